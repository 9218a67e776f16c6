"""Teacher-forced log-likelihood of given answers: ranks choices and measures perplexity.

Each (image, prompt, suffix) row is laid out as in training (`processor.build_prompt`):
image + `<bos>` + prompt + "\\n" attend to each other fully, the suffix and its `<eos>` are
causal, and every suffix token and the `<eos>` is a target. One forward pass per batch of rows,
no decoding.

The vocabulary head is applied only at the target positions: the hidden states there are
gathered first ([B, K, D] -> [B, K, V]), so a 257k vocabulary never makes a [B, T, V] array.
Rows are right-padded to bucketed lengths (T to `bucket`, K to `target_bucket`) and every
batch has `batch_size` rows (dummy rows are masked out), so compiled shapes repeat.
"""

import collections
import concurrent.futures
import dataclasses
import functools
import math
from typing import Iterable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from paligemma_jax import inference
from paligemma_jax import paligemma
from paligemma_jax import processor
from paligemma_jax.tokenizer import Tokenizer

DEFAULT_TARGET_BUCKET = 16  # Target counts (suffix tokens + <eos>) are rounded up to a multiple of this.


@dataclasses.dataclass
class Candidates:
  """An image, a prompt and the suffixes whose likelihood is wanted."""
  image: str
  prompt: str
  suffixes: list
  extra: dict = dataclasses.field(default_factory=dict)  # Carried through to the result.


@dataclasses.dataclass
class Prepared:
  """One example's rows and image, ready for the model, or the reason it is not."""
  candidates: Candidates
  rows: list = dataclasses.field(default_factory=list)  # (tokens, prefix_mask, num_targets) per suffix.
  pixels: np.ndarray | None = None
  image_size: tuple[int, int] | None = None
  error: str | None = None


def suffix_logprobs(model: paligemma.PaliGemma, params, tokens, images, input_mask, prefix_mask,
                    target_pos, target_mask):
  """log p(tokens[b, target_pos[b, k]] | everything before it) -> [B, K] float32, 0 where masked.

  target_pos [B, K] int: positions of the target tokens (>= 1); target_mask [B, K] bool.
  """
  hidden = model.apply({"params": params}, tokens, images, input_mask, prefix_mask, return_hidden=True)
  before = jnp.maximum(target_pos - 1, 0)  # The position whose output predicts the target.
  hidden = jnp.take_along_axis(hidden, before[..., None], axis=1)  # [B, K, D]
  logits = model.apply({"params": params}, hidden, method=lambda m, h: m.llm.logits(h))  # [B, K, V]
  targets = jnp.take_along_axis(tokens, target_pos, axis=1)
  chosen = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  logprobs = chosen - jax.nn.logsumexp(logits, axis=-1)
  return jnp.where(target_mask, logprobs, 0.0)


def collate(rows: list, batch_size: int, bucket: int, target_bucket: int):
  """Right-pads (tokens, prefix_mask, num_targets, pixels) rows to fixed shapes; dummy rows
  repeat row 0 with no targets."""
  length = inference.bucket_length(max(len(r[0]) for r in rows), bucket)
  k = inference.bucket_length(max(r[2] for r in rows), target_bucket)
  tokens = np.zeros((batch_size, length), np.int32)
  input_mask = np.zeros((batch_size, length), bool)
  prefix_mask = np.zeros((batch_size, length), bool)
  target_pos = np.ones((batch_size, k), np.int32)
  target_mask = np.zeros((batch_size, k), bool)
  for i in range(batch_size):
    row_tokens, row_prefix, n_targets, _ = rows[i] if i < len(rows) else rows[0]
    n = len(row_tokens)
    tokens[i, :n], input_mask[i, :n], prefix_mask[i, :n] = row_tokens, True, row_prefix
    if i < len(rows):
      target_pos[i, :n_targets] = np.arange(n - n_targets, n)
      target_mask[i, :n_targets] = True
  pixels = np.stack([(rows[i] if i < len(rows) else rows[0])[3] for i in range(batch_size)])
  return tokens, pixels, input_mask, prefix_mask, target_pos, target_mask


