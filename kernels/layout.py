"""A transpose that XLA's layout assignment cannot see through, for the kernels' wrappers.

The Hopper kernels read some operands time-minor ([b, h, t] decays, Bᵀ [b, g·n, t]) while the
model computes them time-major ([b, t, ·], slices of one in_proj output). Written as
`jnp.transpose`, such a transpose is what XLA's GPU layout assignment satisfies first: it stores
the whole fused in_proj output [b, t, z ‖ x ‖ B ‖ C ‖ dt] time-minor so that the transpose of the
dt slice (128 channels) becomes a free bitcast, and then transposes z, x, B and C (22,528
channels) back for the custom calls that take them row-major, in the forward and again for their
gradients. Measured on the H200 on a Nano-9B LoRA step (4×4096 tokens, 2026-12-01): ~350 ms of
1.7 s in such transposes. A Pallas call takes its operand row-major, so with the transpose done
by one nothing invites that layout; the copy itself moves 2×(bytes of the operand).
"""

from __future__ import annotations

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.triton as pltriton
import jax.numpy as jnp

_TILE = 128  # elements per tile side (Triton blocks are powers of two)


def _tile(d: int) -> int | None:
  """A power-of-two tile that divides `d` (the whole of `d` if it is a power of two ≤ _TILE)."""
  if d % _TILE == 0:
    return _TILE
  return d if d >= 1 and d & (d - 1) == 0 else None


def swap_minor(v: jax.Array, *, interpret: bool) -> jax.Array:
  """[b, m, k] → [b, k, m] as a Pallas (Triton) kernel, bit-exact.

  Each of m and k must be a multiple of 128 or a power of two; any other shape falls back to
  `jnp.transpose` (correct, only without the layout pin). `interpret`: Pallas' interpreter (CPU).
  """
  b, m, k = v.shape
  tm, tk = _tile(m), _tile(k)
  if tm is None or tk is None:
    return jnp.transpose(v, (0, 2, 1))

  def body(src, dst):
    dst[...] = src[...].T

  return pl.pallas_call(
      body,
      out_shape=jax.ShapeDtypeStruct((b, k, m), v.dtype),
      grid=(b, m // tm, k // tk),
      in_specs=[pl.BlockSpec((None, tm, tk), lambda i, r, c: (i, r, c))],
      out_specs=pl.BlockSpec((None, tk, tm), lambda i, r, c: (i, c, r)),
      compiler_params=None if interpret else pltriton.CompilerParams(num_warps=4, num_stages=1),
      interpret=interpret,
  )(v)
