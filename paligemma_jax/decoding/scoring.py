"""Teacher-forced log-likelihood of given answers: ranks choices and measures perplexity.

Each (image, prompt, suffix) row is laid out as in training (`processor.build_prompt`):
image + `<bos>` + prompt + "\\n" attend to each other fully, the suffix and its `<eos>` are
causal, and every suffix token and the `<eos>` is a target. The image and prompt of an example
run once (`PaliGemma.prefill`, into a KV cache); each of its suffixes then runs on a copy of that
cache (`PaliGemma.extend`), so ranking k answers costs one prompt and k short suffixes, not k
whole rows. No decoding.

The vocabulary head is applied only where a target is predicted ([R, K, V], K suffix slots), so
a 257k vocabulary never makes an array over the prompt. Prompts are right-padded to bucketed
lengths (`bucket`), suffixes to `target_bucket`, and every batch has `batch_size` rows and a
power of two of prompts (dummies are masked out), so compiled shapes repeat.
"""

import collections
import dataclasses
import functools
from typing import Any, Iterable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from paligemma_jax import errors
from paligemma_jax import multihost
from paligemma_jax import sharding
from paligemma_jax.decoding import batching
from paligemma_jax.decoding import core
from paligemma_jax.model import kv_cache
from paligemma_jax.model import paligemma
from paligemma_jax.preprocess import image_fields
from paligemma_jax.preprocess import processor
from paligemma_jax.preprocess.tokenizer import Tokenizer

DEFAULT_TARGET_BUCKET = 16  # Target counts (suffix tokens + <eos>) are rounded up to a multiple of this.


@dataclasses.dataclass
class Candidates:
  """An image (or several: `images`, as `inference.Example` takes them), a prompt and the
  suffixes whose likelihood is wanted."""
  image: Any = None
  prompt: str = ""
  suffixes: list = dataclasses.field(default_factory=list)
  extra: dict = dataclasses.field(default_factory=dict)  # Carried through to the result.
  images: list | None = None

  def sources(self) -> list:
    return image_fields.sources(self.image, self.images)

  def given(self) -> dict:
    return image_fields.fields(self.image, self.images)


def make_setup(config: ml_collections.ConfigDict, mesh=None, cache_dtype=None) -> core.Setup:
  """The setup `suffix_logprobs` takes, for parameters in the layout `config` names."""
  return core.Setup.create(config, scan_layers=config.get("scan_layers", True), mesh=mesh,
                           cache_dtype=cache_dtype)


def suffix_logprobs(setup: core.Setup, params, prompt_tokens, images, prompt_mask,
                    suffix_tokens, suffix_mask, source, image_index=None):
  """log p(suffix_tokens[r, j] | image, prompt, suffix_tokens[r, :j]) -> [R, K] float32, 0 where
  masked.

  prompt_tokens [P, T] int, prompt_mask [P, T] bool: right-padded prompts (image tokens,
    <bos>, prompt, "\\n"), each run once; images [P, S, S, 3], or [M, S, S, 3] with
    image_index [P, K] (several per prompt, see `paligemma`).
  suffix_tokens [R, K] int, suffix_mask [R, K] bool: each row's suffix + <eos>, right-padded.
  source [R] int: the prompt each row continues (its cache row is copied).
  Both KV caches are split over setup.mesh like the batch (sharding.cache_shardings).
  """
  model = setup.model
  last, cache = core.prefill(setup, params, prompt_tokens, prompt_mask, prompt_mask,
                             images=images, image_index=image_index,
                             cache_len=prompt_tokens.shape[1] + suffix_tokens.shape[1])
  # last: [P, V], predicts suffix token 0.
  cache = setup.split_cache(kv_cache.take_rows(cache, source))
  hidden, _ = model.apply({"params": params}, suffix_tokens[:, :-1], cache, method=model.extend)
  rest = model.apply({"params": params}, hidden, method=lambda m, h: m.llm.logits(h))  # [R, K-1, V]
  logits = jnp.concatenate([last[source][:, None], rest], axis=1)  # [R, K, V]
  chosen = jnp.take_along_axis(logits, suffix_tokens[..., None], axis=-1)[..., 0]
  return jnp.where(suffix_mask, chosen - jax.nn.logsumexp(logits, axis=-1), 0.0)


def collate(rows: list, batch_size: int, bucket: int, target_bucket: int):
  """(tokens, prefix_mask, num_targets, pixels: a list, group) rows -> the fixed-shape arguments of
  `suffix_logprobs`. Rows of one group (one example) share one prompt. There are `batch_size`
  rows (dummy rows read prompt 0 with no targets) and a power of two of prompts, at most
  `batch_size` (dummy prompts repeat the first): a few shapes, and little work on dummies
  when each example has several suffixes."""
  prompts = {}  # group -> (prompt index, its row)
  for r in rows:
    prompts.setdefault(r[4], (len(prompts), r))
  num_prompts = min(batch_size, batching.bucketed(len(prompts)))
  length = batching.bucketed(max(int(r[1].sum()) for r in rows), multiple=bucket)
  # At least 2: suffix token 0 is predicted by the prompt, the others by `extend`.
  k = batching.bucketed(max(r[2] for r in rows), multiple=target_bucket, minimum=2)
  firsts = [r for _, r in prompts.values()]
  firsts += firsts[:1] * (num_prompts - len(firsts))
  prompt_tokens, prompt_mask = batching.right_pad([t[:int(m.sum())] for t, m, *_ in firsts], length)
  no_suffix = [np.zeros(0, np.int32)] * (batch_size - len(rows))
  suffix_tokens, suffix_mask = batching.right_pad(
      [t[int(m.sum()):] for t, m, *_ in rows] + no_suffix, k)
  source = np.array([prompts[r[4]][0] for r in rows] + [0] * len(no_suffix), np.int32)
  images, image_index = batching.image_batch([r[3] for r in firsts])
  return prompt_tokens, images, prompt_mask, suffix_tokens, suffix_mask, source, image_index


