"""Bad checkpoints: errors that name the file or tensor and what was expected, in one line.

Every case runs through both doors, `nemojax.load` (a CheckpointError) and `nemojax convert`
(exit 1, one line on stderr, nothing left behind), plus fuzzed safetensors headers.
"""

import faulthandler
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.numpy import save_file

import nemojax
from nemojax import CheckpointError, NemotronHConfig
from nemojax import testing as T
from nemojax.convert import api, cli, hf, integrity

CFG = NemotronHConfig.tiny()


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  """A float32 HF checkpoint written by transformers, as one file and sharded."""
  model = T.make_hf_model(CFG, seed=2)
  root = tmp_path_factory.mktemp("hf")
  return {"single": T.save_hf(model, root / "single"),
          "sharded": T.save_hf(model, root / "sharded", max_shard_size="20KB")}


def _leftovers(parent, name):
  return sorted(e for e in os.listdir(parent) if e == name or e.startswith(f".{name}."))


# --------------------------------------------------------------------------------------------------
# Bad input: one line naming the file/tensor and the expectation, exit 1, nothing left behind
# --------------------------------------------------------------------------------------------------
def _copy(src, dst):
  shutil.copytree(src, dst)
  return str(dst)


def _rewrite_single(src, dst, edit):
  d = _copy(src, dst)
  path = os.path.join(d, "model.safetensors")
  with safe_open(path, framework="np") as f:
    tensors = {k: f.get_tensor(k) for k in f.keys()}
  edit(tensors)
  save_file(tensors, path, metadata={"format": "pt"})
  return d


def _shard_of(d, name):
  with open(os.path.join(d, hf.INDEX_FILE)) as f:
    return os.path.join(d, json.load(f)["weight_map"][name])


def _truncate(d):
  f = _shard_of(d, "backbone.layers.0.mixer.in_proj.weight")
  os.truncate(f, os.path.getsize(f) - 100)
  return f


def _corrupt_header(d):
  f = _shard_of(d, "backbone.layers.0.mixer.in_proj.weight")
  with open(f, "r+b") as fh:
    fh.seek(9)
    fh.write(b"\x00\xff")
  return f


def _drop_shard(d):
  f = _shard_of(d, "backbone.layers.0.mixer.in_proj.weight")
  os.remove(f)
  return f


def _pattern(d):
  with open(os.path.join(d, "config.json")) as f:
    cfg = json.load(f)
  cfg["layers_block_type"] = ["mamba", "mamba", "mamba", "attention", "mlp", "mamba"]
  with open(os.path.join(d, "config.json"), "w") as f:
    json.dump(cfg, f)
  return "backbone.layers.1"


def _pattern_length(d):
  with open(os.path.join(d, "config.json")) as f:
    cfg = json.load(f)
  cfg.pop("layers_block_type")
  cfg["hybrid_override_pattern"] = "M-M*-"
  cfg["num_hidden_layers"] = 6
  with open(os.path.join(d, "config.json"), "w") as f:
    json.dump(cfg, f)
  return os.path.join(d, "config.json")


def _in_proj_short(t):
  t["backbone.layers.0.mixer.in_proj.weight"] = t["backbone.layers.0.mixer.in_proj.weight"][:-1]


BAD = {
    # case: (source kind, how to break a copy, expected fragments of the message)
    "truncated": ("sharded", _truncate, ["truncated", "the header needs"]),
    "header": ("sharded", _corrupt_header, ["corrupted safetensors header"]),
    "missing_shard": ("sharded", _drop_shard, ["shard file is missing"]),
    "missing_tensor": ("single", "missing", ["missing tensor 'backbone.layers.2.mixer.dt_bias'",
                                             "required by the config"]),
    "unexpected_tensor": ("single", "unexpected", [
        "model.safetensors: unexpected tensor 'backbone.layers.1.mixer.extra'"]),
    "wrong_shape": ("single", "shape", [
        "model.safetensors", "backbone.layers.0.mixer.in_proj.weight",
        str((CFG.in_proj_dim - 1, CFG.hidden_size)), str((CFG.in_proj_dim, CFG.hidden_size))]),
    "pattern": ("sharded", _pattern, ["backbone.layers.1"]),
    "pattern_length": ("single", _pattern_length, ["config.json", "hybrid_override_pattern"]),
}


def _make_bad(dirs, case, where):
  kind, how, _ = BAD[case]
  dst = where / f"bad_{case}"
  if how == "missing":
    drop = "backbone.layers.2.mixer.dt_bias"
    return _rewrite_single(dirs[kind], dst, lambda t: t.pop(drop)), None
  if how == "unexpected":
    return _rewrite_single(dirs[kind], dst, lambda t: t.__setitem__(
        "backbone.layers.1.mixer.extra", np.zeros(3, np.float32))), None
  if how == "shape":
    return _rewrite_single(dirs[kind], dst, _in_proj_short), None
  d = _copy(dirs[kind], dst)
  return d, how(d)


