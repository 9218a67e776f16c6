"""A continuous-batching engine: many requests share one jitted decode batch (pure JAX, no HTTP).

Event.finish_reason speaks generate's words: "eos" (<eos>, OpenAI's "stop", as server.py
answers it), "stop" (a stop string), "length", "cancelled" (after Handle.cancel or
shutdown(drain=False)) and "error" (the engine thread failed; Event.error says why). Also:
Event.logprobs (one per token id) and top_logprobs (Request.top_logprobs alternatives per token
id), Event.index (the choice, for Request.n > 1), exception Closed (submit after shutdown),
Handle.result(timeout) / results(timeout), Engine.stats() keys requests_finished,
finish_<reason> (per choice), image_cache_entries, prefill_calls, prefilled_prompts,
decode_calls, decode_rows (the rows those computed, summed), error. Sampler(...) itself raises
ValueError for bad values (the server builds it and maps that to a 400). max_prompt_tokens
counts the text tokens (<bos> + prompt + "\n"), not the image tokens; Event.prompt_tokens counts
both.

  submit   validates a Request at once (InputError, QueueFull) and queues it;
  thread   the engine thread owns the device: it prefills queued requests in batches (grouped
           by image count and prompt-length bucket) and INSERTS them into free rows of the
           running decode batch, runs `steps_per_call` decode steps per device call, streams the new
           tokens to each request's Handle and frees its row as soon as its request ends
           (<eos>, a stop string, max_tokens or cancel), to refill it at the next step.
           Each round launches its prefills and chunk before reading the previous round's
           tokens, so the host's copying, detokenizing, stop strings and streaming overlap
           the device's work (`_step`); while rows run, one round prefills at most
           max_prefill_tokens of prompts (`_admit`), so arrivals stall them about one chunk.

A request of n choices is prefilled once; its prompt's cache row and last logits are copied into
n rows, each with its own key: choice i's is fold_in(sampling.seed_key(seed), i), the key
`inference.Predictor` gives example i of a run, so choice 0 is the answer of n=1. It starts when
n rows are free at once (first come, first served: the requests behind it wait too).

A request holds 1 to max_images images (Request.image, or Request.images in prompt order): its
prompt is K * N image tokens (each image's N in order), <bos>, the prompt, "\n", as generate's
with `images`. Each image's features [N, D] come from the image cache (keyed by its bytes) or the
image tower, on its own: a request whose images are all cached runs no image tower, and an image
given twice runs once.

One preallocated KV cache holds every row ([L, rows, max_images * N + max_prompt_tokens +
max_tokens_limit, ...]: sized for the most images, whatever a request holds; int8 with
cache_dtype="int8"); each row keeps its own end, so rows advance independently and rows of
different image counts decode together. A request's result depends on nothing else that runs:
rows never see each other, and its sampler settings, max_tokens and PRNG key
(fold_in(sampling.seed_key(seed), choice), then folded with the step index, as
`autoregressive.Generator` keys its rows) are per-row arrays. Greedy answers equal `generate`'s;
sampled ones equal `generate`'s for a single example with the same seed (choice i: for example i).
Only the float rounding of its log-probs may change with how many rows run beside it (a chunk
computes the rows in use, and its products' shapes move the last bits, as generate's batch
sizes do).

Beside it: requests.py (what a caller holds), image_cache.py (identical images run the image
tower once), text_stream.py (tokens -> the text a client may see, stop strings).

Shapes, hence compiles: prefill batches of 1, 2, 4 .. `rows` rows, for each image count K of
1 .. max_images, prompt text padded to 16, 32, 64 .. max_prompt_tokens tokens after the K * N
image tokens (and for requests with n > 1, each count of choices: 1, 2, 4 .. `rows`); image-tower
batches of 1, 2, 4 .. `rows` images; decode chunks of the first 1, 2, 4 .. `rows` rows (the rows
in use, `_narrow`), each without and with the top log-probs (the latter runs only while some
row asked for top_logprobs); one program moving rows. `warmup` compiles the common ones of one
image (or all of them); shapes of several images compile when first needed.
Multi-host meshes are not supported (one process drives the device).
"""

import collections
from concurrent import futures
import contextlib
import dataclasses
import functools
import logging
import math
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
from paligemma_jax.model import kv_cache
from paligemma_jax.model import paligemma
from paligemma_jax.preprocess import processor
from paligemma_jax.serving.image_cache import ImageCache, image_key
from paligemma_jax.serving.requests import Closed, Event, Handle, QueueFull, Request
from paligemma_jax.serving.text_stream import TextStream

