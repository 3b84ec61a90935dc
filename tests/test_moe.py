"""Mixture-of-experts layers (Nemotron 3): routed-expert implementations against each other, the
router and the whole model against transformers, decode against the full forward, greedy tokens
against transformers' generate, convert/export round trips and malformed MoE configs."""

import copy
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

import nemojax
from nemojax import ConfigError, LayerType, NemotronHConfig
from nemojax import moe as moe_lib
from nemojax import testing as T
from nemojax.convert import api as convert_api
from nemojax.convert.hf import CheckpointError
from nemojax.kernels import moe as kmoe
from nemojax.model import count_params
from nemojax.sampler import Sampler
from nemojax.demo.bpe import build_tokenizer
from nemojax.tokenizer import THINK_CLOSE

CONFIGS = T.MOE_CONFIGS


# --------------------------------------------------------------------------------------------------
# Routed experts: ragged_dot, gather and the dense oracle agree
# --------------------------------------------------------------------------------------------------
def _expert_inputs(m, k, e, d, f, dtype, seed=0, skew=False):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((m, d)).astype(np.float32)
  # skew: most rows pick from the first experts, so some experts get no rows at all
  pool = min(e, k + 1) if skew else e
  ids = np.stack([rng.choice(pool, k, replace=False) for _ in range(m)]).astype(np.int32)
  w = rng.random((m, k)).astype(np.float32)
  up = (rng.standard_normal((e, f, d)) / np.sqrt(d)).astype(np.float32)
  down = (rng.standard_normal((e, d, f)) / np.sqrt(f)).astype(np.float32)
  cast = lambda a: jnp.asarray(a, dtype)
  return jnp.asarray(x, dtype), jnp.asarray(ids), jnp.asarray(w), cast(up), cast(down)


@pytest.mark.parametrize("m,k,e,skew", [(1, 2, 8, False), (37, 3, 8, False), (37, 3, 16, True),
                                        (5, 6, 128, False)])
def test_expert_paths_agree_fp32(m, k, e, skew):
  args = _expert_inputs(m, k, e, 12, 10, jnp.float32, seed=m + e, skew=skew)
  want = kmoe.moe_ffn_dense(*args)
  for impl in ("ragged_dot", "gather", "xla", None):
    got = kmoe.moe_ffn(*args, implementation=impl)
    assert got.dtype == jnp.float32 and got.shape == (m, 12)
    T.assert_close(got, want, "float32", "same", f"{impl}")


def test_expert_paths_bf16_close_to_fp32():
  args32 = _expert_inputs(40, 3, 8, 16, 24, jnp.float32, seed=3)
  want = kmoe.moe_ffn_dense(*args32)
  x, ids, w, up, down = args32
  for impl in ("ragged_dot", "gather"):
    got = kmoe.moe_ffn(x.astype(jnp.bfloat16), ids, w, up.astype(jnp.bfloat16),
                       down.astype(jnp.bfloat16), implementation=impl)
    T.assert_close(got, want, "bfloat16", "kernel", impl)


def test_expert_dispatch_size_rule_and_errors():
  # decode: few rows -> gather the chosen experts; prefill: sort + grouped matmul
  assert kmoe.resolve_implementation(None, num_rows=1, top_k=6, num_experts=128) == "gather"
  assert kmoe.resolve_implementation("xla", num_rows=64, top_k=6, num_experts=128) == "ragged_dot"
  assert kmoe.resolve_implementation("dense", num_rows=1, top_k=6, num_experts=128) == "dense"
  args = _expert_inputs(4, 2, 8, 6, 5, jnp.float32)
  with pytest.raises(ValueError, match="implementation must be one of"):
    kmoe.moe_ffn(*args, implementation="cuda")
  with pytest.raises(ValueError, match="expected up"):
    kmoe.moe_ffn(args[0], args[1], args[2], args[4], args[3])


