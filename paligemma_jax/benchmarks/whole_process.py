r"""Whole-process benchmark: the generate CLI against a transformers script doing the same job.

  python -m paligemma_jax.benchmark --e2e --variant=pg1-3b --vision_layers=2 --text_layers=2

Builds (or reuses, with --e2e_dir) a random transformers PaliGemma at the variant's real widths,
its Hugging Face directory and our converted checkpoint of it, 16 images and an input file. Each
round then runs, as separate processes and in alternating order:

  ours cold    python -m paligemma_jax.generate on the converted checkpoint, empty XLA cache
  ours warm    the same with a compilation cache filled by an earlier (untimed) run
  transformers a script that loads the HF directory, preprocesses (SiglipImageProcessor),
               tokenizes (SentencePiece), generates greedily and detokenizes: the same work

Each answers --e2e_examples prompts in batches of --e2e_batch_size with --new_tokens greedy
tokens (random weights never pick <eos>, so every row makes all of them). Prints the medians and
the ratios ours / transformers (below 1: ours is faster). Results go to docs/benchmarks.md by hand.
"""

import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from absl import flags
import numpy as np

from paligemma_jax import cli

_TRANSFORMERS = r"""
import json, sys
import numpy as np, PIL.Image, sentencepiece, torch, transformers
hf_dir, in_jsonl, out_jsonl, batch, new = sys.argv[1:4] + [int(x) for x in sys.argv[4:6]]
model = transformers.PaliGemmaForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
cfg = model.config
size = cfg.vision_config.image_size
images = transformers.SiglipImageProcessor(size={"height": size, "width": size}, resample=3,
                                           image_mean=[0.5] * 3, image_std=[0.5] * 3)
sp = sentencepiece.SentencePieceProcessor(model_file=hf_dir + "/tokenizer.model")
n = (size // cfg.vision_config.patch_size) ** 2
lines = [json.loads(l) for l in open(in_jsonl) if l.strip()]
with open(out_jsonl, "w") as out, torch.no_grad():
  for i in range(0, len(lines), batch):
    chunk = lines[i:i + batch]
    rows = [[cfg.image_token_index] * n + [sp.bos_id()] + sp.encode(e["prompt"] + "\n") for e in chunk]
    width = max(map(len, rows))  # Left-padded, as transformers generates.
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    pixels = images([PIL.Image.open(e["image"]).convert("RGB") for e in chunk],
                    return_tensors="pt")["pixel_values"]
    got = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels,
                         token_type_ids=torch.zeros_like(ids), max_new_tokens=new, do_sample=False)
    for e, tokens in zip(chunk, got[:, width:].tolist()):
      out.write(json.dumps({**e, "text": sp.decode([t for t in tokens if t < sp.get_piece_size()])}) + "\n")
"""


def define_flags():
  flags.DEFINE_bool("e2e", False, "Instead of the component timings, time whole processes: the "
                    "generate CLI against a transformers script (paligemma_jax/benchmarks/whole_process.py).")
  flags.DEFINE_string("e2e_dir", None, "Work directory to build the checkpoints in, or reuse "
                      "them from (default: a temporary one).")
  flags.DEFINE_integer("e2e_rounds", 3, "Rounds of (ours cold, ours warm, transformers).",
                       lower_bound=1, upper_bound=1000)
  flags.DEFINE_integer("e2e_examples", 16, "Prompts answered per process.", lower_bound=1,
                       upper_bound=1_000_000)
  flags.DEFINE_integer("e2e_batch_size", 8, "Batch size of both.", lower_bound=1,
                       upper_bound=cli.MAX_BATCH_SIZE)


def _tokenizer(path):
  """A small SentencePiece model (Gemma's special ids); the benchmark's text is a few words."""
  import sentencepiece as spm
  words = "a the cat dog on red blue car tree house caption answer en what is this".split()
  corpus = (f"{a} {b} {c} {i}" for i, (a, b, c) in enumerate(zip(words * 40, words[3:] * 40,
                                                                   words[5:] * 40)))
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=corpus, model_writer=buf, model_type="bpe", vocab_size=300, pad_id=0,
      eos_id=1, bos_id=2, unk_id=3, byte_fallback=True, add_dummy_prefix=False,
      normalization_rule_name="identity", character_coverage=1.0, minloglevel=2)
  with open(path, "wb") as f:
    f.write(buf.getvalue())