MIN_TEXT_BUCKET = 16  # Prompt text lengths are padded to powers of two from here: few compiles.
DEFAULT_MAX_IMAGES = 4  # Images per request, unless fewer fit the model's positions.
FAILED = "The server failed while running this request."  # Event.error (details in the log).
_DROP = -1  # Placeholder row index of a prefill batch's dummy rows; never written.


@dataclasses.dataclass
class _Live:
  """One request from submit to its last choice's finishing event (host side)."""
  request: Request
  handle: Handle
  tokens: np.ndarray  # [T] int32 prompt tokens (image tokens included).
  prefix_mask: np.ndarray  # [T] bool.
  length_bucket: int  # Padded prompt length of its prefill: its K * N image tokens + text bucket.
  image_keys: list[tuple]  # One per image, in prompt order (K of them).
  choices: list["_Choice"] = dataclasses.field(default_factory=list)  # Request.n of them.
  # Image key -> pixels [S, S, 3], for its images whose features were not cached at submit.
  pixels: dict = dataclasses.field(default_factory=dict)
  features: list = dataclasses.field(default_factory=list)  # Per image: [N, D] once known.

  @property
  def prefill_shape(self) -> tuple[int, int]:
    """(images, padded prompt length): requests alike in both share a prefill."""
    return len(self.image_keys), self.length_bucket

  def ready(self) -> bool:
    return all(f is not None for f in self.features)


@dataclasses.dataclass
class _Choice:
  """One of a request's n samples: its key, its text so far and its row (host side)."""
  live: _Live
  index: int
  key: np.ndarray  # [2] uint32: fold_in(sampling.seed_key(seed), index).
  stream: TextStream
  row: int | None = None  # Its row of the decode batch, once admitted.
  finished: bool = False  # Its finishing event was sent.
  launched: int = 0  # Most tokens the device may have chosen for it in the work launched so far.


@dataclasses.dataclass
class _Launched:
  """A prefill or decode chunk launched on the device and not read yet: its outputs (device
  arrays, one row each) and, per output row, the choice it was launched for (None: padding or
  a free row). Reading them later is what lets the device run while the host streams."""
  choices: list
  tokens: jax.Array  # [R] or [R, steps] int32, -1 where a row chose nothing.
  logprobs: jax.Array  # Same shape.
  top: tuple | None  # (ids, logprobs) [R, (steps,) K], or None when not computed.


