"""A continuous-batching engine: many requests share one jitted decode batch (pure JAX, no HTTP).

Event.finish_reason speaks generate's words: "eos" (<eos>, OpenAI's "stop", as server.py
answers it), "stop" (a stop string), "length", "cancelled" (after Handle.cancel or
shutdown(drain=False)) and "error" (the engine thread failed; Event.error says why). Also:
Event.logprobs (one per token id), exception Closed (submit after shutdown),
Handle.result(timeout), Engine.stats() keys requests_finished, finish_<reason>,
image_cache_entries, prefill_calls, decode_calls, error. Sampler(...) itself raises ValueError
for bad values (the server builds it and maps that to a 400). max_prompt_tokens counts the text
tokens (<bos> + prompt + "\n"), not the image tokens; Event.prompt_tokens counts both.

  submit   validates a Request at once (InputError, QueueFull) and queues it;
  thread   the engine thread owns the device: it prefills queued requests in batches (grouped
           by prompt-length bucket) and INSERTS them into free rows of the running
           decode batch, runs `steps_per_call` decode steps per device call, streams the new
           tokens to each request's Handle and frees its row as soon as its request ends
           (<eos>, a stop string, max_tokens or cancel), to refill it at the next step.

One preallocated KV cache holds every row ([L, rows, image + prompt + max_tokens_limit, ...];
int8 with cache_dtype="int8"); each row keeps its own end, so rows advance independently. A request's result depends on
nothing else that runs: rows never see each other, and its sampler settings, max_tokens and PRNG
key (fold_in(sampling.seed_key(seed), 0), then folded with the step index, as `autoregressive.Generator`
keys row 0) are per-row arrays. Greedy answers equal `generate`'s; sampled ones equal `generate`'s for a
single example with the same seed.

Beside it: requests.py (what a caller holds), image_cache.py (identical images run the image
tower once), text_stream.py (tokens -> the text a client may see, stop strings).

Shapes, hence compiles: prefill batches of 1, 2, 4 .. `rows` rows, prompt text padded to 16, 32,
64 .. max_prompt_tokens tokens; one decode chunk. `warmup` compiles the common ones (or all).
Multi-host meshes are not supported (one process drives the device).
"""

import collections
from concurrent import futures
import contextlib
import dataclasses
import functools
import logging
import os
import threading

import jax
import jax.numpy as jnp
import numpy as np

from paligemma_jax import errors
from paligemma_jax import sharding
from paligemma_jax.checkpoints import loading
from paligemma_jax.decoding import batching
from paligemma_jax.decoding import core
from paligemma_jax.decoding import sampling
from paligemma_jax.model import paligemma
from paligemma_jax.preprocess import processor
from paligemma_jax.serving.image_cache import ImageCache, image_key
from paligemma_jax.serving.requests import Closed, Event, Handle, QueueFull, Request
from paligemma_jax.serving.text_stream import TextStream

MIN_TEXT_BUCKET = 16  # Prompt text lengths are padded to powers of two from here: few compiles.
FAILED = "The server failed while running this request."  # Event.error (details in the log).
_DROP = -1  # Placeholder row index of a prefill batch's dummy rows; never written.


@dataclasses.dataclass
class _Live:
  """One request from submit to its finishing event (host side)."""
  request: Request
  handle: Handle
  tokens: np.ndarray  # [T] int32 prompt tokens (image tokens included).
  prefix_mask: np.ndarray  # [T] bool.
  length_bucket: int  # Padded prompt length of its prefill.
  key: np.ndarray  # [2] uint32: fold_in(sampling.seed_key(seed), 0).
  image_key: tuple
  stream: TextStream
  pixels: np.ndarray | None = None  # Only when its image features were not cached at submit.
  features: jax.Array | None = None  # [N, D] once known.
  row: int | None = None  # Its row of the decode batch, once admitted.