class Scorer:
  """Log-likelihoods of suffixes under a loaded model; reuses compiled shapes across calls."""

  def __init__(self, config: ml_collections.ConfigDict, params, tokenizer: Tokenizer, *,
               batch_size: int = 1, bucket: int = inference.DEFAULT_BUCKET,
               target_bucket: int = DEFAULT_TARGET_BUCKET, num_threads: int = 8):
    self.config, self.params, self.tokenizer = config, params, tokenizer
    self.batch_size, self.bucket, self.target_bucket = batch_size, bucket, target_bucket
    self.num_image_tokens = paligemma.num_image_tokens(config)
    self.max_positions = config.text.get("max_position_embeddings", 8192)
    self.model = paligemma.PaliGemma(config)
    self.logprobs_fn = jax.jit(functools.partial(suffix_logprobs, self.model))
    self._pool = concurrent.futures.ThreadPoolExecutor(num_threads)

  def row(self, prompt: str, suffix: str):
    """(tokens, prefix_mask, number of targets) of one prompt + suffix."""
    tokens, prefix_mask, loss_mask = processor.build_prompt(
        self.tokenizer, prompt, self.num_image_tokens, self.config.image_token_id, suffix=suffix)
    return tokens, prefix_mask, int(loss_mask.sum())

  def prepare(self, candidates: Candidates) -> Prepared:
    """Tokenizes every suffix and decodes the image; runs in the background threads."""
    if not candidates.suffixes:
      return Prepared(candidates, error="no suffixes to score")
    rows = [self.row(candidates.prompt, s) for s in candidates.suffixes]
    longest = max(len(r[0]) for r in rows)
    if inference.bucket_length(longest, self.bucket) > self.max_positions:
      return Prepared(candidates, error=f"prompt + suffix of {longest} tokens exceeds the model's "
                                        f"{self.max_positions} positions")
    try:
      image = processor.load_image(candidates.image)
    except (ValueError, OSError) as e:
      return Prepared(candidates, error=str(e))
    pixels = processor.preprocess_image(image, self.config.vision.image_size)
    return Prepared(candidates, rows, pixels, image.size)

  def logprobs(self, rows: list) -> list:
    """Per-token target log-probs (float32 arrays) of up to batch_size (tokens, prefix_mask,
    num_targets, pixels) rows, in one compiled call."""
    batch = collate(rows, self.batch_size, self.bucket, self.target_bucket)
    out = np.asarray(self.logprobs_fn(self.params, *batch))
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
      rows = [(*e[0].rows[j], e[0].pixels) for e, j in chunk]
      for (entry, j), lp in zip(chunk, self.logprobs(rows)):
        entry[1][j] = lp

    def finished():
      while pending and all(lp is not None for lp in pending[0][1]):
        p, lps = pending.popleft()
        bar.update(1)
        yield self._result(p, lps)

    chunks = inference.chunks(examples, self.batch_size)
    for batch in inference.prefetch(self._pool, self.prepare, chunks):
      for p in batch:
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

  def _result(self, p: Prepared, lps: list) -> dict:
    c = p.candidates
    out = {"image": c.image, "prompt": c.prompt, "suffixes": list(c.suffixes), **c.extra}
    if p.error is not None:
      return {**out, "error": p.error}
    sums = [float(np.sum(lp, dtype=np.float64)) for lp in lps]
    counts = [len(lp) for lp in lps]
    return {**out, "logprob": sums, "mean_logprob": [s / n for s, n in zip(sums, counts)],
            "num_tokens": counts, "choice": int(np.argmax(sums)), "image_size": list(p.image_size)}


def perplexity(logprob_sums, token_counts) -> float:
  """exp(-sum log p / number of tokens) over a corpus of scored suffixes; NaN when empty."""
  n = sum(token_counts)
  return math.exp(-sum(logprob_sums) / n) if n else float("nan")
