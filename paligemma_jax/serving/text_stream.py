"""A request's tokens -> the text its client may see so far (incremental detokenization).

A streamed piece must never be taken back: text that may still turn into a stop string, or an
incomplete UTF-8 character (SentencePiece shows it as U+FFFD), is held back until the next
tokens settle it. The text ends before the first stop string; <eos> is never part of it.
"""

import dataclasses


@dataclasses.dataclass
class TextStream:
  """One request's ids and the text already sent; `push` takes the device's new tokens."""
  detokenize: callable  # ids -> text (the tokenizer's `decode`).
  eos_id: int
  max_tokens: int
  stop: tuple[str, ...] = ()
  ids: list = dataclasses.field(default_factory=list)  # Chosen so far, <eos> excluded.
  text: str = ""  # Sent so far.

  def push(self, tokens) -> tuple[list[int], str, str | None]:
    """New tokens (a request may have chosen more than it needs) -> (the ids it keeps, the new
    text to send, finish: "eos", "stop" (a stop string), "length", or None while running).
    The reasons are generate's (`Generation.row`'s stop_reason) plus "stop"; the server alone
    speaks OpenAI's ("stop" for both <eos> and a stop string)."""
    start, finish, cut = len(self.ids), None, None
    for token in tokens:
      if token == self.eos_id:
        finish = "eos"
        break
      self.ids.append(token)
      if self.stop:
        cut = find_stop(self.detokenize(self.ids), self.stop, len(self.text))
        if cut is not None:
          finish = "stop"
          break
      if len(self.ids) >= self.max_tokens:
        finish = "length"
        break
    text = self.detokenize(self.ids)
    if cut is not None:
      text = text[:cut]
    elif finish is None:
      text = text[:len(text) - held_back(text, self.stop)]
    delta = text[len(self.text):] if text.startswith(self.text) else ""
    self.text += delta
    return self.ids[start:], delta, finish


def find_stop(text: str, stops, sent: int) -> int | None:
  """Where the text must end for the earliest stop string in it, if any (never before `sent`
  characters, which the client already has)."""
  found = [i for i in (text.find(s) for s in stops) if i >= 0]
  return max(min(found), sent) if found else None


def held_back(text: str, stops) -> int:
  """How many trailing characters to hold back while running: an incomplete UTF-8 character
  or the start of a stop string."""
  held = len(text) - len(text.rstrip("\ufffd"))
  for s in stops:
    held = max(held, next((k for k in range(min(len(s) - 1, len(text)), 0, -1)
                           if text.endswith(s[:k])), 0))
  return held