def test_sort_by_expert_groups_rows():
  ids = jnp.asarray([[2, 0], [2, 1], [0, 2]])
  order, sizes = kmoe.sort_by_expert(ids, 4)
  np.testing.assert_array_equal(sizes, [2, 1, 3, 0])
  np.testing.assert_array_equal(np.asarray(ids).reshape(-1)[np.asarray(order)], [0, 0, 1, 2, 2, 2])


def test_expert_paths_jit_and_grad():
  x, ids, w, up, down = _expert_inputs(9, 2, 8, 6, 5, jnp.float32, seed=7)
  ref = jax.grad(lambda a, b: kmoe.moe_ffn_dense(a, ids, w, b, down).sum(), argnums=(0, 1))(x, up)
  for impl in ("ragged_dot", "gather"):
    def loss(a, b, impl=impl):
      return kmoe.moe_ffn(a, ids, w, b, down, implementation=impl).sum()
    g = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, up)
    for a, b in zip(g, ref):
      T.assert_close(a, b, "float32", "same", impl)


# --------------------------------------------------------------------------------------------------
# Against transformers
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
  """name -> (name, HF model, nemojax fp32 model loaded from its sharded checkpoint, that dir)."""
  made = {}

  def get(name):
    if name not in made:
      hf = T.make_hf_model(CONFIGS[name], seed=11)
      path = T.save_hf(hf, tmp_path_factory.mktemp(f"{name}_hf"), max_shard_size="40KB")
      made[name] = name, hf, nemojax.load(path, dtype=jnp.float32), path
    return made[name]
  return get


@pytest.fixture(params=sorted(CONFIGS))
def pair(request, pairs):
  return pairs(request.param)


def _ids(cfg, b, t, seed):
  return np.random.default_rng(seed).integers(0, cfg.vocab_size, (b, t))


@pytest.mark.parametrize("norm,n_group,topk_group", [(True, 1, 1), (False, 1, 1), (True, 4, 2),
                                                     (False, 3, 1)])
def test_router_matches_transformers(norm, n_group, topk_group):
  from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHTopkRouter
  cfg = CONFIGS["moe"].replace(n_routed_experts=12, num_experts_per_tok=3, n_group=n_group,
                               topk_group=topk_group, norm_topk_prob=norm)
  hf_router = NemotronHTopkRouter(T.hf_config(cfg))
  rng = np.random.default_rng(n_group + norm)
  with torch.no_grad():
    hf_router.weight.copy_(torch.randn(hf_router.weight.shape) / np.sqrt(cfg.hidden_size))
    hf_router.e_score_correction_bias.copy_(0.3 * torch.randn(cfg.n_routed_experts))
  ours = moe_lib.Router(cfg, rngs=nnx.Rngs(0))
  ours.weight[...] = jnp.asarray(hf_router.weight.detach().numpy())
  ours.e_score_correction_bias[...] = jnp.asarray(hf_router.e_score_correction_bias.numpy())
  x = rng.standard_normal((64, cfg.hidden_size)).astype(np.float32)
  with torch.no_grad():
    _, ref_w, ref_ids = hf_router(torch.as_tensor(x))
  w, ids = ours(jnp.asarray(x))
  # transformers returns its top-k unsorted: compare per row as expert -> weight maps
  ref = np.zeros((64, cfg.n_routed_experts), np.float32)
  got = np.zeros_like(ref)
  np.put_along_axis(ref, ref_ids.numpy(), ref_w.numpy(), axis=1)
  np.put_along_axis(got, np.asarray(ids), np.asarray(w), axis=1)
  np.testing.assert_array_equal(got != 0, ref != 0)
  T.assert_close(got, ref, "float32", "independent")


def test_logits_match_transformers(pair):
  name, hf, model, _ = pair
  cfg = model.config
  ids = _ids(cfg, 3, 2 * cfg.chunk_size + 5, 0)
  ref = T.hf_logits(hf, ids)
  for impl in ("ragged_dot", "gather"):
    moe_lib.set_implementation(model, impl)
    out = np.asarray(model(ids))
    assert out.dtype == np.float32 and out.shape == ref.shape
    T.assert_close(out, ref, "float32", "independent", f"{name} {impl}")
  moe_lib.set_implementation(model, None)


