"""The continuous-batching engine: answers equal generate's whatever runs beside them, streaming,
stop strings, max_tokens, the image cache, bad requests, overload, cancel and shutdown.

One engine (2 rows) serves every test; most drive its loop by hand (`_step`), so which request
sits in which row at each step is certain; the last test runs its thread.
"""

import contextlib
import io
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from paligemma_jax import errors
from paligemma_jax.checkpoints import loading
from paligemma_jax.decoding import inference
from paligemma_jax.decoding import sampling
from paligemma_jax.serving import engine as engine_lib

MAX_NEW = 8  # Every reference answer is this long (one compiled reference loop).
GREEDY = sampling.Sampler()
TEMPERATURE = sampling.Sampler("temperature", temperature=1.5)
TOP_K = sampling.Sampler("top_k", temperature=2.0, top_k=5)


def louder(model: loading.Model) -> loading.Model:
  """The model with its decoder layers' kernels x10, so that greedy answers vary with the prompt
  and image (the plain random tiny one repeats its last input token)."""
  params, config, tokenizer = model
  scale = lambda path, x: np.asarray(x) * (10 if "layers" in jax.tree_util.keystr(path) and
                                           x.ndim > 1 else 1)
  params = {**params, "llm": jax.tree_util.tree_map_with_path(scale, params["llm"])}
  return loading.Model(jax.device_put(params), config, tokenizer)


@pytest.fixture(scope="module")
def model(converted_checkpoint):
  """The tiny PaliGemma 1, `louder`."""
  return louder(loading.load_model(converted_checkpoint(1)[0]))


@pytest.fixture(scope="module")
def predictor(model):
  return inference.Predictor(*model, batch_size=2)


@pytest.fixture(scope="module")
def engine(model):
  return engine_lib.Engine(model, rows=2, max_queue=2, steps_per_call=2, max_prompt_tokens=16,
                           max_tokens_limit=12, image_cache_size=2)


def png(seed: int) -> bytes:
  pixels = np.random.RandomState(seed).randint(0, 256, (20, 24, 3), np.uint8)
  out = io.BytesIO()
  Image.fromarray(pixels).save(out, "PNG")
  return out.getvalue()


def reference(predictor, image, prompt, sampler=GREEDY, seed=0):
  """generate's answer for one example: (token ids, text, finish reason)."""
  [out] = predictor.predict([inference.Example(image, prompt)], max_new_tokens=MAX_NEW,
                            sampler=sampler, seed=seed)
  return out["tokens"], out["text"], out["stop_reason"]  # The engine's words are generate's.


def run_until_idle(engine):
  while engine._pending or engine._busy():
    engine._step(wait=False)


def answer(handle):
  result = handle.result(timeout=0)
  return result.token_ids, result.text, result.finish_reason


@contextlib.contextmanager
def engine_compiles():
  """Yields the list of the engine's programs (prefill, decode, image tower) lowered within; a
  lowering happens on every jit cache miss, even when the persistent cache has the program."""
  names = []

  def listener(event, duration, fun_name="", **kwargs):
    if event == "/jax/core/compile/jaxpr_to_mlir_module_duration" and any(
        p in fun_name for p in ("prefill_insert", "decode_chunk", "embed_images", "move_rows")):
      names.append(fun_name)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield names
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def test_a_second_identical_request_compiles_nothing(engine):
  """The first prefill gets the state built at start, later ones a state a jitted call returned;
  both must hit one compiled program (they did not: uncommitted vs committed arrays)."""
  run_until_idle(engine)
  engine._state = engine._empty_state()  # As the engine starts.
  request = engine_lib.Request("caption en", png(0), max_tokens=3)
  first = engine.submit(request)
  run_until_idle(engine)
  with engine_compiles() as compiled:
    second = engine.submit(request)
    run_until_idle(engine)
  assert compiled == []
  assert answer(second) == answer(first)


def test_requests_inserted_into_a_running_batch_answer_as_generate(engine, predictor):
  first = engine_lib.Request("caption en", png(0), max_tokens=MAX_NEW)
  inserted = [engine_lib.Request("answer en what is it", png(1), MAX_NEW, TEMPERATURE, seed=3),
              engine_lib.Request("detect cat", png(2), MAX_NEW, TOP_K, seed=5)]
  handle = engine.submit(first)
  engine._step(wait=False)  # Prefill + 2 decode steps: 3 tokens, still running.
  assert engine.stats()["running_slots"] == 1
  handles = [engine.submit(r) for r in inserted]
  engine._step(wait=False)  # The first inserted joins the running one; the other waits.
  assert engine.stats()["running_slots"] == 2 and engine.stats()["queue_depth"] == 1
  run_until_idle(engine)
  for request, h in zip([first] + inserted, [handle] + handles):
    want = reference(predictor, request.image, request.prompt, request.sampler, request.seed)
    assert answer(h) == want
    assert len(want[0]) > 2 and len(set(want[0])) > 1  # Not a degenerate answer.
  # Same seed, same answer; another seed, another answer.
  again = engine.submit(inserted[0])
  other = engine.submit(engine_lib.Request(**{**vars(inserted[0]), "seed": 4}))
  run_until_idle(engine)
  assert answer(again) == answer(handles[0]) != answer(other)


