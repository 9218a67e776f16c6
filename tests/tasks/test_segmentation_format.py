"""Segmentation answers: the VQ-VAE mask decoder, weight loading and mask placement."""

import numpy as np
import pytest
from PIL import Image

from helpers import CODE_DIM, constant_vae, random_vae
from paligemma_jax.tasks import detection_format, segmentation_format



# An independent NumPy decoder in PyTorch's layout and conventions (NHWC activations).

def np_conv(x, w, b, pad):
  """torch.nn.functional.conv2d, stride 1: w is [out, in, kh, kw]."""
  kh, kw = w.shape[2:]
  xp = np.pad(x, [(0, 0), (pad, pad), (pad, pad), (0, 0)])
  h, wd = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
  out = sum(np.einsum("nhwi,oi->nhwo", xp[:, i:i + h, j:j + wd], w[:, :, i, j])
            for i in range(kh) for j in range(kw))
  return out + b


def np_conv_transpose(x, w, b, stride=2, pad=1):
  """torch.nn.functional.conv_transpose2d: w is [in, out, kh, kw]; every input pixel (i, j)
  adds x[i, j] @ w[:, :, a, b] at output (i * stride + a, j * stride + b), then `pad` is cropped."""
  n, h, wd, _ = x.shape
  kh, kw = w.shape[2:]
  full = np.zeros((n, (h - 1) * stride + kh, (wd - 1) * stride + kw, w.shape[1]))
  for i in range(h):
    for j in range(wd):
      for a in range(kh):
        for c in range(kw):
          full[:, i * stride + a, j * stride + c] += x[:, i, j] @ w[:, :, a, c]
  return full[:, pad:full.shape[1] - pad, pad:full.shape[2] - pad] + b


def np_decoder(weights, codes):
  relu = lambda v: np.maximum(v, 0)
  conv = lambda x, name, pad: np_conv(x, weights[f"{name}.weight"], weights[f"{name}.bias"], pad)
  emb = weights["_vq_vae._embedding"]
  x = emb[codes].reshape(len(codes), 4, 4, emb.shape[1])  # Code k sits at row k // 4, column k % 4.
  x = relu(conv(x, "decoder.0", 0))
  for block in (2, 3):
    y = relu(conv(x, f"decoder.{block}.net.0", 1))
    y = relu(conv(y, f"decoder.{block}.net.2", 1))
    x = x + conv(y, f"decoder.{block}.net.4", 0)
  for layer in (4, 6, 8, 10):
    x = relu(np_conv_transpose(x, weights[f"decoder.{layer}.weight"], weights[f"decoder.{layer}.bias"]))
  return conv(x, "decoder.12", 0)[..., 0]






@pytest.fixture(scope="module")
def weights():
  return random_vae()


@pytest.fixture(scope="module")
def params(weights, tmp_path_factory):
  path = tmp_path_factory.mktemp("vae") / "vae-oid.npz"
  np.savez(path, **weights)
  return segmentation_format.load_vae_npz(path)


def test_numpy_reference_matches_torch():
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 5, 3, 6)).astype(np.float32)
  wt, bt = rng.normal(size=(6, 4, 4, 4)).astype(np.float32), rng.normal(size=4).astype(np.float32)
  wc, bc = rng.normal(size=(4, 6, 3, 3)).astype(np.float32), rng.normal(size=4).astype(np.float32)
  nchw = lambda a: torch.from_numpy(a.transpose(0, 3, 1, 2))
  want_t = torch.nn.functional.conv_transpose2d(nchw(x), torch.from_numpy(wt), torch.from_numpy(bt),
                                                stride=2, padding=1).numpy().transpose(0, 2, 3, 1)
  want_c = torch.nn.functional.conv2d(nchw(x), torch.from_numpy(wc), torch.from_numpy(bc),
                                      padding=1).numpy().transpose(0, 2, 3, 1)
  assert want_t.shape == (2, 10, 6, 4)  # Stride 2, padding 1, kernel 4: exactly doubles.
  np.testing.assert_allclose(np_conv_transpose(x, wt, bt), want_t, atol=1e-4)
  np.testing.assert_allclose(np_conv(x, wc, bc, 1), want_c, atol=1e-4)


def test_decoder_matches_numpy_reference(weights, params):
  codes = np.array([np.arange(16), [127, 0, 5, 77, 3, 3, 3, 3, 100, 64, 9, 1, 0, 127, 42, 8]])
  got = np.asarray(segmentation_format.reconstruct_masks(params, codes))
  want = np_decoder({k: v.astype(np.float64) for k, v in weights.items()}, codes)
  assert got.shape == (2, 64, 64) and want.std() > 0.1  # A non-trivial map.
  np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max(), rtol=1e-4)
  assert not np.allclose(got[0], got[1])


def test_loaded_params_use_flax_layout(params):
  assert params["codebook"].shape == (128, CODE_DIM)
  assert params["Conv_0"]["kernel"].shape == (1, 1, CODE_DIM, 128)  # [kh, kw, in, out]
  assert params["ResBlock_1"]["Conv_0"]["kernel"].shape == (3, 3, 128, 128)
  assert params["ConvTranspose_1"]["kernel"].shape == (4, 4, 64, 128)  # [kh, kw, out, in]
  assert params["Conv_1"]["kernel"].shape == (1, 1, 16, 1)


