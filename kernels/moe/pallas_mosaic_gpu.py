"""Routed experts of a MoE layer as two grouped GEMMs in Pallas for Hopper GPUs (Mosaic GPU).

Legend: m rows (tokens), k chosen experts per row, e experts, d expert input width, f expert
width, P = m·k (row, expert) pairs, T row tiles of `Config.tile_m` rows, n output columns.

The function is `reference.moe_ffn_sorted`'s:

    y[m] = Σ_j w[m, j] · down[e[m, j]] · relu(up[e[m, j]] · x[m])²

computed as
  1. layout (XLA, O(P) integer work): sort the P pairs by expert and give every expert's group a
     whole number of row tiles (each group padded up to a multiple of `tile_m` rows, empty groups
     get none), so that every row tile belongs to exactly one expert: `tile_expert[T]` (-1 for the
     unused tiles at the end of the static bound), `src[T·tile_m]` (the token each padded row
     reads; padding rows read token 0) and `dest[P]` (the padded row of every pair);
  2. `h = relu(xs · up[g]ᵀ)²` in bf16 and 3. `ys = h · down[g]ᵀ` in fp32, both by
     `grouped_matmul`: one CTA per (output tile of `tile_n` columns, row tile), bf16 operands on
     the tensor cores (wgmma) with fp32 accumulation, the K dimension streamed through shared
     memory by TMA in a `plgpu.emit_pipeline` of `num_stages` stages (blocks of 64, the 128-byte
     swizzle width); a CTA whose tile is unused exits at once;
  4. gather the P rows back (`dest`), weight and sum (XLA).

The weights stay in the Hugging Face layout (out, in), so each weight tile is a [tile_n, 64] slab
read by TMA and fed to wgmma transposed. Columns that do not fill a last tile are covered by an
overlapping tile (its start is pulled back to n − tile_n; both CTAs write the same values).

Decode: only tiles of chosen experts exist (at m = 1, k = 6: six tiles), so only the chosen
experts' weights are read; the padded rows cost tensor-core time, not bytes. For a handful of
rows (`per_pair`) each pair gets its own tile without sorting (`pair_layout`): the layout's
small XLA kernels would cost more than the expert reads they organise. A transposed form
(`Config.transposed`: the weights as the wgmma's M side, 16 token rows as its N side, giving
outᵀ) cuts a one-token tile's padding from 64 rows of tensor-core and shared-memory work to 16;
on the H200 it is no faster at one token than plain 64 × 64 tiles, but at 64 tokens (384 pairs,
~3 per touched expert) it takes 0.79 ms against their 1.16 ms. `default_config` therefore picks
64 × 64 tiles below one pair per expert, the transposed 16 × 64 form up to 8 pairs per expert,
and 128 × 128 tiles for prefill.

Requirements (`supports`): bf16, d and f multiples of 64 (TMA/swizzle width), at least `tile_n`.

Interpret mode (`interpret=True`, CPU tests) runs the same layout, grid and pipeline on Mosaic
GPU's interpreter with `jnp.dot` for the product (the interpreter has no transposed wgmma
operand) and no swizzle.

Status (2026-12-01, H200, jax 0.11.2): compiled and checked against the ragged_dot reference at
1, 64 and 1024 rows (decode, 64x64 and prefill, warp-specialised configs; tests marked gpu in
tests/test_moe_pallas.py), so the dispatcher picks it (`HARDWARE_VERIFIED`). Timed at one token
(Nano 30B-A3B experts, 128 x [1856, 2688], top-6; benchmarks/moe.py): 64 x 64 tiles, 6 stages
0.046-0.047 ms = 59-61% of the 0.028 ms byte roofline (transposed 16 x 64: 0.048-0.056 ms;
XLA gather 0.095 ms, ragged_dot 1.95 ms). At 64 tokens (roofline 0.576 ms): transposed 16 x 64 x 8
0.786 ms = 73%, 16 x 128 x 4 0.783 ms, 64 x 64 x 6 1.16 ms = 50%. Called back to back inside one
jitted program, as a decode step calls it (no Python dispatch per call), the default takes 0.046 ms
at one token (60% of t*, layout and combine included) and 0.72 ms at 64 tokens (80%). At 8192 tokens
(t* 1.24 ms, FLOPs-bound): 128 x 128 x 4 tiles 4.10 ms (30%), warp-specialised 128 x 256 x 3 with
bf16 per-pair outputs 3.49 ms (36%; `LARGE_PREFILL_CONFIG`, the default from 256 pairs per expert),
JAX's example `ragged_dot_mgpu` 5.17 ms; the two grouped GEMMs take 1.6 ms each at 128 x 128, about
300 TFLOP/s, so prefill is where this kernel is furthest from its roofline.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

from nemojax.kernels import platform

f32 = jnp.float32
_BLOCK_K = 64  # one 128-byte swizzle row of bf16
_SMEM_LIMIT = 227 * 1024
# Whether the kernel has been compiled and checked on an H200 (the dispatcher's automatic choice
# takes it only then; implementation="pallas" always runs it). True since 2026-12-01.
HARDWARE_VERIFIED = True


@dataclasses.dataclass(frozen=True)
class Config:
  """Tuning knobs.

  Attributes:
    tile_m: rows per CTA tile (64 or 128); every expert's group is padded to a multiple of it.
    tile_n: output columns per CTA tile (64 or 128).
    num_stages: K blocks in flight (TMA pipeline depth).
    down_dtype: dtype of the down projection's per-pair output before the weighted sum.
    warp_specialized: three warpgroups per CTA, one streaming the operands with TMA and two
      computing, each on half of the columns (`tile_n` 256: two [tile_m, 128] accumulators);
      otherwise one warpgroup issues both the copies and the wgmmas.
    transposed: weights as the wgmma's M side (tile_n weight rows, 64 or 128) and the tokens as
      its N side (`tile_m` of 16, 32 or 64 rows), producing outᵀ; for decode, where the token
      tiles are mostly padding: 16-row tiles cut the padded work and the token traffic from
      shared memory 4x against 64-row ones.
  """
  tile_m: int = 128
  tile_n: int = 128
  num_stages: int = 4
  down_dtype: str = "float32"
  warp_specialized: bool = False
  transposed: bool = False

  def __post_init__(self):
    rows = (16, 32, 64) if self.transposed else (64, 128)
    if self.tile_m not in rows:
      raise ValueError(f"Config.tile_m must be one of {rows}, got {self.tile_m}")
    if self.transposed and self.warp_specialized:
      raise ValueError("Config: transposed and warp_specialized cannot be combined")
    if self.tile_n not in ((128, 256) if self.warp_specialized else (64, 128)):
      raise ValueError(f"Config.tile_n must be 64 or 128 (128 or 256 when warp_specialized), "
                       f"got {self.tile_n}")
    if self.num_stages < 2:
      raise ValueError(f"Config.num_stages must be >= 2, got {self.num_stages}")
    if self.down_dtype not in ("float32", "bfloat16"):
      raise ValueError(f"Config.down_dtype must be 'float32' or 'bfloat16', got "
                       f"{self.down_dtype!r}")


# Decode, fewer pairs than experts: 64 x 64 tiles (0.046 ms at one token on the H200, the
# transposed 16-row form 0.048 ms). A few pairs per expert (batched decode, short prefill):
# the transposed 16-row form, 0.79 ms at 64 tokens against 1.16 ms for 64 x 64 (module docstring).
DECODE_CONFIG = Config(tile_m=64, tile_n=64, num_stages=6)
SMALL_BATCH_CONFIG = Config(tile_m=16, tile_n=64, num_stages=8, transposed=True)
# Prefill keeps the per-pair down outputs in bf16 (as a bf16 torch model's experts return them):
# at 8192 tokens their fp32 round trip through HBM would add ~0.25 ms to a ~1.3 ms product.
PREFILL_CONFIG = Config(tile_m=128, tile_n=128, num_stages=4, down_dtype="bfloat16")
# Long prefill chunks (hundreds of pairs per expert): warp-specialised 128 x 256 tiles, 3.49 ms
# at 8192 tokens on the H200 against 4.10 ms for PREFILL_CONFIG (2026-12-01, same run).
LARGE_PREFILL_CONFIG = Config(tile_m=128, tile_n=256, num_stages=3, down_dtype="bfloat16",
                              warp_specialized=True)


def default_config(num_pairs: int, num_experts: int, width: int | None = None) -> Config:
  """Small tiles while the pairs are few (decode: bytes of the chosen experts), else large.

  `width` = min(d, f) when known: the 256-column tiles need at least that many."""
  if num_pairs < num_experts:
    return DECODE_CONFIG
  if num_pairs < 8 * num_experts:
    return SMALL_BATCH_CONFIG
  if num_pairs < 256 * num_experts or (width is not None and width < LARGE_PREFILL_CONFIG.tile_n):
    return PREFILL_CONFIG
  return LARGE_PREFILL_CONFIG


def smem_bytes(config: Config, out_itemsize: int = 4) -> int:
  """Shared memory of one CTA: the pipeline's stages and the output tile (bf16 operands)."""
  stage = 2 * _BLOCK_K * (config.tile_m + config.tile_n)
  out = config.tile_m * config.tile_n // (2 if config.warp_specialized else 1)
  return config.num_stages * stage + out_itemsize * out + 1024