def test_stop_strings_max_tokens_and_streaming(engine, predictor):
  tokens, text, _ = reference(predictor, png(0), "caption en")
  stop = text[len(text) // 2:len(text) // 2 + 2]
  streamed = engine.submit(engine_lib.Request("caption en", png(0), MAX_NEW, stop=("zzz", stop)))
  short = engine.submit(engine_lib.Request("caption en", png(0), max_tokens=3))
  run_until_idle(engine)
  events = list(streamed.events(timeout=0))
  assert all(e.finish_reason is None for e in events[:-1]) and len(events) >= 2
  assert 0 < text.find(stop) < len(text) - len(stop)  # Cut in the middle.
  assert "".join(e.text for e in events) == text[:text.find(stop)]
  assert events[-1].finish_reason == "stop"
  assert sum((e.token_ids for e in events), []) == tokens[:events[-1].completion_tokens]
  assert events[-1].prompt_tokens == len(predictor.prompt_tokens("caption en")[0])
  assert answer(short) == (tokens[:3], predictor.tokenizer.decode(tokens[:3]), "length")


def test_image_cache_computes_each_image_once(engine):
  before = engine.stats()
  image = png(7)
  handles = [engine.submit(engine_lib.Request(p, image, max_tokens=2)) for p in ("ocr", "caption en")]
  run_until_idle(engine)  # Both in one prefill batch: the image tower runs once.
  handles.append(engine.submit(engine_lib.Request("detect dog", image, max_tokens=2)))
  run_until_idle(engine)
  after = engine.stats()
  assert after["image_cache_misses"] - before["image_cache_misses"] == 1
  assert after["image_cache_hits"] - before["image_cache_hits"] == 2
  assert all(h.result(timeout=0).finish_reason == "length" for h in handles)


def test_bad_requests_raise_without_disturbing_running_ones(engine, predictor):
  running = engine.submit(engine_lib.Request("caption en", png(1), max_tokens=MAX_NEW))
  engine._step(wait=False)
  bad = [dict(image=b"not an image"), dict(image=b""), dict(prompt="word " * 20),
         dict(max_tokens=0), dict(max_tokens=13), dict(stop=("",)), dict(seed="x"),
         dict(prompt="\ud83d")]
  for change in bad:
    with pytest.raises(errors.InputError):
      engine.submit(engine_lib.Request(**{"prompt": "ocr", "image": png(2), **change}))
  with pytest.raises(ValueError):
    sampling.Sampler("temperature", temperature=0.0)
  assert engine.stats()["queue_depth"] == 0
  run_until_idle(engine)
  assert answer(running) == reference(predictor, png(1), "caption en")


def test_queue_full_and_cancel_free_rows(engine):
  request = engine_lib.Request("caption en", png(0), max_tokens=12)
  running = [engine.submit(request) for _ in range(2)]
  engine._step(wait=False)
  waiting = [engine.submit(request) for _ in range(2)]
  with pytest.raises(engine_lib.QueueFull):
    engine.submit(request)
  running[0].cancel()
  waiting[0].cancel()
  engine._step(wait=False)  # The freed row takes the request still waiting.
  stats = engine.stats()
  assert stats["running_slots"] == 2 and stats["queue_depth"] == 0
  run_until_idle(engine)
  assert [h.result(timeout=0).finish_reason for h in running + waiting] == [
      "cancelled", "length", "cancelled", "length"]


def test_out_of_range_values_are_refused_at_submit(engine):
  request = lambda **change: engine_lib.Request(**{"prompt": "ocr", "image": png(2),
                                                   "max_tokens": 4, **change})
  vocab = engine.tokenizer.vocab_size
  for change in [dict(sampler=sampling.Sampler("top_k", 1.0, top_k=vocab + 1)),
                 dict(seed=2**63), dict(seed=-2**63 - 1), dict(seed=1.5)]:
    with pytest.raises(errors.InputError):
      engine.submit(request(**change))
  for value in [2**31, 1e20]:
    with pytest.raises(ValueError, match="top_k"):
      sampling.Sampler("top_k", 1.0, top_k=value)
  assert engine.stats()["queue_depth"] == 0
  handles = [engine.submit(request(sampler=sampling.Sampler("top_k", 1.0, top_k=vocab),
                                   seed=seed)) for seed in (2**63 - 1, -2**63)]
  run_until_idle(engine)
  assert [h.result(timeout=0).finish_reason for h in handles] == ["length"] * 2


def test_max_queue_counts_only_requests_beyond_the_free_rows(engine):
  """An idle engine with 2 rows and max_queue=2 takes 4 requests at once (2 start at the next
  step, 2 wait), and refuses the 5th."""
  request = engine_lib.Request("caption en", png(0), max_tokens=2)
  handles = [engine.submit(request) for _ in range(4)]
  with pytest.raises(engine_lib.QueueFull):
    engine.submit(request)
  run_until_idle(engine)
  assert [h.result(timeout=0).finish_reason for h in handles] == ["length"] * 4


def test_a_failure_preparing_one_request_fails_it_alone(engine, predictor, monkeypatch):
  running = engine.submit(engine_lib.Request("caption en", png(1), max_tokens=MAX_NEW))
  engine._step(wait=False)
  calls = []

  def failing(*args):
    calls.append(args)
    raise OverflowError("a value this request carried")  # Before the state is donated.

  monkeypatch.setattr(engine, "_prefill", failing)
  doomed = engine.submit(engine_lib.Request("ocr", png(2), max_tokens=MAX_NEW))
  run_until_idle(engine)
  result = doomed.result(timeout=0)
  assert result.finish_reason == "error" and result.error == engine_lib.FAILED
  assert answer(running) == reference(predictor, png(1), "caption en")
  assert len(calls) == 1 and engine.health() is None and engine.stats()["running_slots"] == 0
  monkeypatch.undo()
  later = engine.submit(engine_lib.Request("caption en", png(3), max_tokens=MAX_NEW))
  run_until_idle(engine)
  assert answer(later) == reference(predictor, png(3), "caption en")


def assert_top_logprobs(result, k, vocab, greedy):
  """k alternatives per token, most likely first, distinct ids that may be chosen; the chosen
  token's log-prob is its entry's when it is among them (greedy: always the first)."""
  assert len(result.top_logprobs) == len(result.token_ids) > 0
  for token, logprob, top in zip(result.token_ids, result.logprobs, result.top_logprobs):
    ids, values = [i for i, _ in top], [v for _, v in top]
    assert len(top) == k and len(set(ids)) == k and all(0 <= i < vocab for i in ids)
    assert values == sorted(values, reverse=True) and values[0] <= 0
    if greedy:
      assert (ids[0], values[0]) == (token, logprob)
    if token in ids:
      assert values[ids.index(token)] == logprob
    else:
      assert logprob <= values[-1]


def test_logprobs_and_top_logprobs_as_generate(engine, predictor):
  """The log-probs are generate's (to float32 rounding: the two batch rows differently);
  top_logprobs the most likely ids, the greedy choice first."""
  vocab = engine.tokenizer.vocab_size
  greedy = engine.submit(engine_lib.Request("caption en", png(1), MAX_NEW, top_logprobs=5))
  sampled = engine.submit(engine_lib.Request("caption en", png(1), MAX_NEW, TEMPERATURE, seed=3,
                                             top_logprobs=20))
  run_until_idle(engine)
  [want] = predictor.predict([inference.Example(png(1), "caption en")], max_new_tokens=MAX_NEW)
  result = greedy.result(timeout=0)
  assert result.token_ids == want["tokens"]
  np.testing.assert_allclose(result.logprobs, want["logprobs"], rtol=1e-5, atol=1e-5)
  assert_top_logprobs(result, 5, vocab, greedy=True)
  [want] = predictor.predict([inference.Example(png(1), "caption en")], max_new_tokens=MAX_NEW,
                             sampler=TEMPERATURE, seed=3)
  result = sampled.result(timeout=0)
  assert result.token_ids == want["tokens"]
  np.testing.assert_allclose(result.logprobs, want["logprobs"], rtol=1e-5, atol=1e-5)
  assert_top_logprobs(result, 20, vocab, greedy=False)
  plain = engine.submit(engine_lib.Request("caption en", png(1), MAX_NEW))
  run_until_idle(engine)
  assert plain.result(timeout=0).top_logprobs == []  # Only asked for.


def test_n_choices_share_one_prefill_each_with_its_key(engine, predictor):
  """Choice i of a request answers as example i of a generate run with its seed: choice 0 is the
  n=1 answer; the prompt is prefilled once for all of them."""
  example = inference.Example(png(2), "answer en what is it")
  want = list(predictor.predict([example] * 2, max_new_tokens=MAX_NEW, sampler=TOP_K, seed=7))
  before = engine.stats()
  handle = engine.submit(engine_lib.Request(example.prompt, example.image, MAX_NEW, TOP_K,
                                            seed=7, n=2, top_logprobs=2))
  run_until_idle(engine)
  after = engine.stats()
  assert after["prefilled_prompts"] - before["prefilled_prompts"] == 1
  assert after["prefill_calls"] - before["prefill_calls"] == 1
  results = handle.results(timeout=0)
  assert [r.index for r in results] == [0, 1]
  for result, w in zip(results, want):
    assert (result.token_ids, result.text, result.finish_reason) == (
        w["tokens"], w["text"], w["stop_reason"])
    np.testing.assert_allclose(result.logprobs, w["logprobs"], rtol=1e-5, atol=1e-5)
    assert_top_logprobs(result, 2, engine.tokenizer.vocab_size, greedy=False)
  assert results[0].token_ids != results[1].token_ids  # Distinct keys.
  one = engine.submit(engine_lib.Request(example.prompt, example.image, MAX_NEW, TOP_K, seed=7))
  greedy = engine.submit(engine_lib.Request(example.prompt, example.image, MAX_NEW, n=2))
  run_until_idle(engine)
  assert one.result(timeout=0).token_ids == results[0].token_ids
  with pytest.raises(ValueError, match="results"):
    greedy.result(timeout=0)
  first, second = greedy.results(timeout=0)  # Greedy: n identical choices.
  assert first.token_ids == second.token_ids and first.text == second.text


def test_a_request_with_n_choices_waits_for_its_rows_and_cancel_frees_them(engine):
  """First come, first served: a request waits until it has a row for every choice, and the
  ones behind it wait too; max_queue counts the rows the waiting requests need."""
  request = engine_lib.Request("caption en", png(0), max_tokens=12)
  running = engine.submit(request)
  engine._step(wait=False)
  pair = engine.submit(engine_lib.Request("caption en", png(0), max_tokens=12, n=2))
  behind = engine.submit(request)  # 3 rows wanted, 1 free: 2 beyond it, max_queue 2.
  with pytest.raises(engine_lib.QueueFull):
    engine.submit(request)
  engine._step(wait=False)  # One row is free; the pair needs two: both wait.
  assert engine.stats()["running_slots"] == 1 and engine.stats()["queue_depth"] == 2
  running.cancel()
  engine._step(wait=False)
  assert engine.stats()["running_slots"] == 2 and engine.stats()["queue_depth"] == 1
  pair.cancel()
  engine._step(wait=False)  # Both of its rows are freed; the one behind takes one.
  assert engine.stats()["running_slots"] == 1 and engine.stats()["queue_depth"] == 0
  results = pair.results(timeout=0)
  assert [(r.index, r.finish_reason) for r in results] == [(0, "cancelled"), (1, "cancelled")]
  run_until_idle(engine)
  assert running.result(timeout=0).finish_reason == "cancelled"
  assert behind.result(timeout=0).finish_reason == "length"


def test_bad_n_and_top_logprobs_are_refused_at_submit(engine, predictor):
  running = engine.submit(engine_lib.Request("caption en", png(1), max_tokens=MAX_NEW))
  engine._step(wait=False)
  for change in [dict(n=0), dict(n=3), dict(n=10**30), dict(n="2"), dict(n=True), dict(n=1.0),
                 dict(top_logprobs=21), dict(top_logprobs=-1), dict(top_logprobs=True),
                 dict(top_logprobs="2")]:
    with pytest.raises(errors.InputError, match=f"^{next(iter(change))} must be"):
      engine.submit(engine_lib.Request(**{"prompt": "ocr", "image": png(2), "max_tokens": 4,
                                          **change}))
  assert engine.stats()["queue_depth"] == 0
  run_until_idle(engine)
  assert answer(running) == reference(predictor, png(1), "caption en")


def test_several_images_answer_as_generate_beside_one_image_rows(engine, predictor):
  """A request of 2 images is generate's example of those images (greedy tokens and log-probs),
  its images in order, decoding in one batch with a 1-image request; n choices and top
  log-probs with them too. A second identical request compiles nothing."""
  pair, prompt = [png(4), png(5)], "answer en what is it"
  one = engine.submit(engine_lib.Request("caption en", png(1), MAX_NEW))
  two = engine.submit(engine_lib.Request(prompt, images=tuple(pair), max_tokens=MAX_NEW,
                                         top_logprobs=3))
  before = engine.stats()
  engine._step(wait=False)  # One prefill per image count; both rows then decode together.
  after = engine.stats()
  assert after["running_slots"] == 2 and after["prefill_calls"] - before["prefill_calls"] == 2
  swapped = engine.submit(engine_lib.Request(prompt, images=tuple(pair[::-1]), max_tokens=MAX_NEW))
  run_until_idle(engine)
  want = list(predictor.predict([inference.Example(images=pair, prompt=prompt),
                                 inference.Example(images=pair[::-1], prompt=prompt)],
                                max_new_tokens=MAX_NEW))
  result = two.result(timeout=0)
  assert (result.token_ids, result.text, result.finish_reason) == (
      want[0]["tokens"], want[0]["text"], want[0]["stop_reason"])
  # Float32 rounding: generate's own log-probs of this example differ by up to 1.7e-4 between
  # its batch sizes 1 and 2 (the 10x louder layers amplify it).
  np.testing.assert_allclose(result.logprobs, want[0]["logprobs"], rtol=1e-5, atol=5e-4)
  assert_top_logprobs(result, 3, engine.tokenizer.vocab_size, greedy=True)
  assert result.prompt_tokens == len(predictor.prompt_tokens(prompt, num_images=2)[0])
  assert answer(swapped) == (want[1]["tokens"], want[1]["text"], want[1]["stop_reason"])
  assert want[0]["tokens"] != want[1]["tokens"]  # The order of the images matters.
  assert answer(one) == reference(predictor, png(1), "caption en")

  sampled = list(predictor.predict([inference.Example(images=pair, prompt=prompt)] * 2,
                                   max_new_tokens=MAX_NEW, sampler=TOP_K, seed=7))
  with engine_compiles() as compiled:
    again = engine.submit(engine_lib.Request(prompt, images=tuple(pair), max_tokens=MAX_NEW,
                                             top_logprobs=3))
    run_until_idle(engine)
  # Alone, it decodes in chunks of one row, which may compile here (warmup compiles those).
  assert len(compiled) <= 1 and all("decode_chunk" in x for x in compiled)
  assert answer(again) == answer(two)
  choices = engine.submit(engine_lib.Request(prompt, images=tuple(pair), max_tokens=MAX_NEW,
                                             sampler=TOP_K, seed=7, n=2, top_logprobs=2))
  run_until_idle(engine)
  results = choices.results(timeout=0)
  for result, w in zip(results, sampled):
    assert (result.token_ids, result.text) == (w["tokens"], w["text"])
    np.testing.assert_allclose(result.logprobs, w["logprobs"], rtol=1e-5, atol=5e-4)
    assert_top_logprobs(result, 2, engine.tokenizer.vocab_size, greedy=False)
  assert results[0].token_ids != results[1].token_ids


def test_each_image_of_a_request_goes_through_the_image_cache(engine, monkeypatch):
  """2 distinct images: 2 misses; the same request again: 2 hits and no image tower; an image
  given twice in one request runs once."""
  calls = []
  embed = engine._embed
  monkeypatch.setattr(engine, "_embed", lambda params, pixels: calls.append(len(pixels)) or
                      embed(params, pixels))
  request = engine_lib.Request("caption en", images=(png(8), png(9)), max_tokens=2)

  def run(request):
    before = engine.stats()
    handle = engine.submit(request)
    run_until_idle(engine)
    assert handle.result(timeout=0).finish_reason == "length"
    after = engine.stats()
    return [after[k] - before[k] for k in ("image_cache_misses", "image_cache_hits")]

  assert run(request) == [2, 0] and calls == [2]  # One tower batch for both.
  assert run(request) == [0, 2] and calls == [2]  # Cached: no image tower.
  assert run(engine_lib.Request("ocr", images=(png(10), png(10)), max_tokens=2)) == [1, 1]
  assert calls == [2, 1]


def test_bad_image_lists_are_refused_at_submit(engine, predictor):
  """No image, both fields, an empty list, more than max_images, one undecodable image among
  two (named): each an InputError at submit, and what runs is undisturbed."""
  running = engine.submit(engine_lib.Request("caption en", png(1), max_tokens=MAX_NEW))
  engine._step(wait=False)
  for change, match in [
      (dict(), "no image"), (dict(image=png(2), images=(png(3),)), "not both"),
      (dict(images=()), "non-empty"), (dict(images=(png(2), b"")), "non-empty encoded"),
      (dict(images=tuple(png(i) for i in range(5))), r"5 images; the limit is 4 \(max_images\)"),
      (dict(images=(png(2), b"not an image")), "^image 2 of 2: ")]:
    with pytest.raises(errors.InputError, match=match):
      engine.submit(engine_lib.Request("ocr", max_tokens=4, **change))
  assert engine.stats()["queue_depth"] == 0
  four = engine.submit(engine_lib.Request("ocr", images=tuple(png(i) for i in range(4)),
                                          max_tokens=2))
  run_until_idle(engine)
  assert answer(running) == reference(predictor, png(1), "caption en")
  assert four.result(timeout=0).finish_reason == "length"


def test_the_cache_is_sized_for_max_images(model):
  """Each row holds max_images * N image tokens + the prompt and new tokens; the default is 4
  images, or as many as fit the model's positions; too many is an error naming max_images."""
  n = 16  # Image tokens of the tiny model.
  engine = engine_lib.Engine(model, rows=1, max_prompt_tokens=16, max_tokens_limit=12)
  assert (engine.max_images, engine.max_len) == (4, 4 * n + 28)
  assert engine_lib.Engine(model, rows=1, max_prompt_tokens=16, max_tokens_limit=12,
                           max_images=1).max_len == n + 28
  config = model.config.copy_and_resolve_references()
  config.text.max_position_embeddings = 2 * n + 28
  short = loading.Model(model.params, config, model.tokenizer)
  assert engine_lib.Engine(short, rows=1, max_prompt_tokens=16, max_tokens_limit=12).max_images == 2
  with pytest.raises(errors.InputError, match=r"3 x 16 image \(max_images\)"):
    engine_lib.Engine(short, rows=1, max_prompt_tokens=16, max_tokens_limit=12, max_images=3)


def read_at_once(engine):
  """One round as the engine ran before it launched ahead: launch, then read at once."""
  engine._step(wait=False)
  previous, engine._launched = engine._launched, []
  for launched in previous:
    engine._read(launched)


def events_of(handle):
  """Per choice, its events as (text, token ids, finish, logprobs, top logprobs)."""
  out = {}
  for e in handle.events(timeout=0):
    out.setdefault(e.index, []).append((e.text, e.token_ids, e.finish_reason, e.logprobs,
                                        e.top_logprobs))
  return out


def assert_same_events(got, want):
  """events_of lists alike: text, tokens, finish reasons and top ids equal; log-probs equal up to
  float32 rounding (a chunk computes the rows in use, and the shapes of its products change
  the last bits, as generate's batch sizes do)."""
  assert [{c: [e[:3] for e in events] for c, events in h.items()} for h in got] == [
      {c: [e[:3] for e in events] for c, events in h.items()} for h in want]
  flat = lambda runs: [(e[3], [[x for x, _ in top] for top in e[4]],
                        [[v for _, v in top] for top in e[4]])
                       for h in runs for events in h.values() for e in events]
  for (logprobs, ids, values), (want_logprobs, want_ids, want_values) in zip(flat(got), flat(want)):
    np.testing.assert_allclose(logprobs, want_logprobs, rtol=0, atol=1e-5)
    assert ids == want_ids
    np.testing.assert_allclose(sum(values, []), sum(want_values, []), rtol=0, atol=1e-5)


def test_launching_ahead_streams_what_reading_at_once_streamed(engine, predictor):
  """The same requests, arriving at the same rounds, through the engine as it runs (each round
  launches the next chunk before reading the last) and as it ran before (read at once): every
  choice's events are the same (tokens, text, log-probs, top log-probs, finish reasons), with
  greedy, sampled, stop-string, n=2, max_tokens=1 and a row refilled mid-run among them."""
  _, text, _ = reference(predictor, png(0), "caption en")
  stop = text[len(text) // 2:len(text) // 2 + 2]
  waves = [[engine_lib.Request("caption en", png(0), MAX_NEW, stop=(stop,)),
            engine_lib.Request("answer en what is it", png(1), MAX_NEW, TEMPERATURE, seed=3,
                               top_logprobs=2)],
           [engine_lib.Request("caption en", png(2), max_tokens=1)],
           [engine_lib.Request("detect cat", png(2), MAX_NEW, TOP_K, seed=5, n=2)],
           [engine_lib.Request("ocr", png(3), max_tokens=5, top_logprobs=1)]]

  def run(round_):
    handles = []
    for wave in waves:
      handles += [engine.submit(r) for r in wave]
      round_(engine)
    while engine._pending or engine._busy():
      round_(engine)
    return [events_of(h) for h in handles]

  ahead = run(lambda e: e._step(wait=False))
  assert_same_events(ahead, run(read_at_once))
  assert [c[-1][2] for h in ahead for c in h.values()] == [
      "stop", "length", "length", "length", "length", "length"]
  want = list(predictor.predict([inference.Example(png(2), "detect cat")] * 2,
                                max_new_tokens=MAX_NEW, sampler=TOP_K, seed=5))
  assert [sum((e[1] for e in ahead[3][i]), []) for i in (0, 1)] == [w["tokens"] for w in want]


def test_a_finished_row_takes_no_tokens_from_the_chunk_launched_after(engine, predictor):
  """A stop string ends a choice in one chunk while the next chunk, already launched, decodes
  its row on: those tokens are dropped, the row is freed and refilled, and the request that
  takes it answers as generate."""
  tokens, text, _ = reference(predictor, png(0), "caption en")
  stop = text[len(text) // 2:len(text) // 2 + 2]
  before = engine.stats()["tokens_total"]
  handle = engine.submit(engine_lib.Request("caption en", png(0), MAX_NEW, stop=(stop,)))
  [choice] = engine._pending[0].choices
  while not choice.finished:
    engine._step(wait=False)
  [after] = [l for l in engine._launched if choice in l.choices]  # Launched before it ended.
  row = after.choices.index(choice)
  assert (np.asarray(after.tokens)[row] >= 0).any()  # The device did choose more for it.
  assert engine._rows[row] is None
  later = engine.submit(engine_lib.Request("caption en", png(3), max_tokens=MAX_NEW))
  run_until_idle(engine)
  events = list(handle.events(timeout=0))
  assert [e.finish_reason for e in events].count("stop") == 1 and events[-1].finish_reason == "stop"
  assert "".join(e.text for e in events) == text[:text.find(stop)]
  assert sum((e.token_ids for e in events), []) == tokens[:events[-1].completion_tokens]
  assert handle._events.empty()  # Nothing sent after the finishing event.
  assert answer(later) == reference(predictor, png(3), "caption en")
  assert engine.stats()["tokens_total"] - before == events[-1].completion_tokens + MAX_NEW


def test_a_row_is_refilled_as_soon_as_the_launched_work_ends_its_request(engine, predictor):
  """A request whose max_tokens the launched prefill and chunk cover frees its row before its
  tokens are read; the next request takes the row at the next round and both answer as
  generate. A cancel while work is launched drops that work's tokens."""
  short = engine.submit(engine_lib.Request("caption en", png(1), max_tokens=3))
  engine._step(wait=False)  # Prefill (1 token) + a chunk of 2: all 3 launched.
  assert engine.stats()["running_slots"] == 0 and engine._launched
  assert short._events.empty()  # Not read yet.
  doomed = engine.submit(engine_lib.Request("ocr", png(2), max_tokens=MAX_NEW))
  inserted = engine.submit(engine_lib.Request("caption en", png(3), max_tokens=MAX_NEW))
  engine._step(wait=False)  # Both take rows; the short one's tokens are read.
  assert engine.stats()["running_slots"] == 2
  doomed.cancel()
  run_until_idle(engine)
  assert [(e.token_ids, e.finish_reason) for e in doomed.events(timeout=0)] == [([], "cancelled")]
  tokens, text, _ = reference(predictor, png(1), "caption en")
  assert answer(short) == (tokens[:3], predictor.tokenizer.decode(tokens[:3]), "length")
  assert answer(inserted) == reference(predictor, png(3), "caption en")


def test_chunks_decode_the_rows_in_use_moving_the_last_ones_down(engine, predictor):
  """When the request in row 0 ends, the one in row 1 moves to row 0 and decodes in chunks of
  one row; its answer is generate's. A request alone decodes one row from the start."""
  short = engine.submit(engine_lib.Request("ocr", png(3), max_tokens=3))
  long = engine.submit(engine_lib.Request("caption en", png(1), MAX_NEW))
  before = engine.stats()
  engine._step(wait=False)
  [second] = [c for c in engine._rows if c is not None and c.live.handle is long]
  assert second.row == 1
  run_until_idle(engine)
  after = engine.stats()
  calls, rows = (after[k] - before[k] for k in ("decode_calls", "decode_rows"))
  assert second.row == 0 and calls < rows < 2 * calls  # Two rows, then one.
  assert answer(long) == reference(predictor, png(1), "caption en")
  assert answer(short)[2] == "length"
  alone = engine.submit(engine_lib.Request("caption en", png(2), MAX_NEW))
  before = engine.stats()
  run_until_idle(engine)
  after = engine.stats()
  assert after["decode_rows"] - before["decode_rows"] == after["decode_calls"] - before[
      "decode_calls"] > 0
  assert answer(alone) == reference(predictor, png(2), "caption en")


def test_a_failed_engine_fails_what_it_had_launched(model):
  """A device failure while launched work holds a request whose row is already free (its
  max_tokens launched): that request ends with "error" too, as the one waiting, never hangs."""
  engine = engine_lib.Engine(model, rows=2, max_queue=2, steps_per_call=2, max_prompt_tokens=16,
                             max_tokens_limit=12)
  launched = engine.submit(engine_lib.Request("caption en", png(1), max_tokens=3))
  engine._step(wait=False)
  assert engine.stats()["running_slots"] == 0 and engine._launched
  waiting = engine.submit(engine_lib.Request("ocr", png(2), max_tokens=4))

  def failing(*args, **kwargs):
    raise RuntimeError("the device is gone")

  engine._decode = failing
  engine._run()
  for handle in (launched, waiting):
    assert handle.result(timeout=0).finish_reason == "error"
  assert "the device is gone" in engine.health()


def test_threaded_streaming_and_draining_shutdown(engine, predictor):
  engine.warmup()  # Shapes of one prompt bucket only here (2 rows): nothing new to compile.
  engine.start()
  requests = [engine_lib.Request("caption en", png(i), max_tokens=MAX_NEW) for i in range(3)]
  results = {}

  def consume(i):
    results[i] = answer_stream(handles[i])

  def answer_stream(handle):
    events = list(handle.events(timeout=60))
    return sum((e.token_ids for e in events), []), "".join(e.text for e in events), \
        events[-1].finish_reason

  with engine_compiles() as compiled:
    handles = [engine.submit(r) for r in requests]
    threads = [threading.Thread(target=consume, args=(i,)) for i in range(3)]
    for t in threads:
      t.start()
    engine.shutdown(drain=True)  # Returns once everything accepted has finished.
    for t in threads:
      t.join(timeout=60)
  assert compiled == []
  for i, r in enumerate(requests):
    assert results[i] == reference(predictor, r.image, r.prompt)
  with pytest.raises(engine_lib.Closed):
    engine.submit(requests[0])
  assert engine.stats()["running_slots"] == 0


def test_an_int8_cache_answers_as_generate_over_one(model):
  """cache_dtype="int8": every row holds int8 keys and values; a request inserted into the
  running batch and the one already there answer as generate does over an int8 cache."""
  engine = engine_lib.Engine(model, rows=2, max_queue=2, steps_per_call=2, max_prompt_tokens=16,
                             max_tokens_limit=12, image_cache_size=2, cache_dtype="int8")
  cache = engine._state.cache
  assert cache.k.dtype == jnp.int8 and cache.k_scale.shape == cache.k.shape[:-1]
  predictor = inference.Predictor(*model, batch_size=2, cache_dtype="int8")
  requests = [engine_lib.Request("caption en", png(0), max_tokens=MAX_NEW),
              engine_lib.Request("answer en what is it", png(1), MAX_NEW, TEMPERATURE, seed=3)]
  first = engine.submit(requests[0])
  engine._step(wait=False)
  second = engine.submit(requests[1])
  run_until_idle(engine)
  assert engine._state.cache.k.dtype == jnp.int8
  for request, handle in zip(requests, (first, second)):
    want = reference(predictor, request.image, request.prompt, request.sampler, request.seed)
    assert answer(handle) == want and len(set(want[0])) > 1


def test_prefill_batches_are_powers_of_two_never_padded(model, predictor):
  """Three prompts admitted together on a 4-row engine run as prefills of 2 and 1 (not one
  batch padded to 4), and answer as generate; the split itself, in order."""
  engine = engine_lib.Engine(model, rows=4, steps_per_call=2, max_prompt_tokens=16,
                             max_tokens_limit=MAX_NEW)
  handles = [engine.submit(engine_lib.Request("caption en", png(i), MAX_NEW)) for i in range(3)]
  engine._step(wait=False)
  assert (engine.stats()["prefill_calls"], engine.stats()["prefilled_prompts"]) == (2, 3)
  run_until_idle(engine)
  for i, handle in enumerate(handles):
    assert answer(handle) == reference(predictor, png(i), "caption en")
  assert engine_lib._binary_parts(list(range(7))) == [[0, 1, 2, 3], [4, 5], [6]]
  assert engine_lib._binary_parts(list(range(8))) == [list(range(8))]
  assert engine_lib._binary_parts([5]) == [[5]] and engine_lib._binary_parts([]) == []


def test_per_row_sampler_settings_choose_as_one_sampler_per_batch():
  logits = jax.random.normal(jax.random.PRNGKey(1), (4, 40)) * 3
  keys = jax.random.split(jax.random.PRNGKey(2), 4)
  samplers = [GREEDY, TEMPERATURE, TOP_K, sampling.Sampler("top_p", temperature=0.7, top_p=0.8)]
  sample = jax.jit(sampling.sample)
  per_row = np.asarray(sample(logits, keys, sampling.per_row(samplers)))
  for i, sampler in enumerate(samplers):
    assert per_row[i] == np.asarray(sample(logits, keys, sampler.as_arrays()))[i]
  assert len(set(per_row)) > 1


