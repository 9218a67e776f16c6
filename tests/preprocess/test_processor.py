"""Processor: images and prompts match transformers' PaliGemmaProcessor, built offline."""

import concurrent.futures
import io
import itertools
import os
import re
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from paligemma_jax import errors
from paligemma_jax.preprocess import processor
from paligemma_jax.preprocess.tokenizer import Tokenizer
from helpers import ROOT

IMAGE_TOKEN_ID = 1536  # First id past the test tokenizer's pieces, as in the real model.
NUM_IMAGE_TOKENS = 4


def reference_image_processor(height, width):
  """transformers' SigLIP image processor as PaliGemma checkpoints configure it (no download).

  Without torchvision installed, the PaliGemma auto class resolves to the PIL backend used here.
  """
  from transformers.image_utils import PILImageResampling
  from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
  image_processor = SiglipImageProcessorPil(
    size={"height": height, "width": width}, resample=PILImageResampling.BICUBIC, do_rescale=True,
    rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3)
  image_processor.image_seq_length = NUM_IMAGE_TOKENS
  return image_processor


@pytest.fixture(scope="module")
def hf_processor(spm_model_path):
  transformers = pytest.importorskip("transformers")
  tokenizer = transformers.GemmaTokenizer.from_pretrained(os.path.dirname(spm_model_path), local_files_only=True)
  proc = transformers.PaliGemmaProcessor(image_processor=reference_image_processor(28, 28), tokenizer=tokenizer)
  assert proc.image_token_id == IMAGE_TOKEN_ID
  return proc


@pytest.fixture(scope="module")
def tok(spm_model_path):
  return Tokenizer(spm_model_path)


def _image(mode, size=(37, 53), seed=0):
  """A random image of `mode` and (width, height) `size`."""
  rng = np.random.default_rng(seed)
  w, h = size
  if mode in ("RGB", "RGBA", "CMYK", "LA"):
    return Image.fromarray(rng.integers(0, 256, (h, w, len(mode)), np.uint8), mode)
  if mode in ("L", "1"):
    return Image.fromarray(rng.integers(0, 256, (h, w), np.uint8), "L").convert(mode)
  image = Image.fromarray(rng.integers(0, 16, (h, w), np.uint8), "P")
  image.putpalette(rng.integers(0, 256, 48, np.uint8).tolist())
  if mode == "P+transparency":
    image.info["transparency"] = 3
  return image


# -- Images -------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode,src_size,size", [
  ("RGB", (37, 53), 28), ("RGB", (300, 200), 56), ("RGB", (28, 28), 28), ("RGB", (10, 10), 64),
  ("RGB", (60, 40), (28, 42)), ("L", (37, 53), 28), ("1", (37, 53), 28), ("RGBA", (37, 53), 28),
  ("LA", (90, 31), 28), ("P", (37, 53), 28), ("P+transparency", (37, 53), 28), ("CMYK", (37, 53), 28),
])
def test_preprocess_matches_transformers(mode, src_size, size):
  pytest.importorskip("transformers")
  height, width = (size, size) if isinstance(size, int) else size
  image = _image(mode, src_size)
  want = reference_image_processor(height, width)(images=image, return_tensors="np")["pixel_values"][0]
  got = processor.preprocess_image(image, size)
  assert got.shape == (height, width, 3) and got.dtype == np.float32
  np.testing.assert_allclose(got, want.transpose(1, 2, 0), rtol=0, atol=1e-6)
  assert -1 <= got.min() and got.max() <= 1


def test_preprocess_through_paligemma_processor(hf_processor):
  image = _image("RGB", (45, 33), seed=1)
  want = hf_processor(images=image, text="caption en", return_tensors="np")["pixel_values"][0]
  np.testing.assert_allclose(processor.preprocess_image(image, 28), want.transpose(1, 2, 0), rtol=0, atol=1e-6)


