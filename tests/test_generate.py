"""`python -m paligemma_jax.generate` end to end on a tiny converted checkpoint."""

import json
import os
import re
import subprocess
import sys

import numpy as np
from PIL import Image

from paligemma_jax import decode
from paligemma_jax import inference
from paligemma_jax import processor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
  params, config, tokenizer = inference.load_model(directory)
  predictor = inference.Predictor(config, params, tokenizer)
  for r in (results[0], results[3], results[6]):
    assert set(r) >= {"image", "prompt", "text", "tokens", "logprobs", "stop_reason"}
    tokens, prefix_mask = predictor.prompt_tokens(r["prompt"])
    pixels = processor.preprocess_image(processor.load_image(r["image"]), config.vision.image_size)
    ones = np.ones((1, len(tokens)), bool)
    want = decode.Decoder(config, params).generate(tokens[None], pixels[None], ones, prefix_mask[None],
                                                   max_new_tokens=6).row(0)
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
  missing = run("--checkpoint=/nonexistent", f"--image={tmp_path / 'blue.png'}", "--prompt=x")
  assert missing.returncode != 0 and "/nonexistent" in missing.stderr
  usage = run(f"--checkpoint={directory}", "--prompt=x")
  assert usage.returncode != 0 and "--image and --prompt" in usage.stderr


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
                          env=dict(os.environ, PYTHONPATH=ROOT,
                                   XLA_FLAGS="--xla_force_host_platform_device_count=4"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    outputs[mesh] = [json.loads(line) for line in out.read_text().splitlines()]
  for single, sharded in zip(outputs[None], outputs["data:2,tensor:2"]):
    assert single["tokens"] == sharded["tokens"]
    np.testing.assert_allclose(single["logprobs"], sharded["logprobs"], atol=1e-5)


def test_help_explains_every_flag():
  proc = run("--help")
  for flag in ("checkpoint", "config", "image", "prompt", "input_jsonl", "output_jsonl", "batch_size",
               "max_new_tokens", "sampler", "temperature", "top_k", "top_p", "seed", "dtype", "task",
               "mesh", "distributed"):
    assert re.search(rf"--(\[no\])?{flag}:", proc.stdout), flag
