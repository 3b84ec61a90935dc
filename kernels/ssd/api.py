"""Dispatch for the SSD scan: a Pallas kernel on GPUs that support it, XLA everywhere else.

`implementation`:
  None      pick the fastest available for the arrays' device ("pallas" on a Hopper-or-newer
            NVIDIA GPU when the kernel supports the shapes, else "xla").
  "xla"     `reference.ssd_chunked`, runs everywhere (CPU, TPU, any GPU).
  "pallas"  the Mosaic GPU kernels (`pallas_mosaic_gpu.py`; backward `pallas_mosaic_gpu_bwd.py`,
            `pallas_mosaic_gpu_bwd_blocks.py`); without a
            Hopper-or-newer GPU they run on Mosaic GPU's CPU interpreter (slow: for tests); an error
            for shapes they do not support.
  "naive"   the `lax.scan` oracle; for tests.

Packed sequences (`segment_ids` given): every implementation resets the state at document
boundaries (the Mosaic GPU kernels through a penalty on the log-decay at each document's first
step, `pallas_mosaic_gpu.DOC_PENALTY`), so None picks as without them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from nemojax.kernels import platform
from nemojax.kernels.ssd import reference

IMPLEMENTATIONS = ("xla", "pallas", "naive")


_KERNEL = "ssd.pallas_mosaic_gpu_bwd"  # the differentiable entry: forward and backward kernels


def _pallas_module():
  return platform.kernel_module(_KERNEL)  # None, with one warning, if it fails on this JAX


def _kernel_traces(head_dim: int, state_size: int, chunk_size: int, dtype) -> bool:
  """Whether the compiled kernel traces at these sizes on this JAX (one block, one head; once)."""
  S = jax.ShapeDtypeStruct
  x = S((1, chunk_size, 1, head_dim), dtype)
  dt, A = S((1, chunk_size, 1), jnp.float32), S((1,), jnp.float32)
  bc = S((1, chunk_size, 1, state_size), dtype)
  kernel = functools.partial(_pallas_module().ssd, chunk_size=chunk_size, interpret=False)
  return platform.traces(_KERNEL, kernel, x, dt, A, bc, bc)


def resolve_implementation(implementation: str | None, **shape_info) -> str:
  """The implementation `ssd` will use for `implementation` on the default backend."""
  if implementation is not None:
    if implementation not in IMPLEMENTATIONS:
      raise ValueError(f"ssd: implementation must be one of {IMPLEMENTATIONS} or None, "
                       f"got {implementation!r}")
    return implementation
  if platform.mosaic_gpu_available():
    mod = _pallas_module()
    if (mod is not None and mod.supports(**shape_info)
        and _kernel_traces(**{**shape_info, "dtype": jnp.dtype(shape_info["dtype"])})):
      return "pallas"
  return "xla"


def ssd(x, dt, A, B, C, D=None, *, initial_state=None, chunk_size: int = 128,
        implementation: str | None = None, segment_ids=None):
  """The SSD scan; see `reference` for the math and shapes.

  `segment_ids` [b, t] (packed documents, state reset at each boundary; the initial state is the
  first document's, the final state the last's) are taken by every implementation.

  Returns y [b, t, h, p] in x.dtype and the final state [b, h, p, n] in float32.
  """
  impl = resolve_implementation(
      implementation, head_dim=x.shape[-1], state_size=B.shape[-1], chunk_size=chunk_size,
      dtype=x.dtype)
  if impl == "xla":
    return reference.ssd_chunked(x, dt, A, B, C, D, initial_state, segment_ids,
                                 chunk_size=chunk_size)
  if impl == "naive":
    return reference.ssd_naive(x, dt, A, B, C, D, initial_state, segment_ids)
  from nemojax.kernels.ssd import pallas_mosaic_gpu_bwd  # noqa: PLC0415  (chosen: errors surface)
  return pallas_mosaic_gpu_bwd.ssd(x, dt, A, B, C, D, initial_state=initial_state,
                                   chunk_size=chunk_size, segment_ids=segment_ids,
                                   interpret=not platform.mosaic_gpu_available())


def ssd_step(state, x, dt, A, B, C, D=None, *, implementation: str | None = None):
  """One decode step for a batch of single tokens; see `reference.ssd_update`."""
  del implementation  # XLA fuses this update well; a kernel is added only if measurements say so.
  return reference.ssd_update(state, x, dt, A, B, C, D)
