"""Settings -> sampler (sampled or beam search): the same rules for flags, request bodies and
Python."""

import pytest

from paligemma_jax import errors
from paligemma_jax.decoding import beam_search
from paligemma_jax.decoding import sampling
from paligemma_jax.decoding import settings


def test_a_named_method_takes_the_defaults_for_what_is_unset():
  assert settings.decoder("top_k") == sampling.Sampler("top_k", 1.0, top_k=40, top_p=0.95)
  assert settings.decoder("top_p", temperature=0.7) == sampling.Sampler("top_p", 0.7, 40, 0.95)
  assert settings.decoder("greedy", temperature=3.0).method == "greedy"  # Ignored when decoding.
  assert settings.decoder("beam", beam_size=3) == beam_search.BeamSearch(3)
  assert settings.decoder("beam", beam_size=2, length_penalty=0.0, **settings.DEFAULTS) == (
      beam_search.BeamSearch(2, 0.0))  # The defaults are "unchanged", also when given.


def test_without_a_method_the_values_choose_it_as_the_api_implies():
  assert settings.decoder(None) == sampling.Sampler()  # temperature 0.
  assert settings.decoder(None, temperature=0.0, top_k=5, top_p=0.5) == sampling.Sampler()
  assert settings.decoder(None, temperature=2.0) == sampling.Sampler("temperature", 2.0)
  assert settings.decoder(None, temperature=2.0, top_k=5).method == "top_k"
  assert settings.decoder(None, temperature=2.0, top_p=0.5).method == "top_p"


@pytest.mark.parametrize("method,values,message,param", [
    ("beam", dict(beam_size=2, temperature=0.5), "--temperature is for sampled decoding", "temperature"),
    ("beam", {}, "--sampler=beam needs --beam_size", "beam_size"),
    ("beam", dict(temperature=0.5), "--sampler=beam needs --beam_size", "beam_size"),  # First.
    ("beam", dict(beam_size=0), "--sampler=beam: beam_size must be", "beam_size"),
    ("top_k", dict(beam_size=2), "--beam_size is for --sampler=beam, not --sampler=top_k", "beam_size"),
    ("top_k", dict(top_k=0), "--sampler=top_k: ", "sampler"),
    ("nucleus", {}, "--sampler must be one of", "sampler"),
])
def test_flags_refused_name_the_flag(method, values, message, param):
  with pytest.raises(errors.InputError, match=message) as e:
    settings.decoder(method, **values)
  assert e.value.param == param


@pytest.mark.parametrize("values,message,param", [
    (dict(temperature=-1.0), "temperature must be >= 0", "temperature"),
    (dict(temperature=1.0, top_p=0.0), "top_p must be in", "top_p"),
    (dict(temperature=1.0, top_k=3, top_p=0.5), "Give top_k or top_p, not both", "top_k"),
    (dict(temperature=float("inf")), "temperature", "temperature"),
    (dict(temperature=float("inf"), top_k=5), "temperature", "temperature"),
    (dict(temperature=1.0, top_k=2**40), "top_k", "top_k"),
])
def test_request_bodies_refused_name_the_field(values, message, param):
  with pytest.raises(errors.InputError, match=message) as e:
    settings.decoder(None, flag_names=False, **values)
  assert e.value.param == param and "--" not in str(e.value)