def test_load_names_missing_and_misshapen_keys(weights, tmp_path):
  broken = dict(weights)
  del broken["decoder.3.net.2.bias"]
  broken["decoder.8.weight"] = np.zeros((32, 64, 4, 4), np.float32)  # In and out swapped.
  np.savez(tmp_path / "bad.npz", **broken)
  with pytest.raises(ValueError) as err:
    segmentation_format.load_vae_npz(tmp_path / "bad.npz")
  msg = str(err.value)
  assert "missing decoder.3.net.2.bias" in msg
  assert "decoder.8.weight (32, 64, 4, 4) (expected (64, 32, 4, 4))" in msg
  assert "decoder.3.net.2.weight" not in msg and "decoder.0" not in msg


def test_masks_fill_their_boxes_on_a_non_square_image():
  width, height = 300, 200
  params = segmentation_format.convert_vae(constant_vae(1.0))
  segs = "".join(f"<seg{i:03d}>" for i in range(16))
  text = f"<loc0100><loc0200><loc0900><loc0700>{segs} cat ; <loc0000><loc0000><loc1023><loc1023>{segs}"
  out = segmentation_format.decode_masks(text, width, height, params)
  assert out.labels == ["cat", ""] and out.skipped == 0 and out.masks.shape == (2, height, width)
  # y = 100..900 of 1023 of the height, x = 200..700 of 1023 of the width, truncated to pixels.
  y1, y2 = int(100 / 1023 * height), int(900 / 1023 * height)
  x1, x2 = int(200 / 1023 * width), int(700 / 1023 * width)
  assert (y1, x1, y2, x2) == (19, 58, 175, 205)
  want = np.zeros((height, width), bool)
  want[y1:y2, x1:x2] = True
  np.testing.assert_array_equal(out.masks[0], want)
  assert out.masks[1].all()
  boxes = detection_format.parse_detections(text.replace(segs, ""), width, height).boxes
  np.testing.assert_allclose(out.boxes, boxes)  # The same float boxes detection gives.
  # A map <= 0 (the threshold is strict) gives objects with empty masks, not skipped ones.
  for value in (-1.0, 0.0):
    empty = segmentation_format.decode_masks(text, width, height, segmentation_format.convert_vae(constant_vae(value)))
    assert empty.masks.shape == (2, height, width) and not empty.masks.any() and empty.skipped == 0


def test_paste_keeps_orientation_in_a_wide_box():
  left = np.where(np.arange(64)[None, :] < 32, 1.0, -1.0) * np.ones((64, 1))  # Left half inside.
  mask = segmentation_format.paste_mask(left, (100, 10, 300, 60), width=400, height=80)
  assert mask.shape == (80, 400)
  assert mask[10:60, 100:199].all() and not mask[10:60, 201:300].any()
  assert not mask[:10].any() and not mask[60:].any() and not mask[:, :100].any()
  top = left.T  # Top half inside.
  mask = segmentation_format.paste_mask(top, (100, 10, 300, 60), width=400, height=80)
  assert mask[10:34, 100:300].all() and not mask[36:60].any()


def test_malformed_segmentation_groups_are_skipped(params):
  segs = "".join(f"<seg{i:03d}>" for i in range(16))
  groups = [
      f"<loc0100><loc0100><loc0500><loc0500>{segs} ok",
      f"<loc0100><loc0100><loc0500><loc0500>{segs[:-8]} fifteen codes",
      f"<loc0100><loc0100><loc0500><loc0500>{segs[:-8]}<seg128> code out of range",
      f"<loc0500><loc0100><loc0500><loc0500>{segs} zero height",
      "<loc0100><loc0100><loc0500><loc0500> no codes",
      f"<loc0100><loc0100><loc0102><loc0500>{segs} under a pixel tall",
  ]
  out = segmentation_format.decode_masks(" ; ".join(groups), 40, 10, params)
  assert out.labels == ["ok"] and out.skipped == 5 and out.masks.shape == (1, 10, 40)
  none = segmentation_format.decode_masks("", 40, 10, params)
  assert none.masks.shape == (0, 10, 40) and none.boxes.shape == (0, 4) and none.skipped == 0


def test_draw_masks_tints_inside_only():
  masks = np.zeros((1, 40, 60), bool)
  masks[0, 15:30, 5:55] = True
  segs = segmentation_format.Segmentations(np.array([[5, 15, 55, 30]], np.float32), ["cat"], masks, 0)
  out = np.asarray(segmentation_format.draw_masks(Image.new("RGB", (60, 40)), segs, alpha=0.5))
  color = np.array(detection_format.color_for("cat"))
  np.testing.assert_array_equal(out[22, 30], np.round(color * 0.5))  # Black tinted halfway.
  assert out[35, 30].max() == 0 and out[22, 58].max() == 0  # Outside the mask and box.


def test_object_counts_share_compiles_and_padding_changes_no_mask(params):
  rng = np.random.RandomState(0)
  groups = ["<loc0100><loc0100><loc0900><loc0900>"
            + "".join(f"<seg{c:03d}>" for c in rng.randint(0, 128, 16)) + f" obj{i}" for i in range(4)]
  alone = [segmentation_format.decode_masks(g, 30, 20, params).masks[0] for g in groups]
  assert any(m.any() for m in alone) and not all(m.all() for m in alone)  # Masks worth comparing.
  before = segmentation_format.reconstruct_masks._cache_size()
  for n in (3, 4):  # Both run as 4 objects.
    out = segmentation_format.decode_masks(" ; ".join(groups[:n]), 30, 20, params)
    np.testing.assert_array_equal(out.masks, alone[:n])
  assert segmentation_format.reconstruct_masks._cache_size() - before <= 1