def test_moe_block_in_isolation(pair):
  _, hf, model, _ = pair
  cfg = model.config
  i = cfg.layer_types.index(LayerType.MOE)
  u = np.random.default_rng(5).standard_normal((2, 9, cfg.hidden_size)).astype(np.float32)
  with torch.no_grad():
    ref = hf.model.layers[i].mixer(torch.as_tensor(u)).numpy()
  T.assert_close(model.backbone.layers[i].mixer(jnp.asarray(u)), ref, "float32", "independent")


def test_param_counts_equal_torch(pair):
  _, hf, model, _ = pair
  n_torch = sum(p.numel() for p in hf.parameters())
  assert count_params(model) == n_torch == model.config.num_params()
  # the selection bias is loaded state but not a trainable parameter (a torch buffer)
  assert not any("e_score_correction_bias" in ".".join(map(str, p))
                 for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param)))


def test_decode_matches_full_forward(pair):
  """Prefill (grouped matmul) then one-token steps (gathered experts) reproduce the logits."""
  _, _, model, _ = pair
  cfg = model.config
  ids = _ids(cfg, 2, 14, 4)
  full = np.asarray(model(ids))
  cache = model.init_cache(2, 32)
  logits, cache = model(ids[:, :9], cache=cache)
  outs = [np.asarray(logits)]
  for t in range(9, 14):
    logits, cache = model(ids[:, t:t + 1], cache=cache)
    outs.append(np.asarray(logits))
  T.assert_close(np.concatenate(outs, axis=1), full, "float32", "same")


def test_greedy_matches_transformers_generate(pairs):
  name, hf, model, _ = pairs("moe")  # all four layer types; one config keeps the suite quick
  cfg = model.config
  prompts = np.random.default_rng(1).integers(3, cfg.vocab_size, (2, 11))
  with torch.no_grad():
    ref = hf.generate(torch.as_tensor(prompts), max_new_tokens=20, do_sample=False,
                      eos_token_id=None, pad_token_id=0)[:, prompts.shape[1]:].numpy()
  out = Sampler(model, prefill_chunk=16)(prompts.tolist(), max_new_tokens=20)
  for row, res in zip(ref, out):
    assert res.tokens == row.tolist(), name


@pytest.mark.slow  # ~20 s: compiles the whole sampling loop
def test_generate_with_thinking_budget_on_moe_model(tmp_path):
  """The text front door and per-row thinking budgets work unchanged on a MoE model."""
  corpus = ["Think step by step: first add the units, then carry. 12 + 30 = 42\n",
            "Nemotron models reason inside <think> tags before answering.\n"] * 20
  # `</think>` spelt with several BPE pieces, so a random model does not write it by chance
  tok = build_tokenizer(corpus, 300, tmp_path / "tok", think_as_special=False)
  cfg = CONFIGS["latent"].replace(vocab_size=tok.vocab_size)
  model = nemojax.NemotronH(cfg, dtype=jnp.float32, rngs=nnx.Rngs(7))
  budgets = [0, 4, None]
  gens = nemojax.generate(model, ["Add 12 and 30."] * 3, tokenizer=tok, max_new_tokens=16,
                          thinking=True, thinking_budget=budgets, temperature=1.0, seed=3,
                          stop_tokens=[])
  zero, four, free = gens
  assert zero.reasoning is None and zero.num_reasoning_tokens == 0 and THINK_CLOSE not in zero.text
  assert four.num_reasoning_tokens == 4 and four.text.count(THINK_CLOSE) == 1
  assert free.num_reasoning_tokens == len(free.tokens) and THINK_CLOSE not in free.text
  assert all(g.finish_reason == "length" for g in gens)