def _compile(setup: core.Setup, *, steps: int):
  """The jitted (embed_images, prefill_insert, decode_chunk); they hold no engine or params."""

  def embed_images(params, pixels):
    return setup.model.apply({"params": params}, pixels, method=setup.model.embed_image)

  def prefill_insert(params, state: core.State, tokens, features, input_mask, prefix_mask, rows,
                     rng, sampler, limit):
    """Prefills B prompts from their image features and writes them into rows `rows` [B] of
    the running batch (rows marked _DROP are padding and are not written); returns (state,
    first tokens, their logprobs)."""
    logits, cache = core.prefill(setup, params, tokens, input_mask, prefix_mask,
                                 features=features, cache_len=tokens.shape[1])
    new, logprob = core.start(setup, logits, cache, rng, sampler, limit)
    rows = jnp.where(rows == _DROP, state.token.shape[0], rows)  # Out of range: dropped.
    state = core.insert(state, rows, new)
    return (state.replace(cache=setup.split_cache(state.cache)), setup.replicate(new.token),
            setup.replicate(logprob))

  def decode_chunk(params, state: core.State, active):
    """`steps` decode steps of every active, unfinished row -> (state, tokens [S, steps] with
    -1 where a row chose nothing, their logprobs)."""
    num_rows = state.token.shape[0]

    def body(i, carry):
      s, out, out_logprobs = carry
      s, token, logprob, running = core.step(setup, params, s, active)
      out = out.at[:, i].set(jnp.where(running, token, -1))
      out_logprobs = out_logprobs.at[:, i].set(jnp.where(running, logprob, 0.0))
      return s, out, out_logprobs

    init = (state, jnp.full((num_rows, steps), -1, jnp.int32),
            jnp.zeros((num_rows, steps), jnp.float32))
    state, out, out_logprobs = jax.lax.fori_loop(0, steps, body, init)
    return state, setup.replicate(out), setup.replicate(out_logprobs)

  return (jax.jit(embed_images), jax.jit(prefill_insert, donate_argnums=1),
          jax.jit(decode_chunk, donate_argnums=1))


