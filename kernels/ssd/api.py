"""Dispatch for the SSD scan: a Pallas kernel on GPUs that support it, XLA everywhere else.

`implementation`:
  None      pick the fastest available for the arrays' device ("pallas" on a Hopper-or-newer
            NVIDIA GPU when the kernel supports the shapes, else "xla").
  "xla"     `reference.ssd_chunked`, runs everywhere (CPU, TPU, any GPU).
  "pallas"  the Mosaic GPU kernels (`pallas_mosaic_gpu.py` forward, `pallas_mosaic_gpu_bwd.py`
            backward and the differentiable entry); without a Hopper-or-newer GPU it runs
            on Mosaic GPU's CPU interpreter (slow: for tests); an error for shapes it does not
            support.
  "naive"   the `lax.scan` oracle; for tests.
"""

from __future__ import annotations

from nemojax.kernels import platform
from nemojax.kernels.ssd import reference

IMPLEMENTATIONS = ("xla", "pallas", "naive")


def _pallas_module():
  try:
    from nemojax.kernels.ssd import pallas_mosaic_gpu_bwd  # forward + backward kernels
  except ImportError:
    return None
  return pallas_mosaic_gpu_bwd


def resolve_implementation(implementation: str | None, **shape_info) -> str:
  """The implementation `ssd` will use for `implementation` on the default backend."""
  if implementation is not None:
    if implementation not in IMPLEMENTATIONS:
      raise ValueError(f"ssd: implementation must be one of {IMPLEMENTATIONS} or None, "
                       f"got {implementation!r}")
    return implementation
  if platform.mosaic_gpu_available():
    mod = _pallas_module()
    if mod is not None and mod.supports(**shape_info):
      return "pallas"
  return "xla"


def ssd(x, dt, A, B, C, D=None, *, initial_state=None, chunk_size: int = 128,
        implementation: str | None = None):
  """The SSD scan; see `reference` for the math and shapes.

  Returns y [b, t, h, p] in x.dtype and the final state [b, h, p, n] in float32.
  """
  impl = resolve_implementation(
      implementation, head_dim=x.shape[-1], state_size=B.shape[-1], chunk_size=chunk_size,
      dtype=x.dtype)
  if impl == "xla":
    return reference.ssd_chunked(x, dt, A, B, C, D, initial_state, chunk_size=chunk_size)
  if impl == "naive":
    return reference.ssd_naive(x, dt, A, B, C, D, initial_state)
  mod = _pallas_module()
  if mod is None:
    raise NotImplementedError("ssd: the Pallas Mosaic GPU kernel is not available in this build")
  return mod.ssd(x, dt, A, B, C, D, initial_state=initial_state, chunk_size=chunk_size,
                 interpret=not platform.mosaic_gpu_available())


def ssd_step(state, x, dt, A, B, C, D=None, *, implementation: str | None = None):
  """One decode step for a batch of single tokens; see `reference.ssd_update`."""
  del implementation  # XLA fuses this update well; a kernel is added only if measurements say so.
  return reference.ssd_update(state, x, dt, A, B, C, D)
