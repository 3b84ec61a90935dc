"""The Nemotron-H language model: embeddings, a hybrid stack of blocks, final norm, LM head.

    x = embeddings[ids]                               # no scaling, no positional encoding
    for each block l:  x = x + mixer_l(rmsnorm_l(x))  # mixer: Mamba-2, attention or relu² MLP
    logits = rmsnorm_f(x) @ lm_headᵀ                  # float32, untied head

The module tree mirrors the HF checkpoint names, so `backbone.layers.3.mixer.in_proj.weight` in a
safetensors file is `model.backbone.layers[3].mixer.in_proj.weight` here.

Calling conventions (functional cache, DESIGN point 6):
  model(ids)                         -> logits [b, t, V] float32 (full forward)
  model(ids, segment_ids=seg)        -> the same for packed rows: each document (a run of equal
                                        ids in seg [b, t]) sees only itself (XLA kernels)
  model(ids, cache=cache)            -> (logits, new_cache): consumes ids at cache.pos
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from nemojax import jit, sharding
from nemojax.attention import Attention
from nemojax.cache import Cache, init_cache
from nemojax.config import LayerType, NemotronHConfig
from nemojax.layers import MLP, Embedding, Linear, RMSNorm, scaled_out_std
from nemojax.mamba2 import Mamba2Mixer
from nemojax.moe import MoE

f32 = jnp.float32


class Block(nnx.Module):
  """Pre-norm residual block around one mixer."""

  def __init__(self, config: NemotronHConfig, layer_type: LayerType, *, dtype, rngs: nnx.Rngs,
               ssd_implementation: str | None = None):
    self.layer_type = layer_type
    self.norm = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
    if layer_type is LayerType.MAMBA:
      self.mixer = Mamba2Mixer(config, dtype=dtype, rngs=rngs,
                               ssd_implementation=ssd_implementation)
    elif layer_type is LayerType.ATTENTION:
      self.mixer = Attention(config, dtype=dtype, rngs=rngs)
    elif layer_type is LayerType.MOE:  # stateless like the MLP: called by the `else` below
      self.mixer = MoE(config, dtype=dtype, rngs=rngs)
    else:
      self.mixer = MLP(config.hidden_size, config.intermediate_size, dtype=dtype, rngs=rngs,
                       out_std=scaled_out_std(config.initializer_range, config.num_hidden_layers))

  def __call__(self, x, *, state, start, pos, valid, segment_ids=None):
    h = self.norm(x)
    if self.layer_type is LayerType.MAMBA:
      h, state = self.mixer(h, state=state, valid=valid, segment_ids=segment_ids)
    elif self.layer_type is LayerType.ATTENTION:
      h, state = self.mixer(h, start=start, pos=pos, state=state, segment_ids=segment_ids)
    else:
      h = self.mixer(h)
    return (x.astype(f32) + h.astype(f32)).astype(x.dtype), state


class Backbone(nnx.Module):
  def __init__(self, config: NemotronHConfig, *, dtype, rngs: nnx.Rngs,
               ssd_implementation: str | None = None):
    self.embeddings = Embedding(config.vocab_size, config.hidden_size, dtype=dtype, rngs=rngs,
                                init_std=config.initializer_range)
    self.layers = nnx.List([
        Block(config, t, dtype=dtype, rngs=rngs, ssd_implementation=ssd_implementation)
        for t in config.layer_types])
    self.norm_f = RMSNorm(config.hidden_size, config.layer_norm_epsilon)


class NemotronH(nnx.Module):
  """Nemotron-H causal language model (HF `NemotronHForCausalLM`).

  Args:
    config: the model's hyper-parameters.
    dtype: storage dtype of matmul weights and of activations (bf16 for use, fp32 to verify).
      Norm scales, A_log, D, dt_bias, the SSM math and logits are always float32.
    rngs: random keys for initialisation.
    ssd_implementation: None (auto), "xla", "pallas" or "naive"; see `kernels/ssd/api.py`.
  """

  def __init__(self, config: NemotronHConfig, *, dtype=jnp.bfloat16, rngs: nnx.Rngs | None = None,
               ssd_implementation: str | None = None):
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    self.config = config
    self.dtype = jnp.dtype(dtype)
    self.backbone = Backbone(config, dtype=dtype, rngs=rngs, ssd_implementation=ssd_implementation)
    self.lm_head = Linear(config.hidden_size, config.vocab_size, dtype=dtype, rngs=rngs,
                          init_std=config.initializer_range)

  # ----------------------------------------------------------------------------------------------
  def hidden_states(self, input_ids: jax.Array, *, cache: Cache | None = None,
                    start: jax.Array | None = None, remat=None,
                    segment_ids: jax.Array | None = None):
    """Final-normed hidden states [b, t, D] (and the new cache when `cache` is given).

    Without a cache, `start` [b] optionally marks left padding (row b's first real token) and
    `segment_ids` [b, t] packed documents: a new document starts wherever the id changes, and
    none sees another (the conv, the SSD and attention restart; attention runs XLA, the SSD
    either path, see `kernels/segments.py`).
    `remat`, a `jax.checkpoint` policy, runs every block under `jax.checkpoint` with it, so a
    backward pass keeps only what the policy saves and recomputes the rest block by block.
    """
    input_ids = jnp.asarray(input_ids)
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids must be [batch, time], got shape {input_ids.shape}")
    b, t = input_ids.shape
    if segment_ids is not None:
      segment_ids = jnp.asarray(segment_ids)
      if cache is not None or segment_ids.shape != (b, t):
        raise ValueError(f"segment_ids must be [batch, time] = {(b, t)} without a cache, got "
                         f"shape {segment_ids.shape}"
                         + (" with a cache" if cache is not None else ""))
    # Without a cache or `start` no row is padded: the blocks then skip every padding mask, and
    # attention may run cuDNN (`start=None` below).
    any_pad = cache is not None or start is not None
    if cache is not None:
      if cache.batch_size != b:
        raise ValueError(f"input_ids has batch {b} but the cache was made for {cache.batch_size}")
      start, pos = cache.start, cache.pos
    else:
      start = jnp.zeros((b,), jnp.int32) if start is None else jnp.asarray(start, jnp.int32)
      pos = jnp.zeros((), jnp.int32)
    positions = pos + jnp.arange(t, dtype=jnp.int32)
    valid = positions[None, :] >= start[:, None]  # [b, t]
    x = sharding.constrain(self, self.backbone.embeddings(input_ids).astype(self.dtype),
                           "residual")
    new_layers = []
    for i, block in enumerate(self.backbone.layers):
      state = None if cache is None else cache.layers[i]
      args = dict(state=state, start=start if any_pad else None, pos=pos,
                  valid=valid if any_pad else None, segment_ids=segment_ids)
      x, state = block(x, **args) if remat is None else _remat_block(block, remat, x, args)
      # Block boundary: batch over data, the residual stream whole on every tensor shard.
      x = sharding.constrain(self, x, "residual")
      new_layers.append(state)
    x = self.backbone.norm_f(x)
    if cache is None:
      return x
    return x, Cache(layers=tuple(new_layers), pos=pos + t, start=start)

  def logits(self, hidden: jax.Array) -> jax.Array:
    return sharding.constrain(self, self.lm_head(hidden, out_dtype=f32), "logits")

  def __call__(self, input_ids: jax.Array, *, cache: Cache | None = None,
               start: jax.Array | None = None, segment_ids: jax.Array | None = None):
    """Logits [b, t, V] float32; with a cache, (logits, new_cache). `segment_ids` [b, t]: packed
    documents (full forward only; see `hidden_states`).

    Compiled as one program (inlined when already inside a jit or other transform), so that
    calling the model eagerly does not compile hundreds of small ops one at a time.
    """
    graph, state = jit.split(self)
    return _forward(graph, state, jnp.asarray(input_ids), cache, start, segment_ids)

  def init_cache(self, batch_size: int, max_len: int) -> Cache:
    """An empty decode state for `batch_size` rows and `max_len` cache positions (created in its
    shards when the model is sharded)."""
    layout = sharding.layout_of(self)
    if layout is not None:
      return layout.init_cache(self.config, batch_size, max_len, self.dtype)
    return init_cache(self.config, batch_size, max_len, dtype=self.dtype)

  def set_attention_implementation(self, implementation: str | None) -> None:
    """Selects prefill attention over the cache (None: auto, "xla", "pallas");
    see `kernels/attention/api.py`. Decode steps and the full forward always use XLA."""
    for block in self.backbone.layers:
      if block.layer_type is LayerType.ATTENTION:
        block.mixer.implementation = implementation

  def set_ssd_implementation(self, implementation: str | None) -> None:
    """Selects the SSD scan for every Mamba layer (None: auto, "xla", "pallas", "naive")."""
    for block in self.backbone.layers:
      if block.layer_type is LayerType.MAMBA:
        block.mixer.ssd_implementation = implementation


def _forward_fn(graph: jit.Graph, state, input_ids, cache, start, segment_ids=None):
  # Pure function of the split model: no state flows back, so it composes with any outer
  # transform (jax.jit closing over the model, nnx.grad, ...).
  model = graph.merge(state)
  if cache is None:
    return model.logits(model.hidden_states(input_ids, start=start, segment_ids=segment_ids))
  h, cache = model.hidden_states(input_ids, cache=cache, segment_ids=segment_ids)
  return model.logits(h), cache


def _forward_specs(layout, state, input_ids, cache, start, segment_ids=None):
  # PartitionSpecs of the outputs when the model is sharded over an Explicit mesh.
  vocab = jax.tree.leaves(state["lm_head"])[0].shape[0]
  logits = layout.activation_spec("logits", (*input_ids.shape, vocab))
  return logits if cache is None else (logits, layout.cache_specs(cache))


_forward = jit.jit(_forward_fn, out_specs=_forward_specs)


def _remat_block(block: Block, policy, x, args):
  # Blocks are pure functions of their parameters (no state written back), so a plain
  # jax.checkpoint of split-and-merge does it. nnx.remat (flax 0.12.8) raises TraceContextError
  # ("Cannot mutate Param from a different trace level") on a LoRA model's frozen base.
  graphdef, params = nnx.split(block)
  run = lambda params, x, args: nnx.merge(graphdef, params)(x, **args)
  return jax.checkpoint(run, policy=policy)(params, x, args)


def count_params(model_or_state) -> int:
  state = nnx.state(model_or_state, nnx.Param) if isinstance(model_or_state, nnx.Module) \
      else model_or_state
  return sum(x.size for x in jax.tree.leaves(state))
