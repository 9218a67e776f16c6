"""Host arrays JAX on CPU takes as they are: XLA:CPU keeps a host buffer without copying it only
if it is 64-byte aligned (numpy's allocations are 16-byte aligned, and a copy of a whole model
into fresh memory costs seconds of page faults on the machines we measure on)."""

import math

import numpy as np

ALIGNMENT = 64


def aligned_empty(shape, dtype) -> np.ndarray:
  """np.empty(shape, dtype) starting on an ALIGNMENT-byte boundary."""
  dtype = np.dtype(dtype)
  nbytes = math.prod(shape) * dtype.itemsize
  raw = np.empty(nbytes + ALIGNMENT, np.uint8)
  start = -raw.ctypes.data % ALIGNMENT
  return raw[start:start + nbytes].view(dtype).reshape(shape)
