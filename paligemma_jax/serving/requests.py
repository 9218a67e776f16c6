"""What a caller of the serving engine holds: the Request it submits, the Handle it reads Events
from, and the two refusals (QueueFull, Closed). No device, no scheduling: see engine.py."""

import dataclasses
import queue
import time
from typing import Iterator

from paligemma_jax.decoding import sampling


@dataclasses.dataclass(frozen=True)
class Request:
  prompt: str  # The text prompt as generate takes it ("caption en", "detect cat").
  image: bytes  # Encoded image file bytes (PNG, JPEG, ...).
  max_tokens: int = 32
  sampler: sampling.Sampler = sampling.Sampler()  # Greedy by default.
  seed: int = 0
  stop: tuple[str, ...] = ()  # Stop strings; the returned text ends before the first one.


@dataclasses.dataclass
class Event:
  """Streamed to the caller, in order; the last one has a finish_reason."""
  text: str  # New text since the previous event (may be "").
  token_ids: list[int]  # New token ids since the previous event (<eos> never included).
  finish_reason: str | None  # None while running; then "eos", "stop" (a stop string),
  #                            "length", "cancelled" or "error" (server.py: OpenAI's names).
  prompt_tokens: int  # Prompt length in tokens, image tokens included.
  completion_tokens: int  # Tokens generated so far (<eos> not counted).
  error: str | None = None  # Added: why, when finish_reason is "error".
  logprobs: list[float] = dataclasses.field(default_factory=list)  # Added: one per token_ids.


class QueueFull(Exception):
  """submit() while max_queue requests already wait (HTTP 429)."""


class Closed(Exception):
  """Added: submit() after shutdown() began, or after the engine failed (HTTP 503)."""


class Handle:
  """The caller's side of one request: a thread-safe stream of Events."""

  def __init__(self, engine, prompt_tokens: int):
    self.prompt_tokens = prompt_tokens
    self.cancelled = False
    self.submitted = time.monotonic()
    self._engine = engine
    self._events = queue.Queue()
    self._finished = False  # Set by the consumer once it read the finishing event.
    self._result = None

  def events(self, timeout: float | None = None) -> Iterator[Event]:
    """Blocks for each event (queue.Empty -> TimeoutError if none comes within `timeout` s);
    ends after the finishing one. One consumer per handle."""
    while not self._finished:
      try:
        event = self._events.get(timeout=timeout)
      except queue.Empty:
        raise TimeoutError(f"no event within {timeout} s") from None
      self._finished = event.finish_reason is not None
      yield event

  def cancel(self) -> None:
    """The client went away: its row is freed at the next step (finish_reason "cancelled")."""
    self.cancelled = True
    self._engine._notify()

  def result(self, timeout: float | None = None) -> Event:
    """Blocks; the whole text and token_ids, the final finish_reason and counts. Reads the
    events itself: call it instead of `events`, not after (a second call returns the same)."""
    if self._result is None:
      text, ids, logprobs, last = [], [], [], None
      for last in self.events(timeout):
        text.append(last.text)
        ids += last.token_ids
        logprobs += last.logprobs
      self._result = dataclasses.replace(last, text="".join(text), token_ids=ids,
                                         logprobs=logprobs)
    return self._result

  def _put(self, event: Event):
    self._events.put(event)