def prepare(directory, variant, vision_layers, text_layers, examples):
  """(hf_dir, checkpoint_dir, input_jsonl) under `directory`, built once."""
  from PIL import Image
  from checkpoints_convert import hf_to_orbax
  from paligemma_jax.benchmarks import components
  hf_dir, ckpt = os.path.join(directory, "hf"), os.path.join(directory, "ckpt")
  if not os.path.exists(os.path.join(hf_dir, "tokenizer.model")):
    components.build_reference(variant, vision_layers, text_layers, hf_dir)
    _tokenizer(os.path.join(hf_dir, "tokenizer.model"))
  if not os.path.exists(ckpt):
    hf_to_orbax.convert(hf_dir, ckpt, progress=False)
  rng = np.random.RandomState(0)
  lines = []
  for i in range(examples):
    path = os.path.join(directory, f"image{i}.png")
    if not os.path.exists(path):
      Image.fromarray(rng.randint(0, 256, (480, 640, 3), np.uint8)).save(path)
    lines.append(json.dumps({"image": path, "prompt": ["caption en", "answer en what is this"][i % 2]}))
  in_jsonl = os.path.join(directory, "in.jsonl")
  with open(in_jsonl, "w") as f:
    f.write("\n".join(lines) + "\n")
  return hf_dir, ckpt, in_jsonl


def _timed(cmd, out_jsonl, examples) -> float:
  if os.path.exists(out_jsonl):
    os.remove(out_jsonl)
  env = dict(os.environ)
  env.pop("JAX_COMPILATION_CACHE_DIR", None)  # --compilation_cache decides.
  start = time.perf_counter()
  done = subprocess.run(cmd, env=env, capture_output=True, text=True)
  seconds = time.perf_counter() - start
  if done.returncode != 0:
    raise RuntimeError(f"{cmd[:3]} failed: {done.stderr[-2000:]}")
  with open(out_jsonl) as f:
    count = sum(1 for line in f if "text" in json.loads(line))
  if count != examples:
    raise RuntimeError(f"{cmd[:3]} answered {count} of {examples} prompts.")
  return seconds


def main(f):
  directory = f.e2e_dir or tempfile.mkdtemp(prefix="paligemma-e2e-")
  os.makedirs(directory, exist_ok=True)
  hf_dir, ckpt, in_jsonl = prepare(directory, f.variant, f.vision_layers, f.text_layers,
                                   f.e2e_examples)
  out = os.path.join(directory, "out.jsonl")
  script = os.path.join(directory, "transformers_generate.py")
  with open(script, "w") as s:
    s.write(_TRANSFORMERS)
  ours = lambda cache: [sys.executable, "-m", "paligemma_jax.generate", f"--checkpoint={ckpt}",
                        f"--input_jsonl={in_jsonl}", f"--output_jsonl={out}",
                        f"--batch_size={f.e2e_batch_size}", f"--max_new_tokens={f.new_tokens}",
                        f"--compilation_cache={cache}"]
  theirs = [sys.executable, script, hf_dir, in_jsonl, out, str(f.e2e_batch_size),
            str(f.new_tokens)]
  warm_cache = os.path.join(directory, "xla-warm")
  # Fill the warm cache (and the page cache); untimed, but printed.
  print(f"priming: ours {_timed(ours(warm_cache), out, f.e2e_examples):.1f} s, transformers "
        f"{_timed(theirs, out, f.e2e_examples):.1f} s", flush=True)
  times = {"ours cold": [], "ours warm": [], "transformers": []}
  for r in range(f.e2e_rounds):
    runs = [("ours cold", lambda: ours(tempfile.mkdtemp(prefix="xla-cold-", dir=directory))),
            ("ours warm", lambda: ours(warm_cache)), ("transformers", lambda: theirs)]
    for name, cmd in (runs if r % 2 == 0 else runs[::-1]):
      times[name].append(_timed(cmd(), out, f.e2e_examples))
      print(f"round {r + 1}: {name} {times[name][-1]:.1f} s", flush=True)
  median = {k: statistics.median(v) for k, v in times.items()}
  print(f"\n{f.e2e_examples} prompts, batch {f.e2e_batch_size}, {f.new_tokens} greedy tokens, "
        f"{f.variant} widths, {f.vision_layers}+{f.text_layers} layers, {f.e2e_rounds} rounds\n")
  print("| process | median s | all s | ours / transformers |")
  print("|---|---|---|---|")
  for name, values in times.items():
    ratio = median[name] / median["transformers"]
    print(f"| {name} | {median[name]:.1f} | {', '.join(f'{v:.1f}' for v in values)} | "
          f"{ratio:.2f}x |")
