r"""Answers prompts about images with a converted PaliGemma checkpoint.

One example:
  python -m paligemma_jax.generate --checkpoint=/ckpt/pg2-3b-224 --image=cat.jpg --prompt="caption en"
Many, in batches:
  python -m paligemma_jax.generate --checkpoint=/ckpt/pg2-3b-224 --input_jsonl=in.jsonl \
      --output_jsonl=out.jsonl --batch_size=8
where each input line is {"image": path, "prompt": str} (other fields are copied through).
Each output line holds image, prompt, text, tokens (generated ids, <eos> excluded), logprobs
(log-softmax of the raw logits at each chosen token), stop_reason ("eos" | "length"),
image_size ([width, height]), or error.

Detection and segmentation answers, read into pixel coordinates of the original image:
  --task=detect --prompt="detect cat ; dog" [--draw_dir=out/]
  --task=segment --prompt="segment cat" --vae_npz=vae-oid.npz [--draw_dir=out/]
add boxes ([[x1, y1, x2, y2]] pixels), labels, skipped (malformed objects dropped) and, for
segment, masks (COCO uncompressed run-length encoding, see `segmentation.rle_encode`) to each line;
--draw_dir writes each image with its boxes (and masks) drawn, named in the line's `drawing`.
"""

import contextlib
import json
import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags
import numpy as np

from paligemma_jax import checkpoint
from paligemma_jax import files
from paligemma_jax import inference
from paligemma_jax import processor
from paligemma_jax import sampling
from paligemma_jax import sharding
from paligemma_jax.tasks import detection
from paligemma_jax.tasks import segmentation

FLAGS = flags.FLAGS


def define_flags():
  """The command-line flags; defined only when this module runs as a program, so that
  library code and tests can import it beside the other entry points."""
  flags.DEFINE_string("checkpoint", None, "Converted checkpoint directory "
                      "(checkpoints_convert.hf_to_orbax), or a Hugging Face PaliGemma directory.",
                      required=True)
  config_flags.DEFINE_config_file(
      "config", None, "Optional model config overriding the checkpoint's, e.g. "
      "configs/paligemma.py:pg2-3b-448 --config.text.sliding_window=0. Shapes must match.",
      lock_config=False)
  flags.DEFINE_string("image", None, "Image path, for a single example (with --prompt).")
  flags.DEFINE_string("prompt", None, 'Prompt, e.g. "caption en", "answer en what is this?", '
                      '"ocr", "detect cat ; dog", "segment cat".')
  flags.DEFINE_string("input_jsonl", None, 'Many examples: lines {"image": path, "prompt": str}.')
  flags.DEFINE_string("output_jsonl", None, "Write one result line per input, in input order.")
  flags.DEFINE_integer("batch_size", 1, "Examples per compiled batch (the last is padded).")
  flags.DEFINE_integer("max_new_tokens", 64, "Most tokens to generate per example.")
  flags.DEFINE_enum("sampler", "greedy", list(sampling.METHODS), "How to pick each token.")
  flags.DEFINE_float("temperature", 1.0, "Softmax temperature (all but greedy).")
  flags.DEFINE_integer("top_k", 40, "Tokens kept by --sampler=top_k.")
  flags.DEFINE_float("top_p", 0.95, "Probability mass kept by --sampler=top_p.")
  flags.DEFINE_integer("seed", 0, "PRNG seed: the same seed reproduces sampled outputs.")
  flags.DEFINE_enum("dtype", "auto", ["auto", "float32", "bfloat16"],
                    "Compute and parameter dtype; auto = float32 on CPU, bfloat16 on TPU/GPU.")
  flags.DEFINE_enum("task", None, ["detect", "segment"], "Also read the answers as boxes "
                    "(detect) or boxes and masks (segment) into each output line.")
  flags.DEFINE_string("vae_npz", None, "Mask decoder weights (big_vision's vae-oid.npz), for "
                      "--task=segment.")
  flags.DEFINE_string("draw_dir", None, "With --task: write each image with its boxes (and "
                      "masks) drawn here, as NNNNN_<image name>.png.")
  sharding.define_flags()


def read_examples(path: str):
  """Yields Example or, for an unusable line, an error dict naming the line."""
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
        image, prompt = record.pop("image"), record.pop("prompt")
        if not isinstance(image, str) or not isinstance(prompt, str):
          raise TypeError("'image' and 'prompt' must be strings")
      except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        reason = f"missing field {e}" if isinstance(e, KeyError) else str(e)
        yield {"line": number, "error": f"{path}:{number}: bad input line: {reason}"}
        continue
      yield inference.Example(image, prompt, extra=record)


