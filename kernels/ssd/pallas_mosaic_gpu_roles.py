"""The compute warpgroups of the SSD forward kernel with `Config(roles="state")` (non-default).

`pallas_mosaic_gpu` (module docstring: legend, the function, the TMA warpgroup) with the work of
its two compute warpgroups split by role rather than by rows (benchmarks/ssd_notes.md,
"forward vs jax-linear-attention", plan item 1):

* WG 0 (`state_warpgroup`) carries the whole Sᵀ [n, p] (fp32, two 64-row register tiles) and
  walks each 128-step block as two 64-step halves k = 0, 1 with Λ_b, Λ_e = 0, Λ_63 (k = 0) and
  Λ_63, Λ_127 (k = 1). Per half it publishes the bf16 Sᵀ entering the half into slot k of a
  2-deep ring in shared memory (after the output warpgroup freed that slot), then
      Sᵀ ← e^{Λ_e − Λ_b} Sᵀ + Σ_{s in half} B_s (e^{Λ_e − Λ_s} dt_s) x_sᵀ
  (two M=64 wgmmas, K=64). Slot 0 holds the state entering the block: `emit_states` stores it.
* WG 1 (`output_warpgroup`) writes all outputs; per half, on its one diagonal 64×64 tile,
      y_l = e^{Λ_l − Λ_b} (C_l · Sᵀ_slot k) + Σ_{s in half, s≤l} (C_l·B_s) e^{Λ_l − Λ_s} dt_s x_s
            + D x_l.
  The off-diagonal 64×64 tile of C·Bᵀ of the row split is gone (the state of half 1 carries
  it): −18% FLOPs, and no two-way barrier between the compute warpgroups inside a block.

Shared memory: the ring (2·2·n·p bytes) and one y tile (2·64·p) replace Sᵀ (2·n·p) and two y
tiles: 203 KB at p = 64, 221 KB at p = 80 with two stages (`pallas_mosaic_gpu.smem_bytes`).
Only the forward walk: the backward's adjoint walk (`reverse`) keeps the row split.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

f32 = jnp.float32
ROWS = 64  # a half block; wgmma M


def smem_extra(head_dim: int, state_size: int) -> int:
  """Bytes of the ring of bf16 Sᵀ tiles and the one y tile (the stages come on top)."""
  return 2 * 2 * state_size * head_dim + 2 * ROWS * head_dim


def scratch(smem, *, n, p, dtype):
  """Shared memory of the two roles; `smem(shape, dtype, cols)` picks the swizzle."""
  return dict(
      ring=smem((2, n, p), dtype, p),                        # bf16 Sᵀ entering half k
      y_s=smem((ROWS, p), dtype, p),                         # one output tile
      ring_ready=plgpu.Barrier(num_arrivals=1, num_barriers=2),
      ring_free=plgpu.Barrier(num_arrivals=1, num_barriers=2),
      init_bar=plgpu.Barrier(num_arrivals=1),
      exit_bar=plgpu.Barrier(num_arrivals=2),
  )


def _half_bounds(lam_t, k):
  """(Λ_b, Λ_e) of half k: the block-local Λ before its first and at its last step."""
  lam_b = jnp.float32(0.0) if k == 0 else lam_t[ROWS - 1]
  return lam_b, lam_t[ROWS * k + ROWS - 1]


def state_warpgroup(k, ops, *, x_s, bt_s, lam_s, dt_s, in_bar, free_bar, ring, ring_ready,
                    ring_free, init_bar, exit_bar, init_ref, fin_ref, states_ref):
  """WG 0: the recurrence; publishes the bf16 Sᵀ entering each half into the ring."""
  bi, hi, nc, S, n, p, dtype = (k[key] for key in ("bi", "hi", "nc", "S", "n", "p", "dtype"))
  row_tiles = [pl.ds(i * ROWS, ROWS) for i in range(n // ROWS)]  # the state's row tiles
  WG = plgpu.Layout.WGMMA
  COL = WG.reduce(0)
  state = [ops.zeros((ROWS, p)) for _ in row_tiles]
  if k["has_init"]:
    # The fp32 state as three exact bf16 pieces (`split3`), staged through ring slot 0.
    for piece in range(3):
      plgpu.copy_gmem_to_smem(init_ref.at[piece, bi, hi], ring.at[0], init_bar)
      plgpu.barrier_wait(init_bar)
      state = [s + ops.load(ring.at[0, rows], WG).astype(f32) for s, rows in zip(state, row_tiles)]
      if not k["interpret"]:
        plgpu.commit_smem()  # reads of the slot done before the next copy overwrites it

  def block(c, state):
    # kernel body: one block as two halves, each published, then advanced by two wgmmas.
    slot = lax.rem(c, S)
    plgpu.barrier_wait(in_bar.at[slot])
    x_t, bt_t, lam_t, dt_t = x_s.at[slot], bt_s.at[slot], lam_s.at[slot], dt_s.at[slot]
    for half in range(2):
      src = pl.ds(half * ROWS, ROWS)

      @pl.when(c > 0)
      def _():
        plgpu.barrier_wait(ring_free.at[half])  # the output warpgroup read the last one
      if states_ref is not None and half == 0:
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last block's S_in store read it
      for s, rows in zip(state, row_tiles):
        ring.at[half, rows][...] = s.astype(dtype)
      plgpu.commit_smem()
      if states_ref is not None and half == 0:  # the backward's S_in (bf16)
        plgpu.copy_smem_to_gmem(ring.at[0], states_ref.at[bi, hi, c])
      plgpu.barrier_arrive(ring_ready.at[half])

      lam_b, lam_e = _half_bounds(lam_t, half)
      wv = jnp.exp(lam_e - ops.load(lam_t.at[src], COL)) * ops.load(dt_t.at[src], COL)
      a_ops = []
      for rows in row_tiles:  # Bᵀ diag(w) [n(rows), s(half)], bf16 in registers
        bt = ops.load(bt_t.at[rows, src], WG).astype(f32)
        a_ops.append((bt * lax.broadcast_in_dim(wv, bt.shape, [1])).astype(dtype))

      def update(accs, a_ops=a_ops, src=src):
        for acc, a in zip(accs, a_ops):
          ops.mma(acc, a, x_t.at[src])                             # Sᵀ += (Bᵀ diag w) X
      decay = jnp.exp(lam_e - lam_b)
      state = ops.run(update, [s * decay for s in state])
    plgpu.barrier_arrive(free_bar.at[slot])
    return state

  state = lax.fori_loop(0, nc, block, state)
  for half in range(2):  # the last block's releases (every phase is waited for)
    plgpu.barrier_wait(ring_free.at[half])
  for s, rows in zip(state, row_tiles):
    fin_ref.at[bi, hi, rows, :][...] = s
  plgpu.barrier_arrive(exit_bar)
  plgpu.barrier_wait(exit_bar)
  plgpu.wait_smem_to_gmem(0)


def _masked(ops, cb, lam_t, dt_t, src, d, dtype):
  """CB∘L on the diagonal tile of half `src`: e^{Λ_l − Λ_s} dt_s for s < l, + D at s = l."""
  WG = plgpu.Layout.WGMMA
  ROW, COL = WG.reduce(1), WG.reduce(0)
  shape = cb.shape
  seg = (lax.broadcast_in_dim(ops.load(lam_t.at[src], ROW), shape, [0])
         - lax.broadcast_in_dim(ops.load(lam_t.at[src], COL), shape, [1]))
  # min(·, 0): above the diagonal the difference is positive and exp could overflow.
  pm = (cb * jnp.exp(jnp.minimum(seg, 0.0))
        * lax.broadcast_in_dim(ops.load(dt_t.at[src], COL), shape, [1]))
  li, si = ops.iota(shape, 0), ops.iota(shape, 1)
  return jnp.where(li > si, pm, jnp.where(li == si, pm + d, 0.0)).astype(dtype)


def output_warpgroup(k, ops, *, x_s, c_s, bt_s, lam_s, dt_s, in_bar, free_bar, ring,
                     ring_ready, ring_free, exit_bar, y_s, d_ref, y_ref):
  """WG 1: every output row, per half from the ring's Sᵀ and the half's diagonal tile."""
  bi, hi, nc, S, T, p, dtype = (k[key] for key in ("bi", "hi", "nc", "S", "T", "p", "dtype"))
  WG = plgpu.Layout.WGMMA
  ROW = WG.reduce(1)
  d = d_ref[hi]

  def block(c, carry):
    # kernel body: one block as two halves of output rows, one y tile store each.
    slot = lax.rem(c, S)
    plgpu.barrier_wait(in_bar.at[slot])
    x_t, c_t, bt_t = x_s.at[slot], c_s.at[slot], bt_s.at[slot]
    lam_t, dt_t = lam_s.at[slot], dt_s.at[slot]
    for half in range(2):
      src = pl.ds(half * ROWS, ROWS)
      c_h = ops.load(c_t.at[src], WG)                                # [l, n] bf16
      if k["fuse_waits"]:  # one wait for C·Sᵀ and C·Bᵀ, after the slot is published
        plgpu.barrier_wait(ring_ready.at[half])

        def products(accs, c_h=c_h, src=src, half=half):
          ops.mma(accs[0], c_h, ring.at[half])                       # C·Sᵀ [l, p]
          ops.mma(accs[1], c_h, bt_t.at[:, src])                     # C·Bᵀ [l, s]
        y, cb = ops.run(products, [(ROWS, p), (ROWS, ROWS)])
        plgpu.barrier_arrive(ring_free.at[half])
        pm = _masked(ops, cb, lam_t, dt_t, src, d, dtype)
      else:  # C·Bᵀ and its mask first: they do not need the state
        cb, = ops.run(lambda accs, c_h=c_h, src=src: ops.mma(accs[0], c_h, bt_t.at[:, src]),
                      [(ROWS, ROWS)])
        pm = _masked(ops, cb, lam_t, dt_t, src, d, dtype)
        plgpu.barrier_wait(ring_ready.at[half])
        y, = ops.run(lambda accs, c_h=c_h, half=half: ops.mma(accs[0], c_h, ring.at[half]),
                     [(ROWS, p)])
        plgpu.barrier_arrive(ring_free.at[half])
      lam_b, _ = _half_bounds(lam_t, half)
      y = y * lax.broadcast_in_dim(jnp.exp(ops.load(lam_t.at[src], ROW) - lam_b), y.shape, [0])
      y, = ops.run(lambda accs, pm=pm, src=src: ops.mma(accs[0], pm, x_t.at[src]), [y])
      if half == 1:
        plgpu.barrier_arrive(free_bar.at[slot])
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last store read the tile
      y_s[...] = y.astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(y_s, y_ref.at[bi, pl.ds(c * T + half * ROWS, ROWS), hi, :])
    return carry

  lax.fori_loop(0, nc, block, None)
  plgpu.barrier_arrive(exit_bar)
  plgpu.barrier_wait(exit_bar)
  plgpu.wait_smem_to_gmem(0)
