"""Grouped-query attention of Nemotron-H, without positional encoding: projections and the cache.

    q = u @ q_projᵀ  [b, t, h, d];  k, v = u @ k_projᵀ, u @ v_projᵀ  [b, kv, t, d]
    o = softmax(q·kᵀ / sqrt(d) + mask) · v;  out = o @ o_projᵀ

Query head i reads KV head i // (h / kv). No RoPE and no QK-norm: order enters only through the
causal mask (and through the Mamba layers). The mask and both algorithms (blocked online softmax
for many queries, loop-free split-K for a decode step), the Pallas flash kernel for prefill
chunks and the rules that choose between them live in `kernels/attention/`; this module projects,
writes the new keys and values into the heads-major cache [b, kv, s, d] and calls
`kernels.attention.attention`.
"""

from __future__ import annotations

import functools

import jax
from einops import rearrange
from flax import nnx

from nemojax import sharding
from nemojax.cache import KVState
from nemojax.config import NemotronHConfig
from nemojax.kernels import attention as attention_kernels
from nemojax.layers import Linear, scaled_out_std

DEFAULT_KEY_BLOCK = attention_kernels.DEFAULT_KEY_BLOCK


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

  def __call__(self, u: jax.Array, *, start: jax.Array | None, pos: jax.Array | int = 0,
               state: KVState | None = None,
               segment_ids: jax.Array | None = None) -> tuple[jax.Array, KVState | None]:
    """u [b, t, D] at cache indices pos..pos+t−1; start [b] first real index per row (None: no
    padding, a full forward only);
    segment_ids [b, t] (full forward only): packed documents, each attends only its own keys.

    With `state`, the new keys/values are written into the cache at `pos` and the queries attend
    over the cache; without, they attend over this call's keys only (a full forward).
    """
    t = u.shape[1]
    q = rearrange(self.q_proj(u), "b t (h d) -> b t h d", d=self.head_dim)
    k = rearrange(self.k_proj(u), "b t (kv d) -> b kv t d", d=self.head_dim)
    v = rearrange(self.v_proj(u), "b t (kv d) -> b kv t d", d=self.head_dim)
    q = sharding.constrain(self, q, "attn_q")  # on a mesh: heads over tensor, batch over data
    k, v = sharding.constrain(self, k, "kv"), sharding.constrain(self, v, "kv")
    if state is None:
      o = attention_kernels.attention(q, k, v, pos, start, key_block=self.key_block,
                                      segment_ids=segment_ids)
      new_state = None
    else:
      k_all = jax.lax.dynamic_update_slice_in_dim(state.k, k.astype(state.k.dtype), pos, axis=2)
      v_all = jax.lax.dynamic_update_slice_in_dim(state.v, v.astype(state.v.dtype), pos, axis=2)
      impl = sharding.kernel_choice(self, self.implementation)
      attend = functools.partial(attention_kernels.attention, implementation=impl,
                                 key_block=self.key_block)
      if impl == "pallas":  # a custom call the partitioner cannot split: run it per shard
        o = sharding.attention_per_shard(self, attend, q, k_all, v_all, pos, start, pos + t)
      else:
        o = attend(q, k_all, v_all, pos, start, pos + t)
      new_state = KVState(k=sharding.constrain(self, k_all, "kv"),
                          v=sharding.constrain(self, v_all, "kv"))
    return self.o_proj(rearrange(o, "b t h d -> b t (h d)")), new_state
