"""Grouped-query attention of Nemotron-H, without positional encoding, for prefill and decode.

    q = u @ q_projᵀ  [b, t, H, d];  k, v = u @ k_projᵀ, u @ v_projᵀ  [b, kv, t, d]
    o = softmax(q·kᵀ / sqrt(d) + mask) · v;  out = o @ o_projᵀ

Query head i reads KV head i // (H / kv). No RoPE and no QK-norm: order enters only through the
causal mask (and through the Mamba layers). The mask of query position i (absolute cache index)
and key position j of row b allows j ≤ i and j ≥ start[b] (left pads are never attended).

Keys and values are stored heads-major, [b, kv, s, d], so that every product below is a plain
batched matmul over (b, kv) with no transposed copy of the cache.

Two schedules:
- Many queries (full forward, prefill chunks): keys in blocks with an online softmax, so memory
  is bounded by [b, H, t, block] scores rather than [b, H, t, s]; with a cache only the blocks up
  to the last written position are visited.
- Few queries (a decode step): one pass over the whole cache, split into blocks that are reduced
  in parallel and merged by their log-sum-exp ("split-K"). No loop, hence no device-to-host
  synchronisation inside the step; the cost is proportional to the cache size, which the
  sampler sizes to the request.

A prefill chunk of more than `MAX_SPLIT_QUERIES` queries over a cache runs the Pallas flash
kernel instead on Hopper-or-newer GPUs (`kernels/attention/`, inference only); the two schedules
above are the XLA path and the kernel's specification.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from nemojax.cache import KVState
from nemojax.config import NemotronHConfig
from nemojax.kernels.attention import api as attention_api
from nemojax.layers import Linear, scaled_out_std

f32 = jnp.float32
_NEG = -1e30  # finite "minus infinity": fully masked rows stay finite instead of NaN
DEFAULT_KEY_BLOCK = 1024
MAX_SPLIT_QUERIES = 16  # up to this many queries per call use the loop-free split-K schedule


def _mask(k_idx, q_pos, start):
  """[b, 1, t, s] allowed (key index k_idx [s], query index q_pos [t], row start [b])."""
  return ((k_idx[None, None, None, :] <= q_pos[None, None, :, None])
          & (k_idx[None, None, None, :] >= start[:, None, None, None]))


def _block_update(carry, q, k_blk, v_blk, allowed, scale):
  """One online-softmax step. q [b,kv,m,d] (m = r·t); k/v_blk [b,kv,s,d]; allowed [b,1,m,s]."""
  m, l, acc = carry  # [b,kv,m], [b,kv,m], [b,kv,m,d]
  s = jnp.einsum("bkmd,bksd->bkms", q, k_blk, preferred_element_type=f32) * scale
  s = jnp.where(allowed, s, _NEG)
  m_new = jnp.maximum(m, s.max(-1))
  p = jnp.exp(s - m_new[..., None])
  correction = jnp.exp(m - m_new)
  l = l * correction + p.sum(-1)
  acc = acc * correction[..., None] + jnp.einsum(
      "bkms,bksd->bkmd", p.astype(v_blk.dtype), v_blk, preferred_element_type=f32)
  return m_new, l, acc


def _split_size(s: int, target_blocks: int = 32, min_block: int = 128) -> int:
  """Block length for split-K: the largest divisor of s not above max(s // target, min_block)."""
  cap = max(s // target_blocks, min_block)
  if s <= cap:
    return s
  blk = next(n for n in range(cap, 0, -1) if s % n == 0)
  return blk if blk >= 64 else s  # an awkward length: one block (correct, less parallel)


def _attend_split(q, k, v, q_pos, start, scale):
  """Loop-free attention over all s keys. q [b,kv,m,d]; k/v [b,kv,s,d]; q_pos [m]; start [b]."""
  b, kv, m, d = q.shape
  s = k.shape[2]
  blk = _split_size(s)
  nb = s // blk
  k_idx = jnp.arange(s).reshape(nb, blk)
  allowed = ((k_idx[None, None, :, None, :] <= q_pos[None, None, None, :, None])
             & (k_idx[None, None, :, None, :] >= start[:, None, None, None, None]))
  # Block index n is a batch dimension of both products (kept ahead of m and s, which XLA's CPU
  # dot requires for bf16 × bf16 -> f32).
  scores = jnp.einsum("bkmd,bknsd->bknms", q, k.reshape(b, kv, nb, blk, d),
                      preferred_element_type=f32) * scale
  scores = jnp.where(allowed, scores, _NEG)
  m_blk = scores.max(-1)  # [b, kv, nb, m]
  p = jnp.exp(scores - m_blk[..., None])
  l_blk = p.sum(-1)
  acc = jnp.einsum("bknms,bknsd->bknmd", p.astype(v.dtype), v.reshape(b, kv, nb, blk, d),
                   preferred_element_type=f32)
  m_all = m_blk.max(2, keepdims=True)
  w = jnp.exp(m_blk - m_all)  # [b, kv, nb, m]
  return (acc * w[..., None]).sum(2) / (l_blk * w).sum(2)[..., None]  # [b, kv, m, d]


@functools.partial(jax.jit, static_argnames=("key_block",))
def attend(q, k, v, q_pos, start, *, num_keys=None, key_block: int = DEFAULT_KEY_BLOCK):
  """Causal GQA attention with left-pad masking.

  Args:
    q: [b, t, H, d] queries; k, v: [b, kv, s, d] keys and values (heads-major).
    q_pos: [t] int32 absolute index of each query (shared by all rows).
    start: [b] int32 index of each row's first real key.
    num_keys: None (static: all s keys may be needed) or a traced int32 count of keys that can
      be attended at all; the blocked schedule skips the rest (the split schedule masks them).
    key_block: keys per online-softmax block.
  Returns:
    [b, t, H, d] in q.dtype.
  """
  b, t, nh, d = q.shape
  kv, s = k.shape[1], k.shape[2]
  r = nh // kv
  scale = 1.0 / (d ** 0.5)
  # Rows of one KV head: its r query heads × t positions, m = r·t.
  qg = jnp.moveaxis(q.reshape(b, t, kv, r, d), 1, 3).reshape(b, kv, r * t, d)
  q_pos_m = jnp.tile(q_pos, r)  # [m]: position of each row of qg

  blk = min(key_block, s)
  if t <= MAX_SPLIT_QUERIES or blk == s:
    out = _attend_split(qg, k, v, q_pos_m, start, scale)
  else:
    n_blocks = -(-s // blk)
    carry = (jnp.full((b, kv, r * t), _NEG, f32), jnp.zeros((b, kv, r * t), f32),
             jnp.zeros((b, kv, r * t, d), f32))

    def body(i, carry):
      # The last block is shifted back to stay in bounds; keys it re-visits are masked out.
      lo = jnp.minimum(i * blk, s - blk)
      k_idx = lo + jnp.arange(blk)
      allowed = _mask(k_idx, q_pos_m, start) & (k_idx >= i * blk)
      k_blk = jax.lax.dynamic_slice_in_dim(k, lo, blk, axis=2)
      v_blk = jax.lax.dynamic_slice_in_dim(v, lo, blk, axis=2)
      return _block_update(carry, qg, k_blk, v_blk, allowed, scale)

    upper = n_blocks if num_keys is None else jnp.minimum((num_keys + blk - 1) // blk, n_blocks)
    m, l, acc = jax.lax.fori_loop(0, upper, body, carry)
    out = acc / l[..., None]
  out = jnp.moveaxis(out.reshape(b, kv, r, t, d), 3, 1)  # [b, t, kv, r, d]
  return out.reshape(b, t, nh, d).astype(q.dtype)


class Attention(nnx.Module):
  """GQA attention block; attribute names follow the HF checkpoint (`mixer.q_proj.weight`, ...)."""

  def __init__(self, config: NemotronHConfig, *, dtype, rngs: nnx.Rngs,
               key_block: int = DEFAULT_KEY_BLOCK, implementation: str | None = None):
    c = config
    self.implementation = implementation  # prefill over a cache; see kernels/attention/api.py
    self.num_heads = c.num_attention_heads
    self.num_kv_heads = c.num_key_value_heads
    self.head_dim = c.head_dim
    self.key_block = key_block
    std = c.initializer_range
    self.q_proj = Linear(c.hidden_size, c.num_attention_heads * c.head_dim, dtype=dtype, rngs=rngs,
                         init_std=std)
    self.k_proj = Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, dtype=dtype, rngs=rngs,
                         init_std=std)
    self.v_proj = Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, dtype=dtype, rngs=rngs,
                         init_std=std)
    self.o_proj = Linear(c.num_attention_heads * c.head_dim, c.hidden_size, dtype=dtype, rngs=rngs,
                         init_std=scaled_out_std(std, c.num_hidden_layers))

  def __call__(self, u: jax.Array, *, start: jax.Array, pos: jax.Array | int = 0,
               state: KVState | None = None) -> tuple[jax.Array, KVState | None]:
    """u [b, t, D] at cache indices pos..pos+t−1; start [b] first real index per row.

    With `state`, the new keys/values are written into the cache at `pos` and the queries attend
    over the cache; without, they attend over this call's keys only (a full forward).
    """
    b, t, _ = u.shape
    q = self.q_proj(u).reshape(b, t, self.num_heads, self.head_dim)
    heads_major = lambda x: jnp.swapaxes(x.reshape(b, t, self.num_kv_heads, self.head_dim), 1, 2)
    k = heads_major(self.k_proj(u))  # [b, kv, t, d]
    v = heads_major(self.v_proj(u))
    q_pos = pos + jnp.arange(t, dtype=jnp.int32)
    if state is None:
      o = attend(q, k, v, q_pos, start, key_block=self.key_block)
      new_state = None
    else:
      k_all = jax.lax.dynamic_update_slice_in_dim(state.k, k.astype(state.k.dtype), pos, axis=2)
      v_all = jax.lax.dynamic_update_slice_in_dim(state.v, v.astype(state.v.dtype), pos, axis=2)
      impl = "xla" if t <= MAX_SPLIT_QUERIES else attention_api.resolve_implementation(
          self.implementation, head_dim=self.head_dim, cache_len=k_all.shape[2], dtype=q.dtype)
      if impl == "pallas":  # a prefill chunk: the flash kernel (inference only, no gradient)
        o = attention_api.prefill_attention(q, k_all, v_all, pos, start, pos + t)
      else:
        o = attend(q, k_all, v_all, q_pos, start, num_keys=pos + t, key_block=self.key_block)
      new_state = KVState(k=k_all, v=v_all)
    return self.o_proj(o.reshape(b, t, self.num_heads * self.head_dim)), new_state
