"""nemojax.lora: adapters on the block projections (nnx.LoRA), merging, saving."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nemojax
from nemojax import NemotronH, NemotronHConfig
from nemojax import testing as T
from nemojax.layers import Linear
from nemojax.lora import DEFAULT_TARGETS, LORA_PARAM, apply_lora, lora_targets, merge_lora
from nemojax.train import TrainConfig, Trainer, fit

VOCAB = 64
CONFIG = NemotronHConfig.tiny(vocab_size=VOCAB, hybrid_override_pattern="M*-")
IDS = (np.arange(2 * 11).reshape(2, 11) * 7 % VOCAB).astype(np.int32)


def _model(dtype=jnp.float32):
  return NemotronH(CONFIG, dtype=dtype, rngs=nnx.Rngs(0), ssd_implementation="xla")


def _randomize_adapters(model, seed=2):
  # B starts at zero; give it values so the adapters change the output.
  for i, (path, var) in enumerate(nnx.iter_graph(model)):
    if isinstance(var, nnx.LoRAParam) and path[-1] == "lora_b":
      var[...] = 0.05 * jax.random.normal(jax.random.PRNGKey(seed + i), var.shape, var.dtype)


def test_fresh_adapters_change_nothing_and_sit_on_every_projection():
  model = _model()
  before = np.asarray(model(IDS))
  assert lora_targets(model) == set(DEFAULT_TARGETS)
  apply_lora(model, 4)
  adapters = nnx.state(model, LORA_PARAM)
  # Mamba in/out (1 layer) + q/k/v/o (1) + up/down (1), two matrices each.
  assert len(jax.tree.leaves(adapters)) == 2 * 8
  assert {x.dtype for x in jax.tree.leaves(adapters)} == {jnp.dtype(jnp.float32)}
  np.testing.assert_array_equal(np.asarray(model(IDS)), before)
  _randomize_adapters(model)
  assert T.rel_err(model(IDS), before) > T.tolerance("float32", "independent")


def test_only_chosen_targets_are_adapted():
  model = apply_lora(_model(), 2, targets=("q_proj", "v_proj"))
  attn = model.backbone.layers[1].mixer
  assert isinstance(attn.q_proj, nnx.LoRA) and isinstance(attn.v_proj, nnx.LoRA)
  assert isinstance(attn.k_proj, Linear) and isinstance(model.backbone.layers[0].mixer.in_proj,
                                                        Linear)
  assert isinstance(model.lm_head, Linear)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, ("float32", "same")),
                                       (jnp.bfloat16, ("bfloat16", "model"))])
def test_merged_model_computes_what_the_adapted_model_does(dtype, tol):
  model = apply_lora(_model(dtype), 4)
  _randomize_adapters(model)
  adapted = np.asarray(model(IDS))
  base_before = np.asarray(model.backbone.layers[1].mixer.q_proj.base_module.weight[...])
  merged = merge_lora(model)
  assert not jax.tree.leaves(nnx.state(merged, LORA_PARAM))
  q = merged.backbone.layers[1].mixer.q_proj
  assert isinstance(q, Linear) and q.weight.dtype == jnp.dtype(dtype)
  assert T.rel_err(q.weight[...], base_before) > 0  # the adapter went into the weight
  T.assert_close(merged(IDS), adapted, *tol, "merged logits")


def test_merged_model_saves_and_loads_like_any_checkpoint(tmp_path):
  model = apply_lora(_model(), 4)
  _randomize_adapters(model)
  adapted = np.asarray(model(IDS))
  nemojax.save(merge_lora(model), tmp_path / "merged")
  loaded = nemojax.load(tmp_path / "merged", dtype=jnp.float32)
  T.assert_close(loaded(IDS), adapted, "float32", "same", "reloaded merged logits")


def test_default_targets_are_the_projections_the_model_has():
  mamba_only = NemotronH(NemotronHConfig.tiny(vocab_size=VOCAB, hybrid_override_pattern="MM"),
                         dtype=jnp.float32, rngs=nnx.Rngs(0), ssd_implementation="xla")
  apply_lora(mamba_only, 2)  # no q/k/v/o or up/down here: skipped, not an error
  mixers = [block.mixer for block in mamba_only.backbone.layers]
  assert all(isinstance(m.in_proj, nnx.LoRA) and isinstance(m.out_proj, nnx.LoRA) for m in mixers)
  with pytest.raises(ValueError, match=r"targets \['q_proj'\] name no projection"):
    apply_lora(NemotronH(NemotronHConfig.tiny(vocab_size=VOCAB, hybrid_override_pattern="M"),
                         dtype=jnp.float32, rngs=nnx.Rngs(0)), 2, targets=("q_proj",))


def test_bad_arguments_are_one_line_errors():
  with pytest.raises(ValueError, match="rank must be a positive integer, got 0"):
    apply_lora(_model(), 0)
  with pytest.raises(ValueError, match=r"targets \['qproj'\] name no projection"):
    apply_lora(_model(), 2, targets=("qproj",))


def _batch(step: int, b: int = 2, t: int = 16) -> dict[str, np.ndarray]:
  rng = np.random.default_rng([5, step])
  return {"tokens": rng.integers(3, VOCAB, (b, t)).astype(np.int32)}


@pytest.fixture(scope="module")
def lora_trainer():
  model = apply_lora(_model(jnp.bfloat16), 4)
  config = TrainConfig(learning_rate=1e-2, warmup_steps=1, total_steps=8, loss_chunk_size=16,
                       remat="full")
  return Trainer(model, config, wrt=LORA_PARAM)


def test_training_moves_only_the_adapters(lora_trainer):
  base = nnx.state(lora_trainer.model(lora_trainer.init_state()), nnx.Not(LORA_PARAM))
  state = lora_trainer.init_state()
  # Only adapters are trained: they alone have optimizer state.
  n_adapter = sum(x.size for x in jax.tree.leaves(state.params))
  n_moments = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim == 2)
  assert n_moments == 2 * n_adapter
  losses = []
  for _ in range(3):
    state, metrics = lora_trainer.step(state, _batch(0))
    losses.append(float(metrics["loss"]))
  assert losses[2] < losses[0]
  model = lora_trainer.model(state)
  after = nnx.state(model, nnx.Not(LORA_PARAM))
  for x, y in zip(jax.tree.leaves(after), jax.tree.leaves(base)):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))
  adapted = np.asarray(model(IDS))
  T.assert_close(merge_lora(model)(IDS), adapted, "bfloat16", "model", "merged after training")


def test_lora_run_resumes_exactly_from_a_checkpoint(lora_trainer, tmp_path):
  straight, _ = fit(lora_trainer, lora_trainer.init_state(), _batch, 4, progress=False)
  fit(lora_trainer, lora_trainer.init_state(), _batch, 2, checkpoint_dir=tmp_path, progress=False)
  resumed, history = fit(lora_trainer, lora_trainer.init_state(seed=9), _batch, 4,
                         checkpoint_dir=tmp_path, progress=False, log_every=1)
  assert [h["step"] for h in history] == [3, 4]
  for x, y in zip(jax.tree.leaves((resumed.params, resumed.opt_state)),
                  jax.tree.leaves((straight.params, straight.opt_state))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
