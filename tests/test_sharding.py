"""SPMD sharding on 8 fake CPU devices (tests/conftest.py sets
--xla_force_host_platform_device_count=8): a sharded model computes what the unsharded one does.

Two meshes cover both axis types: (2 data, 4 tensor) from `jax.make_mesh` with its default axis
types (Explicit in current JAX) and (8 fsdp) with Auto axes. The model of the first is a random
config whose head counts divide 4 (every projection partitioned), saved in nemojax's format and
loaded with `mesh=`; the second loads the demo's trained HF checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding

import nemojax
from nemojax import NemotronH, NemotronHConfig, Sampler
from nemojax import sharding as S
from nemojax import testing as T
from nemojax.lora import apply_lora
from nemojax.train import Checkpointer, TrainConfig, Trainer

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "nemojax" / "demo" / "assets")
# Every head count divides the tensor axis (4) and the embed width the fsdp axis (8).
CONFIG = NemotronHConfig.tiny(hidden_size=64, intermediate_size=128, num_attention_heads=8,
                              num_key_value_heads=4, head_dim=8, mamba_num_heads=8,
                              mamba_head_dim=8, n_groups=4, ssm_state_size=8)
PROMPTS = [[5, 17, 3], [9, 1, 44, 2, 8, 100, 7], [3] * 12, [60, 61, 62, 63, 64]]

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")


def _mesh(shape, names, axis_type=None):
  if axis_type is None:
    return jax.make_mesh(shape, names)  # the JAX version's default axis types
  return jax.make_mesh(shape, names, axis_types=(axis_type,) * len(shape))


def _ids(vocab, shape=(4, 16), seed=0):
  return np.asarray(jax.random.randint(jax.random.key(seed), shape, 0, vocab), np.int32)


def _is_partitioned(x: jax.Array) -> bool:
  return x.addressable_shards[0].data.size < x.size


@pytest.fixture(scope="module")
def tensor_parallel(tmp_path_factory):
  """(unsharded model, the same loaded on a (2 data, 4 tensor) mesh)."""
  path = tmp_path_factory.mktemp("tp") / "model"
  model = NemotronH(CONFIG, dtype=jnp.float32, rngs=nnx.Rngs(3))
  nemojax.save(model, path)
  sharded = nemojax.load(path, jnp.float32, mesh=_mesh((2, 4), ("data", "tensor")))
  return model, sharded


@pytest.fixture(scope="module")
def fsdp():
  """(the demo model unsharded, the same on an (8 fsdp) Auto mesh)."""
  return (nemojax.load(DEMO, jnp.float32),
          nemojax.load(DEMO, jnp.float32, mesh=_mesh((8,), ("fsdp",), AxisType.Auto)))


# ------------------------------------------------------------------------------------------------
# Rules
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [CONFIG, *T.MOE_CONFIGS.values()],
                         ids=["hybrid", "moe", "latent"])
def test_every_parameter_has_logical_axes(config):
  state = nnx.state(nnx.eval_shape(lambda: NemotronH(config, rngs=nnx.Rngs(0))))
  for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(state)):
    keys = [getattr(k, "key", getattr(k, "idx", k)) for k in path]
    axes = S.param_axes(keys)
    assert len(axes) == leaf.ndim, f"{keys}: axes {axes} for shape {leaf.shape}"
    assert all(a is None or a in S.DEFAULT_RULES or a in S.ACTIVATION_AXES or a in (
        "head_dim", "state", "norm", "latent", "length") for a in axes)


def test_rules_divisibility_and_overrides():
  mesh = _mesh((2, 4), ("data", "tensor"), AxisType.Auto)
  layout = S.make_layout(mesh, CONFIG.replace(num_key_value_heads=2))
  assert layout.spec(("kv_heads", "embed"), (16, 64)) == jax.sharding.PartitionSpec()
  assert layout.spec(("heads", "embed"), (64, 64)) == jax.sharding.PartitionSpec("tensor")
  # batch over (data, fsdp) falls back to what divides it
  assert layout.spec(("batch", None), (6, 3)) == jax.sharding.PartitionSpec("data")
  custom = S.make_layout(mesh, CONFIG, rules={"heads": None, "embed": "tensor"})
  assert custom.spec(("heads", "embed"), (64, 64)) == jax.sharding.PartitionSpec(None, "tensor")
  with pytest.raises(ValueError, match="not used by any sharding rule"):
    S.make_layout(_mesh((8,), ("model",)), CONFIG)


def test_indivisible_sizes_replicate_or_fail_with_one_line():
  mesh = _mesh((2, 4), ("data", "tensor"))
  model = nemojax.load(DEMO, jnp.float32, mesh=mesh)  # 2 KV heads on 4 tensor shards
  k = model.backbone.layers[1].mixer.k_proj.weight[...]
  q = model.backbone.layers[1].mixer.q_proj.weight[...]
  assert not _is_partitioned(k) and _is_partitioned(q)
  strict = S.make_layout(mesh, model.config, on_indivisible="error")
  with pytest.raises(ValueError) as err:
    nemojax.load(DEMO, jnp.float32, mesh=strict)
  message = str(err.value)
  assert "\n" not in message and "k_proj.weight" in message and "kv_heads" in message


# ------------------------------------------------------------------------------------------------
# Sharded equals unsharded
# ------------------------------------------------------------------------------------------------
def test_tensor_parallel_logits_and_partitioned_weights(tensor_parallel):
  model, sharded = tensor_parallel
  layers = sharded.backbone.layers
  for name, w in [("in_proj", layers[0].mixer.in_proj.weight), ("out_proj",
                  layers[0].mixer.out_proj.weight), ("up_proj", layers[1].mixer.up_proj.weight),
                  ("down_proj", layers[1].mixer.down_proj.weight)] + [
                  (p, getattr(layers[3].mixer, p).weight) for p in ("q_proj", "k_proj", "v_proj",
                                                                    "o_proj")]:
    assert _is_partitioned(w[...]), f"{name} is not partitioned: {w[...].sharding}"
  ids = _ids(CONFIG.vocab_size)
  got = sharded(ids)
  assert isinstance(got.sharding, NamedSharding) and got.sharding.mesh.shape["tensor"] == 4
  T.assert_close(np.asarray(got), np.asarray(model(ids)), "float32", "same", "logits")


def test_fsdp_logits_and_partitioned_weights(fsdp):
  model, sharded = fsdp
  mixer = sharded.backbone.layers[0].mixer
  assert _is_partitioned(mixer.in_proj.weight[...]) and _is_partitioned(mixer.out_proj.weight[...])
  ids = _ids(320, (8, 12), seed=1)
  T.assert_close(np.asarray(sharded(ids)), np.asarray(model(ids)), "float32", "same", "logits")


def test_moe_experts_over_the_expert_axis():
  config = T.MOE_CONFIGS["moe"]
  ids = _ids(config.vocab_size, seed=5)
  want = np.asarray(NemotronH(config, dtype=jnp.float32, rngs=nnx.Rngs(1))(ids))
  mesh = _mesh((2, 4), ("data", "expert"))
  sharded = S.shard_model(NemotronH(config, dtype=jnp.float32, rngs=nnx.Rngs(1)), mesh)
  up = sharded.backbone.layers[1].mixer.experts.up_proj[...]
  assert up.addressable_shards[0].data.shape[0] == config.n_routed_experts // 4
  T.assert_close(np.asarray(sharded(ids)), want, "float32", "same", "logits")


@pytest.mark.parametrize("name,axes", [("moe", ("tensor", "expert")),
                                       ("latent", ("data", "tensor"))])
def test_experts_run_per_shard(name, axes):
  # Experts over 4 devices and their hidden width over 2 (or rows over 2 and the width over 4):
  # no expert weight moves between devices in the compiled forward (prefill, and one token,
  # where the experts' weights are gathered), and logits and greedy decode tokens equal the
  # unsharded model's (greedy decode of the plain MoE: test_benchmark_scripts_smoke's moe-ep4).
  config = T.MOE_CONFIGS[name]
  ids = _ids(config.vocab_size, (4, 9), seed=7)
  model = NemotronH(config, dtype=jnp.float32, rngs=nnx.Rngs(2))
  want = np.asarray(model(ids))
  mesh = _mesh((2, 4), axes)
  sharded = S.shard_model(NemotronH(config, dtype=jnp.float32, rngs=nnx.Rngs(2)), mesh)
  graphdef, state = nnx.split(sharded)
  forward = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x))
  tensor = mesh.shape["tensor"]
  f = config.moe_intermediate_size // (tensor if config.moe_intermediate_size % tensor == 0 else 1)
  width = config.moe_expert_dim
  for tokens in (ids, ids[:1, :1]):  # prefill, and one token (decode: the gather path)
    hlo = forward.lower(state, tokens).compile().as_text()
    outputs = [line[:match.start()] for line in hlo.splitlines()
               if (match := re.search(r" (all-gather|all-reduce|all-to-all)(-start)?\(", line))]
    moved = [o for o in outputs if f",{f},{width}]" in o or f",{width},{f}]" in o]
    assert not moved, f"expert weights move between devices: {moved}"
  T.assert_close(np.asarray(sharded(ids)), want, "float32", "same", "logits")
  if name == "latent":  # the plain MoE's greedy decode over 4 expert shards: the smoke run below
    greedy = lambda m: [r.tokens for r in Sampler(m)(PROMPTS, max_new_tokens=5)]
    assert greedy(sharded) == greedy(model)


def test_lora_model_shards_like_its_base(tensor_parallel):
  model, _ = tensor_parallel
  ids = _ids(CONFIG.vocab_size, seed=6)
  lora = nnx.clone(model)
  apply_lora(lora, rank=4)
  for _, leaf in nnx.iter_graph(lora):  # non-zero adapters: B starts at 0
    if isinstance(leaf, nnx.LoRAParam):
      leaf[...] = 0.01 * jnp.ones_like(leaf[...])
  want = np.asarray(lora(ids))
  sharded = S.shard_model(lora, _mesh((2, 4), ("data", "tensor"), AxisType.Auto))
  in_proj = sharded.backbone.layers[0].mixer.in_proj
  assert _is_partitioned(in_proj.base_module.weight[...]) and _is_partitioned(in_proj.lora_b[...])
  T.assert_close(np.asarray(sharded(ids)), want, "float32", "same", "logits")


def test_greedy_generate_matches_unsharded(tensor_parallel):
  model, sharded = tensor_parallel
  want = Sampler(model)(PROMPTS, max_new_tokens=8)
  got = Sampler(sharded)(PROMPTS, max_new_tokens=8)
  assert [r.tokens for r in got] == [r.tokens for r in want]
  cache = sharded.init_cache(4, 32)
  assert _is_partitioned(cache.layers[0].ssm) and _is_partitioned(cache.layers[3].k)


@pytest.mark.slow
def test_train_step_matches_unsharded_and_restores_on_another_mesh(fsdp, tmp_path):
  model, sharded = fsdp
  batch = {"tokens": jnp.asarray(_ids(320, (8, 12), seed=2))}
  config = TrainConfig(warmup_steps=1, total_steps=10)
  want_state, want = Trainer(model, config).step(Trainer(model, config).init_state(), batch)
  trainer = Trainer(sharded, config)
  state, got = trainer.step(trainer.init_state(), batch)
  T.assert_close(float(got["loss"]), float(want["loss"]), "float32", "same", "loss")
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(state.params),
                          jax.tree.leaves(want_state.params)):
    T.assert_close(np.asarray(a), np.asarray(b), "float32", "same", jax.tree_util.keystr(path))

  # saved from the (8 fsdp) mesh, restored onto (2 data, 4 tensor): values equal, new shardings
  ckpt = Checkpointer(tmp_path / "run")
  ckpt.save(state)
  other = S.shard_model(nemojax.load(DEMO, jnp.float32), _mesh((2, 4), ("data", "tensor")))
  restored = ckpt.restore(Trainer(other, config).abstract_state())
  ckpt.close()
  q = restored.params["backbone"]["layers"][1]["mixer"]["q_proj"]["weight"][...]
  assert q.sharding.mesh.shape["tensor"] == 4 and _is_partitioned(q)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------------------------------------------
# Benchmark scripts (run on the GPU machine; a script that breaks should break here)
# ------------------------------------------------------------------------------------------------
def _script(args, tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, *args, "--out", str(tmp_path)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
def test_benchmark_scripts_smoke(tmp_path):
  _script(["benchmarks/multi_gpu.py", "--smoke", "--repeats", "1", "--steps", "2"], tmp_path)
  result = json.loads((tmp_path / "multi_gpu_smoke.json").read_text())
  checks = [r["check"] for r in result["table"] if r.get("check")]
  assert {r["row"] for r in result["table"]} == {"moe-ep1", "moe-ep4", "train-fsdp8"}
  assert len(checks) == 1 and checks[0]["logits_rel_err"] <= T.tolerance("float32", "same")
  decode = [r for r in result["table"] if r["row"] == "moe-ep4" and r["part"] == "decode b8"]
  assert decode[0]["same_tokens"]  # greedy tokens of the sharded model equal one device's
  _script(["benchmarks/sharding_memory.py", "--config", "tiny", "--parts", "prefill", "--devices",
           "2", "--chunk", "16", "--cache-len", "64"], tmp_path)
  rows = json.loads((tmp_path / "sharding_memory.json").read_text())["rows"]
  assert rows[0]["devices"] == 2 and rows[0]["args_gib"] > 0


@pytest.mark.gpu
def test_pallas_ssd_runs_per_shard():
  # The Pallas SSD kernel under shard_map: rows over data, heads (and their B/C groups) over
  # tensor; equal to the unsharded kernel's output. GPU only: on CPU the kernel's interpreter
  # (Python callbacks) under shard_map on several fake devices can deadlock.
  config = NemotronHConfig.tiny(hybrid_override_pattern="M-", mamba_num_heads=4,
                                mamba_head_dim=64, ssm_state_size=128, n_groups=2, chunk_size=128)
  build = lambda: NemotronH(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(3),
                            ssd_implementation="pallas")
  ids = _ids(config.vocab_size, (2, 40), seed=4)
  want = np.asarray(build()(ids), np.float32)
  n = 4 if jax.device_count() >= 4 else 2 if jax.device_count() >= 2 else 1
  shape = (2, 2) if n == 4 else (1, n)
  mesh = jax.make_mesh(shape, ("data", "tensor"), devices=jax.devices()[:n])
  got = np.asarray(S.shard_model(build(), mesh)(ids), np.float32)
  T.assert_close(got, want, "bfloat16", "kernel", "logits")


def test_attention_per_shard_splits_rows_and_head_groups():
  # The per-shard wrapper's specs on CPU with the XLA attention as the per-shard body (the Pallas
  # interpreter under shard_map hangs on fake CPU devices): rows over data, KV heads over tensor
  # with their query heads.
  from nemojax.kernels import attention as attn
  mesh = _mesh((2, 4), ("data", "tensor"), AxisType.Auto)
  model = S.shard_model(NemotronH(CONFIG, dtype=jnp.float32, rngs=nnx.Rngs(0)), mesh)
  keys = jax.random.split(jax.random.key(7), 3)
  q = jax.random.normal(keys[0], (4, 24, 8, 8))
  k, v = (jax.random.normal(key, (4, 4, 64, 8)) for key in keys[1:])
  start = jnp.asarray([0, 3, 0, 9], jnp.int32)
  attend = lambda *a: attn.attention(*a, implementation="xla")
  want = attend(q, k, v, 10, start, 34)
  got = jax.jit(lambda *a: S.attention_per_shard(model, attend, *a))(q, k, v, 10, start, 34)
  T.assert_close(np.asarray(got), np.asarray(want), "float32", "same", "attention")


@pytest.mark.gpu
def test_pallas_attention_runs_per_shard(monkeypatch):
  # The Pallas attention kernel under shard_map (rows over data, KV heads and their query heads
  # over tensor) for a prefill chunk over the cache; the next step's logits equal the unsharded
  # kernel's. GPU only: on CPU the kernel's interpreter under shard_map on several fake devices
  # hangs (as the SSD kernel's does).
  config = NemotronHConfig.tiny(hybrid_override_pattern="*-", num_attention_heads=4,
                                num_key_value_heads=2, head_dim=64)
  ids = _ids(config.vocab_size, (2, 33), seed=6)
  calls = []
  per_shard = S.attention_per_shard
  monkeypatch.setattr(S, "attention_per_shard",
                      lambda *a: calls.append(S.layout_of(a[0]) is not None) or per_shard(*a))

  def next_logits(model):
    model.set_attention_implementation("pallas")
    cache = model.init_cache(2, 128).replace(start=jnp.asarray([0, 5], jnp.int32))
    _, cache = model(ids[:, :32], cache=cache)  # 32 queries: a prefill chunk, the kernel's case
    return np.asarray(model(ids[:, 32:], cache=cache)[0], np.float32)

  build = lambda: NemotronH(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(2))
  want = next_logits(build())
  assert not any(calls)
  mesh = jax.make_mesh((2, 2), ("data", "tensor"), devices=jax.devices()[:4])
  got = next_logits(S.shard_model(build(), mesh))
  assert any(calls), "the kernel did not run per shard"
  T.assert_close(got, want, "bfloat16", "kernel", "logits")
