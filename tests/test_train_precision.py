"""nemojax.train at scale, checked small: mixed precision, remat, the chunked loss, accumulation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nemojax import NemotronH, NemotronHConfig
from nemojax import testing as T
from nemojax.losses import chunked_next_token_loss
from nemojax.train import REMAT_POLICIES, TrainConfig, Trainer, next_token_loss

VOCAB = 64
CONFIG = NemotronHConfig.tiny(vocab_size=VOCAB, hybrid_override_pattern="M*-")
BASE = dict(learning_rate=3e-3, warmup_steps=1, total_steps=8, seed=3)


def _batch(step: int = 0, b: int = 4, t: int = 20) -> dict[str, np.ndarray]:
  rng = np.random.default_rng([11, step])
  mask = (rng.random((b, t)) < 0.8).astype(np.float32)  # rows with different target counts
  return {"tokens": rng.integers(3, VOCAB, (b, t)).astype(np.int32), "mask": mask}


def _model(dtype=jnp.float32):
  return NemotronH(CONFIG, dtype=dtype, rngs=nnx.Rngs(0), ssd_implementation="xla")


def _run(trainer, steps=2, vary=True):
  state = trainer.init_state()
  losses = []
  for i in range(steps):
    state, metrics = trainer.step(state, _batch(i if vary else 0))
    losses.append(float(metrics["loss"]))
  return state, losses


def _leaves(tree):
  return [np.asarray(x, np.float32) for x in jax.tree.leaves(tree)]


def _assert_trees_close(a, b, dtype, kind, what):
  la, lb = _leaves(a), _leaves(b)
  assert len(la) == len(lb)
  T.assert_close(np.concatenate([x.ravel() for x in la]), np.concatenate([x.ravel() for x in lb]),
                 dtype, kind, what)


def test_mixed_precision_step_tracks_the_float32_step():
  fp32, fp32_losses = _run(Trainer(_model(jnp.float32), TrainConfig(**BASE)))
  trainer = Trainer(_model(jnp.bfloat16), TrainConfig(**BASE))
  mixed, mixed_losses = _run(trainer)
  # The master copy and both Adam moments are float32; the model computes in bf16.
  assert {x.dtype for x in jax.tree.leaves(mixed.params)} == {jnp.dtype(jnp.float32)}
  floats = [x for x in jax.tree.leaves(mixed.opt_state) if jnp.issubdtype(x.dtype, jnp.floating)]
  assert {x.dtype for x in floats} == {jnp.dtype(jnp.float32)}
  assert trainer.model(mixed).lm_head.weight.dtype == jnp.bfloat16
  T.assert_close(mixed_losses, fp32_losses, "bfloat16", "model", "losses")
  # evaluate (the chunked loss) agrees with the full logits of the bf16 model it describes.
  batch = _batch(5)
  logits = trainer.model(mixed)(batch["tokens"][:, :-1])
  T.assert_close(trainer.evaluate(mixed.params, batch),
                 next_token_loss(logits, batch["tokens"], batch["mask"])[0],
                 "float32", "independent", "evaluate")
  _assert_trees_close(mixed.params, fp32.params, "bfloat16", "model", "params after 2 steps")


def test_bf16_weights_with_float32_moments():
  trainer = Trainer(_model(jnp.bfloat16), TrainConfig(**BASE, master_weights=False))
  state, losses = _run(trainer, 3, vary=False)
  assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.bfloat16),
                                                              jnp.dtype(jnp.float32)}
  mu = jax.tree.leaves(state.opt_state)
  assert any(x.dtype == jnp.float32 and x.ndim == 2 for x in mu)
  assert losses[2] < losses[0]


@pytest.mark.slow
def test_chunked_loss_and_accumulation_give_the_full_batch_step():
  full = Trainer(_model(), TrainConfig(**BASE, loss_chunk_size=None))
  chunked = Trainer(_model(), TrainConfig(**BASE, loss_chunk_size=7, grad_accum_steps=2))
  a, loss_a = _run(full, 1)
  b, loss_b = _run(chunked, 1)
  T.assert_close(loss_b, loss_a, "float32", "same", "loss")
  # One AdamW step from zero moments is ±lr per element wherever the gradient is not tiny, so
  # equal updates mean equal gradient signs; compare the step's change to the parameters.
  init = full.init_state().params
  delta = lambda s: jax.tree.map(lambda x, y: x - y, s.params, init)
  _assert_trees_close(delta(b), delta(a), "float32", "same", "update")
  with pytest.raises(ValueError, match="3 rows, not a multiple of TrainConfig.grad_accum_steps=2"):
    chunked.step(chunked.init_state(), _batch(0, b=3))


def _jaxpr_policies(jaxpr):
  for eqn in jaxpr.eqns:
    # jax.checkpoint's primitive: "checkpoint" or "remat2", depending on the JAX version.
    if "policy" in eqn.params and eqn.primitive.name.startswith(("checkpoint", "remat")):
      yield eqn.params["policy"]
    for param in eqn.params.values():
      inner = getattr(param, "jaxpr", param)
      if hasattr(inner, "eqns"):
        yield from _jaxpr_policies(inner)


@pytest.mark.slow
def test_remat_policies_give_the_same_gradients():
  model = _model()
  graphdef, params = nnx.split(model)
  batch = _batch(1)
  tokens = jnp.asarray(batch["tokens"])

  def loss(params, policy):
    m = nnx.merge(graphdef, params)
    h = m.hidden_states(tokens[:, :-1], remat=policy)
    return chunked_next_token_loss(h, m.lm_head.weight[...], tokens, batch["mask"], 16)[0]

  grads = {}
  for name, policy in REMAT_POLICIES.items():
    fn = lambda p, policy=policy: loss(p, policy)
    found = list(_jaxpr_policies(jax.make_jaxpr(jax.grad(fn))(params).jaxpr))
    # One checkpoint per block with this policy; none without remat.
    assert found == ([] if policy is None else [policy] * len(CONFIG.layer_types)), name
    grads[name] = jax.jit(jax.grad(fn))(params)
  for name in set(REMAT_POLICIES) - {"none"}:
    _assert_trees_close(grads[name], grads["none"], "float32", "same", f"remat={name}")


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match=r"TrainConfig.remat: got 'some'"):
    TrainConfig(remat="some")
  with pytest.raises(ValueError, match="TrainConfig.grad_accum_steps: got 0"):
    TrainConfig(grad_accum_steps=0)
  with pytest.raises(ValueError, match="TrainConfig.loss_chunk_size: got -1"):
    TrainConfig(loss_chunk_size=-1)


def _dot_dtypes(jaxpr, out=None):
  """(lhs, rhs, result) dtypes of every dot_general in `jaxpr`, sub-jaxprs included."""
  out = [] if out is None else out
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      out.append(tuple(jnp.dtype(v.aval.dtype).name for v in (*eqn.invars, *eqn.outvars)))
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          _dot_dtypes(inner, out)
  return out


def test_projection_gradients_multiply_in_the_weights_dtype_and_forward_mode_works():
  # layers.matmul: a bf16 model's backward products take bf16 operands (left to autodiff, the
  # float32-accumulated product transposes into float32 x upcast-weight GEMMs, TF32 on a GPU); a
  # frozen weight costs no product; float32 models get the plain einsum's gradients; jax.jvp
  # (forward mode) goes through.
  from nemojax.layers import matmul
  rng = np.random.default_rng(0)
  x32 = jnp.asarray(rng.normal(size=(3, 5, 7)), jnp.float32)
  w32 = jnp.asarray(rng.normal(size=(6, 7)), jnp.float32)
  loss = lambda x, w: jnp.sum(jnp.sin(matmul(x, w, jnp.float32)))
  x16, w16 = x32.astype(jnp.bfloat16), w32.astype(jnp.bfloat16)
  both = _dot_dtypes(jax.make_jaxpr(jax.grad(loss, (0, 1)))(x16, w16).jaxpr)
  assert len(both) == 3 and all(d[:2] == ("bfloat16", "bfloat16") for d in both), both
  assert len(_dot_dtypes(jax.make_jaxpr(jax.grad(loss))(x16, w16).jaxpr)) == 2  # w frozen
  want = jax.grad(lambda x, w: jnp.sum(jnp.sin(jnp.einsum("...i,oi->...o", x, w))), (0, 1))
  for got, ref, name in zip(jax.grad(loss, (0, 1))(x32, w32), want(x32, w32), ("dx", "dw")):
    T.assert_close(got, ref, "float32", "same", name)
  _, tangent = jax.jvp(lambda x: matmul(x, w32, jnp.float32), (x32,), (x32,))
  T.assert_close(tangent, jnp.einsum("...i,oi->...o", x32, w32), "float32", "same", "jvp")
