"""From (image path, prompt) examples to answers: the path every entry point shares.

  load + preprocess images (background threads, one batch ahead of the model) -> build prompt
  tokens -> right-pad into fixed-shape batches (prompt length rounded up to a bucket, last batch
  padded with dummy rows) -> Decoder.generate -> detokenize.

An example that cannot be prepared (missing or corrupt image) gets an `error` instead of an
answer; the others in its batch run as usual.
"""

import concurrent.futures
import dataclasses
import os
from typing import Iterable, Iterator

import jax
import ml_collections
import numpy as np
import tqdm

from paligemma_jax import checkpoint
from paligemma_jax import decode
from paligemma_jax import hf
from paligemma_jax import paligemma
from paligemma_jax import processor
from paligemma_jax import sampling
from paligemma_jax import sharding
from paligemma_jax.tokenizer import Tokenizer

DEFAULT_BUCKET = 32  # Prompt lengths are rounded up to a multiple of this: one compile per bucket.


def default_dtype() -> str:
  """float32 on CPU (XLA's CPU bfloat16 matrix-vector products are ~30x slower), else bfloat16."""
  return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def load_model(path: str, dtype: str | None = None, config: ml_collections.ConfigDict | None = None,
               mesh=None):
  """(params, config, tokenizer) from a converted checkpoint or a Hugging Face directory.

  `dtype` (default: `default_dtype()`) becomes both the parameter and the compute dtype.
  `config` replaces the stored config (e.g. to turn the sliding window off); its parameter
  shapes must match the checkpoint's. With a `mesh` the parameters are sharded over it (a
  converted checkpoint is restored straight into its shards) and decoding follows them.
  """
  dtype = dtype or default_dtype()
  if os.path.exists(os.path.join(path, checkpoint.PARAMS)):
    params, stored = (checkpoint.load(path, dtype=dtype) if mesh is None
                      else sharding.load(path, mesh, dtype))
    tokenizer_file = checkpoint.tokenizer_path(path)
  elif os.path.exists(os.path.join(path, "config.json")):
    params, stored, tokenizer_file = hf.load_hf(path, dtype=dtype, progress=True)
    if mesh is not None:
      params = sharding.shard_params(params, mesh)
    if tokenizer_file is None:
      raise FileNotFoundError(f"{path} has no tokenizer.model.")
  else:
    raise FileNotFoundError(f"{path} is neither a converted checkpoint nor a Hugging Face directory.")
  if config is not None:
    expected = jax.tree_util.tree_map(lambda x: x.shape, paligemma.param_shapes(config))
    if jax.tree_util.tree_map(lambda x: x.shape, params) != expected:
      raise ValueError("The --config model does not match the checkpoint's parameter shapes.")
    stored = config
  stored.dtype = stored.param_dtype = dtype
  return params, stored, Tokenizer(tokenizer_file)


@dataclasses.dataclass
class Example:
  image: str
  prompt: str
  extra: dict = dataclasses.field(default_factory=dict)  # Carried through to the output line.


@dataclasses.dataclass
class Prepared:
  """One example ready for the model, or the reason it is not."""
  example: Example
  tokens: np.ndarray | None = None
  prefix_mask: np.ndarray | None = None
  pixels: np.ndarray | None = None
  image_size: tuple[int, int] | None = None  # Original (width, height), for task outputs.
  error: str | None = None


