"""Per-shard reads of HF checkpoints (`load_hf(..., per_shard_reads=True)`, the multi-host path)
on 8 fake CPU devices: each process reads only the slices its devices hold, and the model equals
the one read tensor by tensor."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nemojax import NemotronH, NemotronHConfig
from nemojax import checkpoint
from nemojax import testing as T
from nemojax.convert import api, hf

CONFIG = NemotronHConfig.tiny(hidden_size=64, intermediate_size=128, num_attention_heads=8,
                              num_key_value_heads=4, head_dim=8, mamba_num_heads=8,
                              mamba_head_dim=8, n_groups=4, ssm_state_size=8)

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  """(unsharded model, its HF directory in two shard files)."""
  model = NemotronH(CONFIG, dtype=jnp.float32, rngs=nnx.Rngs(3))
  path = tmp_path_factory.mktemp("hf") / "model"
  api.export_model(model, path, max_shard_size=100_000, progress=False)
  return model, path


@pytest.mark.parametrize("index", [(slice(16, 32),), (slice(None), slice(8, 24)),
                                   (slice(2, 5), slice(40, None)), ()])
def test_slice_reader_reads_only_the_slice(hf_dir, index):
  ckpt = hf.inspect(hf_dir[1])
  info = next(i for i in ckpt.tensors if i.spec.hf_name.endswith("q_proj.weight"))
  whole = next(a for i, a in hf.iter_tensors(ckpt) if i is info)
  reader = hf.SliceReader(ckpt)
  got = reader.read(info, index)
  np.testing.assert_array_equal(got, whole[index])
  assert reader.bytes_read == got.nbytes < whole.nbytes or index == ()


def test_per_shard_load_equals_whole_read(hf_dir, monkeypatch):
  model, path = hf_dir
  mesh = jax.make_mesh((2, 4), ("data", "tensor"))
  whole = checkpoint.load_hf(path, dtype=jnp.float32, mesh=mesh, per_shard_reads=False)
  requested = []
  read = hf.SliceReader.read

  def counting(self, info, index=()):
    out = read(self, info, index)
    requested.append((info.spec.hf_name, out.nbytes))
    return out

  monkeypatch.setattr(hf.SliceReader, "read", counting)
  sharded = checkpoint.load_hf(path, dtype=jnp.float32, mesh=mesh, per_shard_reads=True)
  # Every byte is read once: slices shared by several devices (replicas over data) are cached.
  assert sum(n for _, n in requested) == hf.inspect(path).num_bytes
  assert len(requested) > len(hf.inspect(path).tensors)  # split tensors came in several slices
  got, want = nnx.state(sharded), nnx.state(whole)
  for (p, a), (_, b) in zip(jax.tree.leaves_with_path(got), jax.tree.leaves_with_path(want),
                            strict=True):
    assert a.sharding == b.sharding, p
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  ids = np.asarray(jax.random.randint(jax.random.key(0), (4, 16), 0, CONFIG.vocab_size), np.int32)
  T.assert_close(np.asarray(sharded(ids)), np.asarray(model(ids)), "float32", "same", "logits")


def test_per_shard_load_moe_experts(tmp_path):
  config = T.MOE_CONFIGS["moe"]
  # Stacked experts take the host path (read whole, stacked, then placed over the expert axis).
  path = T.save_hf(T.make_hf_model(config, seed=11), tmp_path / "moe", max_shard_size="40KB")
  model = checkpoint.load_hf(path, dtype=jnp.float32)
  mesh = jax.make_mesh((2, 4), ("data", "expert"))
  sharded = checkpoint.load_hf(path, dtype=jnp.float32, mesh=mesh, per_shard_reads=True)
  up = sharded.backbone.layers[1].mixer.experts.up_proj[...]
  assert up.addressable_shards[0].data.shape[0] == config.n_routed_experts // 4
  ids = np.asarray(jax.random.randint(jax.random.key(5), (4, 16), 0, config.vocab_size), np.int32)
  T.assert_close(np.asarray(sharded(ids)), np.asarray(model(ids)), "float32", "same", "logits")
