"""Beam search parity with transformers' generate(num_beams, length_penalty, early_stopping=True)
(K=1: its greedy decoding), and the way in through the Predictor, generate and evaluate."""

import copy
import json
import types

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

from paligemma_jax import errors
from paligemma_jax import evaluate
from paligemma_jax import generate
from paligemma_jax.checkpoints import loading
from paligemma_jax.decoding import autoregressive
from paligemma_jax.decoding import batching
from paligemma_jax.decoding import beam_search
from paligemma_jax.decoding import inference
from paligemma_jax.decoding import sampling
from paligemma_jax.evaluation import runner
from paligemma_jax.model import paligemma
from paligemma_jax.tasks import result_lines
from test_autoregressive import prompts  # Right-padded prompts of given lengths.

MAX_NEW = 8
PENALTIES = (1.0, 0.0, 2.0)


@pytest.fixture(scope="module")
def soft():
  """soft(converted) -> (transformers model, params, config, tokenizer) with every logit scaled
  by 0.1 in both (through the final norm's scale): the tiny random models' next-token
  distributions are near one-hot, where every beam search returns the greedy answer."""
  built = {}

  def get(converted):
    directory, reference = converted
    if directory not in built:
      params, config, tokenizer = loading.load_model(directory)
      reference = copy.deepcopy(reference)
      w = reference.model.language_model.norm.weight
      with torch.no_grad():
        w.copy_(0.1 * (1 + w) - 1)
      scale = jnp.asarray(w.detach().numpy(), params["llm"]["final_norm"]["scale"].dtype)
      llm = {**params["llm"], "final_norm": {"scale": scale}}
      built[directory] = (reference, {**params, "llm": llm}, config, tokenizer)
    return built[directory]

  return get


def reference_generate(model, tokens, image, image_token, **kwargs):
  """transformers generate for one unpadded row: (generated ids up to <eos> included, output)."""
  with torch.no_grad():
    out = model.generate(input_ids=torch.tensor(tokens[None], dtype=torch.long),
                         pixel_values=torch.tensor(image[None].transpose(0, 3, 1, 2)),
                         attention_mask=torch.ones(1, len(tokens), dtype=torch.long),
                         token_type_ids=torch.zeros(1, len(tokens), dtype=torch.long),
                         do_sample=False, pad_token_id=0, suppress_tokens=[image_token],
                         return_dict_in_generate=True, output_scores=True, **kwargs)
  new = out.sequences[0, len(tokens):].tolist()
  eos = kwargs.get("eos_token_id")
  return (new[:new.index(eos) + 1] if eos in new else new), out


def hypothesis(generation, b):
  """Row b's best hypothesis as transformers reports it: <eos> included, if any."""
  return generation.tokens[b, :generation.lengths[b] + generation.hit_eos[b]].tolist()


@pytest.mark.parametrize("version", [1, 2], ids=["pg1", "pg2"])
def test_best_hypothesis_and_score_match_transformers(version, soft, converted_checkpoint):
  reference, params, config, _ = soft(converted_checkpoint(version))
  n = paligemma.num_image_tokens(config)
  lengths = [32, n + 3, n + 6]  # Prompts of different lengths in one batch (the Predictor's shape).
  tokens, images, input_mask, prefix_mask = prompts(config, lengths)
  # <eos>: the second most likely first token of row 0, so one of its beams ends at once.
  _, first = reference_generate(reference, tokens[0, :lengths[0]], images[0],
                                config.image_token_id, max_new_tokens=1)
  eos = int(torch.topk(first.scores[0][0], 2).indices[1])
  searcher = beam_search.BeamGenerator(autoregressive.Generator(params, config, eos_id=eos))
  stops = set()
  penalties = PENALTIES if version == 1 else PENALTIES[:2]  # Test time: 2.0 once is enough.
  for beam_size, penalty in [(3, p) for p in penalties] + [(1, 0.0)] * (version == 1):
    beams = beam_search.BeamSearch(beam_size, length_penalty=penalty)
    generation = searcher.generate(tokens, images, input_mask, prefix_mask,
                                   max_new_tokens=MAX_NEW, sampler=beams)
    for b, length in enumerate(lengths):
      theirs, out = reference_generate(  # transformers: num_beams=1 is greedy decoding.
          reference, tokens[b, :length], images[b], config.image_token_id, max_new_tokens=MAX_NEW,
          num_beams=beam_size, length_penalty=penalty, early_stopping=True, eos_token_id=eos,
          output_logits=True)
      ours = hypothesis(generation, b)
      assert ours == theirs, (beam_size, penalty, b)
      # The score is the hypothesis' own log-probs (<eos> included) over its length ** A.
      np.testing.assert_allclose(generation.logprobs[b, :len(ours)].sum() / len(ours) ** penalty,
                                 generation.scores[b], rtol=1e-5)
      if beam_size > 1:
        np.testing.assert_allclose(generation.scores[b], out.sequences_scores[0].item(), rtol=1e-5)
      else:
        greedy = [torch.log_softmax(l[0], -1)[t].item() for l, t in zip(out.logits, theirs)]
        np.testing.assert_allclose(generation.logprobs[b, :len(ours)], greedy, atol=1e-5)
      stops.add((generation.row(b)[2], len(ours)))
  assert ("eos", 1) in stops and ("length", MAX_NEW) in stops  # Both ways of finishing ran.


