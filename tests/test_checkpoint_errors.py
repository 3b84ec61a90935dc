"""Bad checkpoints give errors that name the tensor, the file and what was expected."""

import json
import os

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

import nemojax
from nemojax import NemotronHConfig
from nemojax import testing as T
from nemojax.convert.hf import CheckpointError


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
  hf = T.make_hf_model(NemotronHConfig.tiny(), seed=2)
  return T.save_hf(hf, tmp_path_factory.mktemp("good"))


def _rewrite(src, dst, edit):
  os.makedirs(dst, exist_ok=True)
  with safe_open(os.path.join(src, "model.safetensors"), framework="np") as f:
    tensors = {k: f.get_tensor(k) for k in f.keys()}
  edit(tensors)
  save_file(tensors, os.path.join(dst, "model.safetensors"))
  with open(os.path.join(src, "config.json")) as f:
    cfg = json.load(f)
  with open(os.path.join(dst, "config.json"), "w") as f:
    json.dump(cfg, f)
  return dst


def test_good_checkpoint_loads(good_dir):
  model = nemojax.load(good_dir)
  assert model.config == NemotronHConfig.tiny()


def test_missing_tensor(good_dir, tmp_path):
  name = "backbone.layers.2.mixer.dt_bias"
  bad = _rewrite(good_dir, tmp_path / "m", lambda t: t.pop(name))
  with pytest.raises(CheckpointError, match=rf"missing tensor '{name}'"):
    nemojax.load(bad)


def test_unexpected_tensor(good_dir, tmp_path):
  bad = _rewrite(good_dir, tmp_path / "u",
                 lambda t: t.__setitem__("backbone.layers.1.mixer.extra", np.zeros(3, np.float32)))
  with pytest.raises(CheckpointError, match=r"model.safetensors: unexpected tensor "
                                            r"'backbone.layers.1.mixer.extra'"):
    nemojax.load(bad)


def test_wrong_shape(good_dir, tmp_path):
  name = "backbone.layers.0.mixer.in_proj.weight"

  def edit(t):
    t[name] = t[name][:-1]

  bad = _rewrite(good_dir, tmp_path / "s", edit)
  cfg = NemotronHConfig.tiny()
  with pytest.raises(CheckpointError) as e:
    nemojax.load(bad)
  msg = str(e.value)
  assert name in msg and "model.safetensors" in msg
  assert str((cfg.in_proj_dim - 1, cfg.hidden_size)) in msg
  assert str((cfg.in_proj_dim, cfg.hidden_size)) in msg


def test_pattern_disagrees_with_tensors(good_dir, tmp_path):
  bad = _rewrite(good_dir, tmp_path / "p", lambda t: None)
  with open(bad / "config.json") as f:
    cfg = json.load(f)
  cfg["layers_block_type"] = ["mamba", "mamba", "mamba", "attention", "mlp", "mamba"]
  with open(bad / "config.json", "w") as f:
    json.dump(cfg, f)
  with pytest.raises(CheckpointError, match="backbone.layers.1"):
    nemojax.load(bad)


def test_config_pattern_of_wrong_length(good_dir, tmp_path):
  bad = _rewrite(good_dir, tmp_path / "c", lambda t: None)
  with open(bad / "config.json") as f:
    cfg = json.load(f)
  cfg.pop("layers_block_type")
  cfg["hybrid_override_pattern"] = "M-M*-"
  cfg["num_hidden_layers"] = 6
  with open(bad / "config.json", "w") as f:
    json.dump(cfg, f)
  with pytest.raises(CheckpointError, match=r"config.json.*hybrid_override_pattern"):
    nemojax.load(bad)


def test_not_a_checkpoint(tmp_path):
  with pytest.raises(CheckpointError, match="not a model directory"):
    nemojax.load(tmp_path)
  with pytest.raises(FileNotFoundError, match="no such model directory"):
    nemojax.load(tmp_path / "nope")
