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


def test_bad_arguments_are_one_line_errors():
  with pytest.raises(ValueError, match="rank must be a positive integer, got 0"):
    apply_lora(_model(), 0)
  with pytest.raises(ValueError, match=r"targets \['qproj'\] name no projection"):
    apply_lora(_model(), 2, targets=("qproj",))