def test_predictor_answers_with_the_best_hypothesis_and_its_score(soft, converted_checkpoint,
                                                                    tmp_path):
  _, params, config, tokenizer = soft(converted_checkpoint(1))
  examples = []
  for i, color in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
    Image.new("RGB", (16, 12), color).save(tmp_path / f"{i}.png")
    examples.append(inference.Example(str(tmp_path / f"{i}.png"), "caption en", {"i": i}))
  predictor = inference.Predictor(params, config, tokenizer, batch_size=3)
  beams = beam_search.BeamSearch(beam_size=3, length_penalty=0.0)
  out = tmp_path / "out.jsonl"
  settings = {"max_new_tokens": MAX_NEW, **generate.sampler_settings(beams, seed=0)}
  assert settings == {"max_new_tokens": MAX_NEW, "sampler": "beam", "beam_size": 3,
                      "length_penalty": 0.0}
  results = [r for _, r in result_lines.answer(predictor, examples, output=str(out), settings=settings,
                                          max_new_tokens=MAX_NEW, sampler=beams)]
  assert [json.loads(line) for line in out.read_text().splitlines()] == results
  batch = batching.collate([predictor.prepare(e, MAX_NEW) for e in examples], 3, predictor.bucket)
  direct = predictor.beam_generator.generate(*batch, max_new_tokens=MAX_NEW, sampler=beams)
  for i, r in enumerate(results):
    assert r["i"] == i and r["text"] == tokenizer.decode(r["tokens"])
    assert (r["tokens"], r["logprobs"], r["stop_reason"]) == direct.row(i)
    assert r["score"] == pytest.approx(float(direct.scores[i]))


def test_bad_settings_are_one_line_errors(soft, converted_checkpoint):
  for bad in (dict(beam_size=0), dict(beam_size=2.0), dict(length_penalty=float("nan"))):
    with pytest.raises(ValueError):
      beam_search.BeamSearch(**bad)
  defaults = dict(checkpoint="/nonexistent", input_jsonl=None, image="x.png", prompt="caption en",
                  output_jsonl=None, sampler="beam", beam_size=3, length_penalty=None,
                  temperature=1.0, top_k=40, top_p=0.95, task=None, vae_npz=None, draw_dir=None)
  for changes, needle in [(dict(beam_size=0), "beam_size must be"),
                          (dict(beam_size=None), "needs --beam_size"),
                          (dict(temperature=0.5), "--temperature"),
                          (dict(top_k=3), "--top_k"),
                          (dict(sampler="greedy"), "--beam_size is for --sampler=beam"),
                          (dict(sampler="top_p", beam_size=None, length_penalty=0.0),
                           "--length_penalty is for"),
                          (dict(beam_size=2, length_penalty=1.0), "/nonexistent")]:  # Valid.
    with pytest.raises(errors.InputError, match=needle):
      generate.validate_flags(types.SimpleNamespace(**{**defaults, **changes}))
  with pytest.raises(errors.InputError, match="--task=score"):
    evaluate.validate_flags(types.SimpleNamespace(
        dataset=__file__, predictions=None, metrics=None, task="score", vae_npz=None,
        image_dir=None, checkpoint=None, sampler="beam", beam_size=2, length_penalty=None))
  _, params, config, _ = soft(converted_checkpoint(1))
  searcher = beam_search.BeamGenerator(autoregressive.Generator(params, config, vocab_size=5))
  batch = prompts(config, [paligemma.num_image_tokens(config) + 2])
  with pytest.raises(ValueError, match="needs at least 6 token ids"):
    searcher.generate(*batch, max_new_tokens=2, sampler=beam_search.BeamSearch(3))
  with pytest.raises(ValueError, match="BeamSearch sampler"):
    searcher.generate(*batch, max_new_tokens=2, sampler=sampling.Sampler())


def test_more_beams_than_the_vocabulary_holds_is_one_line_before_any_example_runs(
    soft, converted_checkpoint, tmp_path):
  """2K candidates a step need 2K token ids: more beams than the loaded model's vocabulary allows
  (1536 ids here) are an InputError (one line from the command lines), not a ValueError."""
  _, params, config, tokenizer = soft(converted_checkpoint(1))
  predictor = inference.Predictor(params, config, tokenizer)
  Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
  beams = beam_search.BeamSearch(beam_size=800)
  with pytest.raises(errors.InputError, match="beam_size 800 is too large .* at most 768"):
    next(predictor.predict([inference.Example(str(tmp_path / "a.png"), "ocr")], max_new_tokens=2,
                           sampler=beams))


def test_evaluation_decodes_with_the_beams_and_records_them(tmp_path):
  """The beam settings reach the predictor and the predictions' settings (a greedy run's
  predictions are not resumed by a beam run)."""
  Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
  dataset = tmp_path / "d.jsonl"
  record = {"image": "a.png", "prompt": "caption en", "captions": ["x"]}
  dataset.write_text(json.dumps(record) + "\n")
  calls = []

  class Predictor:
    def predict(self, examples, **kwargs):
      calls.append(kwargs)
      for _ in examples:
        yield {"text": "x", "stop_reason": "eos", "image_size": [8, 8]}

  beams = beam_search.BeamSearch(beam_size=2, length_penalty=0.0)
  for run_beams, name in [(None, "greedy"), (beams, "beam")]:
    evaluator = runner.Evaluator(None, beams=run_beams)
    evaluator.predictor = Predictor()
    evaluator.run(str(dataset), "caption", str(tmp_path / f"{name}.jsonl"), progress=False)
  assert calls == [{"max_new_tokens": 64}, {"max_new_tokens": 64, "sampler": beams}]
  (settings,) = [json.loads(p.read_text()) for p in tmp_path.glob("beam*.run.json")]
  assert settings["decoding"] == {"sampler": "beam", "beam_size": 2, "length_penalty": 0.0}
  with pytest.raises(errors.InputError, match="decoding"):
    evaluator.run(str(dataset), "caption", str(tmp_path / "greedy.jsonl"), progress=False)