def task_outputs(task: str, text: str, width: int, height: int, vae_params=None):
  """(fields for the output line, Detections or Segmentations for drawing) of one answer."""
  if task == "detect":
    objects = detection.parse_detections(text, width, height)
  else:
    objects = segmentation.decode_masks(text, width, height, vae_params)
  fields = {"boxes": np.round(objects.boxes.astype(np.float64), 2).tolist(),
            "labels": objects.labels, "skipped": objects.skipped}
  if task == "segment":
    fields["masks"] = [segmentation.rle_encode(m) for m in objects.masks]
  return fields, objects


def draw(task: str, image_path: str, objects, out_path: str):
  """Saves the image with `objects` drawn on it."""
  image = processor.load_image(image_path)
  draw_fn = detection.draw_boxes if task == "detect" else segmentation.draw_masks
  draw_fn(image, objects).save(out_path)


def add_task_outputs(index: int, result: dict, vae_params=None) -> dict:
  """`result` with --task's fields (and --draw_dir's `drawing`) added; errors pass unchanged."""
  if not FLAGS.task or "error" in result:
    return result
  fields, objects = task_outputs(FLAGS.task, result["text"], *result["image_size"], vae_params)
  if FLAGS.draw_dir and sharding.is_writer():
    stem = os.path.splitext(os.path.basename(result["image"]))[0]
    fields["drawing"] = os.path.join(FLAGS.draw_dir, f"{index:05d}_{stem}.png")
    draw(FLAGS.task, result["image"], objects, fields["drawing"])
  return {**result, **fields}


def _merge_in_order(items, predictions):
  """Interleaves bad-line errors with predictions, keeping the input order."""
  predictions = iter(predictions)
  for item in items:
    yield item if isinstance(item, dict) else next(predictions)


def main(argv):
  del argv
  if bool(FLAGS.input_jsonl) == bool(FLAGS.image or FLAGS.prompt):
    raise app.UsageError("Give either --image and --prompt, or --input_jsonl.")
  if FLAGS.image and not FLAGS.prompt or FLAGS.prompt and not FLAGS.image:
    raise app.UsageError("--image and --prompt go together.")
  checkpoint.quiet_orbax_logs()
  mesh = sharding.mesh_from_flags()  # Before anything touches a device.
  if FLAGS.task == "segment" and not FLAGS.vae_npz:
    raise app.UsageError("--task=segment needs --vae_npz (big_vision's vae-oid.npz).")
  if FLAGS.draw_dir and not FLAGS.task:
    raise app.UsageError("--draw_dir draws boxes and masks: give --task=detect or --task=segment.")
  vae_params = segmentation.load_vae_npz(FLAGS.vae_npz) if FLAGS.task == "segment" else None
  if FLAGS.draw_dir:
    os.makedirs(FLAGS.draw_dir, exist_ok=True)
  dtype = None if FLAGS.dtype == "auto" else FLAGS.dtype
  params, config, tokenizer = inference.load_model(FLAGS.checkpoint, dtype, FLAGS.config, mesh)
  predictor = inference.Predictor(config, params, tokenizer, batch_size=FLAGS.batch_size)
  sampler = sampling.Sampler(FLAGS.sampler, FLAGS.temperature, FLAGS.top_k, FLAGS.top_p)

  if FLAGS.input_jsonl:
    items = list(read_examples(FLAGS.input_jsonl))
  else:
    items = [inference.Example(FLAGS.image, FLAGS.prompt)]
  examples = [x for x in items if not isinstance(x, dict)]
  for e in examples:  # Refuse impossible requests before any work is done.
    error = predictor.length_error(len(predictor.prompt_tokens(e.prompt)[0]), FLAGS.max_new_tokens)
    if error:
      raise app.UsageError(f"{e.image}: {error}")

  predictions = predictor.predict(examples, max_new_tokens=FLAGS.max_new_tokens, sampler=sampler,
                                  seed=FLAGS.seed, progress=len(examples) > 1, total=len(examples))
  writer = sharding.is_writer()  # On a multi-host job only the first host writes.
  write_file = FLAGS.output_jsonl and writer
  with files.atomic_writer(FLAGS.output_jsonl) if write_file else contextlib.nullcontext() as out:
    failures = 0
    for index, result in enumerate(_merge_in_order(items, predictions)):
      result = add_task_outputs(index, result, vae_params)
      if "error" in result:
        failures += 1
        logging.error("%s", result["error"])
      elif writer:
        print(f"{result['image']}\t{result['prompt']!r}\t{result['text']}", flush=True)
      if out:
        out.write(json.dumps(result, ensure_ascii=False) + "\n")
  if failures:
    logging.warning("%d of %d inputs failed (see the messages above).", failures, len(items))
  return 1 if failures == len(items) else 0


if __name__ == "__main__":
  define_flags()
  app.run(main)
