"""The decode state of a Nemotron-H model, as a pytree the model takes and returns.

Per Mamba layer: the last K−1 raw `xBC` columns for the causal conv [b, K−1, conv_dim] (activation
dtype) and the SSM state [b, h, p, n] in float32 (bf16 state loses small updates over long decodes;
NVIDIA requires `mamba_ssm_cache_dtype=float32`). Per attention layer: raw K and V
[b, kv, s_max, hd] (heads-major, so that attention reads each head's keys contiguously). MLP
layers keep nothing.

Rows are left-padded: every row writes its next token at the same cache index `pos`; `start[b]`
is the index of row b's first real token, so row b holds `pos − start[b]` valid tokens. Pads never
reach the Mamba states (their inputs are zeroed) and attention masks keys before `start`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct

from nemojax.config import LayerType, NemotronHConfig


@struct.dataclass
class MambaState:
  conv: jax.Array  # [b, K-1, conv_dim], activation dtype
  ssm: jax.Array  # [b, h, p, n], float32


@struct.dataclass
class KVState:
  k: jax.Array  # [b, kv, s_max, hd]
  v: jax.Array  # [b, kv, s_max, hd]


LayerState = MambaState | KVState | None


@struct.dataclass
class Cache:
  """Decode state for every layer plus the shared write index and per-row starts."""

  layers: tuple  # one LayerState per layer (None for MLP layers)
  pos: jax.Array  # [] int32: next cache index to write (same for every row)
  start: jax.Array  # [b] int32: index of each row's first real token

  @property
  def batch_size(self) -> int:
    return self.start.shape[0]

  @property
  def max_len(self) -> int:
    for layer in self.layers:
      if isinstance(layer, KVState):
        return layer.k.shape[2]
    return -1  # no attention layer: unbounded

  @property
  def lengths(self) -> jax.Array:
    """[b] number of valid tokens per row."""
    return self.pos - self.start


def init_cache(config: NemotronHConfig, batch_size: int, max_len: int, dtype=jnp.bfloat16) -> Cache:
  """An empty cache for `batch_size` rows of at most `max_len` positions (pads included)."""
  if batch_size < 1:
    raise ValueError(f"init_cache: batch_size must be >= 1, got {batch_size}")
  if max_len < 1:
    raise ValueError(f"init_cache: max_len must be >= 1, got {max_len}")
  # One compiled program per shape instead of ~60 eager `zeros` dispatches per call.
  return _zeros(config, int(batch_size), int(max_len), jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _zeros(config: NemotronHConfig, batch_size: int, max_len: int, dtype) -> Cache:
  layers = []
  for t in config.layer_types:
    if t is LayerType.MAMBA:
      layers.append(MambaState(
          conv=jnp.zeros((batch_size, config.conv_kernel - 1, config.conv_dim), dtype),
          ssm=jnp.zeros((batch_size, config.mamba_num_heads, config.mamba_head_dim,
                         config.ssm_state_size), jnp.float32)))
    elif t is LayerType.ATTENTION:
      shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
      layers.append(KVState(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype)))
    else:
      layers.append(None)
  return Cache(layers=tuple(layers), pos=jnp.zeros((), jnp.int32),
               start=jnp.zeros((batch_size,), jnp.int32))


def cache_bytes(config: NemotronHConfig, batch_size: int, max_len: int, dtype=jnp.bfloat16) -> int:
  """Device bytes of a cache, without allocating it."""
  shapes = jax.eval_shape(lambda: init_cache(config, batch_size, max_len, dtype))
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))
