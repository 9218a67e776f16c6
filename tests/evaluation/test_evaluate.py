"""Evaluation end to end: every task on a tiny checkpoint, bad lines, resume, compile counts;
metric values on known answers; the generate CLI's detection and segmentation outputs.

The command-line `main`s run in subprocesses; the library API runs in process.
"""

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from paligemma_jax import tasks
from paligemma_jax.checkpoints import loading
from paligemma_jax.decoding import inference
from paligemma_jax.decoding import scoring
from paligemma_jax.evaluation import dataset
from paligemma_jax.evaluation import runner
from paligemma_jax.tasks import detection_format
from paligemma_jax.tasks import metrics
from paligemma_jax.tasks import segmentation_format
from helpers import ROOT, assert_expected_failure, constant_vae, random_vae

SIZES = [(20, 12), (31, 17), (16, 16), (12, 28), (40, 22), (25, 9)]  # (width, height) per image.
SEGS = "".join(f"<seg{i:03d}>" for i in range(16))
MAX_NEW = 3  # Tokens generated in the end-to-end tests: they share the compiled functions.


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """Images img{i}.png, binary masks mask{i}.png of the same sizes, a random vae-oid.npz."""
  root = tmp_path_factory.mktemp("data")
  rng = np.random.default_rng(0)
  for i, (w, h) in enumerate(SIZES):
    Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(root / f"img{i}.png")
    mask = np.zeros((h, w), np.uint8)
    mask[h // 4:h // 2 + 1, w // 3:] = 255
    Image.fromarray(mask).save(root / f"mask{i}.png")
  np.savez(root / "vae.npz", **random_vae())
  return root


@pytest.fixture(scope="module")
def loaded(converted_checkpoint):
  return loading.load_model(converted_checkpoint(1)[0])


@pytest.fixture(scope="module")
def evaluator(loaded, data_dir):
  """Shared by the end-to-end tests: one model, so equal shapes compile once for all of them."""
  vae = segmentation_format.load_vae_npz(data_dir / "vae.npz")
  return runner.Evaluator(lambda: loaded, batch_size=4, vae_params=vae)


REFERENCES = {
    "vqa": {"answers": ["cat", "cat", "two"]}, "exact_match": {"answers": ["cat"]},
    "anls": {"answers": ["a cat"]}, "relaxed": {"answers": ["12", "3.5"]},
    "caption": {"captions": ["a cat on a bench", "a red car"]},
    "detect": {"boxes": [[1, 2, 10, 8], [0, 0, 5.5, 4]], "labels": ["cat", "dog"]},
    "segment": {"mask": "mask{i}.png"},
    "score": {"suffixes": ["cat", "dog man", "red car"]},
}
FIELD = {"vqa": "answers", "exact_match": "answers", "anls": "answers", "relaxed": "answers",
         "caption": "captions", "detect": "boxes", "segment": "mask", "score": "suffixes"}


def record(task, i, image=None):
  ref = {k: (v.format(i=i) if isinstance(v, str) else v) for k, v in REFERENCES[task].items()}
  if task == "score":
    ref["answer"] = i % 3
  return {"image": image or f"img{i}.png", "prompt": "caption en", **ref, "id": f"ex{i}"}


def write_dataset(path, task, n=5):
  """n good lines with three bad ones among them: lines 3 (not JSON), 5 (a reference field
  missing) and 7 (a missing image); good lines are 1, 2, 4, 6, 8, ..."""
  good = [json.dumps(record(task, i)) for i in range(n)]
  lacking = record(task, 0)
  del lacking[FIELD[task]]
  lines = (good[:2] + ['{"image": "img0.png", "prompt": "caption en",'] + good[2:3] + [json.dumps(lacking)]
           + good[3:4] + [json.dumps(record(task, 1, image="missing.png"))] + good[4:] + [""])
  path.write_text("\n".join(lines) + "\n")
  return [1, 2, 4, 6, 8] + list(range(9, 9 + n - 5))


def read_lines(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def recomputed(task, lines, data_dir, vae):
  """The metric, recomputed from each line's text with the metrics module directly."""
  refs = [p["reference"] for p in lines]
  if task == "vqa":
    return {"vqa_accuracy": np.mean([metrics.vqa_accuracy(p["text"], r["answers"]) for p, r in zip(lines, refs)])}
  if task == "exact_match":
    return {"exact_match": np.mean([metrics.exact_match(p["text"], r["answers"]) for p, r in zip(lines, refs)])}
  if task == "anls":
    return {"anls": np.mean([metrics.anls(p["text"], r["answers"]) for p, r in zip(lines, refs)])}
  if task == "relaxed":
    return {"relaxed_accuracy": np.mean([max(metrics.relaxed_accuracy(p["text"], a) for a in r["answers"])
                                         for p, r in zip(lines, refs)])}
  if task == "caption":
    return {"cider": metrics.cider([p["text"] for p in lines], [r["captions"] for r in refs])[0]}
  if task == "detect":
    dets = [detection_format.parse_detections(p["text"], *p["image_size"]) for p in lines]
    for p, d in zip(lines, dets):
      np.testing.assert_allclose(np.reshape(p["boxes"], (-1, 4)), d.boxes, atol=0.006)
      assert p["labels"] == d.labels and p["skipped"] == d.skipped
    truth = [list(zip(r["labels"], r["boxes"])) for r in refs]
    return {"map50": metrics.mean_average_precision(dets, truth, 0.5)[0]}
  if task == "segment":
    ious = []
    for p, r in zip(lines, refs):
      w, h = p["image_size"]
      seg = segmentation_format.decode_masks(p["text"], w, h, vae)
      target = np.asarray(Image.open(data_dir / r["mask"])) > 0
      groups = detection_format.split_objects(p["text"])
      first = detection_format.parse_object(groups[0], seg_tokens=16) if groups else None
      valid = first is not None and segmentation_format.pixel_box(first[0], w, h) is not None
      assert p["valid"] == valid and p["labels"] == seg.labels and p["skipped"] == seg.skipped
      ious.append(metrics.mask_iou(seg.masks[0], target) if valid else 0.0)
    return {"miou": np.mean(ious), "invalid": sum(not p["valid"] for p in lines)}
  if task == "score":
    for p in lines:
      assert p["choice"] == int(np.argmax(p["logprob"])) and len(p["logprob"]) == 3
      np.testing.assert_allclose(np.array(p["logprob"]) / p["num_tokens"], p["mean_logprob"], rtol=1e-6)
      assert p["correct"] == (p["choice"] == p["reference"]["answer"])
    sums = [s for p in lines for s in p["logprob"]]
    counts = [n for p in lines for n in p["num_tokens"]]
    return {"accuracy": np.mean([p["correct"] for p in lines]),
            "perplexity": math.exp(-sum(sums) / sum(counts))}
  raise AssertionError(task)


@pytest.mark.parametrize("task", tasks.NAMES)
def test_end_to_end(evaluator, data_dir, tmp_path, task):
  good = write_dataset(tmp_path / "data.jsonl", task)
  predictions, metrics_path = tmp_path / "preds.jsonl", tmp_path / "metrics.json"
  result = evaluator.run(str(tmp_path / "data.jsonl"), task, str(predictions), str(metrics_path),
                         max_new_tokens=MAX_NEW, image_dir=str(data_dir), progress=False)
  assert json.loads(metrics_path.read_text()) == result
  assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]  # Written aside, renamed.
  assert (result["task"], result["examples"], result["evaluated"]) == (task, 8, 5)
  assert result["skipped"]["count"] == 3
  assert result["skipped"]["reasons"] == {"invalid JSON": 1, f"missing '{FIELD[task]}'": 1,
                                          "image not found": 1}
  assert [s["line"] for s in result["skipped"]["lines"]] == [3, 5, 7]
  assert "missing.png" in result["skipped"]["lines"][2]["error"]
  assert str(tmp_path / "data.jsonl") + ":3: invalid JSON" in result["skipped"]["lines"][0]["error"]

  lines = read_lines(predictions)
  assert [p["line"] for p in lines] == good
  for p in lines:
    i = int(p["reference"]["id"][2:])
    assert p["task"] == task and p["image"] == f"img{i}.png" and p["image_size"] == list(SIZES[i])
    assert p["reference"] == {k: v for k, v in record(task, i).items() if k not in ("image", "prompt")}
    assert ("text" in p) == (task != "score")
  want = recomputed(task, lines, data_dir, evaluator.vae_params)
  for key, value in want.items():
    assert result[key] == pytest.approx(value, abs=1e-9), key


@pytest.mark.parametrize("task", ["exact_match", "score"])
def test_lines_with_several_images(loaded, data_dir, tmp_path, task):
  """NLVR2-style pairs beside a single image: each answer is the model's on those images in that
  order; the predictions echo the images given; a bad `images` value is a counted skip."""
  evaluator = runner.Evaluator(lambda: loaded, batch_size=4)  # Its own compiles (see below).
  pairs = [["img0.png", "img1.png"], ["img1.png", "img0.png"], ["img2.png"]]
  ref = {"answers": ["true"]} if task == "exact_match" else {"suffixes": ["true", "false"],
                                                               "answer": 0}
  lines = [{"images": p, "prompt": "answer en is the left one bigger?", **ref} for p in pairs]
  lines[2] = {"image": "img2.png", **{k: v for k, v in lines[2].items() if k != "images"}}
  lines.append({"images": [], "prompt": "x", **ref})
  lines.append({"images": ["img0.png", "missing.png"], "prompt": "x", **ref})
  path = tmp_path / "pairs.jsonl"
  path.write_text("".join(json.dumps(x) + "\n" for x in lines))
  result = evaluator.run(str(path), task, str(tmp_path / "preds.jsonl"), max_new_tokens=MAX_NEW,
                         image_dir=str(data_dir), progress=False)
  assert result["evaluated"] == 3 and result["skipped"]["reasons"] == {
      "invalid 'images'": 1, "image not found": 1}
  preds = read_lines(tmp_path / "preds.jsonl")
  assert [p.get("images") for p in preds] == pairs[:2] + [None] and preds[2]["image"] == "img2.png"
  assert preds[0]["image_sizes"] == [list(SIZES[0]), list(SIZES[1])]
  assert preds[0]["image_size"] == list(SIZES[0]) and "image_sizes" not in preds[2]
  params, config, tokenizer = loaded
  for pair, p in zip(pairs[:2], preds):
    images = [str(data_dir / x) for x in pair]
    if task == "score":
      want, = scoring.Scorer(params, config, tokenizer).score(
          [scoring.Candidates(images=images, prompt=lines[0]["prompt"], suffixes=ref["suffixes"])])
      np.testing.assert_allclose(p["logprob"], want["logprob"], atol=1e-4)
    else:
      want, = inference.Predictor(params, config, tokenizer).predict(
          [inference.Example(images=images, prompt=lines[0]["prompt"])], max_new_tokens=MAX_NEW)
      assert p["text"] == want["text"]
  # The same run again resumes: nothing left to do, the same metrics.
  again = evaluator.run(str(path), task, str(tmp_path / "preds.jsonl"), max_new_tokens=MAX_NEW,
                        image_dir=str(data_dir), progress=False)
  assert again == result


class FakePredictor:
  """Answers each image with a fixed text, as Predictor.predict would."""

  def __init__(self, texts):
    self.texts, self.calls = texts, []

  def predict(self, examples, *, max_new_tokens, **kw):
    for e in examples:
      self.calls.append(os.path.basename(e.image))
      if not os.path.exists(e.image):
        yield {"error": f"Image not found: {e.image}"}
        continue
      with Image.open(e.image) as im:
        size = im.size
      yield {"text": self.texts[os.path.basename(e.image)], "stop_reason": "eos", "image_size": list(size)}


def run_fake(tmp_path, data_dir, task, records, texts, vae=None):
  path = tmp_path / f"{task}.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  ev = runner.Evaluator(None, vae_params=vae)
  ev.predictor = FakePredictor(texts)
  return ev.run(str(path), task, str(tmp_path / f"{task}_preds.jsonl"), image_dir=str(data_dir),
                progress=False)


def test_known_answers_vqa_and_text_metrics(tmp_path, data_dir):
  records = [{"image": f"img{i}.png", "prompt": "q", "answers": ["cat"] * 3 + ["two"]} for i in range(4)]
  texts = {"img0.png": "cat", "img1.png": "Cat.", "img2.png": "2", "img3.png": "dog"}
  result = run_fake(tmp_path, data_dir, "vqa", records, texts)
  # "cat" (and "Cat." once normalised) matches 3 of 4 humans: over the 4 leave-one-out subsets
  # min(matches / 3, 1) is 2/3 three times and 1 once -> 0.75. "2" is not "two", "dog" is wrong.
  assert result["vqa_accuracy"] == pytest.approx((0.75 + 0.75 + 0 + 0) / 4)
  records = [{"image": "img0.png", "prompt": "q", "answers": ["12"]},
             {"image": "img1.png", "prompt": "q", "answers": ["10", "3.5"]}]
  texts = {"img0.png": "12.5", "img1.png": "3.6"}  # 4% and 2.9% off: both right.
  assert run_fake(tmp_path, data_dir, "relaxed", records, texts)["relaxed_accuracy"] == 1.0
  texts = {"img0.png": "13", "img1.png": "3.6"}  # 8% off: wrong.
  (tmp_path / "relaxed_preds.jsonl").unlink()
  assert run_fake(tmp_path, data_dir, "relaxed", records, texts)["relaxed_accuracy"] == 0.5


def test_known_answers_detection(tmp_path, data_dir):
  (w0, h0), (w1, h1) = SIZES[:2]
  gt0 = [[2.0, 1.0, 15.0, 10.0], [0.0, 6.0, 8.0, 12.0]]
  gt1 = [[5.0, 3.0, 30.0, 16.0]]
  records = [{"image": "img0.png", "prompt": "detect cat ; dog", "boxes": gt0, "labels": ["cat", "dog"]},
             {"image": "img1.png", "prompt": "detect cat ; dog", "boxes": gt1, "labels": ["dog"]}]
  texts = {"img0.png": detection_format.encode_boxes(gt0, ["cat", "dog"], w0, h0),  # Both right.
           "img1.png": detection_format.encode_boxes(gt1, ["cat"], w1, h1) + " ; <loc0001> junk"}  # Wrong label.
  result = run_fake(tmp_path, data_dir, "detect", records, texts)
  # cat: one hit, one false positive -> AP 0.5; dog: one of two found, no false positive -> 0.5.
  assert result["ap50"] == {"cat": pytest.approx(0.5), "dog": pytest.approx(0.5)}
  assert result["map50"] == pytest.approx(0.5)
  lines = read_lines(tmp_path / "detect_preds.jsonl")
  assert lines[1]["labels"] == ["cat"] and lines[1]["skipped"] == 1
  np.testing.assert_allclose(lines[0]["boxes"], gt0, atol=0.02)  # Loc quantisation: 1/1023 of the size.


def test_known_answers_segmentation(tmp_path, data_dir):
  vae = segmentation_format.convert_vae(constant_vae(1.0))  # Every decoded mask fills its box.
  w, h = SIZES[0]
  target = np.asarray(Image.open(data_dir / "mask0.png")) > 0
  ys, xs = np.nonzero(target)
  box = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
  locs = [round(v * 1023 / s) for v, s in zip([box[1], box[0], box[3], box[2]], [h, w, h, w])]
  text = "".join(f"<loc{v:04d}>" for v in locs) + SEGS + " cat"
  records = [{"image": "img0.png", "prompt": "segment cat", "mask": "mask0.png"},
             {"image": "img2.png", "prompt": "segment cat", "mask": "mask2.png"},
             {"image": "img1.png", "prompt": "segment cat", "mask": "mask0.png"}]  # Mask size differs.
  texts = {"img0.png": text + " ; " + text, "img2.png": "<loc0001> cat ; " + text, "img1.png": text}
  result = run_fake(tmp_path, data_dir, "segment", records, texts, vae)
  lines = read_lines(tmp_path / "segment_preds.jsonl")
  assert lines[0]["iou"] == 1.0 and lines[0]["valid"] and len(lines[0]["labels"]) == 2
  # The first object is malformed: IoU 0 even though a later one would match (as big_vision).
  assert lines[1]["iou"] == 0.0 and not lines[1]["valid"] and lines[1]["skipped"] == 1
  assert result["miou"] == 0.5 and result["invalid"] == 1
  area2 = int((np.asarray(Image.open(data_dir / "mask2.png")) > 0).sum())
  assert result["ciou"] == pytest.approx(target.sum() / (target.sum() + area2))
  assert result["skipped"]["reasons"] == {"mask size differs": 1}


def test_resume_skips_finished_lines_and_matches_an_uninterrupted_run(evaluator, data_dir, tmp_path):
  dataset = tmp_path / "data.jsonl"
  records = [{"image": f"img{i % 6}.png", "prompt": "caption en", "captions": [f"a cat {i}"]}
             for i in range(10)]
  dataset.write_text("".join(json.dumps(r) + "\n" for r in records) + "{oops\n")
  run = lambda preds: evaluator.run(str(dataset), "caption", str(preds), max_new_tokens=MAX_NEW,
                                    image_dir=str(data_dir), progress=False)
  full = run(tmp_path / "full.jsonl")
  complete = (tmp_path / "full.jsonl").read_text().splitlines(keepends=True)
  assert len(complete) == 10
  k = 6
  partial = tmp_path / "partial.jsonl"
  partial.write_text("".join(complete[:k]) + complete[k][:len(complete[k]) // 2])  # Killed mid-line.
  (tmp_path / "partial.jsonl.run.json").write_text((tmp_path / "full.jsonl.run.json").read_text())

  prepared = []
  predictor = evaluator.predictor
  original = predictor.prepare
  predictor.prepare = lambda e, n: prepared.append(e.image) or original(e, n)
  try:
    resumed = run(partial)
  finally:
    del predictor.prepare
  assert len(prepared) == 10 - k  # Only the unfinished examples ran.
  assert resumed == full
  assert read_lines(partial) == read_lines(tmp_path / "full.jsonl")
  assert resumed["skipped"]["reasons"] == {"invalid JSON": 1} and resumed["evaluated"] == 10

  # Finished: a rerun loads nothing and recomputes the same metrics.
  idle = runner.Evaluator(lambda: pytest.fail("the model was loaded"))
  assert idle.run(str(dataset), "caption", str(partial), max_new_tokens=MAX_NEW,
                  image_dir=str(data_dir), progress=False) == full
  # Predictions of another task, answer length or model are refused, naming the difference.
  with pytest.raises(ValueError, match="task: 'caption' then, 'vqa' now"):
    idle.run(str(dataset), "vqa", str(partial), max_new_tokens=MAX_NEW, image_dir=str(data_dir),
             progress=False)
  with pytest.raises(ValueError, match=f"max_new_tokens: {MAX_NEW} then, 7 now"):
    idle.run(str(dataset), "caption", str(partial), max_new_tokens=7, image_dir=str(data_dir),
             progress=False)
  other = runner.Evaluator(None, model_identity={"checkpoint": "/elsewhere"})
  with pytest.raises(ValueError, match="model: None then, {'checkpoint': '/elsewhere'} now"):
    other.run(str(dataset), "caption", str(partial), max_new_tokens=MAX_NEW,
              image_dir=str(data_dir), progress=False)


@pytest.mark.parametrize("task,line,reason", [
    ("vqa", "[1, 2]", "not a JSON object"),
    ("vqa", '{"prompt": "q", "answers": ["a"]}', "missing 'image'"),
    ("vqa", '{"image": 3, "prompt": "q", "answers": ["a"]}', "invalid 'image'"),
    ("vqa", '{"images": [], "prompt": "q", "answers": ["a"]}', "invalid 'images'"),
    ("vqa", '{"images": ["i.png", 3], "prompt": "q", "answers": ["a"]}', "invalid 'images'"),
    ("vqa", '{"image": "i.png", "images": ["i.png"], "prompt": "q", "answers": ["a"]}',
     "invalid 'images'"),
    ("vqa", '{"image": "i.png", "prompt": "q", "answers": []}', "invalid 'answers'"),
    ("caption", '{"image": "i.png", "prompt": "q", "captions": [1]}', "invalid 'captions'"),
    ("detect", '{"image": "i.png", "prompt": "q", "boxes": [[1, 2, 3]], "labels": ["a"]}', "invalid 'boxes'"),
    ("detect", '{"image": "i.png", "prompt": "q", "boxes": [[1, 2, 3, 4]], "labels": []}', "invalid 'labels'"),
    ("detect", '{"image": "i.png", "prompt": "q", "boxes": [[1, 2, 3, 4]]}', "missing 'labels'"),
    ("segment", '{"image": "i.png", "prompt": "q", "mask": "nothing.png"}', "mask not found"),
    ("score", '{"image": "i.png", "prompt": "q", "suffixes": ["a", "b"], "answer": 2}', "invalid 'answer'"),
    ("score", '{"image": "i.png", "prompt": "q", "suffixes": ["a"], "answer": true}', "invalid 'answer'"),
])
def test_bad_lines_are_reported_with_reasons(tmp_path, task, line, reason):
  path = tmp_path / "d.jsonl"
  path.write_text('{"image": "i.png", "prompt": "q", "answers": "a", "captions": "c", "boxes": [], '
                  '"labels": [], "mask": "m.png", "suffixes": "s", "answer": 0}\n\n' + line + "\n")
  (tmp_path / "m.png").write_bytes(b"")
  rows, skips = dataset.read_dataset(str(path), tasks.get(task))
  assert [r.line for r in rows] == [1] and rows[0].images == [str(tmp_path / "i.png")]
  assert [(s.line, s.reason) for s in skips] == [(3, reason)]
  assert skips[0].message.startswith(f"{path}:3: ")
  if task in ("vqa", "score"):  # A lone string is one answer / one suffix.
    assert rows[0].record[FIELD[task]] == ["a" if task == "vqa" else "s"]


def test_decoding_compiles_once_per_prompt_bucket(evaluator, loaded, data_dir, tmp_path):
  """40 examples, batch 4, prompts of many lengths in two buckets, bad lines and a padded last
  batch: prefill and the decode loop compile once per bucket and never again."""
  long_prompt = "answer en what is the red car near the white house on the left?"
  prompts = [f"caption en{' a' * (i % 4)}" if i < 20 else long_prompt + " now" * (i % 3) for i in range(40)]
  lengths = [len(loaded[2].encode(p + "\n")) + 17 for p in prompts]  # + 16 image tokens, <bos>.
  assert len(set(lengths)) >= 6 and max(lengths[:20]) <= 32 < min(lengths[20:]) <= max(lengths) <= 64
  records = [json.dumps({"image": f"img{i % 6}.png", "prompt": p, "answers": ["x"]})
             for i, p in enumerate(prompts)]
  records[5:5] = ["not json"]
  records[30:30] = [json.dumps({"image": "missing.png", "prompt": "caption en", "answers": ["x"]})]
  (tmp_path / "d.jsonl").write_text("\n".join(records) + "\n")

  compiles = []

  def listener(event, duration, **kw):
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(kw.get("fun_name"))

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    result = evaluator.run(str(tmp_path / "d.jsonl"), "vqa", str(tmp_path / "p.jsonl"),
                           max_new_tokens=MAX_NEW, image_dir=str(data_dir), progress=False)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert result["evaluated"] == 40 and result["skipped"]["count"] == 2
  # At most once per bucket (32, 64); the other tests here may have compiled the short one. The
  # long one is new, so there is at least one compile to see.
  for name in ("jit(prefill)", "jit(loop)"):
    assert 1 <= compiles.count(name) <= 2, compiles


def _coco_rle_decode(rle):
  """pycocotools' reading of uncompressed RLE, written out independently."""
  h, w = rle["size"]
  flat, value = [], 0
  for count in rle["counts"]:
    flat += [value] * count
    value = 1 - value
  return np.array(flat, bool).reshape(w, h).T


GENERATE_SCRIPT = """
import json, sys
from absl import flags
from paligemma_jax import generate
from paligemma_jax.checkpoints import loading
from paligemma_jax.decoding import inference
from paligemma_jax.tasks import segmentation_format

texts = json.loads(sys.argv[1])

class Fake:
  def __init__(self, params, config, tokenizer, **kw):
    pass
  def prompt_tokens(self, prompt):
    return [0], [True]
  def length_error(self, n, m):
    return None
  def predict(self, examples, **kw):
    for e in examples:
      try:
        with open(e.image, "rb"):
          pass
      except FileNotFoundError:
        yield {"image": e.image, "prompt": e.prompt, **e.extra, "error": "Image not found: " + e.image}
        continue
      from PIL import Image
      yield {"image": e.image, "prompt": e.prompt, **e.extra, "text": texts[e.image], "tokens": [],
             "logprobs": [], "stop_reason": "eos", "image_size": list(Image.open(e.image).size)}

import numpy as np
for mask in (np.random.default_rng(0).random((5, 7)) > 0.5, np.ones((2, 3), bool), np.zeros((3, 1), bool)):
  assert (segmentation_format.rle_decode(segmentation_format.rle_encode(mask)) == mask).all()

generate.define_flags()
inference.Predictor = Fake
loading.checkpoint_kind = lambda path: "converted"
loading.checkpoint_identity = lambda path: {}
loading.load_model = lambda *a, **k: (None, None, None)
for argv in json.loads(sys.argv[2]):
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["generate"] + argv)
  generate.main([])
"""


def test_generate_task_outputs(tmp_path, data_dir):
  """--task=detect/segment add boxes, labels, skipped, RLE masks; --draw_dir draws them."""
  img0, img1 = str(data_dir / "img0.png"), str(data_dir / "img4.png")
  (w0, h0), (w1, h1) = SIZES[0], SIZES[4]
  det = "<loc0100><loc0200><loc0900><loc0800> cat ; <loc0500> bad ; <loc0000><loc0000><loc1023><loc0511> dog"
  seg = "<loc0100><loc0200><loc0900><loc0800>" + SEGS + " cat ; <loc0000><loc0000><loc1023><loc0511>" + SEGS
  inputs = tmp_path / "in.jsonl"
  inputs.write_text(json.dumps({"image": img0, "prompt": "detect cat ; dog", "id": 1}) + "\n"
                    + json.dumps({"image": str(data_dir / "nope.png"), "prompt": "x"}) + "\n"
                    + json.dumps({"image": img1, "prompt": "segment cat"}) + "\n")
  common = ["--checkpoint=unused", f"--input_jsonl={inputs}"]
  argvs = [common + [f"--output_jsonl={tmp_path / 'det.jsonl'}", "--task=detect", f"--draw_dir={tmp_path / 'det'}"],
           common + [f"--output_jsonl={tmp_path / 'seg.jsonl'}", "--task=segment",
                     f"--vae_npz={data_dir / 'vae.npz'}", f"--draw_dir={tmp_path / 'seg'}"]]
  texts = {img0: det, img1: seg}
  env = dict(os.environ, PYTHONPATH=ROOT)
  proc = subprocess.run([sys.executable, "-c", GENERATE_SCRIPT, json.dumps(texts), json.dumps(argvs)],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]

  lines = read_lines(tmp_path / "det.jsonl")
  assert lines[1]["error"] == f"Image not found: {data_dir / 'nope.png'}" and "boxes" not in lines[1]
  want = detection_format.parse_detections(det, w0, h0)
  assert lines[0]["labels"] == ["cat", "dog"] and lines[0]["skipped"] == 1 and lines[0]["id"] == 1
  np.testing.assert_allclose(lines[0]["boxes"], want.boxes, atol=0.006)
  drawn = np.asarray(Image.open(lines[0]["drawing"]))
  assert os.path.basename(lines[0]["drawing"]) == "00000_img0.png"
  assert drawn.shape == (h0, w0, 3) and not np.array_equal(drawn, np.asarray(Image.open(img0)))
  assert lines[2]["labels"] == [] and lines[2]["skipped"] == 2  # Segment text read as detections.

  lines = read_lines(tmp_path / "seg.jsonl")
  vae = segmentation_format.load_vae_npz(data_dir / "vae.npz")
  want = segmentation_format.decode_masks(seg, w1, h1, vae)
  line = lines[2]
  assert line["labels"] == ["cat", ""] and line["skipped"] == 0 and len(line["masks"]) == 2
  np.testing.assert_allclose(line["boxes"], want.boxes, atol=0.006)
  for rle, mask in zip(line["masks"], want.masks):
    assert rle["size"] == [h1, w1] and sum(rle["counts"]) == h1 * w1
    np.testing.assert_array_equal(_coco_rle_decode(rle), mask)
  assert want.masks.any() and not want.masks.all()  # A non-trivial mask was checked.
  assert os.path.basename(line["drawing"]) == "00002_img4.png" and os.path.exists(line["drawing"])
  assert lines[0]["masks"] == [] and lines[0]["skipped"] == 3  # Detection text read as masks.


def test_evaluate_command_line(converted_checkpoint, data_dir, tmp_path):
  """The real command: flags, printed metrics, metrics file, predictions."""
  write_dataset(tmp_path / "data.jsonl", "score")
  cmd = [sys.executable, "-m", "paligemma_jax.evaluate", f"--checkpoint={converted_checkpoint(1)[0]}",
         f"--dataset={tmp_path / 'data.jsonl'}", "--task=score", f"--predictions={tmp_path / 'p.jsonl'}",
         f"--metrics={tmp_path / 'm.json'}", "--batch_size=4", f"--image_dir={data_dir}"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, PYTHONPATH=ROOT))
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads((tmp_path / "m.json").read_text())
  assert json.loads(proc.stdout) == result
  assert result["evaluated"] == 5 and result["skipped"]["count"] == 3 and 0 <= result["accuracy"] <= 1
  assert result["perplexity"] > 1 and len(read_lines(tmp_path / "p.jsonl")) == 5
  assert ":3: invalid JSON" in proc.stderr  # Reported with its line number.
  with pytest.raises(ValueError, match="--vae_npz"):
    runner.Evaluator(None).run(str(tmp_path / "data.jsonl"), "segment", str(tmp_path / "q.jsonl"))


def test_undecodable_lines_are_skipped_and_counted_not_fatal(tmp_path, data_dir):
  """Invalid UTF-8 and a lone surrogate stopped the whole run, at the same line on every rerun."""
  path = tmp_path / "d.jsonl"
  good = json.dumps({"image": "img0.png", "prompt": "q", "answers": ["cat"]}).encode()
  path.write_bytes(good + b'\n{"image": "img1.png", "prompt": "caf\xe9", "answers": ["x"]}\n'
                   + b'{"image": "img2.png", "prompt": "\\ud83d", "answers": ["x"]}\n' + good + b"\n")
  ev = runner.Evaluator(None)
  ev.predictor = FakePredictor({"img0.png": "cat"})
  result = ev.run(str(path), "exact_match", str(tmp_path / "p.jsonl"), image_dir=str(data_dir),
                  progress=False)
  assert result["evaluated"] == 2 and result["exact_match"] == 1.0
  assert result["skipped"]["reasons"] == {"invalid UTF-8": 1, "invalid Unicode": 1}
  assert [s["line"] for s in result["skipped"]["lines"]] == [2, 3]


def test_evaluate_refuses_bad_flags_before_loading_and_writes_nothing(data_dir, tmp_path):
  write_dataset(tmp_path / "data.jsonl", "vqa")
  common = ["--checkpoint=/nonexistent/ckpt", f"--dataset={tmp_path / 'data.jsonl'}", "--task=vqa",
            f"--predictions={tmp_path / 'p.jsonl'}"]
  env = dict(os.environ, PYTHONPATH=ROOT)
  for extra, needle in [(["--max_new_tokens=0"], "--max_new_tokens"),
                        ([], "/nonexistent/ckpt"),
                        ([f"--metrics={tmp_path / 'data.jsonl'}"], "--metrics is the --dataset"),
                        (["--task=segment"], "--vae_npz"),  # The last --task counts.
                        (["--sampler=beam", "--beam_size=5000"], "--beam_size"),
                        (["--batch_size=100000000000000"], "--batch_size")]:
    proc = subprocess.run([sys.executable, "-m", "paligemma_jax.evaluate", *common, *extra], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=env)
    assert any(needle in line for line in assert_expected_failure(proc)), proc.stderr[-3000:]
  assert sorted(os.listdir(tmp_path)) == ["data.jsonl"]


def test_an_int8_kv_cache_reaches_generation_and_scoring(loaded):
  """evaluate --kv_cache_dtype=int8 -> Evaluator(cache_dtype="int8") -> both loops' caches."""
  ev = runner.Evaluator(lambda: loaded, cache_dtype="int8")
  assert ev.predictor.generator.cache_dtype == np.int8 and ev.scorer.setup.cache_dtype == np.int8
  assert runner.Evaluator(lambda: loaded).scorer.setup.cache_dtype == loaded.config.dtype
