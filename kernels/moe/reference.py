"""Routed-expert feed-forward of a mixture-of-experts layer, in pure JAX (the specification).

For tokens x [m, d], each with k chosen experts e[m, k] and combine weights w[m, k] (float32), and
stacked expert weights in the Hugging Face layout up [E, f, d], down [E, d, f] (out, in):

    y[m] = Σ_j w[m, j] · down[e[m, j]] · relu(up[e[m, j]] · x[m])²        (float32)

Every chosen (token, expert) pair is computed: no capacity, no dropped tokens, so the result
equals the per-expert loop of transformers' `NemotronHExperts` up to summation order.

Three same-signature implementations:
  `moe_ffn_sorted`  sort the m·k (token, expert) rows by expert, one grouped matmul per weight
                    (`jax.lax.ragged_dot_general`: each expert's weights are read once), un-sort,
                    weight and sum. The reference path for prefill.
  `moe_ffn_gather`  gather the chosen experts' weights per row and do a batched matmul: reads only
                    the m·k chosen matrices, the right shape for decode (m·k < E).
  `moe_ffn_dense`   every expert on every token, masked: the oracle for tests (E times the work).

Matmuls take operands in the weights' dtype with float32 accumulation; relu² is computed in
float32 and cast back to the weights' dtype before the down projection (as a bf16 model does).
Legend: m rows (tokens), k chosen experts per row, e experts, d expert input width (hidden or
latent), f expert width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

f32 = jnp.float32

# lhs [m, d] · rhs [e, f, d] -> [m, f]: contract lhs dim 1 with rhs dim 2; rows of lhs are grouped
# (ragged) along dim 0, and rhs dim 0 selects the group's matrix.
_RAGGED_DIMS = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([1], [2]), ([], [])),
    lhs_ragged_dimensions=[0],
    rhs_group_dimensions=[0],
)


def relu2(h: jax.Array) -> jax.Array:
  """Squared ReLU in float32."""
  return jnp.square(jax.nn.relu(h.astype(f32)))


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
  """out[i] = rhs[g(i)] · lhs[i] for rows sorted by group; lhs [m, d], rhs [e, f, d] -> [m, f] f32.

  `group_sizes` [e] int32 counts the consecutive rows of each group and sums to m.
  """
  return jax.lax.ragged_dot_general(lhs.astype(rhs.dtype), rhs, group_sizes.astype(jnp.int32),
                                    _RAGGED_DIMS, preferred_element_type=f32)


def sort_by_expert(expert_ids: jax.Array, num_experts: int):
  """Orders the flattened (row, choice) pairs by expert.

  Args:
    expert_ids: [m, k] int, the chosen experts.
    num_experts: e.

  Returns:
    order [m·k]: flat pair indices sorted by expert (stable, so rows stay in order within an
    expert); group_sizes [e] int32: pairs per expert.
  """
  flat = expert_ids.reshape(-1).astype(jnp.int32)
  order = jnp.argsort(flat, stable=True)
  group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
  return order, group_sizes


def moe_ffn_sorted(x, expert_ids, weights, up, down):
  """Sort-by-expert + grouped matmul. x [m, d]; expert_ids, weights [m, k]; -> [m, d] float32."""
  m, k = expert_ids.shape
  order, group_sizes = sort_by_expert(expert_ids, up.shape[0])
  xs = jnp.take(x, order // k, axis=0)  # [m·k, d], rows grouped by expert
  h = relu2(grouped_matmul(xs, up, group_sizes)).astype(down.dtype)  # [m·k, f]
  ys = grouped_matmul(h, down, group_sizes)  # [m·k, d] f32
  # Back to (row, choice) order with a gather through the inverse permutation.
  inverse = jnp.argsort(order)
  y = jnp.take(ys, inverse, axis=0).reshape(m, k, -1)
  return jnp.einsum("mkd,mk->md", y, weights.astype(f32))


def moe_ffn_gather(x, expert_ids, weights, up, down):
  """Gathered weights + batched matmul; reads only the chosen experts. Same contract."""
  w_up = jnp.take(up, expert_ids, axis=0)  # [m, k, f, d]
  w_down = jnp.take(down, expert_ids, axis=0)  # [m, k, d, f]
  h = jnp.einsum("md,mkfd->mkf", x.astype(up.dtype), w_up, preferred_element_type=f32)
  h = relu2(h).astype(down.dtype)
  y = jnp.einsum("mkf,mkdf->mkd", h, w_down, preferred_element_type=f32)
  return jnp.einsum("mkd,mk->md", y, weights.astype(f32))


def moe_ffn_dense(x, expert_ids, weights, up, down):
  """Every expert on every row, combined with a dense [m, e] weight matrix: the test oracle."""
  num_experts = up.shape[0]
  dense_w = jnp.zeros((x.shape[0], num_experts), f32)
  dense_w = dense_w.at[jnp.arange(x.shape[0])[:, None], expert_ids].add(weights.astype(f32))
  h = relu2(jnp.einsum("md,efd->mef", x.astype(up.dtype), up, preferred_element_type=f32))
  y = jnp.einsum("mef,edf->med", h.astype(down.dtype), down, preferred_element_type=f32)
  return jnp.einsum("med,me->md", y, dense_w)
