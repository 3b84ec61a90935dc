"""Chunked SSD scan as one fused Pallas kernel for Hopper GPUs (Mosaic GPU: wgmma, TMA).

Legend: b batch, t time, h heads, p head dim, n state, g groups, c blocks of the sequence,
l / s positions inside a block (query / source).

The function is the one of `reference.ssd_naive`. Per head, with `a_t = dt_t·A` and the block-local
cumulative sum `Λ_l = Σ_{k≤l} a_k` (the sequence is cut into blocks of `T` = `Config.block_t`
steps), the kernel keeps the transposed state `Sᵀ ∈ R^{n×p}` (fp32, in registers) and, block after
block, computes

    y_l   = e^{Λ_l} (C_l · Sᵀ)                                   (entering state, "y_off")
          + Σ_{s≤l} (C_l·B_s) e^{Λ_l − Λ_s} dt_s x_s + D x_l      (inside the block, "y_diag")
    Sᵀ   ← e^{Λ_last} Sᵀ + Σ_s B_s (e^{Λ_last − Λ_s} dt_s) x_sᵀ   (state passed to the next block)

which is the chunked algorithm of SPEC section 2 with chunk = block. In exact arithmetic the result
does not depend on the block length, so `chunk_size` 128 and 256 are both served by blocks of
`block_t` (=128) steps: a chunk of 256 would need 170 KB of inputs per pipeline stage, more than
two stages of shared memory hold. The four products run on the tensor cores in bf16 with fp32
accumulation: CB = C·Bᵀ (64×64 tiles, causal tiles only), (CB∘L)·X, C·Sᵀ (Sᵀ rounded to bf16 for
the product only; the carried state stays fp32) and (Bᵀ·diag(w))·X. `D·x` rides on the diagonal of
CB∘L, so x is never read into registers.

One CTA per (head, batch) walks all blocks of its sequence, so inter-block states never leave the
chip. Three warpgroups: WG 0 and 1 compute (WG w owns output rows [64w, 64w+64) of each block and
state rows n ∈ [64w, 64w+64)); WG 2 streams the inputs with TMA, `num_stages` blocks
ahead. The wrapper (plain XLA, ~5 KB per token of extra traffic against ~46 KB the kernel moves)
pads the sequence to whole blocks with dt = 0 steps (no decay, no input: the final state stays
exact), computes the block-local cumsum Λ and transposes dt, Λ and B so that they arrive as rows
(dt and B through `layout.swap_minor`, a kernel: an XLA transpose there would make XLA store the
model's whole in_proj output time-minor, see `kernels/layout.py`).

Interpret mode (`interpret=True`, CPU tests) runs the same kernel body on Mosaic GPU's interpreter
(TMA copies, barriers, warpgroups, pipelining). The interpreter of jax 0.10 cannot take register
operands in wgmma nor register layouts in loads, so there the products are `jnp.dot`s on the same
shared-memory tiles and the SMEM buffers carry no swizzle; everything else is the kernel as
compiled.

Measured on an H200 (benchmarks/RESULTS.md, "SSD kernel"): 0.16–0.45× mamba_ssm's time at all 20
BENCHMARKS.md shapes (head dims 80 and 64, chunks 128 and 256), ‖Δy‖/‖y‖ ≈ 2.4e-3 against an fp32
reference.

Training: `pallas_mosaic_gpu_bwd.ssd` (the public entry) is a `custom_vjp`. Its forward runs this
kernel with `emit_states`, which also writes the bf16 Sᵀ entering every block (one TMA store of
the tile the C·Sᵀ product reads; 2·n·p bytes per head and block, ~20 KB per token at p = 80:
saved rather than recomputed because a recompute pass would read x, B, C again and cost more).
Its backward (`Config.backward`): "blocks" (default; `pallas_mosaic_gpu_bwd_blocks`) runs this
kernel again with `reverse=True` (the adjoint walk) and a block-parallel dB/dC kernel; "xla" the
XLA reference's VJP (the path on every non-Hopper backend, where the dispatcher never picks this
module).

Packed sequences (`segment_ids`): `prepare` subtracts `DOC_PENALTY` from a = dt·A at every
document's first step before the block cumsum, so every decay across a boundary is exactly 0;
the kernels are unchanged (see `reference` for the semantics).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

from nemojax.kernels import layout, platform
from nemojax.kernels.segments import document_index
from nemojax.kernels.ssd import reference

f32 = jnp.float32
_ROWS = 64  # wgmma M: every tile of rows a warpgroup owns
_COMPUTE_WGS = 2
_SMEM_LIMIT = 227 * 1024  # Hopper's per-block dynamic shared memory
# Packed sequences: added to a = dt·A at each document's first step, so that every decay across a
# boundary, e^{Λ_l − Λ_s} ≤ e^{−128}, is exactly 0 in fp32, while Λ stays small enough for its
# fp32 rounding (~8e-6 per boundary in the block) to stay far under the bf16 operands' 4e-3.
DOC_PENALTY = 128.0
# Head dims compiled and checked on an H200 (BENCHMARKS.md shapes). Other multiples of 16 that fit
# in shared memory should work but have not run on hardware, so the dispatcher keeps them on XLA.
VERIFIED_HEAD_DIMS = (64, 80)


@dataclasses.dataclass(frozen=True)
class Config:
  """Tuning knobs of the kernel.

  Attributes:
    block_t: time steps per pipeline step (the kernel's chunk); 128 = two warpgroups × 64 rows.
    num_stages: input blocks in flight (shared-memory buffers of x, B, C, Λ, dt).
    compute_registers: registers per thread for the two compute warpgroups (setmaxnreg).
    memory_registers: registers per thread for the TMA warpgroup.
    approx_math: fast approximate exp (ex2.approx); relative error ~1e-7, far under bf16.
    fuse_waits: issue independent wgmmas together and wait once per group (two waits per
      block: C·Sᵀ with the C·Bᵀ tiles; then the state and (CB∘L)·X products) instead of one
      wait per product.
    backward: "blocks" or "xla": the backward pass (module docstring, Training).
    probe: measurements only, wrong results: "no_bc_reload" loads C and Bᵀ only for the first
      stages (isolates their traffic), "no_compute" streams inputs and outputs without math.
  """
  block_t: int = 128
  num_stages: int = 2
  compute_registers: int = 232
  memory_registers: int = 40
  approx_math: bool = True
  fuse_waits: bool = False
  probe: str = ""
  backward: str = "blocks"

  def __post_init__(self):
    if self.block_t != _ROWS * _COMPUTE_WGS:
      raise ValueError(f"Config.block_t must be {_ROWS * _COMPUTE_WGS}, got {self.block_t}")
    if self.num_stages < 1:
      raise ValueError(f"Config.num_stages must be >= 1, got {self.num_stages}")
    if self.backward not in ("blocks", "xla"):
      raise ValueError(f"Config.backward must be 'blocks' or 'xla', got {self.backward!r}")


DEFAULT_CONFIG = Config()


def _swizzle_for(cols: int, itemsize: int) -> int:
  """Largest TMA/wgmma swizzle (bytes) whose row of elements divides `cols`."""
  for sw in (128, 64, 32):
    if cols % (sw // itemsize) == 0:
      return sw
  raise ValueError(f"no swizzle fits {cols} columns of {itemsize}-byte elements")


def smem_bytes(head_dim: int, state_size: int = 128, config: Config = DEFAULT_CONFIG) -> int:
  """Shared memory one CTA needs, for `supports` (bf16 inputs)."""
  t, p, n = config.block_t, head_dim, state_size
  stage = 2 * (t * p + 2 * t * n) + 4 * 2 * t  # x, C, Bᵀ in bf16; Λ, dt in fp32
  return config.num_stages * stage + 2 * n * p + 2 * t * p + 1024  # + Sᵀ, y tiles, barriers


def supports(*, head_dim: int, state_size: int, chunk_size: int, dtype,
             config: Config = DEFAULT_CONFIG) -> bool:
  """Whether the kernel handles these shapes (the dispatcher falls back to XLA otherwise)."""
  try:
    dtype = jnp.dtype(dtype)
  except TypeError:
    return False
  return (dtype == jnp.dtype(jnp.bfloat16)
          and state_size == _ROWS * _COMPUTE_WGS
          and head_dim in VERIFIED_HEAD_DIMS
          and chunk_size in (128, 256)
          and smem_bytes(head_dim, state_size, config) <= _SMEM_LIMIT)


# --------------------------------------------------------------------------------------------
# The few operations that differ between the compiled kernel and the interpreter.


@dataclasses.dataclass(frozen=True)
class _Ops:
  interpret: bool

  def load(self, ref, layout):
    """Read a whole ref into registers with a wgmma-compatible layout."""
    if self.interpret:
      return ref[...]
    return platform.load(ref, layout=layout)

  def iota(self, shape, dim):
    if self.interpret:
      return lax.broadcasted_iota(jnp.int32, shape, dim)
    return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)

  def zeros(self, shape):
    z = jnp.zeros(shape, f32)
    return z if self.interpret else plgpu.layout_cast(z, plgpu.Layout.WGMMA)

  def run(self, fn, inits):
    """Runs `fn(accs)`, which issues `mma`s into accumulators, and waits once for all of them.

    `inits`: per accumulator, a shape (zeros) or an fp32 array in the wgmma layout.
    """
    inits = [self.zeros(v) if isinstance(v, tuple) else v for v in inits]
    if self.interpret:
      boxes = [_Box(v) for v in inits]
      fn(boxes)
      return [bx.value for bx in boxes]
    return list(pl.run_state(lambda refs: fn(list(refs)))(tuple(plgpu.ACC.init(v) for v in inits)))

  def mma(self, acc, a, b_ref, transpose_b: bool = False):
    """acc += a @ b (or a @ bᵀ), `a` in registers (bf16), `b` a shared-memory tile, fp32 sums."""
    if self.interpret:
      bv = b_ref[...]
      acc.value = acc.value + jnp.dot(a, bv.T if transpose_b else bv, preferred_element_type=f32)
    else:
      plgpu.wgmma(acc, a, plgpu.transpose_ref(b_ref, (1, 0)) if transpose_b else b_ref)


class _Box:
  """A mutable accumulator for the interpreter's stand-in of wgmma."""

  def __init__(self, value):
    self.value = value


# --------------------------------------------------------------------------------------------
# The kernel.


def _build_kernel(*, b, t, h, p, g, n, dtype, has_init, config: Config, interpret: bool,
                  emit_states: bool = False, reverse: bool = False):
  """The scan kernel, or with `reverse` its adjoint walk for the backward (module docstring of
  `pallas_mosaic_gpu_bwd_blocks`): blocks from last to first, sources after queries, decays
  e^{Λ_s − Λ_l}, dt on the query rows, the entering state weighted by e^{Λ_last − Λ_l} and the
  sources' state weights e^{Λ_s}."""
  T = config.block_t
  nc = t // T
  r = h // g
  S = min(config.num_stages, nc)
  ops = _Ops(interpret)
  WG = plgpu.Layout.WGMMA
  ROW, COL = WG.reduce(1), WG.reduce(0)  # vectors along rows (per l) / along columns (per s)

  def smem(shape, dt, cols=None):
    if interpret or cols is None:
      return plgpu.SMEM(shape, dt)
    sw = _swizzle_for(cols, jnp.dtype(dt).itemsize)
    tr = (plgpu.TilingTransform((8, sw // jnp.dtype(dt).itemsize)), plgpu.SwizzleTransform(sw))
    return plgpu.SMEM(shape, dt, transforms=tr)

  scratch = dict(
      x_s=smem((S, T, p), dtype, p),        # [stage, l, p]
      c_s=smem((S, T, n), dtype, n),        # [stage, l, n]
      bt_s=smem((S, n, T), dtype, T),       # [stage, n, s]
      lam_s=plgpu.SMEM((S, T), f32),        # Λ [stage, l]
      dt_s=plgpu.SMEM((S, T), f32),         # dt [stage, s]
      in_bar=plgpu.Barrier(num_arrivals=5, num_barriers=S),
      free_bar=plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=S),
      st_s=smem((n, p), dtype, p),          # Sᵀ entering the block, bf16 for the C·Sᵀ product
      y_s=smem((_COMPUTE_WGS, _ROWS, p), dtype, p),
      st_ready=plgpu.Barrier(num_arrivals=_COMPUTE_WGS),
      st_read=plgpu.Barrier(num_arrivals=_COMPUTE_WGS),
      init_bar=plgpu.Barrier(num_arrivals=1, num_barriers=_COMPUTE_WGS),
  )

  def blk(c):  # the block handled at step c
    return nc - 1 - c if reverse else c

  def body(x_ref, bt_ref, c_ref, lam_ref, dt_ref, d_ref, init_ref, y_ref, fin_ref, states_ref, *,
           x_s, c_s, bt_s, lam_s, dt_s, in_bar, free_bar, st_s, y_s, st_ready, st_read,
           init_bar):
    hi = lax.axis_index("h")
    bi = lax.axis_index("b")
    gi = lax.div(hi, jnp.int32(r))
    wg = lax.axis_index("wg")

    def fetch(c, slot, first=True):
      rows = pl.ds(blk(c) * T, T)
      bar = in_bar.at[slot]
      plgpu.copy_gmem_to_smem(x_ref.at[bi, rows, hi, :], x_s.at[slot], bar)
      if first or config.probe != "no_bc_reload":
        plgpu.copy_gmem_to_smem(c_ref.at[bi, rows, gi, :], c_s.at[slot], bar)
        plgpu.copy_gmem_to_smem(bt_ref.at[bi, gi, :, rows], bt_s.at[slot], bar)
      else:
        plgpu.barrier_arrive(bar)
        plgpu.barrier_arrive(bar)
      plgpu.copy_gmem_to_smem(lam_ref.at[bi, hi, rows], lam_s.at[slot], bar)
      plgpu.copy_gmem_to_smem(dt_ref.at[bi, hi, rows], dt_s.at[slot], bar)

    @pl.when(wg == _COMPUTE_WGS)
    def _memory_wg():
      if not interpret:
        plgpu.set_max_registers(config.memory_registers, action="decrease")
      for c in range(S):
        fetch(c, c)

      def step(c, carry):
        slot = lax.rem(c, S)
        plgpu.barrier_wait(free_bar.at[slot])
        fetch(c, slot, first=False)
        return carry
      lax.fori_loop(S, nc, step, None)
      # Observe the last releases too: the barrier protocol (and the interpreter) wants every
      # completed phase waited for by the threads that wait on it.
      for c in range(max(nc, S), nc + S):
        plgpu.barrier_wait(free_bar.at[c % S])


    def compute(w: int):
      """Warpgroup `w`: output rows [64w, 64w+64) of each block, state rows [64w, 64w+64)."""
      if not interpret:
        plgpu.set_max_registers(config.compute_registers, action="increase")
      own = pl.ds(w * _ROWS, _ROWS)
      d = d_ref[hi]
      if has_init:
        # The fp32 state arrives as three bf16 pieces (hi + mid + lo = the fp32 value; 3 × 8
        # mantissa bits), staged through this warpgroup's output tile: no shared memory is left
        # for an fp32 tile, and registers cannot be loaded from global memory in wgmma layout.
        state = ops.zeros((_ROWS, p))
        for k in range(3):
          plgpu.copy_gmem_to_smem(init_ref.at[k, bi, hi, own, :], y_s.at[w], init_bar.at[w])
          plgpu.barrier_wait(init_bar.at[w])
          state = state + ops.load(y_s.at[w], WG).astype(f32)
          if not interpret:
            plgpu.commit_smem()  # reads of the tile done before the next copy overwrites it
      else:
        state = ops.zeros((_ROWS, p))

      def block(c, state):
        # kernel body: one block of the scan, every product and its masks in issue order.
        slot = lax.rem(c, S)
        plgpu.barrier_wait(in_bar.at[slot])
        x_t, c_t, bt_t = x_s.at[slot], c_s.at[slot], bt_s.at[slot]
        lam_t, dt_t = lam_s.at[slot], dt_s.at[slot]
        if config.probe == "no_compute":
          plgpu.barrier_arrive(free_bar.at[slot])
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)
          y_s.at[w][...] = state.astype(dtype)
          plgpu.commit_smem()
          plgpu.copy_smem_to_gmem(y_s.at[w], y_ref.at[bi, pl.ds(blk(c) * T + w * _ROWS, _ROWS),
                                                      hi, :])
          return state

        # Publish the entering state (bf16) for both warpgroups' C·Sᵀ, once both are done
        # reading the previous one.
        @pl.when(c > 0)
        def _():
          plgpu.barrier_wait(st_read)
        st_s.at[own][...] = state.astype(dtype)
        plgpu.commit_smem()
        if emit_states:  # the backward's S_in; read before st_s is next written (waits below)
          plgpu.copy_smem_to_gmem(st_s.at[own], states_ref.at[bi, hi, blk(c), own, :])
        plgpu.barrier_arrive(st_ready)
        plgpu.barrier_wait(st_ready)

        c_own = ops.load(c_t.at[own], WG)                              # [l, n] bf16
        lam_l = ops.load(lam_t.at[own], ROW)                           # [l]
        # Causal: source tiles up to the diagonal (reverse: from it on).
        src_tiles = range(w, _COMPUTE_WGS) if reverse else range(w + 1)
        srcs = [pl.ds(j * _ROWS, _ROWS) for j in src_tiles]
        dt_l = ops.load(dt_t.at[own], ROW) if reverse else None

        def masked(cb, j):
          """CB∘L for source tile j: L[l, s] = e^{Λ_l − Λ_s} dt_s for s ≤ l, D on the diagonal
          (reverse: e^{Λ_s − Λ_l} dt_l for s ≥ l)."""
          shape = cb.shape
          src = pl.ds(j * _ROWS, _ROWS)
          seg = (lax.broadcast_in_dim(lam_l, shape, [0])
                 - lax.broadcast_in_dim(ops.load(lam_t.at[src], COL), shape, [1]))
          # min(·, 0): above the diagonal the difference is positive and exp could overflow.
          if reverse:
            pm = cb * jnp.exp(jnp.minimum(-seg, 0.0)) * lax.broadcast_in_dim(dt_l, shape, [0])
          else:
            pm = (cb * jnp.exp(jnp.minimum(seg, 0.0))
                  * lax.broadcast_in_dim(ops.load(dt_t.at[src], COL), shape, [1]))
          if j == w:
            li, si = ops.iota(shape, 0), ops.iota(shape, 1)
            pm = jnp.where(li < si if reverse else li > si, pm,
                           jnp.where(li == si, pm + d, 0.0))
          return pm.astype(dtype)

        def entering_weight():  # e^{Λ_l} per own row (reverse: e^{Λ_last − Λ_l} dt_l)
          return jnp.exp(lam_last - lam_l) * dt_l if reverse else jnp.exp(lam_l)

        def state_operand():
          """Bᵀ diag(w) for own state rows, w_s = e^{Λ_last − Λ_s} dt_s (reverse: e^{Λ_s});
          bf16, registers."""
          if reverse:
            wv = jnp.exp(ops.load(lam_t, COL))
          else:
            wv = jnp.exp(lam_last - ops.load(lam_t, COL)) * ops.load(dt_t, COL)
          bt_own = ops.load(bt_t.at[own], WG).astype(f32)               # [n(own), s]
          return (bt_own * lax.broadcast_in_dim(wv, bt_own.shape, [1])).astype(dtype)

        lam_last = lam_t[T - 1]
        if config.fuse_waits:
          def products(accs):
            ops.mma(accs[0], c_own, st_s)                                # C·Sᵀ [l, p]
            for k, src in enumerate(srcs):
              ops.mma(accs[1 + k], c_own, bt_t.at[:, src])               # C·Bᵀ [l, s]
          y, *cbs = ops.run(products, [(_ROWS, p)] + [(_ROWS, _ROWS)] * len(srcs))
          plgpu.barrier_arrive(st_read)
          y = y * lax.broadcast_in_dim(entering_weight(), y.shape, [0])
          pms = [masked(cb, j) for j, cb in zip(src_tiles, cbs)]
          a_op = state_operand()

          def updates(accs):  # every register operand is ready before the first issue
            ops.mma(accs[0], a_op, x_t)                                  # Sᵀ += (Bᵀ diag w) X
            for pm, src in zip(pms, srcs):
              ops.mma(accs[1], pm, x_t.at[src])                          # y += (CB∘L)·X
          state, y = ops.run(updates, [state * jnp.exp(lam_last), y])
        else:
          y, = ops.run(lambda accs: ops.mma(accs[0], c_own, st_s), [(_ROWS, p)])
          plgpu.barrier_arrive(st_read)
          y = y * lax.broadcast_in_dim(entering_weight(), y.shape, [0])
          for j, src in zip(src_tiles, srcs):
            cb, = ops.run(lambda accs: ops.mma(accs[0], c_own, bt_t.at[:, src]),
                          [(_ROWS, _ROWS)])
            pm = masked(cb, j)
            y, = ops.run(lambda accs: ops.mma(accs[0], pm, x_t.at[src]), [y])
          a_op = state_operand()
          state, = ops.run(lambda accs: ops.mma(accs[0], a_op, x_t), [state * jnp.exp(lam_last)])
        plgpu.barrier_arrive(free_bar.at[slot])

        # Output rows: the previous TMA store from this tile must have read it.
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        y_s.at[w][...] = y.astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(y_s.at[w], y_ref.at[bi, pl.ds(blk(c) * T + w * _ROWS, _ROWS),
                                                    hi, :])
        return state

      state = lax.fori_loop(0, nc, block, state)
      if config.probe != "no_compute":
        plgpu.barrier_wait(st_read)  # the last block's release (see the memory warpgroup)
      fin_ref.at[bi, hi, own, :][...] = state
      plgpu.wait_smem_to_gmem(0)

    for w in range(_COMPUTE_WGS):
      pl.when(wg == w)(functools.partial(compute, w))

  def entry(*refs):
    if emit_states:
      return body(*refs[:10], **refs[10])
    return body(*refs[:9], None, **refs[9])

  out_type = [jax.ShapeDtypeStruct((b, t, h, p), dtype), jax.ShapeDtypeStruct((b, h, n, p), f32)]
  if emit_states:  # Sᵀ entering every block, bf16 [b, h, c, n, p]
    out_type.append(jax.ShapeDtypeStruct((b, h, nc, n, p), dtype))

  interp, compiler_params = platform.mosaic_params(interpret=interpret,
                                                   approx_math=config.approx_math)
  return plgpu.kernel(
      entry,
      out_type=tuple(out_type),
      scratch_types=[scratch],
      grid=(h, b),
      grid_names=("h", "b"),
      num_threads=_COMPUTE_WGS + 1,
      thread_name="wg",
      compiler_params=compiler_params,
      interpret=interp,
  )


# --------------------------------------------------------------------------------------------
# Wrapper: layout preparation in XLA, then the kernel.


def split3(s32):
  """fp32 array → [3, ...] bf16 pieces whose fp32 sum is exact (hi + mid + lo)."""
  pieces = []
  for _ in range(3):
    pieces.append(s32.astype(jnp.bfloat16))
    s32 = s32 - pieces[-1].astype(f32)
  return jnp.stack(pieces)


def prepare(x, dt, A, B, C, D, initial_state, config: Config, segment_ids=None, *,
            interpret: bool):
  """Checks, padding to whole blocks and the layouts both kernels read.

  Returns a dict: shapes (b, t, tp, h, p, g, n), x, B, C padded (bf16), dt and the block-local
  cumsum Λ of a = dt·A (with `DOC_PENALTY` subtracted at document starts when `segment_ids`
  [b, t] is given) as [b, h, tp] (fp32), D (fp32, zeros if None). dt goes time-minor through
  `layout.swap_minor` before anything else touches it (see `nemojax.kernels.layout`: a
  `jnp.transpose` here makes XLA store the whole in_proj output time-minor).
  """
  b, t, h, p, g, n = reference._check_shapes(x, dt, A, B, C, D, initial_state)
  reference._check_segments(segment_ids, b, t)
  dtype = x.dtype
  if jnp.dtype(dtype) != jnp.dtype(jnp.bfloat16):
    raise ValueError(f"ssd (pallas): x must be bfloat16, got {dtype}; "
                     "use implementation='xla' for other dtypes")
  if not supports(head_dim=p, state_size=n, chunk_size=128, dtype=dtype, config=config):
    raise ValueError(f"ssd (pallas): unsupported shapes head_dim={p}, state_size={n}; the kernel "
                     f"takes state size 128 and head dims {VERIFIED_HEAD_DIMS}")
  if t == 0:
    raise ValueError("ssd: the sequence is empty (time dimension 0)")
  T = config.block_t
  pad = (-t) % T
  tp = t + pad
  pad_t = lambda v: jnp.pad(v, [(0, 0), (0, pad)] + [(0, 0)] * (v.ndim - 2)) if pad else v
  dt_t = layout.swap_minor(pad_t(dt.astype(f32)), interpret=interpret)  # [b, h, tp]; pad: dt = 0
  a = dt_t * A.astype(f32)[None, :, None]
  if segment_ids is not None:  # a document's first step forgets the state (never step 0)
    doc = document_index(segment_ids)
    start = jnp.concatenate([jnp.zeros((b, 1), bool), doc[:, 1:] != doc[:, :-1]], axis=1)
    a = a - jnp.where(pad_t(start), DOC_PENALTY, 0.0)[:, None, :]
  lam_t = jnp.cumsum(a.reshape(b, h, tp // T, T), axis=3).reshape(b, h, tp)
  return dict(
      b=b, t=t, tp=tp, h=h, p=p, g=g, n=n, pad_t=pad_t,
      x=pad_t(x), B=pad_t(B.astype(dtype)), C=pad_t(C.astype(dtype)),
      lam_t=lam_t, dt_t=dt_t,                                     # [b, h, tp]
      d=jnp.zeros((h,), f32) if D is None else D.astype(f32))


def time_minor(v, *, interpret: bool):
  """[b, tp, g, n] → [b, g, n, tp] (Bᵀ for the scan, Cᵀ for its adjoint walk), layout-pinned."""
  b, tp, g, n = v.shape
  return layout.swap_minor(v.reshape(b, tp, g * n), interpret=interpret).reshape(b, g, n, tp)


def forward(x, dt, A, B, C, D, initial_state, config: Config, interpret: bool,
            emit_states: bool = False, segment_ids=None):
  """The forward kernel (not differentiable: `pallas_mosaic_gpu_bwd.ssd` is the public entry)."""
  k = prepare(x, dt, A, B, C, D, initial_state, config, segment_ids, interpret=interpret)
  b, t, h, p, n = k["b"], k["t"], k["h"], k["p"], k["n"]
  has_init = initial_state is not None
  if has_init:  # Sᵀ [b, h, n, p] split exactly into three bf16 pieces
    init = split3(jnp.transpose(initial_state.astype(f32), (0, 1, 3, 2)))
  else:
    init = jnp.zeros((3, 1, 1, n, p), jnp.bfloat16)

  kernel = platform.shared_kernel(_build_kernel, b=b, t=k["tp"], h=h, p=p, g=k["g"], n=n,
                                  dtype=jnp.dtype(x.dtype), has_init=has_init, config=config,
                                  interpret=interpret, emit_states=emit_states)
  bt = time_minor(k["B"], interpret=interpret)                  # [b, g, n, t]
  y, fin_t, *states = kernel(k["x"], bt, k["C"], k["lam_t"], k["dt_t"], k["d"], init)
  y = y[:, :t] if k["tp"] != t else y
  fin = jnp.transpose(fin_t, (0, 1, 3, 2))
  return (y, fin, states[0]) if emit_states else (y, fin)
