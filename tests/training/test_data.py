"""Training data: token layout and masks, bad lines reported and skipped, resumable shuffling."""

import hashlib
import json
import logging

import numpy as np
import pytest
from PIL import Image

from paligemma_jax.preprocess.tokenizer import Tokenizer
from paligemma_jax.training import data

IMAGE_TOKEN_ID = 1536
LAYOUT = data.Layout(num_image_tokens=4, image_token_id=IMAGE_TOKEN_ID, image_size=8, max_text_len=24)


@pytest.fixture(scope="module")
def tok(spm_model_path):
  return Tokenizer(spm_model_path)


def _write_images(root, count):
  rng = np.random.default_rng(0)
  for i in range(count):
    Image.fromarray(rng.integers(0, 256, (10, 12, 3), np.uint8)).save(root / f"img{i}.png")


def _write_jsonl(path, lines):
  path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
  return str(path)


def test_layout_masks_and_padding(tmp_path, tok):
  _write_images(tmp_path, 1)
  path = _write_jsonl(tmp_path / "d.jsonl", [{"image": "img0.png", "prefix": "caption en",
                                              "suffix": "a red car"}])
  [record] = data.read_jsonl(path, tok, LAYOUT)
  prefix = [IMAGE_TOKEN_ID] * 4 + [tok.bos_id] + tok.encode("caption en\n")
  target = tok.encode("a red car") + [tok.eos_id]
  np.testing.assert_array_equal(record.tokens, prefix + target)
  assert record.images == [str(tmp_path / "img0.png")]  # Relative to the JSONL file.

  example = data.load_example(record, LAYOUT)
  n = len(prefix) + len(target)
  assert example["tokens"].shape == (LAYOUT.length,) and example["images"].shape == (8, 8, 3)
  np.testing.assert_array_equal(example["tokens"][n:], 0)
  np.testing.assert_array_equal(example["input_mask"], np.arange(LAYOUT.length) < n)
  np.testing.assert_array_equal(example["prefix_mask"], np.arange(LAYOUT.length) < len(prefix))
  slots = np.arange(LAYOUT.length)
  np.testing.assert_array_equal(example["loss_mask"], (slots >= len(prefix)) & (slots < n))
  assert -1 <= example["images"].min() and example["images"].max() <= 1


def test_bad_lines_are_reported_with_line_numbers_and_skipped(tmp_path, tok, caplog):
  _write_images(tmp_path, 2)
  (tmp_path / "corrupt.png").write_bytes(b"not a png")
  lines = [
      {"image": "img0.png", "prefix": "caption en", "suffix": "cat"},  # 1: fine
      "{not json",  # 2
      {"image": "img1.png", "prefix": "caption en"},  # 3: no suffix
      {"image": "missing.png", "prefix": "caption en", "suffix": "dog"},  # 4
      {"image": "img1.png", "prefix": 3, "suffix": "dog"},  # 5: not a string
      "[1, 2]",  # 6: not an object
      "",  # 7: blank, ignored
      {"image": "img1.png", "prefix": "describe " * 30, "suffix": "x"},  # 8: prompt too long
      {"image": "corrupt.png", "prefix": "caption en", "suffix": "tree"},  # 9: found, undecodable
      {"image": "img1.png", "prefix": "caption en", "suffix": "blue " * 30},  # 10: cut
  ]
  path = _write_jsonl(tmp_path / "d.jsonl", lines)
  with caplog.at_level(logging.WARNING):
    records = data.read_jsonl(path, tok, LAYOUT)
  assert [r.where.rsplit(":", 1)[1] for r in records] == ["1", "9", "10"]
  for number, reason in [(2, "Expecting"), (3, "missing field 'suffix'"), (4, "image not found"),
                         (5, "must be strings"), (6, "JSON object"), (8, "prompt alone")]:
    where = f"d.jsonl:{number}: bad line, skipped: "
    assert any(where in m and reason in m for m in caplog.messages), number
  assert any("d.jsonl:10: " in m and "cut to max_text_len" in m for m in caplog.messages)
  assert len(records[2].tokens) == LAYOUT.length and records[2].loss_mask[-1]  # Cut suffix, no <eos>.
  assert records[2].tokens[-1] != tok.eos_id

  caplog.clear()
  loader = data.TrainLoader(records, LAYOUT, batch_size=2, seed=0, num_threads=2)
  with caplog.at_level(logging.WARNING):
    batches = [next(loader)[0] for _ in range(4)]  # Several epochs: the corrupt image never loads.
  loader.close()
  skipped = [m for m in caplog.messages if "image skipped" in m]
  assert len(skipped) == 1 and "d.jsonl:9: image skipped" in skipped[0]  # Reported once.
  for batch in batches:
    assert batch["tokens"].shape == (2, LAYOUT.length) and batch["images"].shape == (2, 8, 8, 3)
    suffix_starts = {int(t[np.argmax(lm)]) for t, lm in zip(batch["tokens"], batch["loss_mask"])}
    assert suffix_starts <= {tok.encode("cat")[0], tok.encode("blue")[0]}


