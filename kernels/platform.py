"""Which kernels the default JAX backend can compile."""

from __future__ import annotations

import functools

import jax


@functools.lru_cache(maxsize=None)
def mosaic_gpu_available() -> bool:
  """True on an NVIDIA GPU of compute capability 9.0 or newer (Hopper, Blackwell)."""
  try:
    dev = jax.devices()[0]
  except RuntimeError:
    return False
  if dev.platform != "gpu":
    return False
  cc = getattr(dev, "compute_capability", None)
  try:
    major = int(str(cc).split(".")[0])
  except (TypeError, ValueError):
    return False
  return major >= 9