def test_preprocess_accepts_uint8_arrays():
  image = _image("RGB", (20, 30))
  np.testing.assert_array_equal(processor.preprocess_image(np.asarray(image), 28), processor.preprocess_image(image, 28))
  grey = np.asarray(_image("L", (20, 30)))
  assert processor.preprocess_image(grey, 14).shape == (14, 14, 3)
  with pytest.raises(TypeError):
    processor.preprocess_image(np.zeros((4, 4, 3), np.float32), 14)


def test_alpha_is_composited_on_white():
  rgba = np.array([[[200, 100, 50, 0], [200, 100, 50, 255], [0, 0, 0, 128]]], np.uint8)
  got = np.asarray(processor.to_rgb(Image.fromarray(rgba, "RGBA")))
  np.testing.assert_array_equal(got[0, :2], [[255, 255, 255], [200, 100, 50]])
  assert 125 <= got[0, 2, 0] <= 128 and len(set(got[0, 2])) == 1


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P+transparency", "P", "L", "1", "CMYK"])
def test_to_rgb_matches_transformers(mode):
  image_transforms = pytest.importorskip("transformers.image_transforms")
  image = _image(mode)
  got = processor.to_rgb(image)
  assert got.mode == "RGB"
  np.testing.assert_array_equal(np.asarray(got), image_transforms.convert_to_rgb(image, return_numpy=True))


def test_16_bit_greyscale_is_scaled_not_clipped():
  image = Image.fromarray(np.array([[0, 257 * 100, 65535, 300]], np.uint16))
  assert image.mode.startswith("I;16")
  np.testing.assert_array_equal(np.asarray(processor.to_rgb(image))[0, :, 0], [0, 100, 255, 1])
  every = np.arange(65536, dtype=np.uint16).reshape(256, 256)
  want = (every / 257.0).round().astype(np.uint8)
  np.testing.assert_array_equal(np.asarray(processor.to_rgb(Image.fromarray(every)))[..., 0], want)


# -- Loading ------------------------------------------------------------------------------------

def _encoded(image, fmt, **kw):
  buf = io.BytesIO()
  image.save(buf, fmt, **kw)
  return buf.getvalue()


def test_load_image_sources(tmp_path):
  image = _image("RGB", (20, 12))
  data = _encoded(image, "PNG")
  path = tmp_path / "x.png"
  path.write_bytes(data)
  with open(path, "rb") as f:
    loaded = [processor.load_image(s) for s in (str(path), path, data, bytearray(data), io.BytesIO(data))]
    loaded.append(processor.load_image(f))
  for got in loaded:
    assert got.mode == "RGB" and got.size == (20, 12)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(image))


@pytest.mark.parametrize("mode,fmt", [("L", "JPEG"), ("CMYK", "JPEG"), ("P", "PNG"), ("RGBA", "PNG"),
                                      ("LA", "PNG"), ("RGB", "WEBP"), ("RGB", "BMP"), ("P", "GIF")])
def test_load_image_converts_to_rgb(mode, fmt):
  source = Image.open(io.BytesIO(_encoded(_image(mode), fmt)))
  got = processor.load_image(_encoded(_image(mode), fmt))
  assert got.mode == "RGB" and got.size == (37, 53)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(processor.to_rgb(source)))


def test_load_image_applies_exif_orientation():
  pixels = np.random.default_rng(0).integers(0, 256, (2, 3, 3), np.uint8)
  exif = Image.Exif()
  exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display.
  got = processor.load_image(_encoded(Image.fromarray(pixels), "PNG", exif=exif))
  np.testing.assert_array_equal(np.asarray(got), np.rot90(pixels, k=-1))


def test_load_image_16_bit_png():
  image = Image.fromarray(np.full((4, 5), 257 * 60, np.uint16))
  np.testing.assert_array_equal(np.asarray(processor.load_image(_encoded(image, "PNG"))), 60)