class Scorer:
  """Log-likelihoods of suffixes under a loaded model; reuses compiled shapes across calls. Takes
  the model in `loading.Model`'s order: `Scorer(*loading.load_model(path), batch_size=8)`.

  mesh (default: the one `params` are sharded over, if any): batches are split over it like the
  generator's (sharding.shard_batch) and results fetched on every host (multihost.fetch).
  cache_dtype: the KV cache's, default the compute dtype; "int8" (core.Setup.create).
  """

  def __init__(self, params, config: ml_collections.ConfigDict, tokenizer: Tokenizer, *,
               batch_size: int = 1, bucket: int = batching.DEFAULT_BUCKET,
               target_bucket: int = DEFAULT_TARGET_BUCKET, num_threads: int = 8, mesh=None,
               cache_dtype=None):
    self.config, self.params, self.tokenizer = config, params, tokenizer
    self.batch_size, self.bucket, self.target_bucket = batch_size, bucket, target_bucket
    self.num_threads = num_threads
    self.num_image_tokens = paligemma.num_image_tokens(config)
    self.max_positions = batching.max_positions(config)
    self.mesh = sharding.mesh_of(params) if mesh is None else mesh
    self.setup = make_setup(config, self.mesh, cache_dtype)
    self.logprobs_fn = jax.jit(functools.partial(suffix_logprobs, self.setup))

  def row(self, prompt: str, suffix: str, num_images: int = 1):
    """(tokens, prefix_mask, number of targets) of one prompt + suffix."""
    tokens, prefix_mask, loss_mask = processor.build_prompt(
        self.tokenizer, prompt, num_images * self.num_image_tokens, self.config.image_token_id,
        suffix=suffix)
    return tokens, prefix_mask, int(loss_mask.sum())

  def prepare(self, candidates: Candidates) -> batching.Prepared:
    """Tokenizes every suffix and loads the images; runs in the background threads."""
    def rows(num_images):
      if not candidates.suffixes:
        raise errors.InputError("no suffixes to score")
      rows = [self.row(candidates.prompt, s, num_images) for s in candidates.suffixes]
      error = batching.length_error(max(len(r[0]) for r in rows), self.max_positions,
                                    bucket=self.bucket, what="prompt + suffix")
      if error:
        raise errors.InputError(error + batching.images_note(num_images, self.num_image_tokens),
                                reason="too long")
      return rows
    return batching.prepare(candidates, rows, self.config.vision.image_size)

  def batch(self, rows: list):
    """The arguments of `suffix_logprobs` for up to batch_size (tokens, prefix_mask,
    num_targets, pixels, group) rows, placed on the mesh if there is one."""
    batch = collate(rows, self.batch_size, self.bucket, self.target_bucket)
    return batch if self.mesh is None else sharding.shard_batch(batch, self.mesh)

  def logprobs(self, rows: list) -> list:
    """Per-token target log-probs (float32 arrays) of up to batch_size rows (see `batch`), in
    one compiled call; rows of one group share a prompt."""
    out = multihost.fetch(self.logprobs_fn(self.params, *self.batch(rows)))  # Any host.
    return [out[i, :r[2]] for i, r in enumerate(rows)]

  def score(self, examples: Iterable[Candidates], *, progress: bool = False,
            total: int | None = None) -> Iterator[dict]:
    """Yields one result per example, in input order: per suffix the summed log-prob, the mean
    per target token and the number of targets, and `choice`, the most likely suffix; or `error`."""
    pending = collections.deque()  # [Prepared, per-suffix log-probs], in input order.
    queue = []  # (entry, suffix index) rows not yet run.
    bar = tqdm.tqdm(total=total, unit="ex", disable=not progress, desc="score")

    def run(n):
      chunk, queue[:] = queue[:n], queue[n:]
      rows = [(*e[0].rows[j], e[0].pixels, id(e)) for e, j in chunk]
      for (entry, j), lp in zip(chunk, self.logprobs(rows)):
        entry[1][j] = lp

    def finished():
      while pending and all(lp is not None for lp in pending[0][1]):
        p, lps = pending.popleft()
        bar.update(1)
        yield self._result(p, lps)

    chunks = batching.chunks(examples, self.batch_size)
    for prepared in batching.prefetch(self.prepare, chunks, self.num_threads):
      for p in prepared:
        entry = (p, [None] * len(p.rows))
        pending.append(entry)
        queue.extend((entry, j) for j in range(len(p.rows)))
      while len(queue) >= self.batch_size:
        run(self.batch_size)
      yield from finished()
    while queue:
      run(self.batch_size)
    yield from finished()
    bar.close()

  def _result(self, p: batching.Prepared, lps: list) -> dict:
    c = p.example
    out = {**c.given(), "prompt": c.prompt, "suffixes": list(c.suffixes), **c.extra}
    if p.error is not None:
      return {**out, "error": p.error}
    sums = [float(np.sum(lp, dtype=np.float64)) for lp in lps]
    counts = [len(lp) for lp in lps]
    return {**out, "logprob": sums, "mean_logprob": [s / n for s, n in zip(sums, counts)],
            "num_tokens": counts, "choice": int(np.argmax(sums)), **p.size_fields()}