def _compile(setup: core.Setup, *, steps: int):
  """The jitted (embed_images, prefill_insert, decode_chunk); they hold no engine or params."""
  top_k = min(sampling.MAX_TOP_LOGPROBS, int(setup.valid.sum()))  # Alternatives computed.

  def embed_images(params, pixels):
    return setup.model.apply({"params": params}, pixels, method=setup.model.embed_image)

  def prefill_insert(params, state: core.State, tokens, features, input_mask, prefix_mask, source,
                     rows, rng, sampler, limit):
    """Prefills B prompts from the features of their K images each, [B * K, N, D] (prompt b's
    are b * K .. b * K + K - 1 in order, which its K * N image tokens take one after the other),
    gives choice c [C] a copy of prompt source[c]'s cache row and logits (source None: C = B,
    choice b is prompt b), and writes the choices into rows `rows` [C] of the running batch
    (rows marked _DROP are padding and are not written); returns (state, first tokens [C], their
    logprobs, top (ids, logprobs) [C, K])."""
    features = features.reshape(tokens.shape[0], -1, features.shape[-1])  # [B, K * N, D]
    logits, cache = core.prefill(setup, params, tokens, input_mask, prefix_mask,
                                 features=features, cache_len=tokens.shape[1])
    if source is not None:  # A prompt with n choices is prefilled once, copied into n rows.
      logits, cache = logits[source], kv_cache.take_rows(cache, source)
    new, logprob = core.start(setup, logits, cache, rng, sampler, limit)
    top = core.top_logprobs(setup, logits, top_k)  # Once per prefill: a small cost beside it.
    rows = jnp.where(rows == _DROP, state.token.shape[0], rows)  # Out of range: dropped.
    state = core.insert(state, rows, new)
    return (state.replace(cache=setup.split_cache(state.cache)), setup.replicate(new.token),
            setup.replicate(logprob), setup.replicate(top))

  def decode_chunk(params, state: core.State, active, top: bool, width: int):
    """`steps` decode steps of every active [W], unfinished row among the first `width` (static;
    the rest are neither computed nor changed) -> (state, tokens [W, steps] with -1 where a
    row chose nothing, their logprobs, and with the static `top` each step's top (ids,
    logprobs) [W, steps, K], else None). Without `top` nothing more is computed."""
    head, narrow = np.arange(width), width < state.token.shape[0]
    full, state = state, core.take(state, head) if narrow else state

    def body(i, carry):
      s, out, out_logprobs, *best = carry
      s, token, logprob, running, chosen_best = core.step(setup, params, s, active,
                                                          top_k if top else 0)
      out = out.at[:, i].set(jnp.where(running, token, -1))
      out_logprobs = out_logprobs.at[:, i].set(jnp.where(running, logprob, 0.0))
      best = [buffer.at[:, i].set(x) for buffer, x in zip(best, chosen_best or ())]
      return (s, out, out_logprobs, *best)

    init = (state, jnp.full((width, steps), -1, jnp.int32),
            jnp.zeros((width, steps), jnp.float32))
    if top:
      init += (jnp.zeros((width, steps, top_k), jnp.int32),
               jnp.zeros((width, steps, top_k), jnp.float32))
    state, out, out_logprobs, *best = jax.lax.fori_loop(0, steps, body, init)
    if narrow:
      state = core.insert(full, head, state)
      state = state.replace(cache=setup.split_cache(state.cache))
    return (state, setup.replicate(out), setup.replicate(out_logprobs),
            setup.replicate(tuple(best)) if top else None)

  def move_rows(state: core.State, source, target):
    """`state` with rows source [M] copied into rows target [M] (out of range: padding)."""
    state = core.insert(state, target, core.take(state, source))
    return state.replace(cache=setup.split_cache(state.cache))

  return (jax.jit(embed_images), jax.jit(prefill_insert, donate_argnums=1),
          jax.jit(decode_chunk, donate_argnums=1, static_argnames=("top", "width")),
          jax.jit(move_rows, donate_argnums=0))


