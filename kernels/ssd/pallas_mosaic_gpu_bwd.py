"""Backward of the chunked SSD scan as a Pallas kernel for Hopper GPUs (Mosaic GPU: wgmma, TMA).

Legend: b batch, t time, h heads, p head dim, n state, g groups, r heads per group, c blocks,
l / s positions inside a block (query / source), k the number of per-row sums.

Per head and block (the forward's notation: u_s = dt_s x_s, Λ the block-local cumsum of
a = dt·A, Sᵀ_in the state entering the block, saved bf16 by the forward, dSᵀ the cotangent of the
state leaving it, dY the cotangent of y, M[l, s] = (C_l·B_s) e^{Λ_l − Λ_s} for s ≤ l, w_s =
e^{Λ_last − Λ_s}), the kernel computes, walking the blocks from last to first:

    dU    = Mᵀ dY + diag(w) B dSᵀ                        (dx = dt·dU + D·dY)
    dB    = (X dYᵀ ∘ Lᵀ)·diag(dt) C + diag(w dt) X dS      (L[l, s] = e^{Λ_l − Λ_s}, s ≤ l)
    dC    = diag(e^Λ) dY S_in + (dY Xᵀ ∘ L · diag(dt)) B
    dSᵀ  ← e^{Λ_last} dSᵀ + Cᵀ diag(e^Λ) dY                 (the cotangent entering the block)

and six sums per row, from which a small XLA epilogue forms the log-decay gradient without
cancellation between bf16-rounded terms (every term below is an fp32 product of kernel values):

    v1_l = dy_l·(y_l − D x_l)  (= C_l·dC^{off}_l + Σ_s (dY Xᵀ ∘ L dt)_{ls} (C B ᵀ)_{ls})
    v2_s = du_s·x_s          v3_s = B_s·dB^{state}_s       v5_s = dy_s·x_s
    v4_n = Σ_p dSᵀ[n, p] Sᵀ_in[n, p]
    v6_s = du_s·x_s again, summed from the fp32 scores before they are rounded to bf16 for the
           tensor cores, so that its pairs cancel v1's pairs exactly

    dΛ_k = v1_k − dt_k v6_k + [k = last] (e^{Λ_last} Σ_n v4_n + Σ_s v3_s)
    da_r = Σ_{k ≥ r in the block} dΛ_k,   ddt = A·da + v2,   dA = Σ dt·da,   dD = Σ v5.

(`[k = last]` is ⟨dS, S_out⟩ written without S_out.) dB and dC come out per head (fp32, or bf16
with `Config.bwd_grad_dtype`) and XLA sums the r heads of a group. The initial state's cotangent
is dSᵀ after the first block; the final state's cotangent is dSᵀ before the last.

One CTA per (head, batch) walks the blocks backwards, keeping dSᵀ (fp32) in registers: compute
warpgroup w owns rows [64w, 64w+64) of every block (as sources for dU, dB and dx, as queries for dC)
and state rows n ∈ [64w, 64w+64); warpgroup 2 streams the inputs with TMA. Causal 64×64 tiles
only. Shared memory holds one block's inputs (x, dY, B, C, Cᵀ, Sᵀ_in: ~150 KB at p = 80), so by
default there is one stage (`Config.bwd_stages`).

Interpret mode runs the same body on Mosaic GPU's CPU interpreter (products as `jnp.dot`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

from nemojax.kernels import platform
from nemojax.kernels.ssd import pallas_mosaic_gpu as fwd
from nemojax.kernels.ssd import reference

f32 = jnp.float32
_ROWS = fwd._ROWS
_WGS = fwd._COMPUTE_WGS
Config = fwd.Config
DEFAULT_CONFIG = fwd.DEFAULT_CONFIG
supports = fwd.supports
NUM_SUMS = 6  # v1..v6 of the module docstring


def smem_bytes(head_dim: int, state_size: int = 128, config: fwd.Config = fwd.DEFAULT_CONFIG,
               stage_dx: bool = True) -> int:
  """Shared memory of one CTA (bf16 inputs); `stage_dx`: dx leaves through a TMA tile."""
  t, p, n = config.block_t, head_dim, state_size
  stage = 2 * (2 * t * p + 3 * t * n + n * p) + 4 * 2 * t  # x, dY, B, C, Cᵀ, Sᵀ_in; Λ, dt
  grads = 2 * _WGS * _ROWS * n if _tma_grads(config) else 0  # dB / dC staging (bf16)
  return (config.bwd_stages * stage + 2 * n * p + grads + (2 * t * p if stage_dx else 0)
          + 4 * NUM_SUMS * t + 1024)


def _tma_grads(config) -> bool:
  # bf16 dB/dC tiles leave through shared memory and TMA; fp32 ones (no room for the tiles) are
  # stored from registers, which costs ~3.5 ms per 16k tokens (H200, 2026-12-01).
  return jnp.dtype(config.bwd_grad_dtype) == jnp.dtype(jnp.bfloat16)


def _build_kernel(*, b, t, h, p, g, n, dtype, grad_dtype, has_dfin, config, interpret):
  """The backward kernel; its body is long because it is the kernel (one block, all products)."""
  T = config.block_t
  tma_grads = _tma_grads(config)
  stage_dx = smem_bytes(p, n, config, stage_dx=True) <= fwd._SMEM_LIMIT
  nc = t // T
  r = h // g
  S = min(config.bwd_stages, nc)
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
      b_s=smem((S, T, n), dtype, n), c_s=smem((S, T, n), dtype, n),
      ct_s=smem((S, n, T), dtype, T), st_s=smem((S, n, p), dtype, p),
      lam_s=plgpu.SMEM((S, T), f32), dt_s=plgpu.SMEM((S, T), f32),
      ds_s=smem((n, p), dtype, p),                      # dSᵀ leaving the block, bf16 operand
      dx_o=smem((_WGS, _ROWS, p), dtype, p) if stage_dx else None,
      g_o=smem((_WGS, _ROWS, n), dtype, n) if tma_grads else None,
      v_o=plgpu.SMEM((_WGS, NUM_SUMS, _ROWS), f32),
      in_bar=plgpu.Barrier(num_arrivals=8, num_barriers=S),
      free_bar=plgpu.Barrier(num_arrivals=_WGS, num_barriers=S),
      ds_ready=plgpu.Barrier(num_arrivals=_WGS),
      ds_read=plgpu.Barrier(num_arrivals=_WGS),
      init_bar=plgpu.Barrier(num_arrivals=1, num_barriers=_WGS),
  )
  scratch = {k: v for k, v in scratch.items() if v is not None}

  def body(x_ref, dy_ref, b_ref, c_ref, ct_ref, st_ref, lam_ref, dt_ref, d_ref, dfin_ref,
           dx_ref, db_ref, dc_ref, v_ref, ds0_ref, *, x_s, dy_s, b_s, c_s, ct_s, st_s, lam_s,
           dt_s, ds_s, v_o, in_bar, free_bar, ds_ready, ds_read, init_bar, dx_o=None, g_o=None):
    hi = lax.axis_index("h")
    bi = lax.axis_index("b")
    gi = lax.div(hi, jnp.int32(r))
    wg = lax.axis_index("wg")

    def fetch(i, slot):
      c = nc - 1 - i
      rows = pl.ds(c * T, T)
      bar = in_bar.at[slot]
      plgpu.copy_gmem_to_smem(x_ref.at[bi, rows, hi, :], x_s.at[slot], bar)
      plgpu.copy_gmem_to_smem(dy_ref.at[bi, rows, hi, :], dy_s.at[slot], bar)
      plgpu.copy_gmem_to_smem(b_ref.at[bi, rows, gi, :], b_s.at[slot], bar)
      plgpu.copy_gmem_to_smem(c_ref.at[bi, rows, gi, :], c_s.at[slot], bar)
      plgpu.copy_gmem_to_smem(ct_ref.at[bi, gi, :, rows], ct_s.at[slot], bar)
      plgpu.copy_gmem_to_smem(st_ref.at[bi, hi, c], st_s.at[slot], bar)
      plgpu.copy_gmem_to_smem(lam_ref.at[bi, hi, rows], lam_s.at[slot], bar)
      plgpu.copy_gmem_to_smem(dt_ref.at[bi, hi, rows], dt_s.at[slot], bar)

    @pl.when(wg == _WGS)
    def _memory_wg():
      if not interpret:
        plgpu.set_max_registers(config.memory_registers, action="decrease")
      for i in range(S):
        fetch(i, i)

      def step(i, carry):
        slot = lax.rem(i, S)
        plgpu.barrier_wait(free_bar.at[slot])
        fetch(i, slot)
        return carry
      lax.fori_loop(S, nc, step, None)
      for i in range(max(nc, S), nc + S):
        plgpu.barrier_wait(free_bar.at[i % S])

    def compute(w: int):
      if not interpret:
        plgpu.set_max_registers(config.compute_registers, action="increase")
      own = pl.ds(w * _ROWS, _ROWS)
      d = d_ref[hi]
      dsT = ops.zeros((_ROWS, p))
      if has_dfin:  # dSᵀ of the final state as three bf16 pieces, staged through own rows of ds_s
        for k in range(3):
          plgpu.copy_gmem_to_smem(dfin_ref.at[k, bi, hi, own, :], ds_s.at[own], init_bar.at[w])
          plgpu.barrier_wait(init_bar.at[w])
          dsT = dsT + ops.load(ds_s.at[own], WG).astype(f32)
          if not interpret:
            plgpu.commit_smem()

      def bcast(v, shape, dim):
        return lax.broadcast_in_dim(v, shape, [dim])

      def store_grad(val, ref, rows):
        if config.probe == "bwd_no_store":
          return
        if not tma_grads:
          ref.at[bi, rows, hi, :][...] = val.astype(grad_dtype)
          return
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the tile's previous TMA store read it
        g_o.at[w][...] = val.astype(grad_dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(g_o.at[w], ref.at[bi, rows, hi, :])

      def block(i, dsT):
        # kernel body: one block of the scan, every product and its masks in issue order.
        c = nc - 1 - i
        slot = lax.rem(i, S)
        plgpu.barrier_wait(in_bar.at[slot])
        x_t, dy_t, b_t, c_t = x_s.at[slot], dy_s.at[slot], b_s.at[slot], c_s.at[slot]
        ct_t, st_t, lam_t, dt_t = ct_s.at[slot], st_s.at[slot], lam_s.at[slot], dt_s.at[slot]

        @pl.when(i > 0)
        def _():
          plgpu.barrier_wait(ds_read)
        ds_s.at[own][...] = dsT.astype(dtype)
        plgpu.commit_smem()
        plgpu.barrier_arrive(ds_ready)
        plgpu.barrier_wait(ds_ready)

        lam_last = lam_t[T - 1]
        lam_own = ops.load(lam_t.at[own], ROW)
        dt_own = ops.load(dt_t.at[own], ROW)
        w_own = jnp.exp(lam_last - lam_own)                           # e^{Λ_last − Λ_s}
        tiles = [pl.ds(j * _ROWS, _ROWS) for j in range(_WGS)]
        sq = (_ROWS, _ROWS)
        iota_r, iota_c = ops.iota(sq, 0), ops.iota(sq, 1)

        # ---- own rows as sources s: dB (state part, then l-tiles j ≥ w), then dU.
        x_own = ops.load(x_t.at[own], WG)                             # [s, p]
        db, = ops.run(lambda a: ops.mma(a[0], x_own, ds_s, transpose_b=True), [(_ROWS, n)])
        db = db * bcast(w_own * dt_own, db.shape, 0)                  # dB^{state}
        b_own = ops.load(b_t.at[own], WG)                             # [s, n]
        v3 = jnp.sum(b_own.astype(f32) * db, axis=1)
        du, = ops.run(lambda a: ops.mma(a[0], b_own, ds_s), [(_ROWS, p)])
        plgpu.barrier_arrive(ds_read)
        du = du * bcast(w_own, du.shape, 0)
        v6 = jnp.sum(du * x_own.astype(f32), axis=1)
        for j in range(w, _WGS) if config.probe != "bwd_no_intra" else ():
          src = tiles[j]
          lam_l = ops.load(lam_t.at[src], COL)
          e = jnp.exp(jnp.minimum(bcast(lam_l, sq, 1) - bcast(lam_own, sq, 0), 0.0))
          if j == w:
            e = jnp.where(iota_c >= iota_r, e, 0.0)                   # l ≥ s
          bc, xdy = ops.run(lambda a: (ops.mma(a[0], b_own, ct_t.at[:, src]),
                                       ops.mma(a[1], x_own, dy_t.at[src], transpose_b=True)),
                            [sq, sq])
          mt = bc * e
          v6 = v6 + jnp.sum(mt * xdy, axis=1)
          mt = mt.astype(dtype)
          q = (xdy * e * bcast(dt_own, sq, 0)).astype(dtype)
          du, db = ops.run(lambda a: (ops.mma(a[0], mt, dy_t.at[src]),
                                      ops.mma(a[1], q, c_t.at[src])), [du, db])
        rows = pl.ds(c * T + w * _ROWS, _ROWS)
        store_grad(db, db_ref, rows)
        dy_own = ops.load(dy_t.at[own], WG).astype(f32)
        xf = x_own.astype(f32)
        v2 = jnp.sum(du * xf, axis=1)
        v5 = jnp.sum(dy_own * xf, axis=1)
        dx = du * bcast(dt_own, du.shape, 0) + d * dy_own

        # ---- own rows as queries l: dC (entering state, then s-tiles j ≤ w).
        dy_b = dy_own.astype(dtype)
        c_own = ops.load(c_t.at[own], WG)                             # [l, n]
        dc, = ops.run(lambda a: ops.mma(a[0], dy_b, st_t, transpose_b=True), [(_ROWS, n)])
        dc = dc * bcast(jnp.exp(lam_own), dc.shape, 0)                # e^{Λ_l} dY S_in
        v1 = jnp.sum(c_own.astype(f32) * dc, axis=1)
        for j in range(w + 1) if config.probe != "bwd_no_intra" else ():
          src = tiles[j]
          lam_s_ = ops.load(lam_t.at[src], COL)
          e = jnp.exp(jnp.minimum(bcast(lam_own, sq, 0) - bcast(lam_s_, sq, 1), 0.0))
          if j == w:
            e = jnp.where(iota_c <= iota_r, e, 0.0)                   # s ≤ l
          cb, dyx = ops.run(lambda a: (ops.mma(a[0], c_own, b_t.at[src], transpose_b=True),
                                       ops.mma(a[1], dy_b, x_t.at[src], transpose_b=True)),
                            [sq, sq])
          pm = dyx * e * bcast(ops.load(dt_t.at[src], COL), sq, 1)
          v1 = v1 + jnp.sum(pm * cb, axis=1)
          pmb = pm.astype(dtype)
          dc, = ops.run(lambda a: ops.mma(a[0], pmb, b_t.at[src]), [dc])
        store_grad(dc, dc_ref, rows)

        # ---- own state rows n: ⟨dS, S_in⟩ and dSᵀ ← e^{Λ_last} dSᵀ + Cᵀ diag(e^Λ) dY.
        v4 = jnp.sum(dsT * ops.load(st_t.at[own], WG).astype(f32), axis=1)
        lam_all = ops.load(lam_t, COL)
        ct_own = ops.load(ct_t.at[own], WG).astype(f32)               # [n, l]
        ct_sc = (ct_own * bcast(jnp.exp(lam_all), ct_own.shape, 1)).astype(dtype)
        dsT, = ops.run(lambda a: ops.mma(a[0], ct_sc, dy_t), [dsT * jnp.exp(lam_last)])
        plgpu.barrier_arrive(free_bar.at[slot])

        # ---- outputs of these rows: dx tile and the five sums (TMA), after the last reads.
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        if stage_dx:
          dx_o.at[w][...] = dx.astype(dtype)
        else:
          dx_ref.at[bi, rows, hi, :][...] = dx.astype(dtype)
        for k, v in enumerate((v1, v2, v3, v4, v5, v6)):
          v_o.at[w, k][...] = v
        plgpu.commit_smem()
        if stage_dx:
          plgpu.copy_smem_to_gmem(dx_o.at[w], dx_ref.at[bi, rows, hi, :])
        plgpu.copy_smem_to_gmem(v_o.at[w], v_ref.at[bi, hi, :, rows])
        return dsT

      dsT = lax.fori_loop(0, nc, block, dsT)
      plgpu.barrier_wait(ds_read)  # the last block's release (see the forward's memory warpgroup)
      ds0_ref.at[bi, hi, own, :][...] = dsT
      plgpu.wait_smem_to_gmem(0)

    for w in range(_WGS):
      pl.when(wg == w)(functools.partial(compute, w))

  def entry(*refs):
    return body(*refs[:15], **refs[15])

  interp, compiler_params = platform.mosaic_params(interpret=interpret,
                                                   approx_math=config.approx_math)
  return plgpu.kernel(
      entry,
      out_type=(jax.ShapeDtypeStruct((b, t, h, p), dtype),
                jax.ShapeDtypeStruct((b, t, h, n), grad_dtype),
                jax.ShapeDtypeStruct((b, t, h, n), grad_dtype),
                jax.ShapeDtypeStruct((b, h, NUM_SUMS, t), f32),
                jax.ShapeDtypeStruct((b, h, n, p), f32)),
      scratch_types=[scratch],
      grid=(h, b),
      grid_names=("h", "b"),
      num_threads=_WGS + 1,
      thread_name="wg",
      compiler_params=compiler_params,
      interpret=interp,
  )


def backward(x, dt, A, B, C, D, initial_state, segment_ids, states, cotangents, *, config,
             interpret):
  """Cotangents of (x, dt, A, B, C, D, initial_state) for those of (y, final state).

  `states`: the forward's Sᵀ entering every block, bf16 [b, h, c, n, p].
  """
  dy, dfin = cotangents
  k = fwd.prepare(x, dt, A, B, C, D, initial_state, config, segment_ids)
  b, t, tp, h, p, g, n = (k[key] for key in ("b", "t", "tp", "h", "p", "g", "n"))
  T = config.block_t
  nc = tp // T
  dtype = jnp.dtype(x.dtype)
  has_dfin = dfin is not None and not isinstance(dfin, jax.custom_derivatives.SymbolicZero)
  if has_dfin:
    dfin = fwd.split3(jnp.transpose(dfin.astype(f32), (0, 1, 3, 2)))  # [3, b, h, n, p]
  else:
    dfin = jnp.zeros((3, 1, 1, n, p), dtype)
  dy = k["pad_t"](jnp.zeros(x.shape, dtype) if dy is None else dy.astype(dtype))
  ct = jnp.transpose(k["C"], (0, 2, 3, 1))                              # Cᵀ [b, g, n, t]
  grad_dtype = jnp.dtype(config.bwd_grad_dtype)

  kernel = platform.shared_kernel(_build_kernel, b=b, t=tp, h=h, p=p, g=g, n=n, dtype=dtype,
                                  grad_dtype=grad_dtype, has_dfin=has_dfin, config=config,
                                  interpret=interpret)
  dx, db_h, dc_h, v, ds0_t = kernel(k["x"], dy, k["B"], k["C"], ct, states, k["lam_t"],
                                    k["dt_t"], k["d"], dfin)
  return _epilogue(x, dt, A, B, C, D, initial_state, k, dx, db_h, dc_h, v, ds0_t, nc, T)


def _epilogue(x, dt, A, B, C, D, initial_state, k, dx, db_h, dc_h, v, ds0_t, nc, T):
  """Log-decay gradient from the five sums, head sums of dB and dC, unpadding (XLA)."""
  b, t, tp, h, g, n = (k[key] for key in ("b", "t", "tp", "h", "g", "n"))
  v = v.reshape(b, h, NUM_SUMS, nc, T)
  v1, v2, v3, v4, v5, v6 = (v[:, :, i] for i in range(NUM_SUMS))          # [b, h, c, T]
  dt_c = k["dt_t"].reshape(b, h, nc, T)
  lam_last = k["lam_t"].reshape(b, h, nc, T)[..., -1]
  dlam = v1 - dt_c * v6
  last = jnp.exp(lam_last) * jnp.sum(v4, -1) + jnp.sum(v3, -1)            # ⟨dS_out, S_out⟩
  dlam = dlam.at[..., -1].add(last)
  da = jnp.flip(jnp.cumsum(jnp.flip(dlam, -1), -1), -1)                  # Σ_{k ≥ r} in the block
  ddt = (A.astype(f32)[None, :, None, None] * da + v2).reshape(b, h, tp)[:, :, :t]
  dA = jnp.sum(dt_c * da, axis=(0, 2, 3))
  r = h // g
  dB = jnp.sum(db_h.reshape(b, tp, g, r, n).astype(f32), axis=3)[:, :t]
  dC = jnp.sum(dc_h.reshape(b, tp, g, r, n).astype(f32), axis=3)[:, :t]
  dD = None if D is None else jnp.sum(v5, axis=(0, 2, 3)).astype(D.dtype)
  ds0 = None
  if initial_state is not None:
    ds0 = jnp.transpose(ds0_t, (0, 1, 3, 2)).astype(initial_state.dtype)
  return (dx[:, :t].astype(x.dtype), jnp.transpose(ddt, (0, 2, 1)).astype(dt.dtype),
          dA.astype(A.dtype), dB.astype(B.dtype), dC.astype(C.dtype), dD, ds0)


# --------------------------------------------------------------------------------------------
# The differentiable entry point.


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10))
def _ssd(x, dt, A, B, C, D, initial_state, segment_ids, chunk_size, config, interpret):
  del chunk_size  # the kernel's schedule is config.block_t; see the module docstring
  return fwd.forward(x, dt, A, B, C, D, initial_state, config, interpret,
                     segment_ids=segment_ids)


# Head dims at which the block-parallel backward has run on an H200 (2026-12-01: p = 64 at
# 1x4096, gradients within 3.3e-3 of the fp32 reference). Elsewhere on hardware "blocks" runs the
# older reverse-walk kernel until it has been measured there (p = 80 has not, its dB/dC kernel
# fits one pipeline stage). The interpreter runs "blocks" at every size (CPU tests).
BLOCKS_ON_HARDWARE = (64,)


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
  if config.backward == "blocks" and (interpret or args[0].shape[-1] in BLOCKS_ON_HARDWARE):
    from nemojax.kernels.ssd import pallas_mosaic_gpu_bwd_blocks as blocks  # noqa: PLC0415
    return (*blocks.backward(*args, states, cotangents, config=config, interpret=interpret),
            None)
  return (*backward(*args, states, cotangents, config=config, interpret=interpret), None)


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
    backward pass runs the backward kernel of this module, fed by the block
    states this forward saves, or the XLA reference's VJP with `Config(backward="xla")`.
  """
  config = fwd.DEFAULT_CONFIG if config is None else config
  if int(chunk_size) not in (128, 256):
    raise ValueError(f"ssd (pallas): chunk_size must be 128 or 256, got {chunk_size}; "
                     "use implementation='xla' for other chunk sizes")
  return _ssd(x, dt, A, B, C, D, initial_state, segment_ids, int(chunk_size), config,
              bool(interpret))
