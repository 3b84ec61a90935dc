"""Dispatch for prefill attention over a KV cache: the Pallas kernel on GPUs that support it,
XLA everywhere else.

`implementation`:
  None      "pallas" on a Hopper-or-newer NVIDIA GPU when the kernel takes the shapes, else "xla".
  "xla"     `nemojax.attention.attend` (blocked online softmax), runs everywhere.
  "pallas"  the Mosaic GPU kernel (`pallas_mosaic_gpu.py`); without a Hopper-or-newer GPU it runs
            on Mosaic GPU's CPU interpreter (slow: for tests).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from nemojax.kernels import platform

IMPLEMENTATIONS = ("xla", "pallas")
_KERNEL = "attention.pallas_mosaic_gpu"


def _kernel_traces(head_dim: int, dtype) -> bool:
  """Whether the compiled kernel traces for this head size on this JAX (one tile, one block)."""
  S = jax.ShapeDtypeStruct
  mod = platform.kernel_module(_KERNEL)
  q, kv = S((1, 64, 1, head_dim), dtype), S((1, 1, mod.DEFAULT_CONFIG.block_k, head_dim), dtype)
  i, start = S((), jnp.int32), S((1,), jnp.int32)
  kernel = functools.partial(mod.attention, interpret=False)
  return platform.traces(_KERNEL, kernel, q, kv, kv, i, start, i)


def resolve_implementation(implementation: str | None, *, head_dim: int, cache_len: int,
                           dtype) -> str:
  """The implementation a prefill chunk will use on the default backend."""
  if implementation is not None:
    if implementation not in IMPLEMENTATIONS:
      raise ValueError(f"attention: implementation must be one of {IMPLEMENTATIONS} or None, "
                       f"got {implementation!r}")
    return implementation
  if platform.mosaic_gpu_available():
    mod = platform.kernel_module(_KERNEL)  # None, with one warning, if it fails on this JAX
    if (mod is not None and mod.supports(head_dim=head_dim, cache_len=cache_len, dtype=dtype)
        and _kernel_traces(head_dim, jnp.dtype(dtype))):
      return "pallas"
  return "xla"


def prefill_attention(q, k, v, pos, start, num_keys):
  """The Pallas kernel, compiled on a Hopper-or-newer GPU, interpreted elsewhere (tests)."""
  from nemojax.kernels.attention import pallas_mosaic_gpu  # noqa: PLC0415
  return pallas_mosaic_gpu.attention(q, k, v, pos, start, num_keys,
                                     interpret=not platform.mosaic_gpu_available())
