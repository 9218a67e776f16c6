"""What test modules share: the repository's folders, and the check every expected failure of a
command-line tool must pass (exit status 1, no traceback)."""

import os

import numpy as np

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)  # The repository: `python -m ...` runs from here.


def assert_expected_failure(proc, stderr: str | None = None) -> list[str]:
  """A tool's expected failure: exit 1 and no traceback -> the lines of its stderr."""
  stderr = proc.stderr if stderr is None else stderr
  assert proc.returncode == 1 and "Traceback" not in stderr, stderr[-3000:]
  return stderr.strip().splitlines()


# big_vision's mask decoder (vae-oid.npz) with random or constant weights.

CODE_DIM = 512  # Codebook width of the public vae-oid.npz.


def random_vae(seed=0, code_dim=CODE_DIM):
  """Random weights with exactly vae-oid.npz's names and PyTorch shapes, plus an encoder tensor."""
  rng = np.random.default_rng(seed)
  w = {"_vq_vae._embedding": rng.normal(size=(128, code_dim)),
       "encoder.0.weight": rng.normal(size=(16, 1, 3, 3))}  # Present in the real file, unused.

  def add(name, shape, fan_in):
    w[f"{name}.weight"] = rng.normal(size=shape) / np.sqrt(fan_in)
    w[f"{name}.bias"] = rng.normal(size=shape[1] if name in ups else shape[0]) * 0.1

  ups = {"decoder.4", "decoder.6", "decoder.8", "decoder.10"}
  add("decoder.0", (128, code_dim, 1, 1), code_dim)
  for block in (2, 3):
    add(f"decoder.{block}.net.0", (128, 128, 3, 3), 128 * 9)
    add(f"decoder.{block}.net.2", (128, 128, 3, 3), 128 * 9)
    add(f"decoder.{block}.net.4", (128, 128, 1, 1), 128)
  for name, c_in, c_out in (("decoder.4", 128, 128), ("decoder.6", 128, 64),
                            ("decoder.8", 64, 32), ("decoder.10", 32, 16)):
    add(name, (c_in, c_out, 4, 4), c_in * 4)
  add("decoder.12", (1, 16, 1, 1), 16)
  return {k: v.astype(np.float32) for k, v in w.items()}


def constant_vae(value):
  """Weights whose decoder outputs `value` everywhere: all zero but the last bias."""
  w = {k: np.zeros_like(v) for k, v in random_vae().items()}
  w["decoder.12.bias"][:] = value
  return w