def test_bf16_moe_block_close_to_fp32(pair):
  """bf16 weights and activations, float32 router: close to the fp32 block on the same input.

  (Whole bf16 models are not compared with a tolerance: a routing choice that flips between
  near-tied experts changes a token's output by O(1), as it does in any bf16 MoE.)
  """
  _, _, model, path = pair
  model16 = nemojax.load(path, dtype=jnp.bfloat16)
  i = model16.config.layer_types.index(LayerType.MOE)
  block16, block32 = model16.backbone.layers[i].mixer, model.backbone.layers[i].mixer
  assert block16.gate.weight[...].dtype == jnp.float32  # the router stays float32
  assert block16.experts.up_proj[...].dtype == jnp.bfloat16
  u = jnp.asarray(np.random.default_rng(8).standard_normal((2, 9, model.config.hidden_size)),
                  jnp.bfloat16)
  out16 = block16(u)
  assert out16.dtype == jnp.bfloat16
  T.assert_close(out16.astype(jnp.float32), block32(u.astype(jnp.float32)), "bfloat16", "model")
  assert np.isfinite(np.asarray(model16(_ids(model.config, 2, 12, 3)))).all()


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------
def _tensors(d):
  out = {}
  for f in sorted(os.listdir(d)):
    if f.endswith(".safetensors"):
      with safe_open(os.path.join(d, f), framework="np") as st:
        for k in st.keys():
          out[k] = (st.get_slice(k).get_dtype(), st.get_tensor(k).tobytes())
  return out


def test_convert_export_round_trip_bit_identical(pairs, tmp_path):
  name, hf, model, src = pairs("latent")  # every MoE tensor kind, latent projections included
  out, back = tmp_path / "nj", tmp_path / "back"
  convert_api.convert(src, out, dtype="float32", progress=False)
  ours = nemojax.load(out, dtype=jnp.float32)
  ids = _ids(model.config, 2, 10, 6)
  np.testing.assert_array_equal(np.asarray(ours(ids)), np.asarray(model(ids)))
  convert_api.export(out, back, max_shard_size="30KB", progress=False)
  assert _tensors(back) == _tensors(src)
  # and a model saved from memory exports the same tensors too
  saved, back2 = tmp_path / "saved", tmp_path / "back2"
  convert_api.save(model, saved, copy_from=src, progress=False)
  convert_api.export(saved, back2, progress=False)
  assert _tensors(back2) == _tensors(src)


def test_bf16_checkpoint_round_trips_with_float32_router(pairs, tmp_path):
  """bf16 source -> nemojax bf16 (router weight and bias kept float32) -> identical bf16."""
  _, hf, _, _ = pairs("moe")
  src = T.save_hf(copy.deepcopy(hf).to(torch.bfloat16), tmp_path / "hf16")
  out, back = tmp_path / "nj", tmp_path / "back"
  convert_api.convert(src, out, dtype="bfloat16", progress=False)
  model = nemojax.load(out, dtype=jnp.bfloat16)
  i = model.config.layer_types.index(LayerType.MOE)
  assert model.backbone.layers[i].mixer.gate.weight[...].dtype == jnp.float32
  convert_api.export(out, back, progress=False)
  assert _tensors(back) == _tensors(src)


def test_mtp_tensors_are_ignored(tmp_path):
  cfg = CONFIGS["moe"]
  hf = T.make_hf_model(cfg, seed=2)
  path = T.save_hf(hf, tmp_path / "hf")
  save_file({"mtp.layers.0.mixer.gate.weight": np.zeros((8, 48), np.float32)},
            os.path.join(path, "model-mtp.safetensors"))
  # an index that lists both files, as a real sharded checkpoint with MTP layers has
  with safe_open(os.path.join(path, "model.safetensors"), framework="np") as st:
    names = list(st.keys())
  wm = {n: "model.safetensors" for n in names}
  wm["mtp.layers.0.mixer.gate.weight"] = "model-mtp.safetensors"
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
    json.dump({"weight_map": wm}, f)
  cfg_path = os.path.join(path, "config.json")
  with open(cfg_path) as f:
    raw = json.load(f)
  with open(cfg_path, "w") as f:
    json.dump(dict(raw, num_nextn_predict_layers=1), f)
  model = nemojax.load(path, dtype=jnp.float32)
  assert model.config.num_nextn_predict_layers == 1
  ids = _ids(cfg, 1, 7, 0)
  T.assert_close(model(ids), T.hf_logits(hf, ids), "float32", "independent")