class Engine:
  """Continuous batching over `rows` decode rows of one model; see the module docstring."""

  def __init__(self, model: loading.Model, *, rows: int = 8, max_queue: int = 64,
               steps_per_call: int = 4, max_prompt_tokens: int = 256, max_tokens_limit: int = 256,
               image_cache_size: int = 64, max_images: int | None = None, mesh=None,
               cache_dtype=None, max_prefill_tokens: int | None = None):
    """max_prompt_tokens: text tokens of a prompt (<bos>, prompt, "\\n"; the image tokens are
    not counted). max_images: images per request; every row's cache holds max_images * N image
    tokens + max_prompt_tokens + max_tokens_limit. Default DEFAULT_MAX_IMAGES, or as many as fit
    the model's positions where fewer do (one at 896 px). mesh: default the one model.params are
    sharded over, if any; rows are split over its `data` x `fsdp` axes, the weights stay as
    they are sharded. cache_dtype: the KV cache's, default the compute dtype; "int8" holds about
    twice the rows of a bfloat16 cache (core.Setup.create). max_prefill_tokens: most prompt
    tokens (image tokens included, as padded) prefilled between two decode chunks while rows are
    running; default two one-image prompts of max_prompt_tokens (see `_admit`)."""
    if rows < 1 or rows & (rows - 1):
      raise ValueError(f"rows must be a power of two, got {rows}.")
    if (steps_per_call < 1 or max_prompt_tokens < 1 or max_tokens_limit < 1 or max_queue < 0 or
        (max_images is not None and max_images < 1) or
        (max_prefill_tokens is not None and max_prefill_tokens < 1)):
      raise ValueError("steps_per_call, max_prompt_tokens, max_tokens_limit, max_images and "
                       "max_prefill_tokens must be >= 1.")
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
    positions = batching.max_positions(config)
    text = max_prompt_tokens + max_tokens_limit
    if max_images is None:
      max_images = max(1, min(DEFAULT_MAX_IMAGES, (positions - text) // self.num_image_tokens))
    self.max_images = max_images
    self.max_len = max_images * self.num_image_tokens + text
    self.max_prefill_tokens = max_prefill_tokens or 2 * (
        self.num_image_tokens + self._text_bucket(max_prompt_tokens))
    if self.max_len > positions:
      raise errors.InputError(
          f"{max_images} x {self.num_image_tokens} image (max_images) + {max_prompt_tokens} "
          f"prompt (max_prompt_tokens) + {max_tokens_limit} new tokens (max_tokens_limit) exceed "
          f"the model's {positions} positions.")
    self._embed, self._prefill, self._decode, self._move = _compile(self.setup,
                                                                     steps=steps_per_call)
    # Chunks narrow to the rows in use (`_narrow`) unless the mesh splits the rows: there the
    # first rows sit on the first devices, and a narrowed chunk would move them across.
    self._narrows = self.mesh is None or math.prod(
        self.mesh.shape.get(axis, 1) for axis in sharding.BATCH) == 1
    self._state = self._empty_state()
    # The choice each row decodes for in the next chunk, if any. A row is freed when its choice
    # finishes, or once the launched work will have made all of the choice's max_tokens.
    self._rows: list[_Choice | None] = [None] * rows
    self._launched: list[_Launched] = []  # In launch order; read at the next step.
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
           for f in core.ROW_FIELDS}))

  # Caller side.

  def submit(self, request: Request) -> Handle:
    """Validates synchronously: errors.InputError (one line) for no image, more than max_images,
    an undecodable one (named by its position where there are several), a prompt too long,
    max_tokens < 1 or > max_tokens_limit, n < 1 or > rows, top_logprobs outside
    [0, MAX_TOP_LOGPROBS], a bad sampler, seed or stop; QueueFull when the waiting requests
    would need more than max_queue rows beyond the free ones (n each); Closed after shutdown()
    or a failure."""
    live = self._validate(request)
    with self._wake:
      if self._closing or self._error:
        raise Closed("the engine is shutting down" if self._closing else f"the engine failed: "
                     f"{self._error}")
      # Rows wanted beyond the free ones (these start at the next step).
      waiting = sum(len(l.choices) for l in self._pending) - self._rows.count(None)
      if waiting + request.n > self.max_queue:
        raise QueueFull(f"requests needing {max(waiting, 0)} rows are already waiting")
      self._pending.append(live)
      self._counts["requests_total"] += 1
      self._wake.notify_all()
    return live.handle

  def _validate(self, request: Request) -> _Live:
    if not isinstance(request.prompt, str):
      raise errors.InputError("the prompt must be a string")
    images = request.sources()
    if not all(isinstance(x, (bytes, bytearray)) and x for x in images):
      raise errors.InputError("each image must be non-empty encoded image bytes")
    if len(images) > self.max_images:
      raise errors.InputError(f"the request has {len(images)} images; the limit is "
                              f"{self.max_images} (max_images)")
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
    if not _is_int(request.n) or not 1 <= request.n <= self.num_rows:
      raise errors.InputError(f"n must be an integer in [1, {self.num_rows}] (the engine's rows), "
                              f"got {request.n!r}")
    if not _is_int(request.top_logprobs) or not (
        0 <= request.top_logprobs <= sampling.MAX_TOP_LOGPROBS):
      raise errors.InputError(f"top_logprobs must be an integer in [0, "
                              f"{sampling.MAX_TOP_LOGPROBS}], got {request.top_logprobs!r}")
    try:
      keys = np.asarray(core.row_keys(sampling.seed_key(request.seed), np.arange(request.n)))
    except ValueError as e:
      raise errors.InputError(str(e)) from None
    image_tokens = len(images) * self.num_image_tokens
    tokens, prefix_mask, _ = processor.build_prompt(
        self.tokenizer, request.prompt, image_tokens, self.config.image_token_id)
    text_length = len(tokens) - image_tokens
    if text_length > self.max_prompt_tokens:
      raise errors.InputError(f"the prompt has {text_length} tokens (with <bos> and the final "
                              f"newline); the limit is {self.max_prompt_tokens}")
    bucket = self._text_bucket(text_length) + image_tokens
    live = _Live(request, Handle(self, len(tokens), request.n), tokens, prefix_mask, bucket,
                 [image_key(bytes(x), self.image_size) for x in images])
    live.choices = [_Choice(live, i, key, TextStream(self.tokenizer.decode, self.tokenizer.eos_id,
                                                     request.max_tokens, tuple(request.stop)))
                    for i, key in enumerate(keys)]
    with self._wake:
      live.features = [self._images.get(key) for key in live.image_keys]
    for i, (data, key, features) in enumerate(zip(images, live.image_keys, live.features)):
      if features is None and key not in live.pixels:  # An image twice is decoded once.
        try:  # Decoded here, in the caller's thread, within the decode budget.
          live.pixels[key], _ = processor.load_pixels(bytes(data), self.image_size)
        except errors.InputError as e:
          if len(images) == 1:
            raise
          raise errors.InputError(f"image {i + 1} of {len(images)}: {e}",
                                  reason=e.reason) from None
    return live

  def stats(self) -> dict:
    with self._wake:  # "slots": /metrics' documented names for the rows.
      running = sum(s is not None for s in self._rows)
      return dict(self._counts, queue_depth=len(self._pending), running_slots=running,
                  slots=self.num_rows, image_cache_entries=len(self._images),
                  **{k: self._counts[k] for k in (
                      "requests_total", "requests_finished", "tokens_total", "image_cache_hits",
                      "image_cache_misses", "prefill_calls", "prefilled_prompts",
                      "decode_calls", "decode_rows")},
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
    chunks of every width, prefill + insert of one-image prompts for every batch size of the
    shortest prompt bucket and for one row of every longer bucket (every_shape: every (batch
    size, bucket) pair; the others, and every prompt of several images, compile when first
    needed). Changes no row.

    Ahead of time (lower + compile fills jit's cache) and in threads, as XLA compiles without
    the GIL. The arguments are built as the engine thread builds them (the committed state,
    features indexed out of the tower's output), or the first request would compile again.
    With the persistent compilation cache a restart loads them. What runs: one image-tower
    batch, and the widest narrowed chunk and a row move once with no row active: they copy
    up to half the rows' cache beside the cache, so an engine sized to fill the device's
    memory fails here, at start, rather than when its load first drops."""
    sizes = [1 << i for i in range(self.num_rows.bit_length())]
    s = self.image_size
    pixels = lambda b: np.zeros((b, s, s, 3), np.float32)
    with self._device:
      feature = self._embed(self._params, pixels(1))[0]
      jobs = [functools.partial(self._embed.lower, self._params, pixels(b)) for b in sizes[1:]]
      for width in sizes if self._narrows else sizes[-1:]:
        for top in (False, True):
          jobs.append(functools.partial(self._decode.lower, self._params, self._state,
                                        np.zeros((width,), bool), top=top, width=width))
      if self._narrows and self.num_rows > 1:
        jobs.append(functools.partial(self._move.lower, self._state, *self._no_moves()))
      for b in sizes:
        features = jnp.stack([feature] * b)
        for length in self.text_buckets if every_shape or b == 1 else self.text_buckets[:1]:
          t = length + self.num_image_tokens
          tokens = np.zeros((b, t), np.int32)
          tokens[:, :self.num_image_tokens] = self.config.image_token_id
          mask = np.ones((b, t), bool)
          jobs.append(functools.partial(
              self._prefill.lower, self._params, self._state, tokens, features, mask, mask, None,
              np.full((b,), _DROP, np.int32), np.zeros((b, 2), np.uint32),
              sampling.per_row([sampling.Sampler()] * b), np.ones((b,), np.int32)))
      with futures.ThreadPoolExecutor(max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
        list(pool.map(lambda lower: lower().compile(), jobs))  # Raises what a compile raised.
      if self._narrows and self.num_rows > 1:
        half = self.num_rows // 2
        self._state, *_ = self._decode(self._params, self._state, np.zeros((half,), bool),
                                       top=False, width=half)
        self._state = self._move(self._state, *self._no_moves())
        jax.block_until_ready(self._state)

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
          self._finish_all(live, "cancelled")
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
        for live in self._requests():
          self._finish_all(live, "error", error=FAILED)
        self._pending.clear()
        self._rows = [None] * self.num_rows
        self._launched = []

  def _step(self, wait: bool = True) -> bool:
    """One round: drop cancelled requests, launch the prefill of waiting ones into free rows and
    the next decode chunk, then read what the previous round launched. Waits for work if
    `wait`; False once shut down and idle. (Tests call it directly.)

    The device never waits for the host: JAX dispatch is asynchronous, so this round's chunk is
    launched (on the state the previous chunk will leave) before the previous round's tokens are
    copied out, detokenized, checked for stop strings and streamed; that host work runs while
    the device computes. What it costs: the host learns of an <eos>, a stop string or a cancel
    one chunk late, so such a row decodes one more chunk whose tokens are dropped (`_read` skips
    a finished choice) before its row is refilled. A row that will reach its max_tokens within
    the launched work is refilled without that delay (`_launch_chunk`)."""
    with self._wake:
      if wait:
        self._wake.wait_for(lambda: self._pending or self._closing or self._busy())
      if not self._drain:
        for live in self._requests():
          live.handle.cancelled = True
      self._drop_cancelled()
      if self._closing and not self._pending and not self._busy():
        return False
      admitted = self._admit()
    with self._device:
      previous = len(self._launched)
      if admitted:
        self._prefill_batches(admitted)
      if any(self._rows):
        self._launch_chunk()
      for _ in range(previous):  # The device runs what was just launched meanwhile.
        self._read(self._launched[0])
        del self._launched[0]  # Only once read: a failure fails its choices too (`_run`).
    return True

  def _busy(self) -> bool:
    """Under the lock: a row decodes, or launched work waits to be read."""
    return any(self._rows) or bool(self._launched)

  def _running(self) -> list[_Choice]:
    """Under the lock: the admitted choices not finished yet, in a row or in launched work."""
    found = {id(c): c for c in self._rows if c is not None}
    for launched in self._launched:
      found.update((id(c), c) for c in launched.choices if c is not None)
    return [c for c in found.values() if not c.finished]

  def _requests(self) -> list[_Live]:
    """Under the lock: every request waiting or running, once each."""
    running = {id(c.live): c.live for c in self._running()}
    return [*self._pending, *running.values()]

  def _drop_cancelled(self):
    """Under the lock: finishes cancelled requests, waiting or running (their rows are free)."""
    for live in [l for l in self._pending if l.handle.cancelled]:
      self._pending.remove(live)
      self._finish_all(live, "cancelled")
    for choice in self._running():
      if choice.live.handle.cancelled:
        self._finish(choice, "cancelled")

  def _admit(self) -> list[_Live]:
    """Under the lock: moves waiting requests (first come, first served) into free rows, each
    once it has a row for every choice.

    While rows are running, the prompts admitted in one round hold at most max_prefill_tokens
    (padded, image tokens included; at least one prompt, however long): the running rows wait
    for those prefills, so this bounds how long a burst of arrivals stalls them: by default
    about one decode chunk more at PaliGemma-3B widths on CPU (a one-image prompt's prefill
    costs about 0.6 of a chunk of 4 steps at 8 rows there; measured in docs/serving.md), while
    rows still refill about as fast as short answers free them (a larger bound trades stalls
    for throughput). Interleaving whole prompts is the simplest bound: a prompt cannot be
    prefilled in pieces, since its image tokens and text attend to each other in both
    directions (the prefix-LM mask), and on CPU a batched prefill costs what its prompts cost
    one by one. With
    nothing running there is nobody to stall: every prompt that has rows goes in at once."""
    free = [i for i, s in enumerate(self._rows) if s is None]
    budget = self.max_prefill_tokens if self._busy() else None
    admitted, tokens = [], 0
    while self._pending and len(self._pending[0].choices) <= len(free):
      live = self._pending[0]
      if admitted and budget is not None and tokens + live.length_bucket > budget:
        break
      self._pending.popleft()
      tokens += live.length_bucket
      for choice in live.choices:
        choice.row = free.pop(0)
        self._rows[choice.row] = choice
      admitted.append(live)
    return admitted

  def _image_features(self, admitted: list[_Live]):
    """The features of every admitted request's images: from the cache, else from image-tower
    batches of at most `rows` images (the sizes warmup compiles), each distinct image once."""
    todo = {}  # Image key -> [(request, position of the image in it)].
    with self._wake:
      for live in admitted:
        for i, key in enumerate(live.image_keys):
          if live.features[i] is None:
            live.features[i] = self._images.get(key)
          if live.features[i] is None:
            todo.setdefault(key, []).append((live, i))
          else:
            self._counts["image_cache_hits"] += 1
            live.pixels.pop(key, None)
    keys = list(todo)
    for start in range(0, len(keys), self.num_rows):
      batch = keys[start:start + self.num_rows]
      pixels = [todo[key][0][0].pixels[key] for key in batch]
      pixels += pixels[:1] * (batching.bucketed(len(batch)) - len(batch))
      features = self._embed(self._params, np.stack(pixels))
      with self._wake:
        for i, key in enumerate(batch):
          self._counts["image_cache_misses"] += 1
          self._counts["image_cache_hits"] += len(todo[key]) - 1
          for live, position in todo[key]:
            live.features[position] = features[i]
            live.pixels.pop(key, None)
          self._images.put(key, features[i])

  def _prefill_batches(self, admitted: list[_Live]):
    """Prefills the admitted requests into their rows: per prompt bucket, in batches of
    decreasing powers of two (`_binary_parts`). A failure fails the requests it concerns
    alone, unless the running batch's state was lost with it."""
    with self._failing_alone(admitted):
      self._image_features(admitted)
    groups = collections.defaultdict(list)
    for live in admitted:
      if live.ready():
        groups[live.prefill_shape].append(live)
    for (_, length), group in groups.items():
      for part in _binary_parts(group):
        with self._failing_alone(part):
          self._prefill_group(length, part)

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
          self._finish_all(live, "error", error=FAILED)

  def _prefill_group(self, length: int, group: list[_Live]):
    """Launches one prefill of the group's prompts (as many images each, `length` tokens
    padded; a power of two of them, `_binary_parts`: no dummy prompts); each request's n
    choices start from its one row."""
    tokens, input_mask = batching.right_pad([l.tokens for l in group], length)
    prefix_mask, _ = batching.right_pad([l.prefix_mask for l in group], length, bool)
    choices = [c for l in group for c in l.choices]
    padded = choices + choices[:1] * (batching.bucketed(len(choices)) - len(choices))
    source = None  # Every request has one choice: choice i is prompt i (no copies compiled).
    if len(choices) > len(group):
      source = np.array([i for i, l in enumerate(group) for _ in l.choices] +
                        [0] * (len(padded) - len(choices)), np.int32)
    targets = np.array([c.row for c in choices] + [_DROP] * (len(padded) - len(choices)), np.int32)
    self._state, token, logprob, top = self._prefill(
        self._params, self._state, tokens, jnp.stack([f for l in group for f in l.features]),
        input_mask, prefix_mask, source, targets, np.stack([c.key for c in padded]),
        sampling.per_row([c.live.request.sampler for c in padded]),
        np.array([c.live.request.max_tokens for c in padded], np.int32))
    self._launched.append(_Launched(choices + [None] * (len(padded) - len(choices)), token,
                                    logprob, top))
    with self._wake:
      self._counts["prefill_calls"] += 1
      self._counts["prefilled_prompts"] += len(group)
      for choice in choices:
        self._launch(choice, 1)

  def _launch_chunk(self):
    """Launches a decode chunk of every row that holds a choice: of the first `width` rows only
    (`_narrow`), so that few running requests do not pay for the empty rows."""
    width = self._narrow()
    choices = self._rows[:width]
    active = np.array([c is not None for c in choices])
    top = any(c is not None and c.live.request.top_logprobs > 0 for c in choices)
    self._state, out, logprobs, best = self._decode(self._params, self._state, active, top=top,
                                                    width=width)
    self._launched.append(_Launched(choices, out, logprobs, best))
    with self._wake:
      self._counts["decode_calls"] += 1
      self._counts["decode_rows"] += width
      for choice in filter(None, choices):
        self._launch(choice, self.steps_per_call)

  def _narrow(self) -> int:
    """The next chunk's width: the rows in use, rounded up to a power of two (a compiled
    shape), once any choice in a row at or past it has moved into a free row below it (one
    device call copying those rows; it happens as answers end and fewer rows run).

    Why: a decode step's cost grows with its rows (the KV cache each row reads, and on CPU
    the products: PaliGemma-3B widths step in 92 ms at 1 row, 132 ms at 8, docs/benchmarks.md),
    so one request alone on an 8-row engine, or the last ones draining, would otherwise decode
    at the full batch's cost. Rows are admitted lowest first, so moves are rare. The price: a
    narrowed chunk works on a copy of its rows' cache (at most half the rows; `warmup` claims
    that memory at start), which it reads and writes once a chunk. Not on a mesh that splits
    the rows (`_narrows`). Measured on CPU (docs/serving.md), not yet on an accelerator."""
    used = [i for i, c in enumerate(self._rows) if c is not None]
    width = batching.bucketed(len(used)) if self._narrows else self.num_rows
    moving = [i for i in used if i >= width]
    if moving:  # Then width <= rows / 2: at most rows / 2 moves.
      source, target = self._no_moves()
      free = [i for i in range(width) if self._rows[i] is None]
      with self._wake:
        for k, (old, new) in enumerate(zip(moving, free)):
          source[k], target[k] = old, new
          choice = self._rows[old]
          self._rows[old], self._rows[new], choice.row = None, choice, new
      self._state = self._move(self._state, source, target)
    return width

  def _no_moves(self):
    """(source, target) [rows / 2] for `_move`, every entry padding (dropped)."""
    half = self.num_rows // 2
    return np.zeros((half,), np.int32), np.full((half,), self.num_rows, np.int32)

  def _launch(self, choice: _Choice, tokens: int):
    """Under the lock: the launched work may choose `tokens` more for `choice`; once that covers
    its max_tokens the device finishes it there, so its row is free for the next prefill (which
    the device runs after that work: every call takes the state the previous one returns)."""
    choice.launched += tokens
    if choice.launched >= choice.live.request.max_tokens and self._rows[choice.row] is choice:
      self._rows[choice.row] = None

  def _read(self, launched: _Launched):
    """Copies launched work's tokens to the host (waiting for the device) and streams them to
    the choices they were launched for; a choice that finished meanwhile (a stop string, <eos>
    or a cancel seen in earlier work) takes none."""
    tokens, logprobs = (np.asarray(x).reshape(len(launched.choices), -1)
                        for x in (launched.tokens, launched.logprobs))
    top_ids, top_logprobs = (None, None) if launched.top is None else (
        np.asarray(x).reshape(*tokens.shape, -1) for x in launched.top)
    with self._wake:
      for row, choice in enumerate(launched.choices):
        if choice is not None and not choice.finished:
          chosen = tokens[row] >= 0
          with self._failing_alone([choice.live]):
            self._advance(choice, tokens[row][chosen], logprobs[row][chosen],
                          *((None, None) if top_ids is None else
                            (top_ids[row][chosen], top_logprobs[row][chosen])))

  def _advance(self, choice: _Choice, tokens, logprobs, top_ids=None, top_logprobs=None):
    """Under the lock: takes a choice's new tokens (with their top ids and logprobs [T, K] when
    computed); sends an event; finishes the choice if it ended."""
    new, delta, finish = choice.stream.push(tokens.tolist())
    self._counts["tokens_total"] += len(new)
    k = choice.live.request.top_logprobs
    top = [] if not k or top_ids is None else [
        list(zip(ids[:k].tolist(), values[:k].tolist()))
        for ids, values in zip(top_ids[:len(new)], top_logprobs[:len(new)])]
    self._finish(choice, finish, delta=delta, ids=new, logprobs=logprobs[:len(new)].tolist(),
                 top=top)

  def _finish(self, choice: _Choice, finish: str | None, *, delta: str = "", ids=(),
              logprobs=(), top=(), error: str | None = None):
    """Under the lock: sends one event of a choice; a finishing one also frees its row, and the
    request's last one finishes the request."""
    live = choice.live
    if finish is not None:
      if choice.row is not None and self._rows[choice.row] is choice:
        self._rows[choice.row] = None
      choice.finished = True
      self._counts[f"finish_{finish}"] += 1
      if all(c.finished for c in live.choices):
        self._counts["requests_finished"] += 1
    live.handle._put(Event(delta, list(ids), finish, live.handle.prompt_tokens,
                           len(choice.stream.ids), error, list(logprobs), choice.index, list(top)))

  def _finish_all(self, live: _Live, finish: str, *, error: str | None = None):
    """Under the lock: finishes every choice of a request not finished yet."""
    for choice in live.choices:
      if not choice.finished:
        self._finish(choice, finish, error=error)


def _binary_parts(items: list) -> list[list]:
  """`items` in runs of decreasing powers of two (7 -> 4, 2, 1): batch sizes that compile, none
  padded. A prefill costs about what its rows cost one by one (its products have hundreds of
  tokens a prompt: compute-bound on CPU and accelerators alike), so padding 5 prompts to 8
  would spend three prompts' prefill on nothing; a few more calls cost little beside it."""
  parts, start = [], 0
  while start < len(items):
    size = 1 << ((len(items) - start).bit_length() - 1)
    parts.append(items[start:start + size])
    start += size
  return parts


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)
