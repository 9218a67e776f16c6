"""`python -m paligemma_jax.generate` end to end on a tiny converted checkpoint."""

import json
import os
import re
import subprocess
import sys
import types

import numpy as np
from PIL import Image
import pytest

from paligemma_jax import errors
from paligemma_jax import generate
from paligemma_jax import tasks
from paligemma_jax.checkpoints import loading
from paligemma_jax.decoding import autoregressive
from paligemma_jax.decoding import inference
from paligemma_jax.decoding import sampling
from paligemma_jax.preprocess import processor
from paligemma_jax.tasks import result_lines
from helpers import ROOT, assert_expected_failure



def run(*args):
  return subprocess.run([sys.executable, "-m", "paligemma_jax.generate", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, PYTHONPATH=ROOT))


def test_jsonl_batch_with_bad_lines_keeps_order_and_matches_the_library(converted_checkpoint, tmp_path):
  directory, _ = converted_checkpoint(2)
  rng = np.random.RandomState(0)
  images = []
  for i, size in enumerate([(40, 30), (17, 50), (64, 64)]):
    images.append(str(tmp_path / f"img{i}.png"))
    Image.fromarray(rng.randint(0, 255, size[::-1] + (3,), dtype=np.uint8)).save(images[-1])
  (tmp_path / "broken.png").write_bytes(b"not an image")
  lines = [json.dumps({"image": images[0], "prompt": "caption en", "id": "a"}), "{not json",
           json.dumps({"image": str(tmp_path / "missing.png"), "prompt": "ocr"}),
           json.dumps({"image": images[1], "prompt": "answer en what is this?"}),
           json.dumps({"prompt": "no image"}),
           json.dumps({"image": str(tmp_path / "broken.png"), "prompt": "ocr"}),
           json.dumps({"image": images[2], "prompt": "detect cat ; dog"})]
  (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
  out = tmp_path / "out.jsonl"
  proc = run(f"--checkpoint={directory}", f"--input_jsonl={tmp_path / 'in.jsonl'}",
             f"--output_jsonl={out}", "--batch_size=2", "--max_new_tokens=6")
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = [json.loads(line) for line in out.read_text().splitlines()]
  assert len(results) == len(lines)  # One line per input, in input order.
  assert [r.get("image") for r in results] == [images[0], None, str(tmp_path / "missing.png"),
                                               images[1], None, str(tmp_path / "broken.png"), images[2]]
  assert results[0]["id"] == "a"
  assert "in.jsonl:2" in results[1]["error"] and "in.jsonl:5" in results[4]["error"]
  assert "missing.png" in results[2]["error"] and "broken.png" in results[5]["error"]
  assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]  # Nothing half-written.

  # Each answer equals a direct library run of that example alone.
  params, config, tokenizer = loading.load_model(directory)
  predictor = inference.Predictor(params, config, tokenizer)
  for r in (results[0], results[3], results[6]):
    assert set(r) >= {"image", "prompt", "text", "tokens", "logprobs", "stop_reason"}
    tokens, prefix_mask = predictor.prompt_tokens(r["prompt"])
    pixels = processor.preprocess_image(processor.load_image(r["image"]), config.vision.image_size)
    ones = np.ones((1, len(tokens)), bool)
    want = autoregressive.Generator(params, config, vocab_size=tokenizer.vocab_size).generate(
        tokens[None], pixels[None], ones, prefix_mask[None], max_new_tokens=6).row(0)
    assert r["tokens"] == want[0] and r["stop_reason"] == want[2]
    np.testing.assert_allclose(r["logprobs"], want[1], atol=1e-5)
    assert r["text"] == tokenizer.decode(want[0])


def test_single_example_and_refusals(converted_checkpoint, tmp_path):
  directory, _ = converted_checkpoint(1)
  Image.new("RGB", (20, 10), (0, 128, 255)).save(tmp_path / "blue.png")
  proc = run(f"--checkpoint={directory}", f"--image={tmp_path / 'blue.png'}", "--prompt=caption en",
             "--max_new_tokens=3", "--sampler=top_p", "--top_p=0.9", "--seed=3")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.startswith(f"{tmp_path / 'blue.png'}\t'caption en'\t")

  too_long = run(f"--checkpoint={directory}", f"--image={tmp_path / 'blue.png'}", "--prompt=x",
                 "--max_new_tokens=9000")
  assert too_long.returncode != 0 and "exceeds the model's 8192 positions" in too_long.stderr
  # A missing checkpoint: test_expected_failures_are_one_line_before_any_loading.
  usage = run(f"--checkpoint={directory}", "--prompt=x")
  assert usage.returncode != 0 and "--image and --prompt" in usage.stderr


