"""Next-token cross-entropy, from logits or fused with the LM head so that full logits never exist.

With hidden states h [b, t, D] of tokens x[:, :-1] (after the final norm), the head W [V, D], the
targets y = x[:, 1:] and weights m = mask[:, 1:]:

    z_i   = W · h_i                                   # [V] logits, float32 accumulation
    nll_i = logsumexp(z_i) − z_i[y_i]
    loss  = Σ m_i · nll_i / max(Σ m_i, 1)

`next_token_loss` takes materialised logits [b, t, V]. `chunked_next_token_loss` computes the same
number from (h, W) a chunk of C tokens at a time, so at most [C, V] float32 logits are alive: for
Nano-9B-v2 (V = 131072) and 4096 tokens the full logits are 2 GiB in float32, plus as much again
for their gradient, while a chunk of 1024 tokens needs 512 MiB.

Its gradient is computed in the same pass (a custom VJP): for chunk c,

    p      = softmax(z_c)                             # [C, V] float32
    dz     = m_c · (p − onehot(y_c))                  # ∂(Σ m·nll)/∂z, cast to W's dtype
    dh_c   = dz · W          dW += dzᵀ · h_c          # float32 accumulation

so the backward pass only scales the stored dh and dW by the incoming cotangent: three matmuls of
[C, V, D] per chunk in all (the logits, dh, dW), where autodiff through a rematerialised chunk
needs four; two when the head is frozen (LoRA): the VJP sees that and skips dW. The matmuls take
the operands' dtype (bf16 in training) with float32 accumulation; logsumexp, softmax and the
weighted sums are float32. The target's logit is the dot of h_i with W's row y_i.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

__all__ = ["DEFAULT_LOSS_CHUNK", "chunked_next_token_loss", "next_token_loss", "weighted_nll"]

f32 = jnp.float32
DEFAULT_LOSS_CHUNK = 1024  # tokens per chunk: [1024, 131072] float32 logits are 512 MiB


def _targets_and_weights(tokens: jax.Array, mask: jax.Array | None, shape) -> tuple:
  targets = tokens[:, 1:]
  weights = jnp.ones(shape, f32) if mask is None else jnp.asarray(mask[:, 1:], f32)
  return targets, weights


def next_token_loss(logits: jax.Array, tokens: jax.Array,
                    mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Mean next-token cross-entropy over the masked targets, from full logits.

  Args:
    logits: [b, t-1, V] logits of `tokens[:, :-1]`.
    tokens: [b, t] token ids.
    mask: [b, t] weights; position i counts as the target of position i-1 when mask[:, i] > 0.
      None: every next token counts.

  Returns:
    (loss, number of target tokens), both float32 scalars.
  """
  targets, weights = _targets_and_weights(tokens, mask, logits.shape[:2])
  nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(f32), targets)  # [b, t-1]
  count = weights.sum()
  return (nll * weights).sum() / jnp.maximum(count, 1.0), count