def test_lines_with_several_images(tmp_path, tok, caplog):
  _write_images(tmp_path, 3)
  lines = [
      {"images": ["img0.png", "img1.png"], "prefix": "answer en same?", "suffix": "no"},  # 1
      {"image": "img2.png", "prefix": "caption en", "suffix": "cat"},  # 2
      {"images": [], "prefix": "p", "suffix": "s"},  # 3: no image
      {"image": "img0.png", "images": ["img1.png"], "prefix": "p", "suffix": "s"},  # 4: both
      {"images": ["img0.png", 7], "prefix": "p", "suffix": "s"},  # 5: not a path
      {"images": ["img0.png", "gone.png"], "prefix": "p", "suffix": "s"},  # 6
      {"images": "img0.png", "prefix": "p", "suffix": "s"},  # 7: not a list
  ]
  path = _write_jsonl(tmp_path / "d.jsonl", lines)
  with caplog.at_level(logging.WARNING):
    records = data.read_jsonl(path, tok, LAYOUT)
  assert [r.where.rsplit(":", 1)[1] for r in records] == ["1", "2"]
  for number, reason in [(3, "non-empty list"), (4, "not both"), (5, "list of strings"),
                         (6, "gone.png"), (7, "non-empty list")]:
    assert any(f"d.jsonl:{number}: bad line" in m and reason in m for m in caplog.messages), number
  pair, single = records
  assert pair.images == [str(tmp_path / "img0.png"), str(tmp_path / "img1.png")]
  prefix = [IMAGE_TOKEN_ID] * 8 + [tok.bos_id] + tok.encode("answer en same?\n")
  np.testing.assert_array_equal(pair.tokens, prefix + tok.encode("no") + [tok.eos_id])
  layout = LAYOUT.for_records(records)
  assert layout.max_images == 2 and layout.length == 2 * 4 + LAYOUT.max_text_len
  batch = data.stack([data.load_example(r, layout) for r in records])
  assert batch["images"].shape == (2, 2, 8, 8, 3) and batch["tokens"].shape == (2, layout.length)
  assert batch["images"][0].std(axis=(1, 2, 3)).min() > 0 and not batch["images"][1, 1].any()
  # One image: the digest of earlier versions, so their runs still resume.
  old = hashlib.sha256(single.images[0].encode() + b"\0" + single.tokens.tobytes()).hexdigest()
  assert data.fingerprint([single]) == old[:16]


def test_all_images_unreadable_raises(tmp_path, tok):
  (tmp_path / "bad.png").write_bytes(b"junk")
  path = _write_jsonl(tmp_path / "d.jsonl", [{"image": "bad.png", "prefix": "p", "suffix": "s"}] * 3)
  loader = data.TrainLoader(data.read_jsonl(path, tok, LAYOUT), LAYOUT, batch_size=2, seed=0)
  with pytest.raises(ValueError, match="readable image"):
    next(loader)
  loader.close()


def _records(tmp_path, tok, count):
  _write_images(tmp_path, count)
  path = _write_jsonl(tmp_path / "d.jsonl", [
      {"image": f"img{i}.png", "prefix": "caption en", "suffix": f"item {i}"} for i in range(count)])
  return data.read_jsonl(path, tok, LAYOUT)


def _suffix_ids(batch):
  return [tuple(t[lm]) for t, lm in zip(batch["tokens"], batch["loss_mask"])]


def test_shuffle_is_seeded_epochwise_and_resumable(tmp_path, tok):
  records = _records(tmp_path, tok, 5)
  by_suffix = {tuple(r.tokens[r.loss_mask]): i for i, r in enumerate(records)}

  def run(seed, position=0, steps=5):
    loader = data.TrainLoader(records, LAYOUT, batch_size=3, seed=seed, position=position,
                              num_threads=2)
    out = [next(loader) for _ in range(steps)]
    loader.close()
    return [[by_suffix[s] for s in _suffix_ids(b)] for b, _ in out], [p for _, p in out]

  order, positions = run(seed=0)
  flat = sum(order, [])
  assert positions == [3, 6, 9, 12, 15]
  for epoch in range(3):  # Each epoch is a permutation of all examples.
    assert sorted(flat[5 * epoch:5 * epoch + 5]) == list(range(5))
  assert len({tuple(flat[:5]), tuple(flat[5:10]), tuple(flat[10:15])}) > 1  # Reshuffled.
  assert run(seed=0)[0] == order
  assert run(seed=1)[0] != order
  resumed, _ = run(seed=0, position=positions[1], steps=3)  # As if restored after 2 batches.
  assert resumed == order[2:]


def test_eval_batches_pad_with_zero_weight(tmp_path, tok):
  records = _records(tmp_path, tok, 5)
  batches = list(data.eval_batches(records, LAYOUT, batch_size=2, num_threads=2))
  assert [b["weight"].tolist() for b in batches] == [[True, True], [True, True], [True, False]]
  expected = [tuple(r.tokens[r.loss_mask]) for r in records]
  got = [s for b in batches for s, w in zip(_suffix_ids(b), b["weight"]) if w]
  assert got == expected  # File order.


def test_text_that_is_not_unicode_is_a_bad_line_not_a_stop(tmp_path, tok, caplog):
  """A lone surrogate ("\\ud83d", valid JSON) in the prefix or the suffix, or bytes that are not
  UTF-8, make that line's error; the lines after it are still read."""
  _write_images(tmp_path, 1)
  good = json.dumps({"image": "img0.png", "prefix": "caption en", "suffix": "cat"}).encode()
  path = tmp_path / "d.jsonl"
  path.write_bytes(b"\n".join([
      good,
      b'{"image": "img0.png", "prefix": "caption \\ud83d", "suffix": "cat"}',
      b'{"image": "img0.png", "prefix": "caption en", "suffix": "cat \\ud83d"}',
      b'{"image": "img0.png", "prefix": "caption \xff en", "suffix": "cat"}',
      good]) + b"\n")
  with caplog.at_level(logging.WARNING):
    records = data.read_jsonl(str(path), tok, LAYOUT)
  assert [r.where.rsplit(":", 1)[1] for r in records] == ["1", "5"]
  for number in (2, 3, 4):
    assert any(f"d.jsonl:{number}: bad line, skipped: " in m for m in caplog.messages), number
  assert any("3 bad line(s) skipped, 2 usable" in m for m in caplog.messages)