def _assert_clean_failure(rc, err, parent, name, fragments, file=None):
  assert rc == 1
  lines = err.strip().splitlines()
  assert len(lines) == 1, err
  assert lines[0].startswith("nemojax convert: error: ") or lines[0].startswith(
      "python -m nemojax.convert: error: "), lines[0]
  for frag in fragments:
    assert frag in lines[0], (frag, lines[0])
  if file is not None:
    assert str(file) in lines[0] or os.path.basename(file) in lines[0], (file, lines[0])
  assert _leftovers(parent, name) == []


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_convert(dirs, case, tmp_path, capsys):
  """`nemojax convert`: exit 1, one line, nothing left behind."""
  bad, file = _make_bad(dirs, case, tmp_path)
  out = tmp_path / "out"
  rc = cli.main([bad, str(out)])
  _assert_clean_failure(rc, capsys.readouterr().err, tmp_path, "out", BAD[case][2], file)


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_load(dirs, case, tmp_path):
  """`nemojax.load` of the same damage: a one-line CheckpointError with the same content."""
  bad, file = _make_bad(dirs, case, tmp_path)
  with pytest.raises(CheckpointError) as e:
    nemojax.load(bad)
  msg = str(e.value)
  assert "\n" not in msg
  for frag in BAD[case][2]:
    assert frag in msg, (frag, msg)
  if file is not None:
    assert str(file) in msg or os.path.basename(file) in msg, (file, msg)


def test_not_a_checkpoint(tmp_path):
  with pytest.raises(CheckpointError, match="not a model directory"):
    nemojax.load(tmp_path)
  with pytest.raises(FileNotFoundError, match="no such model directory"):
    nemojax.load(tmp_path / "nope")


def test_checkpoint_error_is_one_type():
  """Raised by the readers, exported at the top level, importable from its old place."""
  from nemojax.convert.hf import CheckpointError as Old
  assert nemojax.CheckpointError is CheckpointError is Old
  assert issubclass(CheckpointError, ValueError)


def _run_cli(*args):
  return subprocess.run([sys.executable, "-m", "nemojax.cli", *args], capture_output=True,
                        text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_bad_input_subprocess(dirs, tmp_path):
  """The real command: a truncated shard, then an existing OUT_DIR without --overwrite."""
  bad, file = _make_bad(dirs, "truncated", tmp_path)
  p = _run_cli("convert", bad, str(tmp_path / "out"))
  _assert_clean_failure(p.returncode, p.stderr, tmp_path, "out", BAD["truncated"][2], file)

  existing = tmp_path / "existing"
  existing.mkdir()
  (existing / "keep.txt").write_text("mine")
  p = _run_cli("convert", dirs["single"], str(existing))
  assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1, p.stderr
  assert f"{existing}: already exists; pass --overwrite" in p.stderr
  assert sorted(os.listdir(existing)) == ["keep.txt"]
  assert _leftovers(tmp_path, "existing") == ["existing"]


def test_existing_out_dir_main(dirs, tmp_path, capsys):
  (tmp_path / "out").mkdir()
  assert cli.main([dirs["single"], str(tmp_path / "out")]) == 1
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "already exists; pass --overwrite" in err
  assert os.listdir(tmp_path / "out") == []


def test_bad_nemojax_dir(dirs, tmp_path):
  """An edited manifest is caught by its own hash; a consistent (re-sealed) but wrong one by the
  structural checks; a deleted part directory by the file records."""
  out = tmp_path / "nj"
  api.convert(dirs["single"], out, dtype="float32")
  man = json.loads((out / "nemojax.json").read_text())

  def write(m, reseal=True):
    (out / "nemojax.json").write_text(json.dumps(integrity.seal(m) if reseal else m))

  dropped = man["tensors"].pop(3)
  write(man, reseal=False)
  with pytest.raises(CheckpointError, match="nemojax.json: damaged .*manifest_sha256"):
    nemojax.load(out)
  write(man)
  with pytest.raises(CheckpointError, match=f"nemojax.json: missing tensor '{dropped['name']}'"):
    nemojax.load(out)
  man["tensors"].insert(3, dropped)
  man["format_version"] = 99
  write(man)
  with pytest.raises(CheckpointError, match="format_version 99"):
    nemojax.load(out)
  man["format_version"] = 1
  write(man)
  shutil.rmtree(out / "params" / man["parts"][0])
  missing = r"part-00000/\S+: missing \(listed in .*nemojax.json\)"
  with pytest.raises(CheckpointError, match=missing):
    nemojax.load(out)


def _fuzz_target(tmp_path_factory, dirs):
  d = tmp_path_factory.mktemp("fuzz")
  shutil.copy(os.path.join(dirs["single"], "config.json"), d)
  with open(os.path.join(dirs["single"], "model.safetensors"), "rb") as f:
    blob = f.read()
  return str(d), blob, 8 + int.from_bytes(blob[:8], "little")


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory, dirs):
  return _fuzz_target(tmp_path_factory, dirs)


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzzed_header_gives_checkpoint_error(fuzz, data):
  """Byte replacements and truncations in the header: a clean CheckpointError or a valid read."""
  d, blob, header_end = fuzz
  buf = bytearray(blob)
  if data.draw(st.booleans(), label="truncate"):
    buf = buf[:data.draw(st.integers(0, header_end + 16), label="length")]
  else:
    for _ in range(data.draw(st.integers(1, 6), label="edits")):
      buf[data.draw(st.integers(0, header_end - 1), label="pos")] = data.draw(
          st.integers(0, 255), label="byte")
  with open(os.path.join(d, "model.safetensors"), "wb") as f:
    f.write(bytes(buf))
  faulthandler.dump_traceback_later(30, exit=True)  # a hang kills the run with a traceback
  try:
    ckpt = hf.inspect(d)
  except CheckpointError as e:
    assert "\n" not in str(e) and "model.safetensors" in str(e)
  else:  # the edit kept the header valid: every tensor must then read as declared
    for info, arr in hf.iter_tensors(ckpt):
      assert arr.shape == info.spec.shape
  finally:
    faulthandler.cancel_dump_traceback_later()