def test_several_images_by_flag_and_by_line_match_the_library(converted_checkpoint, tmp_path):
  directory, _ = converted_checkpoint(2)
  rng = np.random.RandomState(1)
  paths = []
  for i, size in enumerate([(30, 20), (16, 40)]):
    paths.append(str(tmp_path / f"img{i}.png"))
    Image.fromarray(rng.randint(0, 255, size[::-1] + (3,), dtype=np.uint8)).save(paths[-1])
  proc = run(f"--checkpoint={directory}", f"--image={paths[0]}", f"--image={paths[1]}",
             "--prompt=answer en which is wider?", "--max_new_tokens=5", "--task=detect")
  assert proc.returncode == 0, proc.stderr[-3000:]
  params, config, tokenizer = loading.load_model(directory)
  predictor = inference.Predictor(params, config, tokenizer, batch_size=2)
  example = inference.Example(images=paths, prompt="answer en which is wider?")
  want, = predictor.predict([example], max_new_tokens=5)
  assert proc.stdout == f"{paths[0]},{paths[1]}\t'answer en which is wider?'\t{want['text']}\n"

  lines = [{"images": paths, "prompt": "caption en", "id": 1}, {"image": paths[1], "prompt": "ocr"},
           {"images": paths[::-1], "prompt": "caption en"}, {"images": [], "prompt": "x"},
           {"images": [paths[0], 3], "prompt": "x"}]
  (tmp_path / "in.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
  items = result_lines.read_examples(str(tmp_path / "in.jsonl"))
  assert "in.jsonl:4: bad input line: 'images' must be a non-empty list" in items[3]["error"]
  assert "in.jsonl:5: bad input line: 'images' must be a list of strings" in items[4]["error"]
  out = tmp_path / "out.jsonl"
  results = [r for _, r in result_lines.answer(
      predictor, items, output=str(out), settings={}, max_new_tokens=5,
      outputs=result_lines.Outputs(tasks.get("detect")))]
  assert results[0]["images"] == paths and results[0]["id"] == 1 and "image" not in results[0]
  assert results[0]["image_sizes"] == [[30, 20], [16, 40]] and results[2]["image_size"] == [16, 40]
  assert "boxes" in results[0]  # Of the first image (see generate's docstring).
  for line, result in zip(lines[:3], results):
    alone, = predictor.predict([inference.Example(line.get("image"), line["prompt"],
                                                  images=line.get("images"))], max_new_tokens=5)
    assert result["tokens"] == alone["tokens"]
  # A rerun of the finished file gives the same lines without running anything.
  again = [r for _, r in result_lines.answer(None, items, output=str(out), settings={},
                                             max_new_tokens=5)]
  assert again == results


def test_mesh_flag_shards_and_gives_the_same_answers(converted_checkpoint, tmp_path):
  directory, _ = converted_checkpoint(2)
  rng = np.random.RandomState(1)
  lines = []
  for i in range(3):
    Image.fromarray(rng.randint(0, 255, (24, 24, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    lines.append(json.dumps({"image": str(tmp_path / f"{i}.png"), "prompt": f"caption {'en ' * i}"}))
  (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
  outputs = {}
  for mesh in (None, "data:2,tensor:2"):
    out = tmp_path / f"{mesh}.jsonl"
    args = [f"--checkpoint={directory}", f"--input_jsonl={tmp_path / 'in.jsonl'}", f"--output_jsonl={out}",
            "--batch_size=2", "--max_new_tokens=5"] + ([f"--mesh={mesh}"] if mesh else [])
    proc = subprocess.run([sys.executable, "-m", "paligemma_jax.generate", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS=" ".join([
                              os.environ.get("XLA_FLAGS", ""),  # conftest's faster compiling.
                              "--xla_force_host_platform_device_count=4"])))
    assert proc.returncode == 0, proc.stderr[-3000:]
    outputs[mesh] = [json.loads(line) for line in out.read_text().splitlines()]
  for single, sharded in zip(outputs[None], outputs["data:2,tensor:2"]):
    assert single["tokens"] == sharded["tokens"]
    np.testing.assert_allclose(single["logprobs"], sharded["logprobs"], atol=1e-5)


def test_int8_kv_cache_answers_as_the_library_and_is_kept_with_the_output(converted_checkpoint,
                                                                          tmp_path):
  """--kv_cache_dtype=int8: the answers of Predictor(cache_dtype="int8"); the setting is kept
  beside the output, so a rerun with the float cache is refused; a bad value is one line."""
  directory, _ = converted_checkpoint(2)
  images = _images(tmp_path, 2)
  (tmp_path / "in.jsonl").write_text("".join(
      json.dumps({"image": image, "prompt": "caption en"}) + "\n" for image in images))
  out = tmp_path / "out.jsonl"
  args = [f"--checkpoint={directory}", f"--input_jsonl={tmp_path / 'in.jsonl'}",
          f"--output_jsonl={out}", "--max_new_tokens=4"]
  proc = run(*args, "--kv_cache_dtype=int8")
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = [json.loads(line) for line in out.read_text().splitlines()]
  params, config, tokenizer = loading.load_model(directory)
  predictor = inference.Predictor(params, config, tokenizer, cache_dtype="int8")
  assert predictor.generator.cache_dtype == np.int8
  want = predictor.predict([inference.Example(image, "caption en") for image in images],
                           max_new_tokens=4)
  for got, w in zip(results, want, strict=True):
    assert got["tokens"] == w["tokens"]
    np.testing.assert_allclose(got["logprobs"], w["logprobs"], atol=1e-5)
  _no_traceback_one_line(run(*args), "kv_cache_dtype: 'int8' then, None now")
  _no_traceback_one_line(run(*args, "--kv_cache_dtype=int4"), "--kv_cache_dtype", "auto", "int8")


def test_help_explains_every_flag():
  proc = run("--help")
  for flag in ("checkpoint", "config", "image", "prompt", "input_jsonl", "output_jsonl", "batch_size",
               "max_new_tokens", "sampler", "temperature", "top_k", "top_p", "seed", "dtype", "task",
               "mesh", "distributed", "quantize", "kv_cache_dtype"):
    assert re.search(rf"--(\[no\])?{flag}:", proc.stdout), flag


def _images(tmp_path, n):
  rng = np.random.RandomState(2)
  paths = []
  for i in range(n):
    paths.append(str(tmp_path / f"im{i}.png"))
    Image.fromarray(rng.randint(0, 255, (12 + i, 20, 3), dtype=np.uint8)).save(paths[-1])
  return paths


def _no_traceback_one_line(proc, *needles):
  """An expected failure: exit 1, no traceback, and the message (naming `needles`) on one line."""
  lines = [line for line in assert_expected_failure(proc) if all(n in line for n in needles)]
  assert lines, proc.stderr[-3000:]


def test_bad_lines_and_prompts_become_their_own_rows_errors(converted_checkpoint, tmp_path):
  """A lone surrogate, invalid UTF-8 and a prompt longer than the model stopped whole runs."""
  directory, _ = converted_checkpoint(1)
  image, = _images(tmp_path, 1)
  lines = [json.dumps({"image": image, "prompt": "caption en"}).encode(),
           b'{"image": "%s", "prompt": "caption \\ud83d"}' % image.encode(),
           b'{"image": "%s", "prompt": "caf\xe9"}' % image.encode(),
           json.dumps({"image": image, "prompt": "a " * 9000}).encode(),
           json.dumps({"image": image, "prompt": "ocr"}).encode()]
  (tmp_path / "in.jsonl").write_bytes(b"\n".join(lines) + b"\n")
  out = tmp_path / "out.jsonl"
  proc = run(f"--checkpoint={directory}", f"--input_jsonl={tmp_path / 'in.jsonl'}",
             f"--output_jsonl={out}", "--batch_size=2", "--max_new_tokens=3")
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
  assert len(results) == 5 and "text" in results[0] and "text" in results[4]
  assert "in.jsonl:2" in results[1]["error"] and "surrogate" in results[1]["error"]
  assert "in.jsonl:3" in results[2]["error"] and "UTF-8" in results[2]["error"]
  assert "exceeds the model's 8192 positions" in results[3]["error"]
  assert sorted(os.listdir(tmp_path)) == ["im0.png", "in.jsonl", "out.jsonl", "out.jsonl.run.json"]


def test_undecodable_prompt_byte_is_one_line_not_a_crash(converted_checkpoint, tmp_path):
  directory, _ = converted_checkpoint(1)
  image, = _images(tmp_path, 1)
  proc = subprocess.run([sys.executable.encode(), b"-m", b"paligemma_jax.generate",
                         f"--checkpoint={directory}".encode(), f"--image={image}".encode(),
                         b"--prompt=caption \xff", b"--max_new_tokens=2"], cwd=ROOT,
                        capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, PYTHONPATH=ROOT))
  _no_traceback_one_line(proc, "not valid Unicode")


def test_expected_failures_are_one_line_before_any_loading(converted_checkpoint, tmp_path):
  directory, _ = converted_checkpoint(1)
  image, = _images(tmp_path, 1)
  (tmp_path / "in.jsonl").write_text(json.dumps({"image": image, "prompt": "ocr"}) + "\n")
  before = (tmp_path / "in.jsonl").read_text()
  common = [f"--checkpoint={directory}", f"--input_jsonl={tmp_path / 'in.jsonl'}"]
  # As a user meets them: each a whole process (flag parsing, validation, the one error path).
  for args, needles in [
      (["--checkpoint=/nonexistent", f"--image={image}", "--prompt=x"], ("/nonexistent",)),
      (common + ["--batch_size=0"], ("--batch_size",)),
      (common + [f"--output_jsonl={tmp_path / 'in.jsonl'}"], ("--output_jsonl", "--input_jsonl")),
      (common + ["stray"], ("unexpected arguments",)),
      ([f"--checkpoint={directory}", f"--input_jsonl={tmp_path / 'empty.jsonl'}"], ("no examples",))]:
    (tmp_path / "empty.jsonl").write_text("\n  \n")
    _no_traceback_one_line(run(*args), *needles)
  # The rest of the checks, in process.
  defaults = dict(checkpoint=directory, input_jsonl=str(tmp_path / "in.jsonl"), image=None,
                  prompt=None, output_jsonl=None, sampler="greedy", temperature=1.0, top_k=40,
                  top_p=0.95, task=None, vae_npz=None, draw_dir=None)
  for changes, needles in [
      (dict(input_jsonl=str(tmp_path / "nope.jsonl")), ("nope.jsonl",)),
      (dict(output_jsonl=str(tmp_path / "no_dir" / "o.jsonl")), ("no_dir",)),
      (dict(sampler="temperature", temperature=0.0), ("--sampler", "temperature")),
      (dict(sampler="top_p", top_p=1.5), ("--sampler", "top_p")),
      (dict(draw_dir="x"), ("--draw_dir",)),
      (dict(task="segment"), ("--vae_npz",)),
      (dict(image=image), ("--image",)),
      (dict(input_jsonl=None, image=image), ("--image and --prompt",)),
      (dict(checkpoint=str(tmp_path)), (str(tmp_path),))]:
    with pytest.raises(errors.InputError) as e:
      generate.validate_flags(types.SimpleNamespace(**{**defaults, **changes}))
    assert all(n in str(e.value) for n in needles), (changes, str(e.value))
  assert (tmp_path / "in.jsonl").read_text() == before
  assert sorted(os.listdir(tmp_path)) == ["empty.jsonl", "im0.png", "in.jsonl"]  # Nothing written.


def test_killed_run_continues_after_its_finished_lines(converted_checkpoint, tmp_path):
  """kill -9 at any moment, then the same command: the output is what one run writes."""
  import signal
  import time
  directory, _ = converted_checkpoint(2)
  images = _images(tmp_path, 4)
  lines = [json.dumps({"image": images[i % 4], "prompt": "caption en" + " a" * (i % 3), "i": i})
           for i in range(30)]
  (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
  args = lambda out, n=4: [sys.executable, "-m", "paligemma_jax.generate", f"--checkpoint={directory}",
                           f"--input_jsonl={tmp_path / 'in.jsonl'}", f"--output_jsonl={out}",
                           "--batch_size=1", f"--max_new_tokens={n}"]
  env = dict(os.environ, PYTHONPATH=ROOT)
  whole = run(*args(tmp_path / "whole.jsonl")[3:])
  assert whole.returncode == 0, whole.stderr[-3000:]
  want = (tmp_path / "whole.jsonl").read_text()

  out = tmp_path / "out.jsonl"
  proc = subprocess.Popen(args(out), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  partial = tmp_path / "out.jsonl.partial"
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if partial.exists() and partial.read_bytes().count(b"\n") >= 3:
      break
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_early = not out.exists()
  if killed_early:  # Make the kill land mid-line too.
    with open(partial, "ab") as f:
      f.write(b'{"image": "cut')
  # A run with other settings does not mix into what the killed one left.
  other = run(*args(out, n=5)[3:])
  _no_traceback_one_line(other, "max_new_tokens: 4 then, 5 now")
  again = run(*args(out)[3:])
  assert again.returncode == 0, again.stderr[-3000:]
  assert out.read_text() == want
  assert sorted(p for p in os.listdir(tmp_path) if p.startswith("out")) == ["out.jsonl",
                                                                            "out.jsonl.run.json"]
  # Nor into a finished one: it is refused the same way, not replaced.
  _no_traceback_one_line(run(*args(out, n=5)[3:]), "max_new_tokens: 4 then, 5 now")
  assert out.read_text() == want
  assert killed_early  # The run was caught mid-way, so the resume was tested.


def test_a_finished_output_is_kept_and_other_settings_are_refused(tmp_path):
  """A rerun on a finished --output_jsonl gives its results without loading the model; one with
  other settings or other inputs is refused (it used to run again and replace the file)."""
  items = [inference.Example("a.png", "ocr"), {"line": 2, "error": "in.jsonl:2: bad input line"}]

  class Predictor:
    def predict(self, examples, **kwargs):
      for e in examples:
        yield {"image": e.image, "prompt": e.prompt, "text": "x"}

  out = str(tmp_path / "out.jsonl")
  first = [r for _, r in result_lines.answer(Predictor(), items, output=out, settings={"seed": 1})]
  written = open(out).read()
  unused = lambda: pytest.fail("loaded the model for a finished run")
  again = [r for _, r in result_lines.answer(unused, items, output=out, settings={"seed": 1})]
  assert again == first and open(out).read() == written
  with pytest.raises(errors.InputError, match="seed: 1 then, 2 now"):
    list(result_lines.answer(unused, items, output=out, settings={"seed": 2}))
  with pytest.raises(errors.InputError, match="out.jsonl does not match the input file"):
    list(result_lines.answer(unused, items + items, output=out, settings={"seed": 1}))
  assert open(out).read() == written
  assert sorted(os.listdir(tmp_path)) == ["out.jsonl", "out.jsonl.run.json"]


def test_out_of_range_flag_values_are_one_line_before_loading(converted_checkpoint, tmp_path):
  """Values past what the device holds (int32 top_k, int64 seed), more beams than any model
  takes, a batch no memory holds: each a one-line error, the model never loaded (here it could
  not be: its parameters are missing)."""
  directory, _ = converted_checkpoint(1)
  unloadable = tmp_path / "checkpoint"
  (unloadable / "params").mkdir(parents=True)
  (unloadable / "config.json").write_text(open(os.path.join(directory, "config.json")).read())
  image, = _images(tmp_path, 1)
  common = [f"--checkpoint={unloadable}", f"--image={image}", "--prompt=caption en"]
  for args, needle in [(["--sampler=top_k", "--top_k=2147483648"], "top_k"),
                       (["--sampler=top_k", "--seed=1180591620717411303424"], "--seed"),
                       (["--sampler=beam", "--beam_size=5000"], "--beam_size"),
                       (["--batch_size=100000000000000"], "--batch_size")]:
    _no_traceback_one_line(run(*common, *args), needle)


def test_input_lines_cannot_smuggle_in_result_fields(tmp_path):
  """An earlier output fed back in (to retry its errors) must not carry its `error` or `text`."""
  path = tmp_path / "in.jsonl"
  path.write_text(json.dumps({"image": "a.png", "prompt": "ocr", "id": 7, "error": "old",
                              "text": "old", "tokens": [1]}) + "\n")
  example, = result_lines.read_examples(str(path))
  assert (example.image, example.prompt, example.extra) == ("a.png", "ocr", {"id": 7})


def test_a_greedy_run_records_only_what_decides_its_tokens():
  greedy = generate.sampler_settings(sampling.Sampler("greedy", temperature=0.7, top_p=0.5), 3)
  assert greedy == {"sampler": "greedy"}  # Resuming with another --temperature is the same run.
  top_p = generate.sampler_settings(sampling.Sampler("top_p", temperature=0.7, top_p=0.5), 3)
  assert top_p == {"sampler": "top_p", "temperature": 0.7, "top_p": 0.5, "seed": 3}
