"""nemojax.losses: the chunked (fused head + cross-entropy) loss against full logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemojax import testing as T
from nemojax.losses import chunked_next_token_loss, next_token_loss, weighted_nll

B, TIME, D, V = 2, 13, 16, 37  # 2·12 = 24 targets: chunks of 5 leave a padded tail


def _inputs(seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  hidden = jnp.asarray(rng.normal(size=(B, TIME - 1, D)), dtype)
  head = jnp.asarray(rng.normal(size=(V, D)) / np.sqrt(D), dtype)
  tokens = jnp.asarray(rng.integers(0, V, (B, TIME)), jnp.int32)
  mask = jnp.asarray(rng.random((B, TIME)) < 0.7, jnp.float32)
  return hidden, head, tokens, mask


def _full(hidden, head, tokens, mask):
  logits = jnp.einsum("btd,vd->btv", hidden, head, preferred_element_type=jnp.float32)
  return next_token_loss(logits, tokens, mask)


@pytest.mark.parametrize("chunk", [5, 24, 64])
def test_chunked_loss_and_gradient_equal_full_logits(chunk):
  hidden, head, tokens, mask = _inputs()
  full = jax.value_and_grad(lambda h, w: _full(h, w, tokens, mask)[0], argnums=(0, 1))
  chunked = jax.value_and_grad(
      lambda h, w: chunked_next_token_loss(h, w, tokens, mask, chunk)[0], argnums=(0, 1))
  (loss, (dh, dw)), (loss_c, (dh_c, dw_c)) = full(hidden, head), chunked(hidden, head)
  T.assert_close(loss_c, loss, "float32", "same", "loss")
  T.assert_close(dh_c, dh, "float32", "same", "d hidden")
  T.assert_close(dw_c, dw, "float32", "same", "d head")
  count = chunked_next_token_loss(hidden, head, tokens, mask, chunk)[1]
  assert int(count) == int(mask[:, 1:].sum())


def test_chunked_loss_without_mask_and_under_jit():
  hidden, head, tokens, _ = _inputs(1)
  loss_c, count = jax.jit(lambda h, w, x: chunked_next_token_loss(h, w, x, chunk_size=7))(
      hidden, head, tokens)
  loss, _ = _full(hidden, head, tokens, None)
  T.assert_close(loss_c, loss, "float32", "same")
  assert int(count) == B * (TIME - 1)


def test_weighted_nll_gradient_in_the_weights_and_a_scaled_cotangent():
  hidden, head, tokens, mask = _inputs(2)
  y, m = tokens[:, 1:], mask[:, 1:]

  def full(h, w, m):
    logits = jnp.einsum("btd,vd->btv", h, w)
    return 3.0 * jnp.sum(m * -jnp.take_along_axis(jax.nn.log_softmax(logits), y[..., None],
                                                  -1)[..., 0])

  chunked = lambda h, w, m: 3.0 * weighted_nll(h, w, y, m, 8)
  want = jax.grad(full, argnums=(0, 1, 2))(hidden, head, m)
  got = jax.grad(chunked, argnums=(0, 1, 2))(hidden, head, m)
  for g, w, what in zip(got, want, ("hidden", "head", "weights")):
    T.assert_close(g, w, "float32", "same", what)


def test_bf16_chunked_loss_keeps_float32_sums():
  hidden, head, tokens, mask = _inputs(3)
  want = _full(hidden, head, tokens, mask)[0]
  got, _ = chunked_next_token_loss(hidden.astype(jnp.bfloat16), head.astype(jnp.bfloat16),
                                   tokens, mask, 8)
  assert got.dtype == jnp.float32
  T.assert_close(got, want, "bfloat16", "kernel")
  grads = jax.grad(lambda h, w: chunked_next_token_loss(h, w, tokens, mask, 8)[0], (0, 1))(
      hidden.astype(jnp.bfloat16), head.astype(jnp.bfloat16))
  assert [g.dtype for g in grads] == [jnp.bfloat16, jnp.bfloat16]


def test_mismatched_head_is_a_one_line_error():
  hidden, head, tokens, mask = _inputs()
  with pytest.raises(ValueError, match=r"hidden .* and head .* do not match"):
    chunked_next_token_loss(hidden, head[:, :-1], tokens, mask)


def _all_shapes(jaxpr):
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      yield tuple(getattr(var.aval, "shape", ()))
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _all_shapes(inner)


def test_gradient_program_never_holds_full_logits():
  hidden, head, tokens, mask = _inputs()
  chunk = 5
  jaxpr = jax.make_jaxpr(jax.grad(
      lambda h, w: chunked_next_token_loss(h, w, tokens, mask, chunk)[0], (0, 1)))(hidden, head)
  biggest = max(int(np.prod(s)) for s in _all_shapes(jaxpr.jaxpr) if s and s[-1] == V)
  assert biggest <= chunk * V < B * (TIME - 1) * V


def _products_with_vocab(jaxpr) -> int:
  """dot_generals anywhere in `jaxpr` (scan bodies included) with an operand of V columns/rows."""
  n = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general" and any(V in getattr(v.aval, "shape", ())
                                                   for v in eqn.invars):
      n += 1
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          n += _products_with_vocab(inner)
  return n


def test_what_is_not_differentiated_costs_no_product():
  # LoRA freezes the head: the VJP sees that the head is not differentiated and skips dW (one of
  # the three [C, V, D] products per chunk); the loss alone (evaluation) runs only the logits.
  # The gradients that are taken still equal the full-logits ones.
  hidden, head, tokens, mask = _inputs(3)
  loss_of = lambda h, w: chunked_next_token_loss(h, w, tokens, mask, 5)[0]
  count = lambda f: _products_with_vocab(jax.make_jaxpr(f)(hidden, head).jaxpr)
  assert count(jax.grad(loss_of, (0, 1))) == 3
  assert count(jax.grad(loss_of, 0)) == 2  # head frozen
  assert count(jax.grad(loss_of, 1)) == 2  # hidden frozen
  assert count(loss_of) == 1
  full = lambda h, w: _full(h, w, tokens, mask)[0]
  T.assert_close(jax.jit(jax.grad(loss_of))(hidden, head), jax.grad(full)(hidden, head),
                 "float32", "same", "d hidden, head frozen")
  T.assert_close(jax.jit(jax.grad(loss_of, 1))(hidden, head), jax.grad(full, 1)(hidden, head),
                 "float32", "same", "d head, hidden frozen")
  T.assert_close(jax.jit(loss_of)(hidden, head), full(hidden, head), "float32", "same", "loss")
