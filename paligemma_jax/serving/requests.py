"""What a caller of the serving engine holds: the Request it submits, the Handle it reads Events
from, and the two refusals (QueueFull, Closed). No device, no scheduling: see engine.py."""

import dataclasses
import queue
import time
from typing import Iterator

from paligemma_jax.decoding import sampling
from paligemma_jax.preprocess import image_fields


@dataclasses.dataclass(frozen=True)
class Request:
  """One prompt about one image (`image`) or several (`images`, in the order the prompt reads
  them), as `inference.Example` takes them: Request(prompt, image) or Request(prompt,
  images=(a, b)); each is encoded image file bytes (PNG, JPEG, ...)."""
  prompt: str  # The text prompt as generate takes it ("caption en", "detect cat").
  image: bytes | None = None
  max_tokens: int = 32
  sampler: sampling.Sampler = sampling.Sampler()  # Greedy by default.
  seed: int = 0
  stop: tuple[str, ...] = ()  # Stop strings; the returned text ends before the first one.
  n: int = 1  # Choices: samples of the prompt, one prefill, each in its own row with its own key.
  top_logprobs: int = 0  # Alternatives per token in Event.top_logprobs (0..MAX_TOP_LOGPROBS).
  images: tuple[bytes, ...] | None = None  # In place of `image`: several, in prompt order.

  def sources(self) -> list:
    """The images in order; an errors.InputError where there is none, or both fields."""
    return image_fields.sources(self.image, self.images)


@dataclasses.dataclass
class Event:
  """Streamed to the caller, in order for each choice; a choice's last one has a finish_reason."""
  text: str  # New text since the previous event (may be "").
  token_ids: list[int]  # New token ids since the previous event (<eos> never included).
  finish_reason: str | None  # None while running; then "eos", "stop" (a stop string),
  #                            "length", "cancelled" or "error" (server.py: OpenAI's names).
  prompt_tokens: int  # Prompt length in tokens, image tokens included.
  completion_tokens: int  # Tokens this choice generated so far (<eos> not counted).
  error: str | None = None  # Added: why, when finish_reason is "error".
  logprobs: list[float] = dataclasses.field(default_factory=list)  # Added: one per token_ids.
  index: int = 0  # Added: the choice (0 .. n-1).
  # Added: one per token_ids when Request.top_logprobs > 0: the request's top_logprobs most
  # likely (id, logprob) pairs at that step, most likely first (`core.top_logprobs`).
  top_logprobs: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)


class QueueFull(Exception):
  """submit() while max_queue requests already wait (HTTP 429)."""


class Closed(Exception):
  """Added: submit() after shutdown() began, or after the engine failed (HTTP 503)."""


class Handle:
  """The caller's side of one request: a thread-safe stream of Events (of its n choices)."""

  def __init__(self, engine, prompt_tokens: int, n: int = 1):
    self.prompt_tokens, self.n = prompt_tokens, n
    self.cancelled = False
    self.submitted = time.monotonic()
    self._engine = engine
    self._events = queue.Queue()
    self._unfinished = n  # Choices whose finishing event the consumer has not read.
    self._results = None

  def events(self, timeout: float | None = None) -> Iterator[Event]:
    """Blocks for each event (queue.Empty -> TimeoutError if none comes within `timeout` s);
    ends after every choice's finishing one. One consumer per handle."""
    while self._unfinished:
      try:
        event = self._events.get(timeout=timeout)
      except queue.Empty:
        raise TimeoutError(f"no event within {timeout} s") from None
      self._unfinished -= event.finish_reason is not None
      yield event

  def cancel(self) -> None:
    """The client went away: its rows are freed at the next step (finish_reason "cancelled")."""
    self.cancelled = True
    self._engine._notify()

  def results(self, timeout: float | None = None) -> list[Event]:
    """Blocks; per choice (by index) the whole text, token_ids, logprobs and top_logprobs, its
    final finish_reason and counts. Reads the events itself: call it instead of `events`, not
    after (a second call returns the same)."""
    if self._results is None:
      merged = {}
      for event in self.events(timeout):
        last = merged.get(event.index)
        merged[event.index] = event if last is None else dataclasses.replace(
            event, text=last.text + event.text, token_ids=last.token_ids + event.token_ids,
            logprobs=last.logprobs + event.logprobs,
            top_logprobs=last.top_logprobs + event.top_logprobs)
      self._results = [merged[i] for i in sorted(merged)]
    return self._results

  def result(self, timeout: float | None = None) -> Event:
    """`results(timeout)`'s one choice, for a request of n=1."""
    if self.n != 1:
      raise ValueError(f"this request has {self.n} choices: read them with results()")
    return self.results(timeout)[0]

  def _put(self, event: Event):
    self._events.put(event)
