"""Block-parallel backward of the chunked SSD scan (Mosaic GPU): two kernels and an XLA epilogue.

Legend: b batch, t time, h heads, p head dim, n state, g groups, r heads per group, c blocks of
T = 128 steps, l / s positions inside a block (query / source).

Notation of the forward (`pallas_mosaic_gpu.py`): a = dt·A, Λ the block-local cumsum of a,
u_s = dt_s x_s, Sᵀ_in the state entering a block (saved bf16 by the forward), dSᵀ_out the
cotangent of the state leaving it (from later blocks only), dY the cotangent of y,
w_s = e^{Λ_last − Λ_s}.

1. dx and the state cotangents (`_state_cotangents`; sequential over blocks, one CTA per (head,
   batch)): the forward kernel's adjoint walk (`pallas_mosaic_gpu._build_kernel(reverse=True)`)
   with (x, C, B) → (dY, B, C): blocks from last to first,

       dx_s   = dt_s [w_s B_s·dS_out + Σ_{l≥s} (B_s·C_l) e^{Λ_l − Λ_s} dY_l] + D dY_s
       dSᵀ_in = e^{Λ_last} dSᵀ_out + Σ_l C_l e^{Λ_l} dY_lᵀ

   It saves every block's dSᵀ_out (bf16) as the forward saves Sᵀ_in; its final state is the
   initial state's cotangent. Same cost as the forward.
2. dB, dC and per-row sums (`_build_kernel`, fully parallel: one CTA per (group, block, batch),
   looping over the r heads of the group so that dB and dC are summed over heads on chip, fp32,
   and written once per group):

       P[l, s] = (dY_l·x_s) e^{Λ_l − Λ_s} dt_s  (s ≤ l)
       dC_l   += e^{Λ_l} dY_l S_in + Σ_s P[l, s] B_s
       dB_s   += w_s dt_s x_s dS_out + Σ_l P[l, s] C_l

   WG w owns rows [64w, 64w+64) as queries (tiles s ≤ l) and as sources (tiles l ≥ s): both
   warpgroups get three score tiles. P is built twice (dY·Xᵀ for queries, X·dYᵀ for sources) with
   the same fp32 operations, so the two bf16 copies agree. The row-scaled operands of the state
   parts go to the tensor cores as two bf16 pieces (hi + lo).
3. The log-decay gradient without cancellation between differently rounded terms: per head and
   row, q1_l = C_l·dC_l and q2_s = B_s·dB_s (this head's parts, fp32 accumulators; every
   intra-block pair P[l,s](C_l·B_s) appears in both from the same bf16 P), v3_s = B_s·dB^{state}_s,
   v4_n = Σ_p dSᵀ_out[n, p] Sᵀ_in[n, p] and v5_l = dy_l·x_l; then (XLA, on [b, h, t] arrays)

       dΛ_k = q1_k − q2_k + [k = last](e^{Λ_last} Σ_n v4_n + Σ_s v3_s)
       da_r = Σ_{k ≥ r in the block} dΛ_k,  ddt = A·da + x·dU,  dA = Σ dt·da,  dD = Σ v5,

   with x_s·dU_s = q2_s / dt_s (B_s·dB_s = dt_s x_s·dU_s; dt > 0 by contract, padding has
   dt = 0 and is cut). (`[k = last]` is ⟨dS_out, S_out⟩ written with the block's own values.)
   The kernel gets a head's part of dC·C as the change of C·(running head sum): fp32
   differences, far below bf16 noise.

Packed sequences need nothing here: documents enter through the penalised a (`fwd.prepare`).
Interpret mode runs the same body on Mosaic GPU's CPU interpreter (products as `jnp.dot`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

from nemojax.kernels import layout, platform
from nemojax.kernels.ssd import pallas_mosaic_gpu as fwd

f32 = jnp.float32
_ROWS = fwd._ROWS
_WGS = fwd._COMPUTE_WGS
NUM_SUMS = 5  # q1, q2, v3, v4, v5 of the module docstring


def smem_bytes(head_dim: int, state_size: int, stages: int, block_t: int = 128) -> int:
  """Shared memory of one CTA of the dB/dC kernel (bf16 inputs)."""
  t, p, n = block_t, head_dim, state_size
  stage = 2 * (2 * t * p + 2 * n * p) + 4 * 3 * t  # x, dY, Sᵀ_in, dSᵀ_out; Λ, dt, w·dt
  return stages * stage + 2 * 2 * t * n + 4 * _WGS * NUM_SUMS * _ROWS + 1024


def _stages(p, n, config) -> int:
  for s in (2, 1):
    if smem_bytes(p, n, s, config.block_t) <= fwd._SMEM_LIMIT:
      return s
  raise ValueError(f"ssd (pallas): head_dim {p} does not fit the backward kernel's shared memory")


def _build_kernel(*, b, t, h, p, g, n, dtype, config, interpret):
  """The dB/dC kernel; its body is long because it is the kernel (one block, all heads)."""
  T = config.block_t
  nc = t // T
  r = h // g
  S = min(_stages(p, n, config), r)
  ops = fwd._Ops(interpret)
  WG = plgpu.Layout.WGMMA
  ROW, COL = WG.reduce(1), WG.reduce(0)

  def smem(shape, dt, cols=None):
    if interpret or cols is None:
      return plgpu.SMEM(shape, dt)
    sw = fwd._swizzle_for(cols, jnp.dtype(dt).itemsize)
    tr = (plgpu.TilingTransform((8, sw // jnp.dtype(dt).itemsize)), plgpu.SwizzleTransform(sw))
    return plgpu.SMEM(shape, dt, transforms=tr)

  scratch = dict(
      x_s=smem((S, T, p), dtype, p), dy_s=smem((S, T, p), dtype, p),
      st_s=smem((S, n, p), dtype, p), ds_s=smem((S, n, p), dtype, p),
      lam_s=plgpu.SMEM((S, T), f32), dt_s=plgpu.SMEM((S, T), f32), wdt_s=plgpu.SMEM((S, T), f32),
      b_s=smem((T, n), dtype, n), c_s=smem((T, n), dtype, n),
      v_o=plgpu.SMEM((_WGS, NUM_SUMS, _ROWS), f32),
      bc_bar=plgpu.Barrier(num_arrivals=2),
      in_bar=plgpu.Barrier(num_arrivals=7, num_barriers=S),
      free_bar=plgpu.Barrier(num_arrivals=_WGS, num_barriers=S),
  )

  def body(x_ref, dy_ref, b_ref, c_ref, st_ref, ds_ref, lam_ref, dt_ref, wdt_ref, db_ref, dc_ref,
           v_ref, *, x_s, dy_s, st_s, ds_s, lam_s, dt_s, wdt_s, b_s, c_s, v_o, bc_bar, in_bar,
           free_bar):
    gi = lax.axis_index("g")
    ci = lax.axis_index("c")
    bi = lax.axis_index("b")
    wg = lax.axis_index("wg")
    rows = pl.ds(ci * T, T)

    def fetch(i, slot):
      hi = gi * r + i
      bar = in_bar.at[slot]
      plgpu.copy_gmem_to_smem(x_ref.at[bi, rows, hi, :], x_s.at[slot], bar)
      plgpu.copy_gmem_to_smem(dy_ref.at[bi, rows, hi, :], dy_s.at[slot], bar)
      plgpu.copy_gmem_to_smem(st_ref.at[bi, hi, ci], st_s.at[slot], bar)
      plgpu.copy_gmem_to_smem(ds_ref.at[bi, hi, ci], ds_s.at[slot], bar)
      plgpu.copy_gmem_to_smem(lam_ref.at[bi, hi, rows], lam_s.at[slot], bar)
      plgpu.copy_gmem_to_smem(dt_ref.at[bi, hi, rows], dt_s.at[slot], bar)
      plgpu.copy_gmem_to_smem(wdt_ref.at[bi, hi, rows], wdt_s.at[slot], bar)

    @pl.when(wg == _WGS)
    def _memory_wg():
      if not interpret:
        plgpu.set_max_registers(config.memory_registers, action="decrease")
      plgpu.copy_gmem_to_smem(b_ref.at[bi, rows, gi, :], b_s, bc_bar)
      plgpu.copy_gmem_to_smem(c_ref.at[bi, rows, gi, :], c_s, bc_bar)
      for i in range(S):
        fetch(i, i)

      def step(i, carry):
        slot = lax.rem(i, S)
        plgpu.barrier_wait(free_bar.at[slot])
        fetch(i, slot)
        return carry
      lax.fori_loop(S, r, step, None)
      for i in range(max(r, S), r + S):  # observe the last releases (see the forward)
        plgpu.barrier_wait(free_bar.at[i % S])

    def compute(w: int):
      """Warpgroup `w`: rows [64w, 64w+64) as queries (dC) and sources (dB), state rows too."""
      if not interpret:
        plgpu.set_max_registers(config.compute_registers, action="increase")
      own = pl.ds(w * _ROWS, _ROWS)
      tiles = [pl.ds(j * _ROWS, _ROWS) for j in range(_WGS)]
      sq = (_ROWS, _ROWS)
      bcast = lambda v, shape, dim: lax.broadcast_in_dim(v, shape, [dim])
      plgpu.barrier_wait(bc_bar)

      def rowdot(ref, acc):  # Σ_n ref[l, n] acc[l, n] (ref bf16 in shared memory)
        return jnp.sum(ops.load(ref, WG).astype(f32) * acc, axis=1)

      def head(i, carry):
        # kernel body: one head of the group, every product and its masks in issue order.
        dc, db, pc, pb = carry
        slot = lax.rem(i, S)
        plgpu.barrier_wait(in_bar.at[slot])
        x_t, dy_t, st_t, ds_t = x_s.at[slot], dy_s.at[slot], st_s.at[slot], ds_s.at[slot]
        lam_t, dt_t = lam_s.at[slot], dt_s.at[slot]
        lam_own = ops.load(lam_t.at[own], ROW)
        dt_own = ops.load(dt_t.at[own], ROW)
        dy_own = ops.load(dy_t.at[own], WG)                           # [l, p] bf16
        x_own = ops.load(x_t.at[own], WG)                             # [s, p] bf16
        rp = (_ROWS, p)
        # State parts: dC += e^Λ dY S_in, dB += diag(w dt) X dS_out. The row-scaled operands go
        # to the tensor cores as two bf16 pieces (hi + lo): rounding them once to bf16 moved dA
        # by ~0.5% (the decay gradient sums these parts against each other).
        def scaled_product(acc, rows_bf16, scale, state_ref):
          v = rows_bf16.astype(f32) * bcast(scale, rp, 0)
          hi = v.astype(dtype)
          lo = (v - hi.astype(f32)).astype(dtype)
          acc, = ops.run(lambda a: (ops.mma(a[0], hi, state_ref, transpose_b=True),
                                    ops.mma(a[0], lo, state_ref, transpose_b=True)), [acc])
          return acc
        dc = scaled_product(dc, dy_own, jnp.exp(lam_own), st_t)
        db = scaled_product(db, x_own, ops.load(wdt_s.at[slot, own], ROW), ds_t)
        pb_state = rowdot(b_s.at[own], db)
        v3 = pb_state - pb
        v4 = jnp.sum(ops.load(st_t.at[own], WG).astype(f32)
                     * ops.load(ds_t.at[own], WG).astype(f32), axis=1)
        v5 = jnp.sum(dy_own.astype(f32) * x_own.astype(f32), axis=1)
        iota_r, iota_c = ops.iota(sq, 0), ops.iota(sq, 1)
        for j in range(_WGS):
          src = tiles[j]
          lam_src = ops.load(lam_t.at[src], COL)
          if j <= w:  # own rows as queries l, tile j as sources s ≤ l
            z, = ops.run(lambda a: ops.mma(a[0], dy_own, x_t.at[src], transpose_b=True), [sq])
            e = jnp.exp(jnp.minimum(bcast(lam_own, sq, 0) - bcast(lam_src, sq, 1), 0.0))
            pm = z * e * bcast(ops.load(dt_t.at[src], COL), sq, 1)
            if j == w:
              pm = jnp.where(iota_c <= iota_r, pm, 0.0)
            pm = pm.astype(dtype)
            dc, = ops.run(lambda a: ops.mma(a[0], pm, b_s.at[src]), [dc])
          if j >= w:  # own rows as sources s, tile j as queries l ≥ s
            z, = ops.run(lambda a: ops.mma(a[0], x_own, dy_t.at[src], transpose_b=True), [sq])
            e = jnp.exp(jnp.minimum(bcast(lam_src, sq, 1) - bcast(lam_own, sq, 0), 0.0))
            qm = z * e * bcast(dt_own, sq, 0)
            if j == w:
              qm = jnp.where(iota_c >= iota_r, qm, 0.0)
            qm = qm.astype(dtype)
            db, = ops.run(lambda a: ops.mma(a[0], qm, c_s.at[src]), [db])
        plgpu.barrier_arrive(free_bar.at[slot])
        pc_new = rowdot(c_s.at[own], dc)
        pb_new = rowdot(b_s.at[own], db)
        # This head's sums leave through a small tile (the previous TMA store must have read it).
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        for k, v in enumerate((pc_new - pc, pb_new - pb, v3, v4, v5)):
          v_o.at[w, k][...] = v
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(v_o.at[w], v_ref.at[bi, gi * r + i, :, pl.ds(ci * T + w * _ROWS,
                                                                             _ROWS)])
        return dc, db, pc_new, pb_new

      zero = ops.zeros((_ROWS, n))
      z_row = rowdot(c_s.at[own], zero)  # zeros in the row layout
      dc, db, _, _ = lax.fori_loop(0, r, head, (zero, zero, z_row, z_row))
      out_rows = pl.ds(ci * T + w * _ROWS, _ROWS)
      dc_ref.at[bi, out_rows, gi, :][...] = dc
      db_ref.at[bi, out_rows, gi, :][...] = db
      plgpu.wait_smem_to_gmem(0)

    for w in range(_WGS):
      pl.when(wg == w)(functools.partial(compute, w))

  def entry(*refs):
    return body(*refs[:12], **refs[12])

  interp, compiler_params = platform.mosaic_params(interpret=interpret,
                                                   approx_math=config.approx_math)
  return plgpu.kernel(
      entry,
      out_type=(jax.ShapeDtypeStruct((b, t, g, n), f32),
                jax.ShapeDtypeStruct((b, t, g, n), f32),
                jax.ShapeDtypeStruct((b, h, NUM_SUMS, t), f32)),
      scratch_types=[scratch],
      grid=(g, nc, b),
      grid_names=("g", "c", "b"),
      num_threads=_WGS + 1,
      thread_name="wg",
      compiler_params=compiler_params,
      interpret=interp,
  )


def _state_cotangents(k, dy, dfin, config, interpret):
  """Step 1 of the module docstring: the forward kernel's adjoint walk (`reverse=True`).

  Returns dx [b, tp, h, p] (bf16), the dSᵀ_out of every block [b, h, c, n, p] (bf16) and the
  initial state's cotangent [b, h, p, n] (fp32).
  """
  b, tp, h, p, g, n = (k[key] for key in ("b", "tp", "h", "p", "g", "n"))
  has_init = dfin is not None
  if has_init:
    init = fwd.split3(jnp.transpose(dfin.astype(f32), (0, 1, 3, 2)))
  else:
    init = jnp.zeros((3, 1, 1, n, p), jnp.bfloat16)
  kernel = platform.shared_kernel(fwd._build_kernel, b=b, t=tp, h=h, p=p, g=g, n=n,
                                  dtype=jnp.dtype(dy.dtype), has_init=has_init, config=config,
                                  interpret=interpret, emit_states=True, reverse=True)
  # Roles: x → dY, queries C → B, sources Bᵀ → Cᵀ; same Λ, dt, D.
  ct = fwd.time_minor(k["C"], interpret=interpret)
  dx, ds0_t, ds_out = kernel(dy, ct, k["B"], k["lam_t"], k["dt_t"], k["d"], init)
  return dx, ds_out, jnp.transpose(ds0_t, (0, 1, 3, 2))


def backward(x, dt, A, B, C, D, initial_state, segment_ids, states, cotangents, *, config,
             interpret):
  """Cotangents of (x, dt, A, B, C, D, initial_state) for those of (y, final state).

  `states`: the forward's Sᵀ entering every block, bf16 [b, h, c, n, p]. `segment_ids`: the
  forward's (documents enter only through the penalised a, see `fwd.prepare`).
  """
  dy, dfin = cotangents
  k = fwd.prepare(x, dt, A, B, C, D, initial_state, config, segment_ids, interpret=interpret)
  b, t, tp, h, p, g, n = (k[key] for key in ("b", "t", "tp", "h", "p", "g", "n"))
  T = config.block_t
  nc = tp // T
  dtype = jnp.dtype(x.dtype)
  if dfin is None or isinstance(dfin, jax.custom_derivatives.SymbolicZero):
    dfin = None
  dy = k["pad_t"](jnp.zeros(x.shape, dtype) if dy is None else dy.astype(dtype))
  dx, ds_out, ds_init = _state_cotangents(k, dy, dfin, config, interpret)
  kernel = platform.shared_kernel(_build_kernel, b=b, t=tp, h=h, p=p, g=g, n=n, dtype=dtype,
                                  config=config, interpret=interpret)
  lam = k["lam_t"].reshape(b, h, nc, T)
  wdt = (jnp.exp(lam[..., -1:] - lam)).reshape(b, h, tp) * k["dt_t"]     # w_s dt_s
  dB, dC, v = kernel(k["x"], dy, k["B"], k["C"], states, ds_out, k["lam_t"], k["dt_t"], wdt)

  # Epilogue (XLA, on [b, h, t] sums): the log-decay gradient, dt, A, D.
  v = v.reshape(b, h, NUM_SUMS, nc, T)
  q1, q2, v3, v4, v5 = (v[:, :, i] for i in range(NUM_SUMS))                # [b, h, c, T]
  boundary = jnp.exp(lam[..., -1]) * jnp.sum(v4, -1) + jnp.sum(v3, -1)    # ⟨dS_out, S_out⟩
  dlam = (q1 - q2).at[..., -1].add(boundary)
  da = jnp.flip(jnp.cumsum(jnp.flip(dlam, -1), -1), -1).reshape(b, h, tp)
  dt_t = k["dt_t"]
  xdu = jnp.where(dt_t > 0, q2.reshape(b, h, tp) / jnp.where(dt_t > 0, dt_t, 1.0), 0.0)
  ddt = layout.swap_minor(A.astype(f32)[None, :, None] * da + xdu, interpret=interpret)[:, :t]
  dA = jnp.sum(da * dt_t, axis=(0, 2))
  dD = None if D is None else jnp.sum(v5, axis=(0, 2, 3)).astype(D.dtype)
  if initial_state is not None:
    ds_init = ds_init.astype(initial_state.dtype)
  else:
    ds_init = None
  return (dx[:, :t].astype(x.dtype), ddt.astype(dt.dtype),
          dA.astype(A.dtype), dB[:, :t].astype(B.dtype), dC[:, :t].astype(C.dtype), dD, ds_init)
