"""Dispatch for prefill attention over a KV cache: the Pallas kernel on GPUs that support it,
XLA everywhere else.

`implementation`:
  None      "pallas" on a Hopper-or-newer NVIDIA GPU when the kernel takes the shapes, else "xla".
  "xla"     `nemojax.attention.attend` (blocked online softmax), runs everywhere.
  "pallas"  the Mosaic GPU kernel (`pallas_mosaic_gpu.py`); without a Hopper-or-newer GPU it runs
            on Mosaic GPU's CPU interpreter (slow: for tests).
"""

from __future__ import annotations

from nemojax.kernels import platform

IMPLEMENTATIONS = ("xla", "pallas")


def resolve_implementation(implementation: str | None, *, head_dim: int, cache_len: int,
                           dtype) -> str:
  """The implementation a prefill chunk will use on the default backend."""
  if implementation is not None:
    if implementation not in IMPLEMENTATIONS:
      raise ValueError(f"attention: implementation must be one of {IMPLEMENTATIONS} or None, "
                       f"got {implementation!r}")
    return implementation
  if platform.mosaic_gpu_available():
    from nemojax.kernels.attention import pallas_mosaic_gpu  # noqa: PLC0415
    if pallas_mosaic_gpu.supports(head_dim=head_dim, cache_len=cache_len, dtype=dtype):
      return "pallas"
  return "xla"


def prefill_attention(q, k, v, pos, start, num_keys):
  """The Pallas kernel, compiled on a Hopper-or-newer GPU, interpreted elsewhere (tests)."""
  from nemojax.kernels.attention import pallas_mosaic_gpu  # noqa: PLC0415
  return pallas_mosaic_gpu.attention(q, k, v, pos, start, num_keys,
                                     interpret=not platform.mosaic_gpu_available())
