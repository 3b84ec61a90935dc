"""The differentiable SSD scan on the Mosaic GPU kernels: `ssd`, a `custom_vjp`.

The forward runs `pallas_mosaic_gpu.forward` with `emit_states` (the bf16 Sᵀ entering every block
is saved for the backward). The backward (`Config.backward`): "blocks" (default) is
`pallas_mosaic_gpu_bwd_blocks.backward`, where the backward math and kernels live (the forward
kernel's adjoint walk, a block-parallel dB/dC kernel, an XLA epilogue); "xla" is the VJP of the
XLA chunked reference (`reference.ssd_chunked`) behind the same forward kernel.
"""

from __future__ import annotations

import functools

import jax

from nemojax.kernels.ssd import pallas_mosaic_gpu as fwd
from nemojax.kernels.ssd import pallas_mosaic_gpu_bwd_blocks as blocks
from nemojax.kernels.ssd import reference

Config = fwd.Config
DEFAULT_CONFIG = fwd.DEFAULT_CONFIG
supports = fwd.supports


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10))
def _ssd(x, dt, A, B, C, D, initial_state, segment_ids, chunk_size, config, interpret):
  del chunk_size  # the kernels' schedule is config.block_t; see `ssd`'s docstring
  return fwd.forward(x, dt, A, B, C, D, initial_state, config, interpret,
                     segment_ids=segment_ids)


def _ssd_fwd(x, dt, A, B, C, D, initial_state, segment_ids, chunk_size, config, interpret):
  res = (x, dt, A, B, C, D, initial_state, segment_ids)
  if config.backward == "xla":
    out = fwd.forward(x, dt, A, B, C, D, initial_state, config, interpret,
                      segment_ids=segment_ids)
    return out, (*res, None)
  y, fin, states = fwd.forward(x, dt, A, B, C, D, initial_state, config, interpret,
                               emit_states=True, segment_ids=segment_ids)
  return (y, fin), (*res, states)


def _ssd_bwd(chunk_size, config, interpret, res, cotangents):
  *args, states = res  # x, dt, A, B, C, D, initial_state, segment_ids
  if config.backward == "xla":  # the XLA chunked reference's VJP (same function)
    def ref(x, dt, A, B, C, D, initial_state):
      return reference.ssd_chunked(x, dt, A, B, C, D, initial_state, args[7],
                                   chunk_size=chunk_size)

    _, vjp = jax.vjp(ref, *args[:7])
    return (*vjp(cotangents), None)
  return (*blocks.backward(*args, states, cotangents, config=config, interpret=interpret), None)


_ssd.defvjp(_ssd_fwd, _ssd_bwd)


def ssd(x, dt, A, B, C, D=None, initial_state=None, chunk_size: int = 128, *,
        segment_ids=None, config: fwd.Config | None = None, interpret: bool = False):
  """The SSD scan on the fused Mosaic GPU kernel; contract of `reference.ssd_naive`.

  Args:
    x: [b, t, h, p] bf16.
    dt: [b, t, h], positive (after softplus).
    A: [h], negative.
    B, C: [b, t, g, n], cast to x.dtype for the tensor cores.
    D: [h] or None.
    initial_state: [b, h, p, n] or None (the first document's, with `segment_ids`).
    chunk_size: the chunk length of the chunked algorithm. In exact arithmetic the result does
      not depend on it, so the kernels (forward and backward) always work in blocks of
      `config.block_t` = 128 steps; `supports` accepts the chunk sizes the models use (128, 256)
      and this function validates it, so that a chunk size is never silently ignored elsewhere.
    segment_ids: [b, t] integers or None: packed documents (`kernels/segments.py`); the state
      restarts at each document's first step (`pallas_mosaic_gpu.DOC_PENALTY`).
    config: tuning knobs (`pallas_mosaic_gpu.Config`).
    interpret: run on Mosaic GPU's CPU interpreter (tests).

  Returns:
    y [b, t, h, p] in x.dtype and the final state [b, h, p, n] in float32. Differentiable: the
    backward pass runs the block-parallel backward kernels (`pallas_mosaic_gpu_bwd_blocks`), fed
    by the block states this forward saves, or the XLA reference's VJP with
    `Config(backward="xla")`.
  """
  config = fwd.DEFAULT_CONFIG if config is None else config
  if int(chunk_size) not in (128, 256):
    raise ValueError(f"ssd (pallas): chunk_size must be 128 or 256, got {chunk_size}; "
                     "use implementation='xla' for other chunk sizes")
  return _ssd(x, dt, A, B, C, D, initial_state, segment_ids, int(chunk_size), config,
              bool(interpret))
