"""Expected failures: problems with what the user gave, not bugs in this package.

Library code raises `InputError` (or lets an `OSError` such as FileNotFoundError through) for a
bad file, line, flag, config value or request; its message names the thing (a path, `path:line`
or `--flag`). Command-line tools report these as one line and exit 1 (`cli.run`); any other
exception is a bug and keeps its traceback.
"""


class InputError(ValueError):
  """A bad input, named in the message. A ValueError, so callers that expect one still work."""