def _chunks(x, chunk: int, fill=0):
  """[n, ...] -> [n_chunks, chunk, ...], the tail padded with `fill`."""
  pad = -x.shape[0] % chunk
  x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), constant_values=fill)
  return x.reshape(-1, chunk, *x.shape[1:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def weighted_nll(hidden: jax.Array, head: jax.Array, targets: jax.Array, weights: jax.Array,
                 chunk_size: int = DEFAULT_LOSS_CHUNK) -> jax.Array:
  """Σ weights · nll of `targets` under the logits hidden · headᵀ, never all logits at once.

  Args:
    hidden: [..., D] hidden states (any leading shape).
    head: [V, D] the LM head weight (HF layout).
    targets: [...] int target ids.
    weights: [...] float weights (0 for tokens that carry no loss; pre-divided by the number of
      targets for a mean).
    chunk_size: Tokens per chunk (static).

  Returns:
    A float32 scalar. Differentiable in `hidden`, `head` and `weights`; what is not differentiated
    costs nothing: a frozen head (LoRA) no dW product, the loss alone (evaluation) only the logits.
  """
  return _nll_pass(hidden, head, targets, weights, chunk_size, hidden_grad=False,
                   head_grad=False)[0]


def _nll_pass(hidden, head, targets, weights, chunk_size, *, hidden_grad: bool, head_grad: bool):
  """(Σ weights · nll, dΣ/dhidden or None, dΣ/dhead or None, nll) in one pass over the chunks."""
  if head.ndim != 2 or hidden.shape[-1] != head.shape[1]:
    raise ValueError(f"weighted_nll: hidden {hidden.shape} and head {head.shape} do not match "
                     "(expected hidden [..., D] and head [V, D])")
  d = hidden.shape[-1]
  n = targets.size
  h = _chunks(hidden.reshape(n, d), chunk_size)  # [k, C, D]
  y = _chunks(targets.reshape(n).astype(jnp.int32), chunk_size)  # [k, C]
  m = _chunks(jnp.asarray(weights, f32).reshape(n), chunk_size)  # [k, C], padding weighs 0
  vocab = jnp.arange(head.shape[0], dtype=jnp.int32)

  def body(dw, xs):
    h_c, y_c, m_c = xs
    h_c = h_c.astype(head.dtype)
    z = jnp.einsum("cd,vd->cv", h_c, head, preferred_element_type=f32)  # [C, V]
    lse = jax.nn.logsumexp(z, axis=-1)  # [C]
    # The target's logit from its row of the head ([C, D]), not from a pass over [C, V].
    z_y = jnp.einsum("cd,cd->c", h_c.astype(f32), jnp.take(head, y_c, axis=0).astype(f32))
    if not (hidden_grad or head_grad):  # the loss alone (evaluation)
      return dw, (lse - z_y, None)
    hit = vocab[None, :] == y_c[:, None]  # [C, V], fused into dz
    dz = (m_c[:, None] * (jnp.exp(z - lse[:, None]) - hit)).astype(head.dtype)
    dh_c = None
    if hidden_grad:
      dh_c = jnp.einsum("cv,vd->cd", dz, head, preferred_element_type=f32).astype(hidden.dtype)
    if head_grad:
      dw = dw + jnp.einsum("cv,cd->vd", dz, h_c, preferred_element_type=f32)
    return dw, (lse - z_y, dh_c)

  dw0 = jnp.zeros(head.shape, f32) if head_grad else None
  dw, (nll, dh) = jax.lax.scan(body, dw0, (h, y, m))
  nll = nll.reshape(-1)[:n]
  total = jnp.sum(nll * m.reshape(-1)[:n])
  dh = dh.reshape(-1, d)[:n].reshape(hidden.shape) if hidden_grad else None
  return total, dh, (dw.astype(head.dtype) if head_grad else None), nll.reshape(targets.shape)


def _weighted_nll_fwd(hidden, head, targets, weights, chunk_size):
  # symbolic_zeros: each argument arrives as a CustomVJPPrimal that says whether it is
  # differentiated (`perturbed`).
  total, dh, dw, nll = _nll_pass(hidden.value, head.value, targets.value, weights.value,
                                 chunk_size, hidden_grad=hidden.perturbed,
                                 head_grad=head.perturbed)
  return total, (dh, dw, nll if weights.perturbed else None)


def _weighted_nll_bwd(chunk_size, residuals, g):
  del chunk_size
  dh, dw, nll = residuals
  if isinstance(g, jax.custom_derivatives.SymbolicZero):
    return None, None, None, None
  g = g.astype(f32)
  scale = lambda v: None if v is None else (g * v.astype(f32)).astype(v.dtype)
  # The forward already holds dΣ/dh and dΣ/dW; with a mean (g = 1 at the top) scaling is exact.
  return scale(dh), scale(dw), None, None if nll is None else g * nll


weighted_nll.defvjp(_weighted_nll_fwd, _weighted_nll_bwd, symbolic_zeros=True)


def chunked_next_token_loss(hidden: jax.Array, head: jax.Array, tokens: jax.Array,
                            mask: jax.Array | None = None,
                            chunk_size: int = DEFAULT_LOSS_CHUNK) -> tuple[jax.Array, jax.Array]:
  """`next_token_loss` of the logits hidden · headᵀ, computed `chunk_size` tokens at a time.

  Args:
    hidden: [b, t-1, D] final hidden states of `tokens[:, :-1]`.
    head: [V, D] the LM head weight.
    tokens: [b, t] token ids.
    mask: [b, t] target weights as in `next_token_loss` (None: every next token counts).
    chunk_size: Tokens per chunk; memory holds [chunk_size, V] float32 logits at a time.

  Returns:
    (loss, number of target tokens), both float32 scalars.
  """
  targets, weights = _targets_and_weights(tokens, mask, hidden.shape[:2])
  count = weights.sum()
  loss = weighted_nll(hidden, head, targets, weights / jnp.maximum(count, 1.0), chunk_size)
  return loss, count