def test_missing_expert_is_named(pair, tmp_path):
  _, _, _, src = pair
  d = tmp_path / "broken"
  d.mkdir()
  with open(os.path.join(src, "model.safetensors.index.json")) as f:
    wm = json.load(f)["weight_map"]
  victim = next(n for n in wm if ".experts.1.down_proj" in n)
  tensors = {}
  for shard in sorted(set(wm.values())):
    with safe_open(os.path.join(src, shard), framework="np") as st:
      tensors.update({k: st.get_tensor(k) for k in st.keys() if k != victim})
  save_file(tensors, str(d / "model.safetensors"))
  with open(os.path.join(src, "config.json")) as f:
    (d / "config.json").write_text(f.read())
  with pytest.raises(CheckpointError, match="missing tensor .*experts"):
    nemojax.load(d, dtype=jnp.float32)


# --------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad,match", [
    (dict(n_routed_experts=0), "'n_routed_experts'"),
    (dict(num_experts_per_tok=9), "'num_experts_per_tok'.*9 experts per token"),
    (dict(n_group=3), "'n_group'.*divisible"),
    (dict(n_group=4, topk_group=5), "'topk_group'"),
    (dict(n_group=8, topk_group=1, num_experts_per_tok=2), "'n_group'.*at least 2"),
    (dict(n_group=4, topk_group=1, num_experts_per_tok=3), "'num_experts_per_tok'.*offer only 2"),
    (dict(moe_latent_size=0), "'moe_latent_size'"),
    (dict(n_shared_experts=0), "'n_shared_experts'"),
    (dict(routed_scaling_factor=float("nan")), "'routed_scaling_factor'"),
    (dict(norm_topk_prob="yes"), "'norm_topk_prob'"),
    (dict(moe_intermediate_size=None), "'moe_intermediate_size'"),
    (dict(mlp_hidden_act="silu"), "'mlp_hidden_act'"),
])
def test_malformed_moe_configs_name_the_key(bad, match):
  raw = dict(CONFIGS["moe"].to_hf_config(), **bad)
  with pytest.raises(ConfigError, match=f"my/config.json: config key {match}"):
    NemotronHConfig.from_hf_config(raw, source="my/config.json")


def test_moe_config_hf_spellings_round_trip():
  cfg = CONFIGS["latent"]
  raw = cfg.to_hf_config()
  assert NemotronHConfig.from_hf_config(raw) == cfg
  names = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}
  newest = dict(raw, layers_block_type=[names[c] for c in cfg.hybrid_override_pattern])
  del newest["hybrid_override_pattern"]
  newest["num_local_experts"] = newest.pop("n_routed_experts")
  assert NemotronHConfig.from_hf_config(newest) == cfg
  # transformers reads our config back with the same MoE settings
  hf = T.hf_config(cfg)
  assert (hf.n_routed_experts, hf.moe_latent_size, hf.n_group, hf.topk_group) == (12, 20, 4, 2)
  assert hf.layers_block_type[0] == "moe"


@pytest.mark.parametrize("preset,total,active", [
    ("nemotron_3_nano_30b_a3b", 31_577_937_344, 3_580_073_408),
    pytest.param("nemotron_3_super_120b_a12b", 120_668_687_360, 12_770_216_960,
                 marks=pytest.mark.slow),
])
def test_preset_param_counts_equal_torch(preset, total, active):
  """Counted three ways: from the config, from our abstract model, from transformers on `meta`."""
  from transformers import NemotronHForCausalLM
  cfg = getattr(NemotronHConfig, preset)()
  assert cfg.num_params() == total and cfg.num_params(active=True) == active
  abstract = nnx.eval_shape(lambda: nemojax.NemotronH(cfg, rngs=nnx.Rngs(0)))
  assert count_params(abstract) == total
  with torch.device("meta"):
    hf = NemotronHForCausalLM(T.hf_config(cfg))
  assert sum(p.numel() for p in hf.parameters()) == total
