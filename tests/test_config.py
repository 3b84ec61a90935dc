"""NemotronHConfig: HF key spellings, validation errors, presets and parameter counts."""

import dataclasses

import jax
import pytest
from flax import nnx

from nemojax import ConfigError, LayerType, NemotronH, NemotronHConfig
from nemojax.model import count_params


def test_presets_layer_counts():
  c = NemotronHConfig.nano_9b_v2()
  counts = c.num_layers_of
  M, A, F = LayerType.MAMBA, LayerType.ATTENTION, LayerType.MLP
  assert (counts[M], counts[A], counts[F]) == (27, 4, 25)
  assert [i for i, t in enumerate(c.layer_types) if t is LayerType.ATTENTION] == [14, 21, 30, 39]
  assert c.d_inner == 10240 and c.conv_dim == 10240 + 2 * 8 * 128
  assert c.num_params() == 8_888_227_328


@pytest.mark.parametrize("preset", ["nano_9b_v2", "nano_12b_v2_base", "nemotron_h_8b", "tiny",
                                    "nemotron_3_nano_30b_a3b"])
def test_eval_shape_param_count(preset):
  c = getattr(NemotronHConfig, preset)()
  abstract = nnx.eval_shape(lambda: NemotronH(c, rngs=nnx.Rngs(0)))
  n = count_params(abstract)
  print(f"{preset}: {n:,} parameters")
  assert n == c.num_params()
  if preset == "nano_9b_v2":
    assert n == 8_888_227_328
  # Nothing was allocated: every leaf is abstract.
  assert all(isinstance(x, jax.ShapeDtypeStruct)
             for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def test_nemotron_3_presets_layer_counts_and_active_params():
  nano = NemotronHConfig.nemotron_3_nano_30b_a3b()
  counts = nano.num_layers_of
  M, E, A = LayerType.MAMBA, LayerType.MOE, LayerType.ATTENTION
  assert (counts[M], counts[E], counts[A]) == (23, 23, 6)
  assert (nano.n_routed_experts, nano.num_experts_per_tok, nano.moe_latent_size) == (128, 6, None)
  assert nano.num_params() == 31_577_937_344 and nano.num_params(active=True) == 3_580_073_408
  sup = NemotronHConfig.nemotron_3_super_120b_a12b()
  counts = sup.num_layers_of
  M, E, A = LayerType.MAMBA, LayerType.MOE, LayerType.ATTENTION
  assert (counts[M], counts[E], counts[A]) == (40, 40, 8)
  assert (sup.n_routed_experts, sup.num_experts_per_tok, sup.moe_expert_dim) == (512, 22, 1024)
  assert sup.num_params() == 120_668_687_360 and sup.num_params(active=True) == 12_770_216_960
  # without MoE layers, active == total
  nano9 = NemotronHConfig.nano_9b_v2()
  assert nano9.num_params(active=True) == nano9.num_params()


def test_from_hf_config_both_spellings():
  base = NemotronHConfig.tiny()
  old = dict(base.to_hf_config())
  new = dict(old)
  pattern = new.pop("hybrid_override_pattern")
  new["layers_block_type"] = [{"M": "mamba", "*": "attention", "-": "mlp"}[ch] for ch in pattern]
  new["mamba_n_groups"] = new.pop("n_groups")
  new["mamba_d_conv"] = new.pop("conv_kernel")
  new["mamba_chunk_size"] = new.pop("chunk_size")
  del new["num_hidden_layers"]
  assert NemotronHConfig.from_hf_config(old) == base
  assert NemotronHConfig.from_hf_config(new) == base
  # transformers' newest names for the block types
  newest = dict(new, layers_block_type=[
      {"M": "linear_attention", "*": "full_attention", "-": "mlp"}[ch] for ch in pattern])
  assert NemotronHConfig.from_hf_config(newest) == base


def test_from_hf_config_reads_hf_infinity():
  cfg = dict(NemotronHConfig.tiny().to_hf_config())
  cfg["time_step_limit"] = [0.0, {"__float__": "Infinity"}]
  assert NemotronHConfig.from_hf_config(cfg).time_step_limit == (0.0, float("inf"))


def test_pattern_of_wrong_length_is_named():
  cfg = dict(NemotronHConfig.tiny().to_hf_config(), num_hidden_layers=7)
  msg = "hybrid_override_pattern.*6 letters.*num_hidden_layers is 7"
  with pytest.raises(ConfigError, match=msg):
    NemotronHConfig.from_hf_config(cfg, source="my/config.json")
  with pytest.raises(ConfigError, match="my/config.json"):
    NemotronHConfig.from_hf_config(cfg, source="my/config.json")


@pytest.mark.parametrize("bad,match", [
    (dict(n_groups=4), "n_groups"),
    (dict(num_key_value_heads=3), "num_key_value_heads"),
    (dict(hybrid_override_pattern="M-E*-M", n_routed_experts=4, num_experts_per_tok=5),
     "num_experts_per_tok"),
    (dict(hybrid_override_pattern="M-X*-M"), "unknown layer letters"),
    (dict(hidden_size=0), "hidden_size"),
])
def test_bad_configs_name_the_key(bad, match):
  with pytest.raises(ConfigError, match=match):
    NemotronHConfig.tiny(**bad)


def test_config_is_frozen_and_hashable():
  c = NemotronHConfig.tiny()
  with pytest.raises(dataclasses.FrozenInstanceError):
    c.hidden_size = 3  # type: ignore[misc]
  assert hash(c) == hash(NemotronHConfig.tiny())
