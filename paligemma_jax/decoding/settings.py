"""Decoding settings -> the sampler that decodes with them: a sampling.Sampler or a
beam_search.BeamSearch (`AnySampler`).

One function for every caller (generate's and evaluate's flags, the server's request body,
Python) and one set of defaults, so that a setting means the same everywhere:

  method named   "greedy", "temperature", "top_k", "top_p" or "beam" (flags, Python): unset
                 values take DEFAULTS; --beam_size / --length_penalty without beam search, or a
                 sampled setting changed from its default with it, are refused.
  method None    chosen from the values, as OpenAI's API (which names no method) implies:
                 temperature 0 (unset: 0) is greedy, top_k or top_p < 1 truncates, else plain
                 temperature; top_k and top_p together are refused.

Greedy ignores the sampled settings, as OpenAI's temperature 0 ignores top_p. A refusal is an
errors.InputError whose `param` names the setting; `flag_names` words it for a command line
(`--top_k`, `--sampler=beam`) or for a request body (`top_k`).
"""

import math
import numbers

from paligemma_jax import errors
from paligemma_jax.decoding import beam_search
from paligemma_jax.decoding import sampling

DEFAULTS = dict(temperature=1.0, top_k=40, top_p=0.95)  # Of sampled decoding, once named.
METHODS = (*sampling.METHODS, beam_search.BeamSearch.method)
# What a `sampler=` takes: how the next tokens are chosen, sampled or by beam search (as --sampler
# names both). autoregressive.Generator takes a sampling.Sampler, beam_search.BeamGenerator a
# beam_search.BeamSearch, inference.Predictor either.
AnySampler = sampling.Sampler | beam_search.BeamSearch


def decoder(method: str | None = None, *, temperature: float | None = None,
            top_k: int | None = None, top_p: float | None = None, beam_size: int | None = None,
            length_penalty: float | None = None, flag_names: bool = True) -> AnySampler:
  """The sampler of these settings: a sampling.Sampler or a beam_search.BeamSearch (see the
  module doc)."""
  name = (lambda n: f"--{n}") if flag_names else (lambda n: n)
  if method is None:
    return _inferred(temperature, top_k, top_p, name)
  if method not in METHODS:
    raise errors.InputError(f"{name('sampler')} must be one of {', '.join(METHODS)}, got "
                            f"{method!r}.", param="sampler")
  sampled = dict(temperature=temperature, top_k=top_k, top_p=top_p)
  if method == beam_search.BeamSearch.method:
    if beam_size is None:
      raise errors.InputError(f"{name('sampler')}=beam needs {name('beam_size')} (e.g. 2 or 3).",
                              param="beam_size")
    try:
      beams = beam_search.BeamSearch(
          beam_size, beam_search.BeamSearch.length_penalty if length_penalty is None
          else length_penalty)
    except ValueError as e:
      raise errors.InputError(f"{name('sampler')}=beam: {e}", param="beam_size") from None
    for key, value in sampled.items():
      if value is not None and value != DEFAULTS[key]:
        raise errors.InputError(f"{name(key)} is for sampled decoding, not "
                                f"{name('sampler')}=beam.", param=key)
    return beams
  for key, value in (("beam_size", beam_size), ("length_penalty", length_penalty)):
    if value is not None:
      raise errors.InputError(f"{name(key)} is for {name('sampler')}=beam, not "
                              f"{name('sampler')}={method}.", param=key)
  values = {k: DEFAULTS[k] if v is None else v for k, v in sampled.items()}
  try:
    return sampling.Sampler(method, **values)
  except ValueError as e:
    raise errors.InputError(f"{name('sampler')}={method}: {e}", param="sampler") from None


def _inferred(temperature, top_k, top_p, name) -> sampling.Sampler:
  temperature = 0.0 if temperature is None else temperature
  top_p = 1.0 if top_p is None else top_p
  if temperature < 0:
    raise errors.InputError(f"{name('temperature')} must be >= 0, got {temperature}.",
                            param="temperature")
  if not 0 < top_p <= 1:
    raise errors.InputError(f"{name('top_p')} must be in (0, 1], got {top_p}.", param="top_p")
  if temperature == 0:
    return sampling.Sampler()
  if top_k and top_p < 1:
    raise errors.InputError(f"Give {name('top_k')} or {name('top_p')}, not both (one truncation "
                            "per request).", param="top_k")
  method, chosen = (("top_k", dict(top_k=top_k)) if top_k else
                    ("top_p", dict(top_p=top_p)) if top_p < 1 else ("temperature", {}))
  try:
    return sampling.Sampler(method, temperature, **chosen)
  except ValueError as e:  # A temperature that is not finite, a top_k past the device's int32.
    finite = isinstance(temperature, numbers.Real) and math.isfinite(temperature)
    raise errors.InputError(str(e), param=next(iter(chosen), "temperature") if finite
                            else "temperature") from None