class Engine:
  """Continuous batching over `rows` decode rows of one model; see the module docstring."""

  def __init__(self, model: loading.Model, *, rows: int = 8, max_queue: int = 64,
               steps_per_call: int = 4, max_prompt_tokens: int = 256, max_tokens_limit: int = 256,
               image_cache_size: int = 64, mesh=None, cache_dtype=None):
    """max_prompt_tokens: text tokens of a prompt (<bos>, prompt, "\\n"; the image tokens are
    not counted). mesh: default the one model.params are sharded over, if any; rows are split
    over its `data` x `fsdp` axes, the weights stay as they are sharded. cache_dtype: the KV
    cache's, default the compute dtype; "int8" holds about twice the rows of a bfloat16 cache
    (core.Setup.create)."""
    if rows < 1 or rows & (rows - 1):
      raise ValueError(f"rows must be a power of two, got {rows}.")
    if steps_per_call < 1 or max_prompt_tokens < 1 or max_tokens_limit < 1 or max_queue < 0:
      raise ValueError("steps_per_call, max_prompt_tokens and max_tokens_limit must be >= 1.")
    params, config, self.tokenizer = model
    self.vocab_size = self.tokenizer.vocab_size
    self.num_rows, self.max_queue, self.steps_per_call = rows, max_queue, steps_per_call
    self.max_prompt_tokens, self.max_tokens_limit = max_prompt_tokens, max_tokens_limit
    self.image_cache_size = image_cache_size
    self.setup = core.Setup.create(
        config, eos_id=self.tokenizer.eos_id, pad_id=self.tokenizer.pad_id,
        vocab_size=self.vocab_size, mesh=sharding.mesh_of(params) if mesh is None else mesh,
        cache_dtype=cache_dtype)
    self.config, self.mesh = self.setup.config, self.setup.mesh
    self._params = self.setup.decoding_layout(params)
    self.image_size = config.vision.image_size
    self.num_image_tokens = paligemma.num_image_tokens(config)
    self.text_buckets = sorted({self._text_bucket(n) for n in range(1, max_prompt_tokens + 1)})
    self.max_len = self.num_image_tokens + max_prompt_tokens + max_tokens_limit
    positions = batching.max_positions(config)
    if self.max_len > positions:
      raise errors.InputError(
          f"{self.num_image_tokens} image + {max_prompt_tokens} prompt (max_prompt_tokens) + "
          f"{max_tokens_limit} new tokens (max_tokens_limit) exceed the model's {positions} "
          "positions.")
    self._embed, self._prefill, self._decode = _compile(self.setup, steps=steps_per_call)
    self._state = self._empty_state()
    self._rows: list[_Live | None] = [None] * rows  # The request in each row, if any.
    self._pending: collections.deque[_Live] = collections.deque()
    self._images = ImageCache(image_cache_size)
    self._wake = threading.Condition()
    self._device = threading.Lock()  # Held while the state is in use (steps, warmup).
    self._thread = None
    self._closing = False
    self._drain = True
    self._error = None
    self._counts = collections.Counter()

  def _text_bucket(self, length: int) -> int:
    return batching.bucketed(length, minimum=MIN_TEXT_BUCKET, maximum=self.max_prompt_tokens)

  def _empty_state(self) -> core.State:
    s = self.num_rows
    zeros = np.zeros((s,), np.int32)
    state = core.State(cache=self.setup.init_cache(s, self.max_len), token=zeros, step=zeros,
                       limit=zeros, done=np.ones((s,), bool), rng=np.zeros((s, 2), np.uint32),
                       sampler=sampling.per_row([sampling.Sampler()] * s))
    if self.mesh is None:  # Committed, as every state a jitted step returns: else the second
      return jax.device_put(state, jax.devices()[0])  # request's arguments differ: a recompile.
    return jax.device_put(state, core.State(
        cache=sharding.cache_shardings(state.cache, self.mesh),
        **{f: jax.tree.map(lambda x: sharding.batch_sharding(x.shape, self.mesh), getattr(state, f))
           for f in ("token", "step", "limit", "done", "rng", "sampler")}))

  # Caller side.

  def submit(self, request: Request) -> Handle:
    """Validates synchronously: errors.InputError (one line) for an undecodable image, a prompt
    too long, max_tokens < 1 or > max_tokens_limit, a bad sampler, seed or stop; QueueFull when
    max_queue requests wait; Closed after shutdown() or a failure."""
    live = self._validate(request)
    with self._wake:
      if self._closing or self._error:
        raise Closed("the engine is shutting down" if self._closing else f"the engine failed: "
                     f"{self._error}")
      waiting = len(self._pending) - self._rows.count(None)  # The rest start at the next step.
      if waiting >= self.max_queue:
        raise QueueFull(f"{waiting} requests are already waiting")
      self._pending.append(live)
      self._counts["requests_total"] += 1
      self._wake.notify_all()
    return live.handle

  def _validate(self, request: Request) -> _Live:
    if not isinstance(request.prompt, str):
      raise errors.InputError("the prompt must be a string")
    if not isinstance(request.image, (bytes, bytearray)) or not request.image:
      raise errors.InputError("the image must be non-empty encoded image bytes")
    if not isinstance(request.max_tokens, int) or not 1 <= request.max_tokens <= self.max_tokens_limit:
      raise errors.InputError(f"max_tokens must be an integer in [1, {self.max_tokens_limit}], got "
                              f"{request.max_tokens!r}")
    if not isinstance(request.sampler, sampling.Sampler):
      raise errors.InputError("sampler must be a sampling.Sampler")
    if not (isinstance(request.stop, (tuple, list)) and
            all(isinstance(s, str) and s for s in request.stop)):
      raise errors.InputError("stop must be a list of non-empty strings")
    if request.sampler.method == "top_k" and request.sampler.top_k > self.vocab_size:
      raise errors.InputError(f"top_k must be at most the vocabulary ({self.vocab_size}), got "
                              f"{request.sampler.top_k}")
    try:
      key = np.asarray(core.row_keys(sampling.seed_key(request.seed), [0])[0])
    except ValueError as e:
      raise errors.InputError(str(e)) from None
    tokens, prefix_mask, _ = processor.build_prompt(
        self.tokenizer, request.prompt, self.num_image_tokens, self.config.image_token_id)
    text_length = len(tokens) - self.num_image_tokens
    if text_length > self.max_prompt_tokens:
      raise errors.InputError(f"the prompt has {text_length} tokens (with <bos> and the final "
                              f"newline); the limit is {self.max_prompt_tokens}")
    bucket = self._text_bucket(text_length) + self.num_image_tokens
    stream = TextStream(self.tokenizer.decode, self.tokenizer.eos_id, request.max_tokens,
                        tuple(request.stop))
    live = _Live(request, Handle(self, len(tokens)), tokens, prefix_mask, bucket, key,
                 image_key(request.image, self.image_size), stream)
    with self._wake:
      live.features = self._images.get(live.image_key)
    if live.features is None:  # Decoded here, in the caller's thread, within the decode budget.
      live.pixels, _ = processor.load_pixels(bytes(request.image), self.image_size)
    return live

  def stats(self) -> dict:
    with self._wake:  # "slots": /metrics' documented names for the rows.
      running = sum(s is not None for s in self._rows)
      return dict(self._counts, queue_depth=len(self._pending), running_slots=running,
                  slots=self.num_rows, image_cache_entries=len(self._images),
                  **{k: self._counts[k] for k in (
                      "requests_total", "requests_finished", "tokens_total", "image_cache_hits",
                      "image_cache_misses", "prefill_calls", "decode_calls")},
                  error=self._error)

  # Lifecycle.

  def start(self) -> None:
    """Starts the background thread that owns the device."""
    with self._wake:
      if self._thread is None:
        self._thread = threading.Thread(target=self._run, name="paligemma-engine", daemon=True)
        self._thread.start()

  def warmup(self, every_shape: bool = False) -> None:
    """Compiles what most traffic needs: the image tower for every image batch size, the decode
    chunk, prefill + insert for every batch size of the shortest prompt bucket and for one row of
    every longer bucket (every_shape: every (batch size, bucket) pair; the others compile when
    first needed). Changes no row.

    Ahead of time (lower + compile fills jit's cache) and in threads, as XLA compiles without
    the GIL; nothing runs but one image-tower batch. The arguments are built as the engine thread
    builds them (the committed state, features indexed out of the tower's output), or the first
    request would compile again. With the persistent compilation cache a restart loads them."""
    sizes = [1 << i for i in range(self.num_rows.bit_length())]
    s = self.image_size
    pixels = lambda b: np.zeros((b, s, s, 3), np.float32)
    with self._device:
      feature = self._embed(self._params, pixels(1))[0]
      jobs = [functools.partial(self._embed.lower, self._params, pixels(b)) for b in sizes[1:]]
      jobs.append(functools.partial(self._decode.lower, self._params, self._state,
                                    np.zeros((self.num_rows,), bool)))
      for b in sizes:
        features = jnp.stack([feature] * b)
        for length in self.text_buckets if every_shape or b == 1 else self.text_buckets[:1]:
          t = length + self.num_image_tokens
          tokens = np.zeros((b, t), np.int32)
          tokens[:, :self.num_image_tokens] = self.config.image_token_id
          mask = np.ones((b, t), bool)
          jobs.append(functools.partial(
              self._prefill.lower, self._params, self._state, tokens, features, mask, mask,
              np.full((b,), _DROP, np.int32), np.zeros((b, 2), np.uint32),
              sampling.per_row([sampling.Sampler()] * b), np.ones((b,), np.int32)))
      with futures.ThreadPoolExecutor(max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
        list(pool.map(lambda lower: lower().compile(), jobs))  # Raises what a compile raised.

  def shutdown(self, drain: bool = True) -> None:
    """Stops accepting; drain=True finishes what runs and what waits, False cancels it. Returns
    when the engine thread has ended."""
    with self._wake:
      self._closing = True
      self._drain = self._drain and drain
      self._wake.notify_all()
      thread = self._thread
    if thread is None:  # Never started: nothing will run what waits.
      with self._wake:
        for live in self._pending:
          self._finish(live, "cancelled")
        self._pending.clear()
      return
    thread.join()

  def _notify(self):
    with self._wake:
      self._wake.notify_all()

  # The engine thread.

  def health(self) -> str | None:
    """Why the engine cannot serve (it failed, or its thread ended without a shutdown), or None.
    The server's /health answers 503 with it, so a supervisor restarts the process."""
    with self._wake:
      if self._error:
        return f"the engine failed: {self._error}"
      if self._thread is not None and not self._thread.is_alive() and not self._closing:
        return "the engine thread has stopped"
    return None

  def _run(self):
    try:
      while self._step():
        pass
    except BaseException as e:  # A bug or a device failure: fail every request, never hang one.
      logging.exception("serving engine failed")
      with self._wake:
        self._error = f"{type(e).__name__}: {e}"
        for live in [*self._pending, *filter(None, self._rows)]:
          self._finish(live, "error", error=FAILED)
        self._pending.clear()
        self._rows = [None] * self.num_rows

  def _step(self, wait: bool = True) -> bool:
    """One round: drop cancelled requests, prefill waiting ones into free rows, run one decode
    chunk. Waits for work if `wait`; False once shut down and idle. (Tests call it directly.)"""
    with self._wake:
      if wait:
        self._wake.wait_for(lambda: self._pending or self._closing or any(self._rows))
      if not self._drain:
        for live in [*self._pending, *filter(None, self._rows)]:
          live.handle.cancelled = True
      self._drop_cancelled()
      if self._closing and not self._pending and not any(self._rows):
        return False
      admitted = self._admit()
    with self._device:
      if admitted:
        self._prefill_batches(admitted)
      if any(self._rows):
        self._decode_chunk()
    return True

  def _drop_cancelled(self):
    """Under the lock: finishes cancelled requests, waiting or running (their row is free)."""
    for live in [l for l in self._pending if l.handle.cancelled]:
      self._pending.remove(live)
      self._finish(live, "cancelled")
    for live in filter(None, list(self._rows)):
      if live.handle.cancelled:
        self._finish(live, "cancelled")

  def _admit(self) -> list[_Live]:
    """Under the lock: moves waiting requests (first come, first served) into free rows."""
    free = [i for i, s in enumerate(self._rows) if s is None]
    admitted = []
    while free and self._pending:
      live = self._pending.popleft()
      live.row = free.pop(0)
      self._rows[live.row] = live
      admitted.append(live)
    return admitted

  def _image_features(self, admitted: list[_Live]):
    """Features for every admitted request: from the cache, else from one image-tower batch."""
    todo = {}
    for live in admitted:
      with self._wake:
        if live.features is None:
          live.features = self._images.get(live.image_key)
        if live.features is None:
          todo.setdefault(live.image_key, []).append(live)
        else:
          self._counts["image_cache_hits"] += 1
    if not todo:
      return
    keys = list(todo)
    pixels = [todo[k][0].pixels for k in keys]
    pixels += pixels[:1] * (batching.bucketed(len(keys)) - len(keys))
    features = self._embed(self._params, np.stack(pixels))
    with self._wake:
      for i, key in enumerate(keys):
        self._counts["image_cache_misses"] += 1
        self._counts["image_cache_hits"] += len(todo[key]) - 1
        for live in todo[key]:
          live.features, live.pixels = features[i], None
        self._images.put(key, features[i])

  def _prefill_batches(self, admitted: list[_Live]):
    """Prefills the admitted requests, one batch per prompt bucket, into their rows. A failure
    fails the requests it concerns alone, unless the running batch's state was lost with it."""
    with self._failing_alone(admitted):
      self._image_features(admitted)
    groups = collections.defaultdict(list)
    for live in admitted:
      if live.features is not None:
        groups[live.length_bucket].append(live)
    for length, group in groups.items():
      with self._failing_alone(group):
        self._prefill_group(length, group)

  @contextlib.contextmanager
  def _failing_alone(self, group: list[_Live]):
    """Within it, an exception finishes `group` with "error" and the engine goes on, as long as
    the device state is whole (a failed call that had consumed the donated state is fatal)."""
    try:
      yield
    except Exception:
      if any(x.is_deleted() for x in jax.tree.leaves(self._state) if isinstance(x, jax.Array)):
        raise
      logging.exception("serving engine: %d request(s) failed", len(group))
      with self._wake:
        for live in group:
          if live.row is not None and self._rows[live.row] is live:
            self._finish(live, "error", error=FAILED)

  def _prefill_group(self, length: int, group: list[_Live]):
    rows = group + group[:1] * (batching.bucketed(len(group)) - len(group))
    tokens, input_mask = batching.right_pad([l.tokens for l in rows], length)
    prefix_mask, _ = batching.right_pad([l.prefix_mask for l in rows], length, bool)
    targets = np.array([l.row for l in group] + [_DROP] * (len(rows) - len(group)), np.int32)
    self._state, token, logprob = self._prefill(
        self._params, self._state, tokens, jnp.stack([l.features for l in rows]), input_mask,
        prefix_mask, targets, np.stack([l.key for l in rows]),
        sampling.per_row([l.request.sampler for l in rows]),
        np.array([l.request.max_tokens for l in rows], np.int32))
    self._counts["prefill_calls"] += 1
    token, logprob = np.asarray(token), np.asarray(logprob)
    with self._wake:
      for i, live in enumerate(group):
        with self._failing_alone([live]):
          self._advance(live, token[i:i + 1], logprob[i:i + 1])

  def _decode_chunk(self):
    active = np.array([s is not None for s in self._rows])
    self._state, out, logprobs = self._decode(self._params, self._state, active)
    out, logprobs = np.asarray(out), np.asarray(logprobs)
    self._counts["decode_calls"] += 1
    with self._wake:
      for row, live in enumerate(self._rows):
        if live is not None and active[row]:
          chosen = out[row] >= 0
          with self._failing_alone([live]):
            self._advance(live, out[row][chosen], logprobs[row][chosen])

  def _advance(self, live: _Live, tokens, logprobs):
    """Under the lock: takes a request's new tokens; sends an event; finishes it if it ended."""
    new, delta, finish = live.stream.push(tokens.tolist())
    self._counts["tokens_total"] += len(new)
    self._finish(live, finish, delta=delta, ids=new, logprobs=logprobs[:len(new)].tolist())

  def _finish(self, live: _Live, finish: str | None, *, delta: str = "", ids=(), logprobs=(),
              error: str | None = None):
    """Under the lock: sends one event; a finishing one also frees the request's row."""
    if finish is not None:
      if live.row is not None and self._rows[live.row] is live:
        self._rows[live.row] = None
      self._counts["requests_finished"] += 1
      self._counts[f"finish_{finish}"] += 1
    live.handle._put(Event(delta, list(ids), finish, live.handle.prompt_tokens,
                           len(live.stream.ids), error, list(logprobs)))
