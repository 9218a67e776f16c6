"""From (image paths, prompt) examples to answers: the path every entry point shares.

  load + preprocess each example's images, one or several (background threads, one batch ahead
  of the model; batching.py) ->
  build prompt tokens -> right-pad into fixed-shape batches (prompt length rounded up to a
  bucket, last batch padded with dummy rows) -> Generator.generate -> detokenize.

An example that cannot be prepared (a prompt the tokenizer cannot take or too long for the
model, a missing or corrupt image) gets an `error` instead of an answer; the others in its batch
run as usual. Load the model with `loading.load_model`.
"""

import dataclasses
from typing import Any, Iterable, Iterator

import ml_collections
import tqdm

from paligemma_jax import errors
from paligemma_jax.decoding import autoregressive
from paligemma_jax.decoding import batching
from paligemma_jax.decoding import beam_search
from paligemma_jax.decoding import core
from paligemma_jax.decoding import sampling
from paligemma_jax.decoding import settings
from paligemma_jax.model import paligemma
from paligemma_jax.preprocess import image_fields
from paligemma_jax.preprocess import processor
from paligemma_jax.preprocess.tokenizer import Tokenizer


@dataclasses.dataclass
class Example:
  """One prompt about one image (`image`) or several (`images`, in the order the prompt reads
  them: their image tokens come first, in that order, as transformers' processor lays out a
  list of images per prompt). An image is a file path, bytes or a binary file object."""
  image: Any = None
  prompt: str = ""
  extra: dict = dataclasses.field(default_factory=dict)  # Carried through to the output line.
  images: list | None = None

  def sources(self) -> list:
    """The images in order; an InputError where there is none."""
    return image_fields.sources(self.image, self.images)

  def given(self) -> dict:
    """The images as given, for output lines: {"image": ...} or {"images": [...]}."""
    return image_fields.fields(self.image, self.images)


class Predictor:
  """A loaded model + tokenizer that answers batches of examples. Takes the model in
  `loading.Model`'s order: `Predictor(*loading.load_model(path), batch_size=8)`.

  The generator never produces ids past the tokenizer's vocabulary or the image token.
  """

  def __init__(self, params, config: ml_collections.ConfigDict, tokenizer: Tokenizer, *,
               batch_size: int = 1, bucket: int = batching.DEFAULT_BUCKET, num_threads: int = 8,
               mesh=None, cache_dtype=None):
    """cache_dtype: the KV cache's, default the compute dtype; "int8" (core.Setup.create)."""
    self.config, self.tokenizer = config, tokenizer
    self.batch_size, self.bucket, self.num_threads = batch_size, bucket, num_threads
    self.generator = autoregressive.Generator(params, config, eos_id=tokenizer.eos_id,
                                      pad_id=tokenizer.pad_id, vocab_size=tokenizer.vocab_size,
                                      mesh=mesh, cache_dtype=cache_dtype)
    self.beam_generator = beam_search.BeamGenerator(self.generator)  # Compiles on first use.
    self.num_image_tokens = paligemma.num_image_tokens(config)
    self.max_positions = batching.max_positions(config)

  def prompt_tokens(self, prompt: str, num_images: int = 1):
    """(tokens, prefix_mask) of an inference prompt: N image tokens per image, <bos>, prompt,
    "\\n"."""
    tokens, prefix_mask, _ = processor.build_prompt(
        self.tokenizer, prompt, num_images * self.num_image_tokens, self.config.image_token_id)
    return tokens, prefix_mask

  def length_error(self, prompt_length: int, max_new_tokens: int) -> str | None:
    """Why a prompt of this length cannot run, if it cannot: the model has max_positions slots."""
    return batching.length_error(prompt_length, self.max_positions, bucket=self.bucket,
                                 new_tokens=max_new_tokens)

  def prepare(self, example: Example, max_new_tokens: int) -> batching.Prepared:
    def rows(num_images):
      tokens, prefix_mask = self.prompt_tokens(example.prompt, num_images)
      error = self.length_error(len(tokens), max_new_tokens)
      if error:
        raise errors.InputError(error + batching.images_note(num_images, self.num_image_tokens),
                                reason="too long")
      return [(tokens, prefix_mask)]
    return batching.prepare(example, rows, self.config.vision.image_size)

  def check_sampler(self, sampler: settings.AnySampler):
    """InputError for a sampler this model cannot run; the sampler checked its own values. Beam
    search keeps 2K candidates of distinct ids each step: 2 * beam_size ids must be choosable."""
    if isinstance(sampler, beam_search.BeamSearch):
      ids = int(self.generator.valid_ids.sum())
      if 2 * sampler.beam_size > ids:
        raise errors.InputError(f"beam_size {sampler.beam_size} is too large for this model: "
                                f"beam search needs 2 * beam_size token ids and the vocabulary "
                                f"has {ids}; give at most {ids // 2}.")

  def predict(self, examples: Iterable[Example], *, max_new_tokens: int,
              sampler: settings.AnySampler = sampling.Sampler(),
              seed: int = 0,
              first_index: int = 0, progress: bool = False,
              total: int | None = None) -> Iterator[dict]:
    """Yields one result dict per example, in input order.

    Example i samples with its own key, fold_in(seed_key(seed), first_index + i), whatever batch
    it lands in: a run resumed at example k (first_index=k) gives the answers of a whole run.
    sampler: a sampling.Sampler or a beam_search.BeamSearch (`settings.decoder` makes one from
    flags or a request's values); default greedy. A BeamSearch answers with the best hypothesis
    and adds its `score`; one this model cannot run is an InputError (`check_sampler`) before any
    example runs.
    """
    self.check_sampler(sampler)
    beams = isinstance(sampler, beam_search.BeamSearch)
    generator = self.beam_generator if beams else self.generator
    key = sampling.seed_key(seed)  # ValueError outside sampling.SEED_RANGE.
    bar = tqdm.tqdm(total=total, unit="ex", disable=not progress, desc="generate")
    prepare = lambda e: self.prepare(e, max_new_tokens)
    batches = batching.prefetch(prepare, batching.chunks(examples, self.batch_size),
                                self.num_threads)
    index = first_index
    for prepared in batches:
      indices = {id(p): index + i for i, p in enumerate(prepared)}
      index += len(prepared)
      ready = [p for p in prepared if p.error is None]
      answers = {}
      if ready:
        rows = [indices[id(p)] for p in ready]
        keys = core.row_keys(key, rows + rows[:1] * (self.batch_size - len(rows)))  # + dummies.
        generation = generator.generate(
            *batching.collate(ready, self.batch_size, self.bucket), max_new_tokens=max_new_tokens,
            sampler=sampler, rng=keys)
        for i, p in enumerate(ready):
          extra = {"score": float(generation.scores[i])} if beams else {}
          answers[id(p)] = (*generation.row(i), extra)
      bar.update(len(prepared))
      if bar.n == total:
        bar.close()
      for p in prepared:
        yield self._result(p, answers.get(id(p)))
    bar.close()

  def _result(self, p: batching.Prepared, answer) -> dict:
    out = {**p.example.given(), "prompt": p.example.prompt, **p.example.extra}
    if answer is None:
      return {**out, "error": p.error}
    tokens, logprobs, stop_reason, extra = answer
    return {**out, "text": self.tokenizer.decode(tokens), "tokens": tokens, "logprobs": logprobs,
            "stop_reason": stop_reason, **p.size_fields(), **extra}
