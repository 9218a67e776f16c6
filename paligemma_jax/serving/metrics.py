"""What GET /metrics shows (Prometheus text format, prometheus-client): the server's own
counters and histograms, and the engine's `stats()` read at each scrape.

  paligemma_requests_total{status}         answered requests by HTTP status (200, 400, 429, ...)
  paligemma_time_to_first_token_seconds    histogram: request arrival to its first token
  paligemma_time_per_output_token_seconds  histogram: (last - first token time) / (tokens - 1)
  paligemma_request_seconds                histogram: arrival to the last event
  paligemma_{prompt,completion}_tokens_total
  paligemma_output_tokens_per_second       completion tokens over the last `window_s` seconds
  paligemma_engine_<key>                   every number in engine.stats(): queue_depth,
                                           running_slots, slots, image_cache_hits, ...

Each app has its own registry, so several apps (tests) never share a counter.
"""

import collections
import threading
import time

import prometheus_client
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 25, 60, 120)


class _EngineStats(Collector):
  """Reads engine.stats() when scraped: numbers only, as gauges."""

  def __init__(self, engine):
    self.engine = engine

  def collect(self):
    for key, value in sorted(self.engine.stats().items()):
      if isinstance(value, (int, float)) and not isinstance(value, bool):
        yield GaugeMetricFamily(f"paligemma_engine_{key}", f"engine.stats()['{key}']", value=value)


class Metrics:
  """The server's instruments, in one registry; `render()` is the /metrics body."""

  def __init__(self, engine, window_s: float = 10.0):
    self.registry = prometheus_client.CollectorRegistry()
    r = self.registry
    self.requests = prometheus_client.Counter(
        "paligemma_requests", "Answered chat-completion requests by HTTP status.", ["status"],
        registry=r)
    self.ttft = prometheus_client.Histogram(
        "paligemma_time_to_first_token_seconds", "Request arrival to its first generated token.",
        buckets=_LATENCY_BUCKETS, registry=r)
    self.tpot = prometheus_client.Histogram(
        "paligemma_time_per_output_token_seconds", "Time between output tokens of a request.",
        buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5), registry=r)
    self.latency = prometheus_client.Histogram(
        "paligemma_request_seconds", "Request arrival to its last token.",
        buckets=_LATENCY_BUCKETS, registry=r)
    self.prompt_tokens = prometheus_client.Counter(
        "paligemma_prompt_tokens", "Prompt tokens (image tokens included).", registry=r)
    self.completion_tokens = prometheus_client.Counter(
        "paligemma_completion_tokens", "Generated tokens.", registry=r)
    self.tokens_per_second = prometheus_client.Gauge(
        "paligemma_output_tokens_per_second",
        f"Generated tokens per second over the last {window_s:g} s.", registry=r)
    self.tokens_per_second.set_function(self._rate)
    r.register(_EngineStats(engine))
    self.window_s = window_s
    self._recent = collections.deque()  # (time, tokens) of recent events.
    self._lock = threading.Lock()

  def tokens(self, count: int):
    """`count` tokens came out now."""
    if count:
      self.completion_tokens.inc(count)
      with self._lock:
        self._recent.append((time.monotonic(), count))

  def _rate(self) -> float:
    now = time.monotonic()
    with self._lock:
      while self._recent and self._recent[0][0] < now - self.window_s:
        self._recent.popleft()
      return sum(n for _, n in self._recent) / self.window_s

  def finished(self, arrival: float, first: float | None, last: float, completion_tokens: int,
               prompt_tokens: int):
    """One request ended; times are time.monotonic()."""
    self.prompt_tokens.inc(prompt_tokens)
    self.latency.observe(last - arrival)
    if first is not None:
      self.ttft.observe(first - arrival)
      if completion_tokens > 1:
        self.tpot.observe((last - first) / (completion_tokens - 1))

  def render(self) -> tuple[bytes, str]:
    return prometheus_client.generate_latest(self.registry), prometheus_client.CONTENT_TYPE_LATEST
