"""Grouped-query attention of Nemotron-H, without positional encoding, for prefill and decode.

    q = u @ q_projᵀ  [b, t, H, d];  k, v = u @ k_projᵀ, u @ v_projᵀ  [b, t, kv, d]
    o = softmax(q·kᵀ / sqrt(d) + mask) · v;  out = o @ o_projᵀ

Query head i reads KV head i // (H / kv). No RoPE and no QK-norm: order enters only through the
causal mask (and through the Mamba layers). The mask of query position i (absolute cache index)
and key position j of row b allows j ≤ i and j ≥ start[b] (left pads are never attended).

Keys are processed in blocks with an online softmax, so memory is bounded by
[b, H, t, block] scores rather than [b, H, t, s]; with a cache only the blocks up to the last
written position are visited (a decode step at context L reads L keys, not the whole cache).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from nemojax.cache import KVState
from nemojax.config import NemotronHConfig
from nemojax.layers import Linear, scaled_out_std

f32 = jnp.float32
_NEG = -1e30  # finite "minus infinity": fully masked rows stay finite instead of NaN
DEFAULT_KEY_BLOCK = 1024


def _block_update(carry, q, k_blk, v_blk, allowed, scale):
  """One online-softmax step. q [b,t,kv,r,d]; k/v_blk [b,s,kv,d]; allowed [b,t,s]."""
  m, l, acc = carry  # [b,kv,r,t], [b,kv,r,t], [b,kv,r,t,d]
  s = jnp.einsum("btkrd,bskd->bkrts", q, k_blk, preferred_element_type=f32) * scale
  s = jnp.where(allowed[:, None, None], s, _NEG)
  m_new = jnp.maximum(m, s.max(-1))
  p = jnp.exp(s - m_new[..., None])
  correction = jnp.exp(m - m_new)
  l = l * correction + p.sum(-1)
  acc = acc * correction[..., None] + jnp.einsum(
      "bkrts,bskd->bkrtd", p.astype(v_blk.dtype), v_blk, preferred_element_type=f32)
  return m_new, l, acc


@functools.partial(jax.jit, static_argnames=("key_block",))
def attend(q, k, v, q_pos, start, *, num_keys=None, key_block: int = DEFAULT_KEY_BLOCK):
  """Causal GQA attention with left-pad masking.

  Args:
    q: [b, t, H, d] queries; k, v: [b, s, kv, d] keys and values.
    q_pos: [t] int32 absolute index of each query (shared by all rows).
    start: [b] int32 index of each row's first real key.
    num_keys: None (static: all s keys may be needed) or a traced int32 count of keys that can
      be attended at all (the rest are skipped, not just masked).
    key_block: keys per online-softmax block.
  Returns:
    [b, t, H, d] in q.dtype.
  """
  b, t, nh, d = q.shape
  s, kv = k.shape[1], k.shape[2]
  r = nh // kv
  scale = 1.0 / (d ** 0.5)
  qg = q.reshape(b, t, kv, r, d)
  carry = (jnp.full((b, kv, r, t), _NEG, f32), jnp.zeros((b, kv, r, t), f32),
           jnp.zeros((b, kv, r, t, d), f32))

  def mask(k_idx):  # k_idx [blk] -> [b, t, blk]
    return ((k_idx[None, None, :] <= q_pos[None, :, None])
            & (k_idx[None, None, :] >= start[:, None, None]))

  blk = min(key_block, s)
  if blk == s:
    m, l, acc = _block_update(carry, qg, k, v, mask(jnp.arange(s)), scale)
  else:
    n_blocks = -(-s // blk)

    def body(i, carry):
      # The last block is shifted back to stay in bounds; keys it re-visits are masked out.
      lo = jnp.minimum(i * blk, s - blk)
      k_idx = lo + jnp.arange(blk)
      allowed = mask(k_idx) & (k_idx >= i * blk)[None, None, :]
      k_blk = jax.lax.dynamic_slice_in_dim(k, lo, blk, axis=1)
      v_blk = jax.lax.dynamic_slice_in_dim(v, lo, blk, axis=1)
      return _block_update(carry, qg, k_blk, v_blk, allowed, scale)

    if num_keys is None:
      m, l, acc = jax.lax.fori_loop(0, n_blocks, body, carry)
    else:
      upper = jnp.minimum((num_keys + blk - 1) // blk, n_blocks)
      m, l, acc = jax.lax.fori_loop(0, upper, body, carry)
  out = acc / l[..., None]  # [b, kv, r, t, d]
  return jnp.moveaxis(out.reshape(b, nh, t, d), 2, 1).astype(q.dtype)


def _next_pow2(x: int) -> int:
  return 1 << max(0, (x - 1).bit_length())


class Attention(nnx.Module):
  """GQA attention block; attribute names follow the HF checkpoint (`mixer.q_proj.weight`, ...)."""

  def __init__(self, config: NemotronHConfig, *, dtype, rngs: nnx.Rngs,
               key_block: int = DEFAULT_KEY_BLOCK):
    c = config
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
    k = self.k_proj(u).reshape(b, t, self.num_kv_heads, self.head_dim)
    v = self.v_proj(u).reshape(b, t, self.num_kv_heads, self.head_dim)
    q_pos = pos + jnp.arange(t, dtype=jnp.int32)
    if state is None:
      o = attend(q, k, v, q_pos, start, key_block=self.key_block)
      new_state = None
    else:
      k_all = jax.lax.dynamic_update_slice_in_dim(state.k, k.astype(state.k.dtype), pos, axis=1)
      v_all = jax.lax.dynamic_update_slice_in_dim(state.v, v.astype(state.v.dtype), pos, axis=1)
      # A decode step has one query: larger key blocks keep the loop to at most ~16 trips.
      block = self.key_block if t > 1 else max(self.key_block, _next_pow2(k_all.shape[1] // 16))
      o = attend(q, k_all, v_all, q_pos, start, num_keys=pos + t, key_block=block)
      new_state = KVState(k=k_all, v=v_all)
    return self.o_proj(o.reshape(b, t, self.num_heads * self.head_dim)), new_state
