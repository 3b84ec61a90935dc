"""Causal GQA flash attention over a KV cache, as a Pallas kernel for Hopper GPUs (Mosaic GPU).

Legend: b batch, t queries, h query heads, kv key/value heads, s cache positions, d head dim.

The function is `reference.attention`'s for a prefill chunk: queries at cache indices
pos, pos+1, ..., pos+t−1 attend keys j with start[b] ≤ j ≤ their own index (and j < num_keys), in
a cache stored heads-major [b, kv, s, d]. Query head i reads KV head i // (h / kv).

    o = softmax(q·kᵀ / sqrt(d) + mask) · v      (online softmax over key blocks, fp32 state)

One CTA per (query head, batch row, tile of 128 queries). Three warpgroups: WG 0 and 1 compute
(64 query rows each: S = Q·Kᵀ and O += P·V on the tensor cores, bf16 operands, fp32
accumulation; the running max and sum in registers, in log2 units for exp2), WG 2 streams the
key/value blocks with TMA `num_stages` blocks ahead. Only the blocks a tile can see are visited:
from the block holding start[b] to the one holding the tile's last query (the causal diagonal),
so a chunk late in a long prompt reads its whole prefix once and nothing beyond; the loop bounds
are computed on the device, so no host synchronisation happens whatever the position.

Interpret mode (`interpret=True`, CPU tests) runs the same body on Mosaic GPU's interpreter, with
`jnp.dot` standing in for wgmma on the same shared-memory tiles (jax 0.10's interpreter does not
take wgmma), and no swizzle on the shared-memory buffers.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

from nemojax.kernels import platform

f32 = jnp.float32
_ROWS = 64  # wgmma M: query rows per compute warpgroup
_COMPUTE_WGS = 2
_TILE_Q = _ROWS * _COMPUTE_WGS
_SMEM_LIMIT = 227 * 1024
_NEG = -1e30  # finite "minus infinity", as in the XLA path


@dataclasses.dataclass(frozen=True)
class Config:
  """Tuning knobs.

  Attributes:
    block_k: keys per pipeline step (the cache length must be a multiple of it).
    num_stages: key/value blocks in flight.
    compute_registers / memory_registers: registers per thread (setmaxnreg) of the compute and
      the TMA warpgroups.
    approx_math: fast approximate exp2.
  """
  block_k: int = 128
  num_stages: int = 2
  compute_registers: int = 232
  memory_registers: int = 40
  approx_math: bool = True

  def __post_init__(self):
    if self.block_k % 64:
      raise ValueError(f"Config.block_k must be a multiple of 64, got {self.block_k}")
    if self.num_stages < 1:
      raise ValueError(f"Config.num_stages must be >= 1, got {self.num_stages}")


DEFAULT_CONFIG = Config()


def smem_bytes(head_dim: int, config: Config = DEFAULT_CONFIG) -> int:
  """Shared memory one CTA needs (bf16): K and V stages, the query/output tiles, barriers."""
  return 2 * (2 * config.num_stages * config.block_k * head_dim + _TILE_Q * head_dim) + 1024


def supports(*, head_dim: int, cache_len: int, dtype, config: Config = DEFAULT_CONFIG) -> bool:
  """Whether the kernel takes these shapes (the caller falls back to XLA otherwise)."""
  try:
    dtype = jnp.dtype(dtype)
  except TypeError:
    return False
  return (dtype == jnp.dtype(jnp.bfloat16) and head_dim % 64 == 0 and head_dim <= 256
          and cache_len % config.block_k == 0
          and smem_bytes(head_dim, config) <= _SMEM_LIMIT)


def _smem(shape, dtype, interpret):
  if interpret:
    return plgpu.SMEM(shape, dtype)
  elems = 128 // jnp.dtype(dtype).itemsize  # 128-byte swizzle; rows of a multiple of 64 elements
  return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, elems)),
                                              plgpu.SwizzleTransform(128)))


@dataclasses.dataclass(frozen=True)
class _Ops:
  """The few operations that differ between the compiled kernel and the interpreter."""
  interpret: bool

  def iota(self, shape, dim):
    if self.interpret:
      return lax.broadcasted_iota(jnp.int32, shape, dim)
    return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)

  def full(self, shape, value, layout):
    v = jnp.full(shape, value, f32)
    return v if self.interpret else plgpu.layout_cast(v, layout)

  def scores(self, q_ref, k_ref, shape):
    """Q·Kᵀ [rows, keys] in fp32; q and k in shared memory."""
    if self.interpret:
      return jnp.dot(q_ref[...], k_ref[...].T, preferred_element_type=f32)

    def mma(acc_ref):
      plgpu.wgmma(acc_ref, q_ref, plgpu.transpose_ref(k_ref, (1, 0)))
      return acc_ref[...]
    return pl.run_scoped(mma, plgpu.ACC(shape, f32))

  def accumulate(self, acc, p, v_ref):
    """acc + P·V; p in registers (bf16), v in shared memory."""
    if self.interpret:
      return acc + jnp.dot(p, v_ref[...], preferred_element_type=f32)

    def mma(acc_ref):
      plgpu.wgmma(acc_ref, p, v_ref)
    return pl.run_state(mma)(plgpu.ACC.init(acc))


def _build_kernel(*, b, t, h, kv, s, d, dtype, config: Config, interpret: bool):
  # kernel body: the warp-specialised pipeline (TMA warpgroup, two compute warpgroups sharing
  # barriers and shared memory) is one closure; split up, its pieces would only pass refs around.
  BK, S = config.block_k, config.num_stages
  r = h // kv
  ops = _Ops(interpret)
  WG = plgpu.Layout.WGMMA
  ROW = WG.reduce(1)
  scale_log2 = math.log2(math.e) / math.sqrt(d)

  scratch = dict(
      q_s=_smem((_COMPUTE_WGS, _ROWS, d), dtype, interpret),  # queries, then the output tile
      k_s=_smem((S, BK, d), dtype, interpret),
      v_s=_smem((S, BK, d), dtype, interpret),
      q_bar=plgpu.Barrier(num_arrivals=1, num_barriers=_COMPUTE_WGS),
      in_bar=plgpu.Barrier(num_arrivals=2, num_barriers=S),
      free_bar=plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=S),
  )

  def body(q_ref, k_ref, v_ref, start_ref, bounds_ref, o_ref, *, q_s, k_s, v_s, q_bar, in_bar,
           free_bar):
    hi = lax.axis_index("h")
    bi = lax.axis_index("b")
    ti = lax.axis_index("t")
    wg = lax.axis_index("wg")
    kvh = lax.div(hi, jnp.int32(r))
    pos, num_keys, row_start = bounds_ref[0], bounds_ref[1], start_ref[bi]
    tile_pos = pos + ti * _TILE_Q  # cache index of the tile's first query
    # Key blocks this tile can see: from start's block to the one holding its last query.
    lo = lax.div(row_start, jnp.int32(BK))
    end = jnp.minimum(tile_pos + _TILE_Q, num_keys)
    hi_blk = jnp.minimum(lax.div(end + (BK - 1), jnp.int32(BK)), jnp.int32(s // BK))
    n = jnp.maximum(hi_blk - lo, 0)

    def fetch(c, slot):
      keys = pl.ds((lo + c) * BK, BK)
      plgpu.copy_gmem_to_smem(k_ref.at[bi, kvh, keys, :], k_s.at[slot], in_bar.at[slot])
      plgpu.copy_gmem_to_smem(v_ref.at[bi, kvh, keys, :], v_s.at[slot], in_bar.at[slot])

    @pl.when(wg == _COMPUTE_WGS)
    def _memory_wg():
      if not interpret:
        plgpu.set_max_registers(config.memory_registers, action="decrease")
      for c in range(S):
        pl.when(c < n)(functools.partial(fetch, c, c))

      def step(c, carry):
        slot = lax.rem(c, S)
        plgpu.barrier_wait(free_bar.at[slot])
        fetch(c, slot)
        return carry
      lax.fori_loop(S, jnp.maximum(n, S), step, None)
      # Observe the releases of the last blocks too (every completed phase is waited for).
      for k in range(S):
        c = n - S + k

        @pl.when(c >= 0)
        def _():
          plgpu.barrier_wait(free_bar.at[lax.rem(c, S)])

    def compute(w: int):
      if not interpret:
        plgpu.set_max_registers(config.compute_registers, action="increase")
      rows = pl.ds(ti * _TILE_Q + w * _ROWS, _ROWS)
      plgpu.copy_gmem_to_smem(q_ref.at[bi, rows, hi, :], q_s.at[w], q_bar.at[w])
      plgpu.barrier_wait(q_bar.at[w])
      row0 = tile_pos + w * _ROWS  # cache index of this warpgroup's first query

      def block(c, carry):
        acc, m, l = carry
        slot = lax.rem(c, S)
        plgpu.barrier_wait(in_bar.at[slot])
        sc = ops.scores(q_s.at[w], k_s.at[slot], (_ROWS, BK))
        # Index arithmetic in the loop rather than hoisted: two [64, BK] int32 tiles held across
        # it would cost 128 registers per thread.
        q_pos = row0 + ops.iota((_ROWS, BK), 0)
        k_pos = (lo + c) * BK + ops.iota((_ROWS, BK), 1)
        allowed = (k_pos <= q_pos) & (k_pos >= row_start) & (k_pos < num_keys)
        sc = jnp.where(allowed, sc * scale_log2, _NEG)
        m_new = jnp.maximum(m, sc.max(axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(sc - lax.broadcast_in_dim(m_new, sc.shape, [0]))
        l = l * alpha + p.sum(axis=1)
        acc = ops.accumulate(acc * lax.broadcast_in_dim(alpha, acc.shape, [0]),
                             p.astype(dtype), v_s.at[slot])
        plgpu.barrier_arrive(free_bar.at[slot])
        return acc, m_new, l

      init = (ops.full((_ROWS, d), 0.0, WG), ops.full((_ROWS,), _NEG, ROW),
              ops.full((_ROWS,), 0.0, ROW))
      acc, _, l = lax.fori_loop(0, n, block, init)
      l = jnp.where(l > 0.0, l, 1.0)  # no block visited (a tile of padding rows): zeros
      q_s.at[w][...] = (acc / lax.broadcast_in_dim(l, acc.shape, [0])).astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_s.at[w], o_ref.at[bi, rows, hi, :])
      plgpu.wait_smem_to_gmem(0)

    for w in range(_COMPUTE_WGS):
      pl.when(wg == w)(functools.partial(compute, w))

  def entry(*refs):
    return body(*refs[:6], **refs[6])

  interp, compiler_params = platform.mosaic_params(interpret=interpret,
                                                   approx_math=config.approx_math)
  return plgpu.kernel(
      entry,
      out_type=jax.ShapeDtypeStruct((b, t, h, d), dtype),
      scratch_types=[scratch],
      grid=(h, b, t // _TILE_Q),
      grid_names=("h", "b", "t"),
      num_threads=_COMPUTE_WGS + 1,
      thread_name="wg",
      compiler_params=compiler_params,
      interpret=interp,
  )


def attention(q, k, v, pos, start, num_keys, *, config: Config | None = None,
              interpret: bool = False):
  """Causal GQA attention of a chunk of queries over a heads-major KV cache.

  Args:
    q: [b, t, h, d] bf16 queries at cache indices pos .. pos+t−1.
    k, v: [b, kv, s, d] bf16 cache (s a multiple of `config.block_k`), already holding the chunk.
    pos: int32 scalar, cache index of the first query.
    start: [b] int32, each row's first real key (left padding before it is never attended).
    num_keys: int32 scalar, keys written so far (keys at or beyond it are never attended).
    config: tuning knobs.
    interpret: run on Mosaic GPU's CPU interpreter (tests).

  Returns:
    [b, t, h, d] in q.dtype. Rows whose query sits before `start` (padding) hold arbitrary
    finite values, as in the XLA path.
  """
  config = DEFAULT_CONFIG if config is None else config
  b, t, h, d = q.shape
  kv, s = k.shape[1], k.shape[2]
  if k.shape != (b, kv, s, d) or v.shape != k.shape:
    raise ValueError(f"attention (pallas): k and v must be [b, kv, s, d] = {(b, kv, s, d)}, "
                     f"got {k.shape} and {v.shape}")
  if h % kv:
    raise ValueError(f"attention (pallas): {h} query heads are not a multiple of {kv} kv heads")
  if not supports(head_dim=d, cache_len=s, dtype=q.dtype, config=config):
    raise ValueError(f"attention (pallas): unsupported head_dim={d}, cache length {s} (a multiple "
                     f"of {config.block_k} is needed) or dtype {q.dtype} (bf16)")
  pad = (-t) % _TILE_Q
  qp = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))) if pad else q
  bounds = jnp.stack([jnp.asarray(pos, jnp.int32), jnp.asarray(num_keys, jnp.int32)])
  kernel = platform.shared_kernel(_build_kernel, b=b, t=t + pad, h=h, kv=kv, s=s, d=d,
                                  dtype=jnp.dtype(q.dtype), config=config,
                                  interpret=bool(interpret))
  out = kernel(qp, k.astype(q.dtype), v.astype(q.dtype), jnp.asarray(start, jnp.int32), bounds)
  return out[:, :t] if pad else out
