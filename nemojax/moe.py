"""Mixture-of-experts layer ('E') of Nemotron 3: router, routed experts, shared expert, LatentMoE.

For one token x [D] (transformers' `NemotronHMoE`, `NemotronHTopkRouter`, `NemotronHExperts`):

    s      = sigmoid(gate.weight · x)                       # [E], float32 throughout the router
    c      = s + e_score_correction_bias                    # used only to *choose* experts
    groups: with n_group > 1, c is split into n_group groups of E/n_group; a group scores the
            sum of its two best c; experts outside the topk_group best groups get c = -inf
    top    = the k = num_experts_per_tok experts with the largest c
    w_j    = s[top_j]  (/ (Σ_j s[top_j] + 1e-20) if norm_topk_prob)  · routed_scaling_factor
    u      = fc1_latent_proj · x            (LatentMoE; u = x without moe_latent_size)
    r      = Σ_j w_j · down_j · relu(up_j · u)²              # routed experts, relu², no gate
    out    = fc2_latent_proj · r  +  shared_down · relu(shared_up · x)²

The router runs in float32 (weight and bias are kept in float32) so that the choice of experts
does not depend on the activation dtype. The routed experts are stacked per layer in the HF layout
`experts.up_proj` [E, f, L], `experts.down_proj` [E, L, f] and run by `kernels/moe` without
capacity limits: every (token, expert) pair is computed, so results match transformers exactly.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from nemojax import sharding
from nemojax.config import NemotronHConfig
from nemojax.kernels.moe import api as moe_api
from nemojax.layers import MLP, Linear, scaled_out_std

f32 = jnp.float32


class Buffer(nnx.Variable):
  """State read from the checkpoint but not trained (a torch buffer): not an `nnx.Param`."""


class Router(nnx.Module):
  """Sigmoid top-k router with a selection bias and optional grouped top-k."""

  def __init__(self, config: NemotronHConfig, *, rngs: nnx.Rngs):
    e, d = config.n_routed_experts, config.hidden_size
    self.top_k = config.num_experts_per_tok
    self.n_group = config.n_group
    self.topk_group = config.topk_group
    self.norm_topk_prob = config.norm_topk_prob
    self.routed_scaling_factor = float(config.routed_scaling_factor)
    std = config.initializer_range
    self.weight = nnx.Param(std * jax.random.normal(rngs.params(), (e, d), f32))
    self.e_score_correction_bias = Buffer(jnp.zeros((e,), f32))

  def __call__(self, x: jax.Array):
    """x [m, D] -> (weights [m, k] float32, expert ids [m, k] int32)."""
    logits = jnp.einsum("md,ed->me", x.astype(f32), self.weight[...].astype(f32),
                        precision=jax.lax.Precision.HIGHEST)
    scores = jax.nn.sigmoid(logits)
    choice = scores + self.e_score_correction_bias[...].astype(f32)
    if self.n_group > 1:
      m, e = choice.shape
      grouped = choice.reshape(m, self.n_group, e // self.n_group)
      group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)  # [m, n_group]
      _, best_groups = jax.lax.top_k(group_scores, self.topk_group)
      keep = jax.nn.one_hot(best_groups, self.n_group, dtype=jnp.bool_).any(-2)  # [m, n_group]
      keep = jnp.repeat(keep, e // self.n_group, axis=-1)
      choice = jnp.where(keep, choice, -jnp.inf)
    _, ids = jax.lax.top_k(choice, self.top_k)
    weights = jnp.take_along_axis(scores, ids, axis=-1)
    if self.norm_topk_prob:
      weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return weights * self.routed_scaling_factor, ids.astype(jnp.int32)


class Experts(nnx.Module):
  """E routed relu² experts, stacked: up_proj [E, f, L], down_proj [E, L, f] (HF layout)."""

  def __init__(self, config: NemotronHConfig, *, dtype, rngs: nnx.Rngs):
    e, f, width = config.n_routed_experts, config.moe_intermediate_size, config.moe_expert_dim
    std = config.initializer_range
    out_std = scaled_out_std(std, config.num_hidden_layers)
    self.up_proj = nnx.Param(
        (std * jax.random.normal(rngs.params(), (e, f, width), f32)).astype(dtype))
    self.down_proj = nnx.Param(
        (out_std * jax.random.normal(rngs.params(), (e, width, f), f32)).astype(dtype))

  def __call__(self, x, expert_ids, weights, *, implementation: str | None = None):
    """x [m, L] -> Σ_j weights[:, j] · expert_j(x) [m, L] float32."""
    ffn = functools.partial(moe_api.moe_ffn, implementation=implementation)
    return sharding.experts_per_shard(self, ffn, x, expert_ids, weights, self.up_proj[...],
                                      self.down_proj[...])


class MoE(nnx.Module):
  """The 'E' mixer: router + routed experts (optionally in a latent space) + shared expert.

  Args:
    config: the model's hyper-parameters (n_routed_experts, moe_* ...).
    dtype: storage dtype of expert, shared-expert and latent-projection weights; the router's
      weight and bias are float32.
    rngs: random keys for initialisation.
    implementation: routed-expert implementation, see `kernels/moe/api.py` (None: auto).
  """

  def __init__(self, config: NemotronHConfig, *, dtype, rngs: nnx.Rngs,
               implementation: str | None = None):
    self.implementation = implementation
    self.gate = Router(config, rngs=rngs)
    self.experts = Experts(config, dtype=dtype, rngs=rngs)
    out_std = scaled_out_std(config.initializer_range, config.num_hidden_layers)
    self.shared_experts = MLP(config.hidden_size, config.moe_shared_expert_intermediate_size,
                              dtype=dtype, rngs=rngs, out_std=out_std)
    self.latent = config.moe_latent_size is not None
    if self.latent:
      self.fc1_latent_proj = Linear(config.hidden_size, config.moe_latent_size, dtype=dtype,
                                    rngs=rngs, init_std=config.initializer_range)
      self.fc2_latent_proj = Linear(config.moe_latent_size, config.hidden_size, dtype=dtype,
                                    rngs=rngs, init_std=out_std)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x [..., D] -> [..., D] in x.dtype."""
    shape = x.shape
    rows = x.reshape(-1, shape[-1])  # [m, D]
    weights, ids = self.gate(rows)
    u = self.fc1_latent_proj(rows) if self.latent else rows
    routed = self.experts(u, ids, weights, implementation=self.implementation)  # [m, L] f32
    if self.latent:
      routed = self.fc2_latent_proj(routed.astype(x.dtype), out_dtype=f32)
    shared = self._shared(rows)
    return (routed + shared).astype(x.dtype).reshape(shape)

  def _shared(self, rows: jax.Array) -> jax.Array:
    h = self.shared_experts.up_proj(rows, out_dtype=f32)
    h = jnp.square(jax.nn.relu(h)).astype(rows.dtype)
    return self.shared_experts.down_proj(h, out_dtype=f32)


def set_implementation(model: nnx.Module, implementation: str | None) -> None:
  """Selects the routed-expert implementation of every MoE layer of `model` (None: auto)."""
  if implementation is not None and implementation not in moe_api.IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {moe_api.IMPLEMENTATIONS} or None, "
                     f"got {implementation!r}")
  for _, module in nnx.iter_graph(model):
    if isinstance(module, MoE):
      module.implementation = implementation
