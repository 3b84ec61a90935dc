"""Exact parity with the PyTorch reference (transformers' NemotronHForCausalLM) on tiny models."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import nemojax
from nemojax import testing as T

CONFIGS = T.CONFIGS


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
  """(name, HF model, nemojax fp32 model loaded from a single-file checkpoint, sharded dir)."""
  name = request.param
  cfg = CONFIGS[name]
  hf = T.make_hf_model(cfg, seed=11)
  single = T.save_hf(hf, tmp_path_factory.mktemp(f"{name}_single"))
  sharded = T.save_hf(hf, tmp_path_factory.mktemp(f"{name}_sharded"), max_shard_size="20KB")
  return name, hf, nemojax.load(single, dtype=jnp.float32), sharded


def _ids(cfg, b, t, seed):
  return np.random.default_rng(seed).integers(0, cfg.vocab_size, (b, t))


def test_logits_match_pytorch(pair):
  name, hf, model, _ = pair
  cfg = model.config
  ids = _ids(cfg, 3, 2 * cfg.chunk_size + 5, 0)  # crosses two chunk boundaries
  ref = T.hf_logits(hf, ids)
  out = np.asarray(model(ids))
  assert out.dtype == np.float32 and out.shape == ref.shape
  T.assert_close(out, ref, "float32", "independent", str(name))


def test_sharded_checkpoint_loads_identically(pair):
  import os
  name, hf, model, sharded = pair
  assert os.path.exists(os.path.join(sharded, "model.safetensors.index.json"))
  assert len([f for f in os.listdir(sharded) if f.endswith(".safetensors")]) > 1
  model2 = nemojax.load(sharded, dtype=jnp.float32)
  ids = _ids(model.config, 3, model.config.chunk_size + 3, 1)
  np.testing.assert_array_equal(np.asarray(model2(ids)), np.asarray(model(ids)))
  T.assert_close(model2(ids), T.hf_logits(hf, ids), "float32", "independent")


def test_short_sequence_shorter_than_conv_and_chunk(pair):
  _, hf, model, _ = pair
  ids = _ids(model.config, 3, 2, 2)
  T.assert_close(model(ids), T.hf_logits(hf, ids), "float32", "independent")


def test_blocks_in_isolation(pair):
  """One Mamba mixer, one attention block and one MLP, each against its PyTorch twin."""
  _, hf, model, _ = pair
  cfg = model.config
  rng = np.random.default_rng(5)
  u = rng.standard_normal((3, cfg.chunk_size + 7, cfg.hidden_size)).astype(np.float32)
  seen = set()
  for i, t in enumerate(cfg.layer_types):
    if t in seen:
      continue
    seen.add(t)
    hf_mixer = hf.model.layers[i].mixer
    ours = model.backbone.layers[i].mixer
    with torch.no_grad():
      if t is nemojax.LayerType.ATTENTION:
        ref = hf_mixer(torch.as_tensor(u))[0].numpy()
        out, _ = ours(jnp.asarray(u), start=jnp.zeros((3,), jnp.int32))
      elif t is nemojax.LayerType.MAMBA:
        ref = hf_mixer(torch.as_tensor(u)).numpy()
        out, _ = ours(jnp.asarray(u))
      else:
        ref = hf_mixer(torch.as_tensor(u)).numpy()
        out = ours(jnp.asarray(u))
    T.assert_close(out, ref, "float32", "independent", str(t))
  assert len(seen) == 3


def test_bf16_model_close_to_fp32_and_finite(pair, tmp_path):
  name, hf, model, sharded = pair
  model16 = nemojax.load(sharded, dtype=jnp.bfloat16)
  ids = _ids(model.config, 3, 2 * model.config.chunk_size + 5, 3)
  out16 = np.asarray(model16(ids))
  assert out16.dtype == np.float32
  assert np.isfinite(out16).all()
  T.assert_close(out16, model(ids), "bfloat16", "model", str(name))