def bucket_length(length: int, bucket: int = DEFAULT_BUCKET) -> int:
  return -(-length // bucket) * bucket


def power_of_two_bucket(count: int) -> int:
  """`count` (>= 1) rounded up to a power of two: few distinct shapes for a varying count."""
  return 1 << (count - 1).bit_length()


def collate(rows: list[Prepared], batch_size: int, bucket: int = DEFAULT_BUCKET):
  """Right-pads `rows` (all prepared) to [batch_size, bucketed T]; dummy rows repeat row 0."""
  length = bucket_length(max(len(r.tokens) for r in rows), bucket)
  tokens = np.zeros((batch_size, length), np.int32)
  input_mask = np.zeros((batch_size, length), bool)
  prefix_mask = np.zeros((batch_size, length), bool)
  for i in range(batch_size):
    r = rows[i] if i < len(rows) else rows[0]
    n = len(r.tokens)
    tokens[i, :n], input_mask[i, :n], prefix_mask[i, :n] = r.tokens, True, r.prefix_mask
  pixels = np.stack([(rows[i] if i < len(rows) else rows[0]).pixels for i in range(batch_size)])
  return tokens, pixels, input_mask, prefix_mask


class Predictor:
  """A loaded model + tokenizer that answers batches of examples."""

  def __init__(self, config: ml_collections.ConfigDict, params, tokenizer: Tokenizer, *,
               batch_size: int = 1, bucket: int = DEFAULT_BUCKET, num_threads: int = 8):
    self.config, self.tokenizer = config, tokenizer
    self.batch_size, self.bucket = batch_size, bucket
    self.decoder = decode.Decoder(config, params, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    self.num_image_tokens = paligemma.num_image_tokens(config)
    self.max_positions = config.text.get("max_position_embeddings", 8192)
    self._pool = concurrent.futures.ThreadPoolExecutor(num_threads)

  def prompt_tokens(self, prompt: str):
    """(tokens, prefix_mask) of an inference prompt: image tokens, <bos>, prompt, "\\n"."""
    tokens, prefix_mask, _ = processor.build_prompt(
        self.tokenizer, prompt, self.num_image_tokens, self.config.image_token_id)
    return tokens, prefix_mask

  def length_error(self, prompt_length: int, max_new_tokens: int) -> str | None:
    """Why a prompt of this length cannot run, if it cannot: the model has max_positions slots."""
    padded = bucket_length(prompt_length, self.bucket)
    if padded + max_new_tokens > self.max_positions:
      return (f"prompt of {prompt_length} tokens (padded to {padded}) + max_new_tokens="
              f"{max_new_tokens} exceeds the model's {self.max_positions} positions")
    return None

  def prepare(self, example: Example, max_new_tokens: int) -> Prepared:
    tokens, prefix_mask = self.prompt_tokens(example.prompt)
    error = self.length_error(len(tokens), max_new_tokens)
    if error:
      return Prepared(example, error=error)
    try:
      image = processor.load_image(example.image)
    except (ValueError, OSError) as e:
      return Prepared(example, error=str(e))
    pixels = processor.preprocess_image(image, self.config.vision.image_size)
    return Prepared(example, tokens, prefix_mask, pixels, image.size)

  def predict(self, examples: Iterable[Example], *, max_new_tokens: int,
              sampler: sampling.Sampler = sampling.Sampler(), seed: int = 0,
              progress: bool = False, total: int | None = None) -> Iterator[dict]:
    """Yields one result dict per example, in input order."""
    rng = jax.random.PRNGKey(seed)
    bar = tqdm.tqdm(total=total, unit="ex", disable=not progress, desc="generate")
    prepare = lambda e: self.prepare(e, max_new_tokens)
    batches = prefetch(self._pool, prepare, chunks(examples, self.batch_size))
    for batch_index, prepared in enumerate(batches):
      ready = [p for p in prepared if p.error is None]
      answers = {}
      if ready:
        generation = self.decoder.generate(
            *collate(ready, self.batch_size, self.bucket), max_new_tokens=max_new_tokens,
            sampler=sampler, rng=jax.random.fold_in(rng, batch_index))
        for i, p in enumerate(ready):
          answers[id(p)] = generation.row(i)
      bar.update(len(prepared))
      if bar.n == total:
        bar.close()
      for p in prepared:
        yield self._result(p, answers.get(id(p)))
    bar.close()

  def _result(self, p: Prepared, answer) -> dict:
    out = {"image": p.example.image, "prompt": p.example.prompt, **p.example.extra}
    if answer is None:
      return {**out, "error": p.error}
    tokens, logprobs, stop_reason = answer
    return {**out, "text": self.tokenizer.decode(tokens), "tokens": tokens, "logprobs": logprobs,
            "stop_reason": stop_reason, "image_size": list(p.image_size)}


def chunks(items: Iterable, size: int) -> Iterator[list]:
  """Consecutive lists of `size` items; the last may be shorter."""
  chunk = []
  for item in items:
    chunk.append(item)
    if len(chunk) == size:
      yield chunk
      chunk = []
  if chunk:
    yield chunk


def prefetch(pool: concurrent.futures.Executor, fn, batches: Iterable[list]) -> Iterator[list]:
  """Yields [fn(x) for x in batch] per batch, computed in `pool`; batch k + 1 is submitted before
  batch k is handed over, so its images decode while the caller runs the model on batch k."""
  ahead = None
  for batch in batches:
    futures = [pool.submit(fn, x) for x in batch]
    if ahead is not None:
      yield [f.result() for f in ahead]
    ahead = futures
  if ahead is not None:
    yield [f.result() for f in ahead]
