"""nemojax.train: masked loss, optimizer, the jitted step and orbax resume."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from nemojax import NemotronH, NemotronHConfig
from nemojax import testing as T
from nemojax.train import (Checkpointer, TrainConfig, Trainer, fit, learning_rate_schedule,
                           make_optimizer, next_token_loss)

VOCAB = 64
# All three layer types, as few blocks as possible: the train step's compile dominates these tests.
CONFIG = NemotronHConfig.tiny(vocab_size=VOCAB, hybrid_override_pattern="M*-")
TRAIN = TrainConfig(learning_rate=3e-3, warmup_steps=2, total_steps=8, seed=3)


def _batch(step: int, b: int = 4, t: int = 24) -> dict[str, np.ndarray]:
  rng = np.random.default_rng([7, step])
  tokens = rng.integers(3, VOCAB, (b, t)).astype(np.int32)
  mask = np.ones((b, t), np.float32)
  mask[:, : t // 3] = 0  # a "prompt" that carries no loss
  return {"tokens": tokens, "mask": mask}


@pytest.fixture(scope="module")
def trainer():
  model = NemotronH(CONFIG, dtype=jnp.float32, rngs=nnx.Rngs(0),
                    ssd_implementation="xla")
  return Trainer(model, TRAIN)


def _assert_trees_equal(a, b):
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_next_token_loss_counts_only_masked_targets():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(2, 5, 7)), jnp.float32)
  tokens = jnp.asarray(rng.integers(0, 7, (2, 6)), jnp.int32)
  mask = jnp.asarray([[0, 0, 1, 1, 0, 1], [0, 1, 1, 1, 1, 1]], jnp.float32)
  loss, count = next_token_loss(logits, tokens, mask)
  logp = jax.nn.log_softmax(logits)
  nll = [-float(logp[b, i - 1, tokens[b, i]]) for b in range(2) for i in range(1, 6) if mask[b, i]]
  assert int(count) == len(nll) == 8
  T.assert_close(float(loss), np.mean(nll), "float32", "same")
  # A target outside the mask does not matter.
  loss2, _ = next_token_loss(logits, tokens.at[0, 1].set((tokens[0, 1] + 1) % 7), mask)
  assert float(loss2) == pytest.approx(float(loss))
  # Without a mask every next token counts.
  _, count_all = next_token_loss(logits, tokens)
  assert int(count_all) == 10


def test_schedule_warms_up_then_decays():
  config = TrainConfig(learning_rate=1e-2, warmup_steps=10, total_steps=110,
                       final_learning_rate_ratio=0.1)
  lr = learning_rate_schedule(config)
  assert float(lr(0)) == pytest.approx(1e-3)  # the first step already learns
  assert float(lr(4)) == pytest.approx(5e-3)
  assert float(lr(9)) == pytest.approx(1e-2)
  assert float(lr(10)) == pytest.approx(1e-2)
  assert float(lr(60)) == pytest.approx(0.55e-2, rel=1e-4)  # halfway down the cosine
  assert float(lr(110)) == pytest.approx(1e-3)
  assert float(lr(500)) == pytest.approx(1e-3)


def test_optimizer_clips_and_decays_only_matrices():
  config = TrainConfig(learning_rate=0.1, warmup_steps=0, total_steps=10, weight_decay=0.5,
                       grad_clip_norm=1.0, final_learning_rate_ratio=1.0)
  opt = make_optimizer(config)
  params = {"w": jnp.ones((2, 2)), "scale": jnp.ones((2,))}
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = opt.update(zero, opt.init(params), params)
  new = optax.apply_updates(params, updates)
  T.assert_close(new["w"], np.full((2, 2), 1 - 0.1 * 0.5), "float32", "same", "decayed w")
  np.testing.assert_array_equal(new["scale"], 1.0)  # not decayed
  # A huge gradient moves the parameters no further than a clipped one: Adam normalises, and
  # the clip keeps the moments finite and equal.
  huge = {"w": jnp.full((2, 2), 1e30), "scale": jnp.full((2,), 1e30)}
  updates, _ = opt.update(huge, opt.init(params), params)
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


def test_step_lowers_loss_with_finite_gradients(trainer):
  batch = _batch(0)
  state = trainer.init_state()
  losses = []
  for _ in range(3):
    state, metrics = trainer.step(state, batch)
    losses.append(float(metrics["loss"]))  # the loss of the parameters before this step
    assert np.isfinite(float(metrics["grad_norm"])) and float(metrics["grad_norm"]) > 0
  assert losses[1] < losses[0] and losses[2] < losses[1]
  assert int(state.step) == 3
  for leaf in jax.tree.leaves(state.params):
    assert bool(jnp.all(jnp.isfinite(leaf)))


def test_gradients_are_finite_and_reach_every_parameter(trainer):
  state = trainer.init_state()
  batch = _batch(1)
  grads = jax.grad(lambda p: next_token_loss(trainer.model(p)(batch["tokens"][:, :-1]),
                                             batch["tokens"], batch["mask"])[0])(state.params)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert bool(jnp.all(jnp.isfinite(g))), jax.tree_util.keystr(path)
    assert float(jnp.abs(g).max()) > 0, f"no gradient reaches {jax.tree_util.keystr(path)}"


def test_resume_from_checkpoint_equals_uninterrupted_run(trainer, tmp_path):
  steps = 6
  straight, history = fit(trainer, trainer.init_state(), _batch, steps, progress=False,
                          log_every=2)
  assert [h["step"] for h in history] == [2, 4, 6]
  # Interrupted after 3 steps (checkpoint at the end of the first call), then resumed from disk:
  # the second call's fresh initial state must be ignored in favour of the checkpoint.
  ckpt = tmp_path / "ckpt"
  first, _ = fit(trainer, trainer.init_state(), _batch, 3, checkpoint_dir=ckpt, progress=False)
  assert Checkpointer(ckpt).latest_step() == 3
  del first
  resumed, history = fit(trainer, trainer.init_state(seed=99), _batch, steps,
                         checkpoint_dir=ckpt, save_every=2, progress=True, log_every=1)
  assert [h["step"] for h in history] == [4, 5, 6]
  assert int(resumed.step) == steps
  _assert_trees_equal(resumed.params, straight.params)
  _assert_trees_equal(resumed.opt_state, straight.opt_state)
  _assert_trees_equal(resumed.rng, straight.rng)
  assert Checkpointer(ckpt).latest_step() == steps