@pytest.mark.parametrize("case", ["missing", "directory", "garbage", "truncated", "empty"])
def test_load_image_errors_name_the_file(tmp_path, case):
  path = tmp_path / f"{case}.jpg"
  jpeg = _encoded(_image("RGB", (64, 64)), "JPEG")
  if case == "directory":
    path.mkdir()
  elif case != "missing":
    path.write_bytes({"garbage": b"not an image", "truncated": jpeg[:len(jpeg) // 2], "empty": b""}[case])
  with pytest.raises(processor.ImageLoadError) as e:
    processor.load_image(path)
  assert isinstance(e.value, ValueError)
  assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_load_image_bytes_error():
  with pytest.raises(ValueError, match="12-byte buffer"):
    processor.load_image(b"not an image")


# -- Bounded memory: load_pixels ---------------------------------------------------------------

@pytest.fixture
def budget(monkeypatch):
  """budget(limit_bytes): a fresh process-wide decode budget, the previous one restored after."""
  monkeypatch.setattr(processor, "_budget", None)
  return processor.set_decode_budget


def _old_path(source, size):
  return processor.preprocess_image(processor.load_image(source), size)


@pytest.mark.parametrize("mode,fmt", [
  ("RGB", "JPEG"), ("L", "JPEG"), ("CMYK", "JPEG"), ("P", "PNG"), ("P+transparency", "PNG"),
  ("RGBA", "PNG"), ("LA", "PNG"), ("RGB", "WEBP"), ("P", "GIF")])
def test_load_pixels_equals_load_image_then_preprocess(mode, fmt):
  data = _encoded(_image(mode, (300, 200)), fmt)
  pixels, size = processor.load_pixels(data, (28, 42))
  assert size == (300, 200)
  np.testing.assert_array_equal(pixels, _old_path(data, (28, 42)))


def test_load_pixels_orientation_and_16_bit():
  pixels = np.random.default_rng(0).integers(0, 256, (20, 30, 3), np.uint8)
  exif = Image.Exif()
  exif[0x0112] = 6
  data = _encoded(Image.fromarray(pixels), "PNG", exif=exif)
  got, size = processor.load_pixels(data, (14, 28))
  assert size == (20, 30)  # Upright: the stored 30 x 20 turned a quarter.
  np.testing.assert_array_equal(got, _old_path(data, (14, 28)))
  grey16 = _encoded(Image.fromarray(np.arange(600, dtype=np.uint16).reshape(20, 30) * 100), "PNG")
  np.testing.assert_array_equal(processor.load_pixels(grey16, 14)[0], _old_path(grey16, 14))


@pytest.mark.parametrize("case", ["missing", "garbage", "truncated"])
def test_load_pixels_errors_name_the_file_and_release_the_budget(tmp_path, budget, case):
  held = budget(1 << 20)
  path = tmp_path / f"{case}.jpg"
  jpeg = _encoded(_image("RGB", (64, 64)), "JPEG")
  if case != "missing":
    path.write_bytes({"garbage": b"not an image", "truncated": jpeg[:len(jpeg) // 2]}[case])
  with pytest.raises(processor.ImageLoadError, match=re.escape(str(path))):
    processor.load_pixels(path, 28)
  assert held.in_use == 0 and held.waiting == 0
  assert issubclass(processor.ImageLoadError, errors.InputError)


def test_many_threads_never_hold_more_than_the_budget(budget):
  """16 threads, 24 images: every decode waits for its bytes, none is lost or changed."""
  sizes = [(100 + 20 * i, 90 + 15 * (i % 5)) for i in range(24)]
  images = [_encoded(_image("RGB", size, seed=i), "PNG") for i, size in enumerate(sizes)]
  largest = 4 * 560 * 150  # RGB is 4 bytes a pixel in Pillow.
  held = budget(3 * largest)
  with concurrent.futures.ThreadPoolExecutor(16) as pool:
    got = list(pool.map(lambda data: processor.load_pixels(data, 28)[0], images))
  assert largest <= held.high_water <= held.limit and held.in_use == 0
  for data, pixels in zip(images, got):
    np.testing.assert_array_equal(pixels, _old_path(data, 28))


def _wait_until(condition):
  """Spins until `condition()` (another thread reaching its wait); fails after 30 s."""
  deadline = time.monotonic() + 30
  while not condition():
    assert time.monotonic() < deadline
    time.sleep(0.001)


def test_byte_budget_admits_in_order_and_oversized_alone():
  budget = processor.ByteBudget(10)
  admitted = []

  def request(name, nbytes):
    with budget.hold(nbytes):
      admitted.append((name, budget.in_use))

  with budget.hold(6):
    big = threading.Thread(target=request, args=("big", 25))  # Over the limit: runs alone.
    big.start()
    _wait_until(lambda: budget.waiting == 1)
    small = threading.Thread(target=request, args=("small", 1))  # Fits, but comes after big.
    small.start()
    _wait_until(lambda: budget.waiting == 2)
    assert admitted == []
  big.join()
  small.join()
  assert admitted == [("big", 25), ("small", 1)]
  assert budget.high_water == 25 and budget.in_use == 0
  with pytest.raises(errors.InputError):
    processor.ByteBudget(0)


def test_budget_from_environment(monkeypatch):
  monkeypatch.setattr(processor, "_budget", None)
  monkeypatch.setenv(processor.DECODE_BUDGET_ENV, "64")
  assert processor.decode_budget().limit == 64 << 20
  monkeypatch.setattr(processor, "_budget", None)
  monkeypatch.setenv(processor.DECODE_BUDGET_ENV, "1.5G")
  with pytest.raises(errors.InputError, match=processor.DECODE_BUDGET_ENV):
    processor.decode_budget()


_MEMORY_CHILD = """
import concurrent.futures, resource, sys
from paligemma_jax import errors
from paligemma_jax.preprocess import processor
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux.
before = peak()
with concurrent.futures.ThreadPoolExecutor(8) as pool:
  list(pool.map(lambda path: processor.load_pixels(path, 224), sys.argv[1:]))
print(peak() - before)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss units and glibc's allocator")
@pytest.mark.parametrize("side,budget_mib", [(6000, None), (3500, 128)])
def test_eight_threads_decoding_big_pngs_stay_within_the_budget(tmp_path, side, budget_mib):
  """Peak resident growth of 8 threads decoding 8 side x side RGB PNGs (4 bytes a pixel each).

  Bound: the budget plus 96 MiB for what it does not count (each thread's resize intermediate,
  224 x side x 4 bytes; outputs; stacks). Measured with load_pixels / with Pillow's 16 MiB blocks
  (each thread keeps its last image) / with load_image + preprocess_image: 1000 / 1000 / 2180
  MiB at the default 1 GiB and 6000 px; 120 / 310 / 720 MiB at 128 MiB and 3500 px.
  """
  path = tmp_path / "big.png"
  Image.new("RGB", (side, side), (30, 120, 200)).save(path, compress_level=1)
  env = {k: v for k, v in os.environ.items()
         if k not in (processor.DECODE_BUDGET_ENV, "PILLOW_BLOCK_SIZE")}
  if budget_mib:
    env[processor.DECODE_BUDGET_ENV] = str(budget_mib)
  child = subprocess.run([sys.executable, "-c", _MEMORY_CHILD] + [str(path)] * 8, cwd=ROOT, env=env,
                         check=True, capture_output=True, text=True, timeout=300)
  limit = (budget_mib << 20) if budget_mib else processor.DEFAULT_DECODE_BUDGET_BYTES
  growth = int(child.stdout.split()[-1])
  assert growth <= limit + (96 << 20), f"{growth / 2**20:.0f} MiB"


def _photo_like(width, height, seed=0):
  """Smooth shapes plus fine detail and sharp coloured edges, as JPEG photos have."""
  rng = np.random.default_rng(seed)
  coarse = Image.fromarray(rng.integers(0, 256, (12, 12, 3), np.uint8))
  pixels = np.asarray(coarse.resize((width, height), Image.BICUBIC)).astype(np.int16)
  pixels += rng.integers(-20, 21, (height, width, 3), dtype=np.int16)
  pixels[height // 3: height // 2, width // 4: width // 2] = (200, 20, 40)
  return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


@pytest.mark.parametrize("subsampling", [0, 2])  # 4:4:4 and 4:2:0.
def test_big_jpeg_is_draft_decoded_within_tolerance(budget, subsampling):
  """Draft decoding of a JPEG >= 8x the target: within DRAFT_MARGIN's stated tolerance."""
  data = _encoded(_photo_like(1800, 2000), "JPEG", quality=90, subsampling=subsampling)
  held = budget(1 << 30)
  pixels, size = processor.load_pixels(data, 224)
  assert size == (1800, 2000)
  # Decoded at half scale: 900 x 1000, not 1800 x 2000; with Pillow's line pointers, the
  # decoder's two lines and the resize's coefficients.
  assert held.high_water == 4 * 900 * 1000 + 8 * 1000 + 2 * 4 * 900 + 32 * (900 + 1000)
  levels = np.abs(pixels - _old_path(data, 224)) * 127.5  # uint8 levels.
  assert levels.max() <= 7 and levels.mean() <= 0.41 and np.quantile(levels, 0.99) <= 2


def test_jpeg_draft_follows_orientation(budget):
  """Stored 2000 x 1999, shown 1999 x 2000: the draft keeps 4x the target along each shown side."""
  exif = Image.Exif()
  exif[0x0112] = 6
  data = _encoded(_photo_like(2000, 1999), "JPEG", quality=90, exif=exif)
  held = budget(1 << 30)
  pixels, size = processor.load_pixels(data, (112, 56))
  assert size == (1999, 2000) and pixels.shape == (112, 56, 3)
  # Quarter scale (square), turned (one copy); lines and resize coefficients as above.
  assert held.high_water == 2 * 4 * 500 * 500 + 8 * 500 + 2 * 4 * 500 + 32 * (500 + 500)
  levels = np.abs(pixels - _old_path(data, (112, 56))) * 127.5
  assert levels.max() <= 7 and levels.mean() <= 0.41


def test_progressive_jpeg_counts_its_coefficients(budget):
  """libjpeg keeps all DCT coefficients of a progressive JPEG: 2 bytes x 3 components a pixel."""
  data = _encoded(_photo_like(300, 200), "JPEG", progressive=True)
  held = budget(1 << 30)
  np.testing.assert_array_equal(processor.load_pixels(data, 28)[0], _old_path(data, 28))
  assert held.high_water == (4 + 2 * 3) * 300 * 200 + 8 * 200 + 2 * 4 * 300 + 32 * (300 + 200)


def test_jpeg_not_8x_the_target_is_decoded_in_full():
  data = _encoded(_photo_like(1790, 1200), "JPEG", quality=90, subsampling=2)
  np.testing.assert_array_equal(processor.load_pixels(data, 224)[0], _old_path(data, 224))


# -- Prompts ------------------------------------------------------------------------------------

PROMPTS = ["caption en", "answer en what is on the bench?", "ocr", "détecté à 12:30 ☃ 😀", "", "two lines\n",
           "detect cat ; dog", "segment <loc0001> 12345"]
SUFFIXES = [None, "a cat sitting on a bench", "", "😀 x\n",
            "<loc0010><loc0020><loc0500><loc1023> cat ; <loc0000><loc0001><loc0002><loc0003> dog",
            "<loc0010><loc0020><loc0500><loc1023><seg000><seg127><seg042> cat"]


@pytest.mark.parametrize("prompt,suffix", itertools.product(PROMPTS, SUFFIXES))
def test_build_prompt_matches_transformers(tok, hf_processor, prompt, suffix):
  tokens, prefix_mask, loss_mask = processor.build_prompt(tok, prompt, NUM_IMAGE_TOKENS, IMAGE_TOKEN_ID, suffix)
  image = _image("RGB", (8, 8))
  for text in (prompt, "<image>" + prompt):  # transformers' two spellings give the same ids.
    want = hf_processor(images=image, text=text, suffix=suffix, return_tensors="np")
    np.testing.assert_array_equal(tokens, want["input_ids"][0])
    np.testing.assert_array_equal(prefix_mask, want["token_type_ids"][0] == 0)
    np.testing.assert_array_equal(loss_mask, want["labels"][0] != -100)


def test_build_prompt_layout(tok):
  tokens, prefix_mask, loss_mask = processor.build_prompt(tok, "caption en", 3, IMAGE_TOKEN_ID)
  assert tokens.dtype == np.int32 and prefix_mask.dtype == loss_mask.dtype == bool
  assert tokens.tolist() == [IMAGE_TOKEN_ID] * 3 + [tok.bos_id] + tok.encode("caption en\n")
  assert prefix_mask.all() and not loss_mask.any()

  tokens, prefix_mask, loss_mask = processor.build_prompt(tok, "caption en", 3, IMAGE_TOKEN_ID, suffix="a cat")
  n_prefix = 4 + len(tok.encode("caption en\n"))
  assert tokens[n_prefix:].tolist() == tok.encode("a cat") + [tok.eos_id]
  assert prefix_mask.tolist() == [True] * n_prefix + [False] * (len(tokens) - n_prefix)
  np.testing.assert_array_equal(loss_mask, ~prefix_mask)


def test_prompt_newline_is_always_appended(tok):
  """Like transformers: a prompt ending in "\\n" still gets one more."""
  tokens, _, _ = processor.build_prompt(tok, "ocr\n", 1, IMAGE_TOKEN_ID)
  assert tok.decode(tokens) == "ocr\n\n"


def test_num_image_tokens():
  assert [processor.num_image_tokens(s, 14) for s in (224, 448, 896)] == [256, 1024, 4096]
  with pytest.raises(ValueError):
    processor.num_image_tokens(225, 14)


def test_importable_without_transformers_or_torch():
  code = ("import sys; sys.modules.update(transformers=None, torch=None); "
          "import paligemma_jax.preprocess.processor, paligemma_jax.preprocess.tokenizer")
  subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


@pytest.mark.parametrize("size", [(200_000, 1), (1, 200_000)])
def test_a_strip_is_thinned_before_its_resize_and_counted(budget, size, monkeypatch):
  """A 1 x N strip: resizing it directly keeps 32 bytes of coefficients per source pixel (1.6 GB
  for N = 50,000,000), so it is box-averaged along its long axis first; and Pillow's pointer per
  line and the decoder's two lines count in the budget. Ordinary images resize as before."""
  pixels = np.random.RandomState(0).randint(0, 256, (size[1], size[0], 3), np.uint8)
  resized = []
  original = Image.Image.resize
  monkeypatch.setattr(Image.Image, "resize", lambda self, *a, **k: (
      resized.append(self.size), original(self, *a, **k))[1])
  held = budget(1 << 30)
  got, upright = processor.load_pixels(_encoded(Image.fromarray(pixels), "PNG"), 28)
  assert upright == size and got.shape == (28, 28, 3)
  assert max(resized[-1]) <= 2 * processor.DRAFT_MARGIN * 28  # Thinned first: 224 at most.
  long_side = max(size)
  assert held.high_water >= 4 * long_side + 8 * size[1] + 2 * 4 * size[0]
  # The box average keeps the mean colour of the strip's pixels, as the direct resize does.
  want = processor.preprocess_image(Image.fromarray(pixels), 28)
  assert abs(float(got.mean()) - float(want.mean())) < 0.01
  resized.clear()
  ordinary = np.random.RandomState(1).randint(0, 256, (200, 300, 3), np.uint8)
  processor.load_pixels(_encoded(Image.fromarray(ordinary), "PNG"), 28)
  assert resized == [(300, 200)]  # Not a strip: resized as it is.