def supports(*, d: int, f: int, dtype, config: Config = PREFILL_CONFIG) -> bool:
  """Whether the kernel takes these shapes (the dispatcher falls back to XLA otherwise)."""
  try:
    dtype = jnp.dtype(dtype)
  except TypeError:
    return False
  return (dtype == jnp.dtype(jnp.bfloat16) and d % 64 == 0 and f % 64 == 0
          and min(d, f) >= config.tile_n and smem_bytes(config) <= _SMEM_LIMIT)


def _transforms(cols: int, dtype, interpret: bool):
  if interpret:
    return ()
  itemsize = jnp.dtype(dtype).itemsize
  swizzle = next(sw for sw in (128, 64, 32) if (cols * itemsize) % sw == 0)
  return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


def _act(activation):
  if activation == "relu2":
    return lambda acc: jnp.square(jnp.maximum(acc, 0.0))
  return lambda acc: acc


def _build_kernel(*, rows, k_dim, n, e, activation, out_dtype, config: Config, interpret: bool):
  """out[r] = act(w[tile_expert[r // tile_m]] · lhs[r]) for rows r of used tiles; [rows, n]."""
  if config.transposed:
    return _build_t_kernel(rows=rows, k_dim=k_dim, n=n, activation=activation,
                           out_dtype=out_dtype, config=config, interpret=interpret)
  if config.warp_specialized:
    return _build_ws_kernel(rows=rows, k_dim=k_dim, n=n, activation=activation,
                            out_dtype=out_dtype, config=config, interpret=interpret)
  TM, TN, BK = config.tile_m, config.tile_n, _BLOCK_K
  dtype = jnp.bfloat16
  in_tf = _transforms(BK, dtype, interpret)
  out_tf = _transforms(TN, out_dtype, interpret)
  steps = k_dim // BK
  act = _act(activation)

  def body(tile_expert_ref, lhs_ref, w_ref, o_ref):
    ni = lax.axis_index("n")
    mi = lax.axis_index("m")
    g = tile_expert_ref[mi]
    n0 = jnp.minimum(ni * TN, n - TN)  # the last tile overlaps its neighbour if TN ∤ n
    specs = [plgpu.BlockSpec((TM, BK), lambda kb: (0, kb), transforms=in_tf, delay_release=1),
             plgpu.BlockSpec((TN, BK), lambda kb: (0, kb), transforms=in_tf, delay_release=1)]

    @pl.when(g >= 0)
    def _():
      a_gmem = lhs_ref.at[pl.ds(mi * TM, TM)]
      b_gmem = w_ref.at[g, pl.ds(n0, TN)]
      if interpret:
        def dot_step(_, a_s, b_s, acc):
          return acc + jnp.dot(a_s[...], b_s[...].T, preferred_element_type=f32)
        acc = plgpu.emit_pipeline(dot_step, grid=(steps,), in_specs=specs,
                                  max_concurrent_steps=config.num_stages,
                                  init_carry=jnp.zeros((TM, TN), f32))(a_gmem, b_gmem)
      else:
        def mma_scope(acc_ref):
          def mma_step(_, a_s, b_s):
            plgpu.wgmma(acc_ref, a_s, plgpu.transpose_ref(b_s, (1, 0)))
            plgpu.wgmma_wait(1)  # the previous step's operands may now be released
          plgpu.emit_pipeline(mma_step, grid=(steps,), in_specs=specs,
                              max_concurrent_steps=config.num_stages)(a_gmem, b_gmem)
          return acc_ref[...]
        acc = pl.run_scoped(mma_scope, plgpu.ACC((TM, TN), f32))

      def store(o_s):
        o_s[...] = act(acc).astype(out_dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_s, o_ref.at[pl.ds(mi * TM, TM), pl.ds(n0, TN)])
        plgpu.wait_smem_to_gmem(0)
      pl.run_scoped(store, plgpu.SMEM((TM, TN), out_dtype, transforms=out_tf))

  interp, compiler_params = platform.mosaic_params(interpret=interpret, approx_math=False)
  return plgpu.kernel(
      body,
      out_type=jax.ShapeDtypeStruct((rows, n), out_dtype),
      grid=(pl.cdiv(n, TN), rows // TM),
      grid_names=("n", "m"),
      compiler_params=compiler_params,
      interpret=interp,
  )


def _build_t_kernel(*, rows, k_dim, n, activation, out_dtype, config: Config, interpret: bool):
  """`_build_kernel` with the operands' roles swapped: outᵀ [n, rows] = w[g] · lhs[tile]ᵀ."""
  TT, TN, BK = config.tile_m, config.tile_n, _BLOCK_K
  in_tf = _transforms(BK, jnp.bfloat16, interpret)
  out_tf = _transforms(TT, out_dtype, interpret)
  steps = k_dim // BK
  act = _act(activation)

  def body(tile_expert_ref, lhs_ref, w_ref, o_ref):
    ni = lax.axis_index("n")
    mi = lax.axis_index("m")
    g = tile_expert_ref[mi]
    n0 = jnp.minimum(ni * TN, n - TN)
    specs = [plgpu.BlockSpec((TN, BK), lambda kb: (0, kb), transforms=in_tf, delay_release=1),
             plgpu.BlockSpec((TT, BK), lambda kb: (0, kb), transforms=in_tf, delay_release=1)]

    @pl.when(g >= 0)
    def _():
      w_gmem = w_ref.at[g, pl.ds(n0, TN)]
      x_gmem = lhs_ref.at[pl.ds(mi * TT, TT)]
      if interpret:
        def dot_step(_, w_s, x_s, acc):
          return acc + jnp.dot(w_s[...], x_s[...].T, preferred_element_type=f32)
        acc = plgpu.emit_pipeline(dot_step, grid=(steps,), in_specs=specs,
                                  max_concurrent_steps=config.num_stages,
                                  init_carry=jnp.zeros((TN, TT), f32))(w_gmem, x_gmem)
      else:
        def mma_scope(acc_ref):
          def mma_step(_, w_s, x_s):
            plgpu.wgmma(acc_ref, w_s, plgpu.transpose_ref(x_s, (1, 0)))
            plgpu.wgmma_wait(1)
          plgpu.emit_pipeline(mma_step, grid=(steps,), in_specs=specs,
                              max_concurrent_steps=config.num_stages)(w_gmem, x_gmem)
          return acc_ref[...]
        acc = pl.run_scoped(mma_scope, plgpu.ACC((TN, TT), f32))

      def store(o_s):
        o_s[...] = act(acc).astype(out_dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_s, o_ref.at[pl.ds(n0, TN), pl.ds(mi * TT, TT)])
        plgpu.wait_smem_to_gmem(0)
      pl.run_scoped(store, plgpu.SMEM((TN, TT), out_dtype, transforms=out_tf))

  interp, compiler_params = platform.mosaic_params(interpret=interpret, approx_math=False)
  return plgpu.kernel(
      body,
      out_type=jax.ShapeDtypeStruct((n, rows), out_dtype),
      grid=(pl.cdiv(n, TN), rows // TT),
      grid_names=("n", "m"),
      compiler_params=compiler_params,
      interpret=interp,
  )


def _build_ws_kernel(*, rows, k_dim, n, activation, out_dtype, config: Config, interpret: bool):
  """`_build_kernel` with a TMA warpgroup and two compute warpgroups (columns split in two)."""
  TM, TN, BK = config.tile_m, config.tile_n, _BLOCK_K
  WN = TN // 2  # columns per compute warpgroup
  HM = TM // 2  # rows per epilogue store
  in_tf = _transforms(BK, jnp.bfloat16, interpret)
  act = _act(activation)

  def body(tile_expert_ref, lhs_ref, w_ref, o_ref, o_s):
    ni = lax.axis_index("n")
    mi = lax.axis_index("m")
    wg = lax.axis_index("wg")
    g = tile_expert_ref[mi]
    n0 = jnp.minimum(ni * TN, n - TN)
    cols = pl.ds(wg * WN, WN)

    def mma_step(_, a_s, b_s, acc):
      if interpret:
        return acc + jnp.dot(a_s[...], b_s.at[cols][...].T, preferred_element_type=f32)
      plgpu.wgmma(acc, a_s, plgpu.transpose_ref(b_s.at[cols], (1, 0)))
      plgpu.wgmma_wait(1)  # the previous step's operands may now be released
      return acc

    def epilogue(acc):
      # In two halves of rows through one buffer: a whole fp32 tile per warpgroup would not fit
      # beside the pipeline's stages.
      for half in range(2):
        if half:
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the buffer is free again
        o_s.at[wg][...] = act(acc[half * HM:(half + 1) * HM]).astype(out_dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(
            o_s.at[wg], o_ref.at[pl.ds(mi * TM + half * HM, HM), pl.ds(n0 + wg * WN, WN)])
      plgpu.wait_smem_to_gmem(0)

    def compute_context(eval_pipeline):
      if interpret:
        epilogue(eval_pipeline(jnp.zeros((TM, WN), f32)))
        return

      def scope(acc_ref):
        eval_pipeline(acc_ref)
        epilogue(acc_ref[...])
      pl.run_scoped(scope, plgpu.ACC((TM, WN), f32))

    pipeline = plgpu.emit_pipeline_warp_specialized(
        mma_step, grid=(k_dim // BK,), memory_registers=40,
        in_specs=[plgpu.BlockSpec((TM, BK), lambda kb: (0, kb), transforms=in_tf,
                                  delay_release=1),
                  plgpu.BlockSpec((TN, BK), lambda kb: (0, kb), transforms=in_tf,
                                  delay_release=1)],
        wg_axis="wg", num_compute_wgs=2, max_concurrent_steps=config.num_stages,
        compute_context=compute_context)

    @pl.when(g >= 0)
    def _():
      pipeline(lhs_ref.at[pl.ds(mi * TM, TM)], w_ref.at[g, pl.ds(n0, TN)])

  out_smem = plgpu.SMEM((2, HM, WN), out_dtype, transforms=_transforms(WN, out_dtype, interpret))
  interp, compiler_params = platform.mosaic_params(interpret=interpret, approx_math=False)
  return plgpu.kernel(
      body,
      out_type=jax.ShapeDtypeStruct((rows, n), out_dtype),
      scratch_types=[out_smem],
      grid=(pl.cdiv(n, TN), rows // TM),
      grid_names=("n", "m"),
      num_threads=3,
      thread_name="wg",
      compiler_params=compiler_params,
      interpret=interp,
  )


def grouped_matmul(lhs, w, tile_expert, *, activation: str = "none", out_dtype=f32,
                   config: Config = PREFILL_CONFIG, interpret: bool = False):
  """act(w[g] · lhs[r]) for rows grouped in whole tiles; lhs [R, K], w [e, n, K] -> [R, n].

  With `config.transposed` the result is returned transposed, [n, R].

  Args:
    lhs: [R, K] bf16 rows, R a multiple of `config.tile_m`; tile t (rows t·tile_m ...) belongs
      to expert `tile_expert[t]`.
    w: [e, n, K] bf16 (out, in), n and K multiples of 64, n >= `config.tile_n`.
    tile_expert: [R / tile_m] int32; -1 marks a tile to skip (its output rows are undefined).
    activation: "none" or "relu2" (applied to the fp32 accumulator).
    out_dtype: output dtype.
    config: tiles and pipeline depth.
    interpret: run on Mosaic GPU's CPU interpreter (tests).
  """
  rows, k_dim = lhs.shape
  e, n, k2 = w.shape
  tm = config.tile_m
  if (k2 != k_dim or rows % tm or tile_expert.shape != (rows // tm,) or n % 64 or k_dim % 64
      or n < config.tile_n):
    raise ValueError(f"grouped_matmul (pallas): expected lhs [R, K] (R a multiple of {tm}, K a "
                     f"multiple of 64), w [e, n, K] (n a multiple of 64, >= {config.tile_n}), "
                     f"tile_expert [R/{tm}]; got {lhs.shape}, {w.shape}, {tile_expert.shape}")
  if activation not in ("none", "relu2"):
    raise ValueError(f"grouped_matmul (pallas): activation must be 'none' or 'relu2', got "
                     f"{activation!r}")
  kernel = platform.shared_kernel(_build_kernel, rows=rows, k_dim=k_dim, n=n, e=e,
                                  activation=activation, out_dtype=jnp.dtype(out_dtype),
                                  config=config, interpret=bool(interpret))
  return kernel(tile_expert.astype(jnp.int32), lhs.astype(jnp.bfloat16), w.astype(jnp.bfloat16))


def num_tiles(num_pairs: int, num_experts: int, tile_m: int) -> int:
  """Static bound on the row tiles: every non-empty group wastes at most tile_m − 1 rows."""
  return math.ceil((num_pairs + min(num_experts, num_pairs) * (tile_m - 1)) / tile_m)


def padded_layout(expert_ids, num_experts: int, tile_m: int):
  """Places the (row, choice) pairs in expert groups padded to whole tiles (module docstring).

  Args:
    expert_ids: [m, k] int, the chosen experts.
    num_experts: e.
    tile_m: rows per tile.

  Returns:
    src [T·tile_m] int32 (token of every padded row; 0 for padding), dest [m·k] int32 (padded
    row of every pair, in row-major (row, choice) order), tile_expert [T] int32 (-1: unused).
  """
  m, k = expert_ids.shape
  P = m * k
  T = num_tiles(P, num_experts, tile_m)
  flat = expert_ids.reshape(-1).astype(jnp.int32)
  order = jnp.argsort(flat, stable=True)
  rank = jnp.zeros((P,), jnp.int32).at[order].set(jnp.arange(P, dtype=jnp.int32))
  sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
  padded = (sizes + tile_m - 1) // tile_m * tile_m
  starts = jnp.cumsum(sizes) - sizes
  ends_p = jnp.cumsum(padded)
  starts_p = ends_p - padded
  dest = starts_p[flat] + rank - starts[flat]
  src = jnp.zeros((T * tile_m,), jnp.int32).at[dest].set(jnp.arange(P, dtype=jnp.int32) // k)
  tile_start = jnp.arange(T, dtype=jnp.int32) * tile_m
  owner = jnp.searchsorted(ends_p, tile_start, side="right").astype(jnp.int32)
  tile_expert = jnp.where(tile_start < ends_p[-1], owner, -1)
  return src, dest, tile_expert


def per_pair(num_rows: int, top_k: int, num_experts: int) -> bool:
  """Whether every (row, expert) pair gets a tile of its own, unsorted (decode).

  At one row the k experts are distinct, so nothing is read twice and the sort, counts and
  scatter of `padded_layout` (a few small XLA kernels, each costing as much as the whole roofline
  of a decode step's experts) are skipped. For a few rows a repeated expert is read once per pair
  (at 5 rows of top-6 of 128: ~9% more bytes), still cheaper than the layout's kernels.
  """
  return num_rows == 1 or num_rows * top_k <= max(8, num_experts // 4)


def pair_layout(expert_ids, tile_m: int):
  """`padded_layout`'s outputs with one tile per pair, in (row, choice) order."""
  m, k = expert_ids.shape
  P = m * k
  src = jnp.repeat(jnp.arange(P, dtype=jnp.int32) // k, tile_m)
  dest = jnp.arange(P, dtype=jnp.int32) * tile_m
  return src, dest, expert_ids.reshape(-1).astype(jnp.int32)


def moe_ffn(x, expert_ids, weights, up, down, *, config: Config | None = None,
            interpret: bool = False):
  """Routed-expert output [m, d] float32; the contract of `reference.moe_ffn_sorted`.

  Args:
    x: [m, d] rows; expert_ids, weights: [m, k]; up [e, f, d], down [e, d, f] bf16.
    config: tiles (None: `default_config` for m·k pairs).
    interpret: run the kernels on Mosaic GPU's CPU interpreter (tests).
  """
  m, k = expert_ids.shape
  e, f, d = up.shape
  config = default_config(m * k, e, min(d, f)) if config is None else config
  if not supports(d=d, f=f, dtype=up.dtype, config=config) or down.dtype != up.dtype:
    raise ValueError(f"moe_ffn (pallas): needs bf16 up/down with d and f multiples of 64 and >= "
                     f"{config.tile_n}; got up {up.shape} {up.dtype}, down {down.dtype}")
  if per_pair(m, k, e):
    src, dest, tile_expert = pair_layout(expert_ids, config.tile_m)
  else:
    src, dest, tile_expert = padded_layout(expert_ids, e, config.tile_m)
  xs = jnp.take(x.astype(up.dtype), src, axis=0)  # [T·tile_m, d]
  h = grouped_matmul(xs, up, tile_expert, activation="relu2", out_dtype=up.dtype, config=config,
                     interpret=interpret)
  h = h.T if config.transposed else h  # [f, T·tile_m] -> rows again (decode: a few KB)
  ys = grouped_matmul(h, down, tile_expert, out_dtype=jnp.dtype(config.down_dtype),
                      config=config, interpret=interpret)
  if config.transposed:
    y = jnp.take(ys, dest, axis=1).T.reshape(m, k, d)
  else:
    y = jnp.take(ys, dest, axis=0).reshape(m, k, d)
  return jnp.einsum("mkd,mk->md", y, weights.astype(f32), preferred_element_type=f32)
