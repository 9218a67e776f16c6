"""Expected failures: problems with what the user gave, not bugs in this package.

Library code raises `InputError` (or lets an `OSError` such as FileNotFoundError through) for a
bad file, line, flag, config value or request; its message names the thing (a path, `path:line`
or `--flag`). Command-line tools report these as one line and exit 1 (`cli.run`); any other
exception is a bug and keeps its traceback.
"""


class InputError(ValueError):
  """A bad input, named in the message. A ValueError, so callers that expect one still work.

  param: the setting at fault, where there is one (the server's 400 names it in `param`).
  reason: a short category for summaries (evaluate counts the lines it skips by it), so that no
  caller sorts errors by parsing their messages.
  """

  def __init__(self, message: str, *, param: str | None = None, reason: str | None = None):
    super().__init__(message)
    self.param, self.reason = param, reason


class Message(str):
  """An error message kept in a result (a result line's "error", a JSON string as any other),
  with the reason of the InputError it came from."""
  reason: str | None

  def __new__(cls, text: str, reason: str | None = None):
    message = super().__new__(cls, text)
    message.reason = reason
    return message


def message(error: BaseException) -> Message:
  return Message(str(error), getattr(error, "reason", None))


def reason(error: str) -> str:
  """The short category of an error message for a summary; the message itself if it has none."""
  return getattr(error, "reason", None) or error
