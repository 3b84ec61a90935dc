"""Reliability: damage is named, not loaded; interruptions leave nothing behind; NaN is refused.

Fault injection: bytes flipped at seeded offsets and files deleted in every kind of file nemojax
writes (converted and saved checkpoints, training steps); SIGINT/SIGTERM/SIGKILL sent to a
conversion subprocess at seeded moments. Each error must be a CheckpointError (or a one-line CLI
error) naming the file, tensor or argument.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

import nemojax
from nemojax import CheckpointError, NemotronH, NemotronHConfig
from nemojax.cli import main as nemojax_main
from nemojax.convert import api, atomic, cli, integrity, orbax_io, verify
from nemojax.convert.names import tensor_specs

CFG = NemotronHConfig.tiny()
BIG = NemotronHConfig.tiny(vocab_size=16384, hidden_size=512, intermediate_size=2048)  # ~43 MB


def _write_hf(path, config, seed=0, poison=None):
  """A random bf16 HF checkpoint (finite values); `poison` names a tensor to fill with NaN."""
  os.makedirs(path, exist_ok=True)
  rng = np.random.default_rng(seed)
  tensors = {}
  for spec in tensor_specs(config):
    x = rng.standard_normal(spec.shape, np.float32).astype(ml_dtypes.bfloat16)
    if spec.hf_name == poison:
      x[...] = np.nan
    tensors[spec.hf_name] = x
  save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config.to_hf_config(), f)
  return str(path)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  root = tmp_path_factory.mktemp("integrity")
  src = _write_hf(root / "hf", CFG)
  api.convert(src, root / "nj", part_bytes=60_000)  # several parts
  return str(root / "nj")


def _flip(path, seed, n=16):
  """XORs `n` bytes at seeded offsets with nonzero values (each byte really changes)."""
  rng = np.random.default_rng(seed)
  size = os.path.getsize(path)
  offsets = rng.choice(size, min(n, size), replace=False)
  with open(path, "r+b") as f:
    for off, x in zip(offsets, rng.integers(1, 256, len(offsets))):
      f.seek(int(off))
      b = f.read(1)[0]
      f.seek(int(off))
      f.write(bytes([b ^ int(x)]))


def _files(d):
  return sorted(integrity.walk(d))


def _kinds(d):
  """One file of each kind (the same role in another part, or another data chunk, is the same
  kind): a relative path with part numbers and hex chunk names blanked out."""
  out = {}
  for rel in _files(d):
    kind = re.sub(r"part-\d+", "part-N", re.sub(r"/[0-9a-f]{32}$", "/HEX", rel))
    out.setdefault(kind, rel)
  return sorted(out.values())


def _staging(parent):
  return sorted(e for e in os.listdir(parent) if e.startswith("."))


# --------------------------------------------------------------------------------------------------
# Recorded hashes
# --------------------------------------------------------------------------------------------------
def test_every_written_file_is_recorded(converted):
  with open(os.path.join(converted, "nemojax.json")) as f:
    man = json.load(f)
  assert sorted(man["written"]) == [f for f in _files(converted) if f != "nemojax.json"]
  assert len(orbax_io.read(converted).parts) > 2
  for rel, rec in man["written"].items():
    assert rec["size"] == os.path.getsize(os.path.join(converted, rel))
    assert rec["sha256"] == integrity.sha256_file(os.path.join(converted, rel))


@pytest.mark.parametrize("damage", ["flip", "delete"])
def test_damage_to_any_file_is_named(converted, tmp_path, damage):
  """Each kind of file of a converted checkpoint, damaged in turn: `nemojax verify` names it."""
  for i, rel in enumerate(_kinds(converted)):
    d = tmp_path / f"c{i}"
    shutil.copytree(converted, d)
    if damage == "flip":
      _flip(d / rel, seed=i)
    else:
      os.remove(d / rel)
    with pytest.raises(CheckpointError) as e:
      verify.verify(d)
    assert "\n" not in str(e.value) and str(d / rel) in str(e.value), (rel, str(e.value))
    shutil.rmtree(d)


def _largest(d, under=""):
  files = [f for f in _files(d) if f.startswith(under)]
  return max(files, key=lambda f: os.path.getsize(os.path.join(d, f)))


@pytest.mark.parametrize("which", ["data", "orbax_metadata", "manifest", "config"])
def test_load_and_export_refuse_damage(converted, tmp_path, which):
  d = tmp_path / "nj"
  shutil.copytree(converted, d)
  rel = {"data": _largest(converted, "params/"), "orbax_metadata": "params/part-00001/_METADATA",
         "manifest": "nemojax.json", "config": "config.json"}[which]
  _flip(d / rel, seed=7)
  with pytest.raises(CheckpointError, match=str(d / rel)):
    nemojax.load(d)
  with pytest.raises(CheckpointError, match=str(d / rel)):
    api.export(d, tmp_path / "back")
  assert os.listdir(tmp_path) == ["nj"]  # export left neither output nor staging directory
  p = subprocess.run([sys.executable, "-m", "nemojax.cli", "generate", "--model", str(d), "hi"],
                     capture_output=True, text=True, timeout=300,
                     env={**os.environ, "JAX_PLATFORMS": "cpu"}) if which == "data" else None
  if p is not None:  # the CLI exits 1 with the file's name instead of printing garbage
    assert p.returncode == 1 and str(d / rel) in p.stderr, p.stderr


def test_verify_false_skips_hashes_but_not_sizes(converted, tmp_path):
  d = tmp_path / "nj"
  shutil.copytree(converted, d)
  rel = _largest(converted, "params/")
  _flip(d / rel, seed=3)
  nemojax.load(d, verify=False)  # damage in the data goes unseen without hashing
  with open(d / rel, "ab") as f:
    f.write(b"x")
  with pytest.raises(CheckpointError, match=f"{d / rel}: .* bytes, .*nemojax.json records"):
    nemojax.load(d, verify=False)


def test_saved_model_is_recorded_and_checked(tmp_path):
  model = NemotronH(CFG, dtype=jnp.float32, rngs=nnx.Rngs(0), ssd_implementation="xla")
  nemojax.save(model, tmp_path / "m")
  assert verify.verify(tmp_path / "m").num_files == len(_files(tmp_path / "m")) - 1
  rel = _largest(str(tmp_path / "m"), "params/")
  _flip(tmp_path / "m" / rel, seed=11)
  with pytest.raises(CheckpointError, match=str(tmp_path / "m" / rel)):
    nemojax.load(tmp_path / "m")


def test_verify_cli(converted, tmp_path, capsys):
  assert nemojax_main(["verify", converted]) == 0
  assert capsys.readouterr().out.startswith(f"ok: {converted}: nemojax checkpoint")
  shutil.copytree(converted, tmp_path / "nj")
  os.remove(tmp_path / "nj" / "params" / "part-00000" / "_METADATA")
  assert nemojax_main(["verify", str(tmp_path / "nj")]) == 1
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1
  assert f"{tmp_path / 'nj' / 'params' / 'part-00000' / '_METADATA'}: missing" in err


# --------------------------------------------------------------------------------------------------
# Training checkpoints
# --------------------------------------------------------------------------------------------------
def test_training_resume_skips_damaged_and_stray_steps(tmp_path, capsys):
  from nemojax.train import Checkpointer, TrainConfig, Trainer
  config = NemotronHConfig.tiny(vocab_size=64, hybrid_override_pattern="M*-")
  trainer = Trainer(NemotronH(config, dtype=jnp.float32, rngs=nnx.Rngs(0),
                              ssd_implementation="xla"), TrainConfig(total_steps=8))
  state = trainer.init_state()
  ck = Checkpointer(tmp_path / "ck", max_to_keep=5)
  for step in (2, 4, 6):
    ck.save(state.replace(step=jnp.asarray(step, state.step.dtype)))
  ck.close()
  for step in (2, 4, 6):
    assert verify.verify(tmp_path / "ck" / str(step)).kind == "training checkpoint step"
  _flip(tmp_path / "ck" / "6" / _largest(str(tmp_path / "ck" / "6")), seed=5, n=64)
  os.makedirs(tmp_path / "ck" / "9")  # a stray step directory (a run killed while creating it)
  ck = Checkpointer(tmp_path / "ck", max_to_keep=5)
  restored = ck.restore(trainer.abstract_state())
  assert int(restored.step) == 4
  err = capsys.readouterr().err
  assert "skipping training checkpoint step 9" in err and "incomplete" in err
  assert "skipping training checkpoint step 6" in err and "damaged" in err
  assert ck.latest_step() == 4  # the bad ones are out of the way: new saves go through
  ck.save(state.replace(step=jnp.asarray(5, state.step.dtype)))
  assert ck.latest_step() == 5
  ck.close()


# --------------------------------------------------------------------------------------------------
# NaN / Inf
# --------------------------------------------------------------------------------------------------
def test_nan_is_refused_at_convert_load_and_save(tmp_path, capsys):
  name = "backbone.layers.3.mixer.q_proj.weight"
  src = _write_hf(tmp_path / "hf", CFG, poison=name)
  assert cli.main([src, str(tmp_path / "out")]) == 1
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and name in err and "model.safetensors" in err
  assert "NaN/Inf" in err and _staging(tmp_path) == [] and not (tmp_path / "out").exists()
  with pytest.raises(CheckpointError, match=f"model.safetensors: tensor '{name}' holds"):
    nemojax.load(src)
  model = NemotronH(CFG, dtype=jnp.float32, rngs=nnx.Rngs(0), ssd_implementation="xla")
  model.backbone.layers[0].mixer.D[...] = jnp.full_like(model.backbone.layers[0].mixer.D[...],
                                                         jnp.inf)
  with pytest.raises(CheckpointError, match="tensor 'backbone.layers.0.mixer.D' holds"):
    nemojax.save(model, tmp_path / "saved")
  assert not (tmp_path / "saved").exists() and _staging(tmp_path) == []


def test_nonfinite_count_all_float_dtypes():
  for dtype in (np.float16, ml_dtypes.bfloat16, np.float32, np.float64):
    x = np.linspace(-3, 3, 1000).astype(dtype)
    assert integrity.nonfinite_count(x) == 0
    x[[5, 7, 9]] = [np.nan, np.inf, -np.inf]
    assert integrity.nonfinite_count(x) == 3
    assert integrity.nonfinite_count(jnp.asarray(x)) == 3


# --------------------------------------------------------------------------------------------------
# Output locations
# --------------------------------------------------------------------------------------------------
def _unwritable_cases(tmp_path):
  (tmp_path / "file").write_text("x")
  cases = {"under a file": tmp_path / "file" / "out", "in /proc": "/proc/nemojax-out"}
  if os.geteuid() != 0:  # root writes anywhere: a read-only directory proves nothing then
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    cases["read-only"] = ro / "out"
  return cases


@pytest.mark.parametrize("validate_only", [True, False])
def test_unwritable_output_is_named(tmp_path, capsys, validate_only):
  src = _write_hf(tmp_path / "hf", CFG)
  for case, out in _unwritable_cases(tmp_path).items():
    argv = [src, str(out)] + (["--validate-only"] if validate_only else [])
    assert cli.main(argv) == 1, case
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(out) in err, (case, err)
    assert "cannot be" in err, (case, err)


# --------------------------------------------------------------------------------------------------
# Staging directories and signals
# --------------------------------------------------------------------------------------------------
def _dead_pid():
  p = subprocess.Popen([sys.executable, "-c", "pass"])
  p.wait()
  return p.pid


def test_stale_staging_directories_are_cleaned(tmp_path, capsys):
  src = _write_hf(tmp_path / "hf", CFG)
  pid = _dead_pid()
  stale = tmp_path / f".out.tmp-{pid}-0123abcd"
  (stale / "params").mkdir(parents=True)
  live = tmp_path / f".out.tmp-{os.getppid()}-0123abcd"  # a running process's: left alone
  live.mkdir()
  assert cli.main([src, str(tmp_path / "out")]) == 0
  err = capsys.readouterr().err
  assert f"removed {stale}" in err and f"process {pid}" in err
  assert _staging(tmp_path) == [live.name]
  # killed mid-swap: the old output moved aside, the new one not yet in place -> put back
  os.rename(tmp_path / "out", tmp_path / f".out.old-{pid}-89abcdef")
  atomic.remove_stale(str(tmp_path / "out"))
  assert "restored" in capsys.readouterr().err
  assert verify.verify(tmp_path / "out").num_files > 0


def _convert_proc(src, out):
  return subprocess.Popen([sys.executable, "-m", "nemojax.convert", src, out, "--no-progress"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})


def _interrupt_at(src, parent, sig, moment):
  """Starts a conversion and sends `sig` `moment[1]` s after its start ("start") or after its
  staging directory appears ("staged"); returns (returncode, stderr)."""
  out = os.path.join(parent, "out")
  p = _convert_proc(src, out)
  when, delay = moment
  t_end = time.monotonic() + 60
  if when == "staged":
    while p.poll() is None and not _staging(parent) and time.monotonic() < t_end:
      time.sleep(0.002)
  time.sleep(delay)
  if p.poll() is None:
    p.send_signal(sig)
  _, err = p.communicate(timeout=120)
  return p.returncode, err


def _check_after_signal(src, parent, sig, rc, err):
  out = os.path.join(parent, "out")
  if os.path.exists(out):  # finished before the signal landed: then complete
    verify.verify(out)
    shutil.rmtree(out)
  if sig != signal.SIGKILL:
    assert rc in (0, 130, -sig) or "KeyboardInterrupt" in err, (rc, err)
    assert _staging(parent) == [], (rc, err)
  left = _staging(parent)
  p = _convert_proc(src, out)  # the next run: cleans what a killed one left, and succeeds
  _, err2 = p.communicate(timeout=120)
  assert p.returncode == 0, err2
  for name in left:
    assert f"removed {os.path.join(parent, name)}" in err2, (left, err2)
  assert _staging(parent) == [] and verify.verify(out).num_files > 0
  shutil.rmtree(out)


def _moments(seed, n):
  rng = np.random.default_rng(seed)
  return [("staged", float(rng.uniform(0, 0.6))) if i % 3 else ("start", float(rng.uniform(0, 3)))
          for i in range(n)]


@pytest.fixture(scope="module")
def big_src(tmp_path_factory):
  return _write_hf(tmp_path_factory.mktemp("big") / "hf", BIG)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL],
                         ids=["SIGINT", "SIGTERM", "SIGKILL"])
def test_signal_during_conversion(big_src, tmp_path, sig):
  rc, err = _interrupt_at(big_src, str(tmp_path), sig, ("staged", 0.15))
  _check_after_signal(big_src, str(tmp_path), sig, rc, err)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_signals_at_seeded_moments(big_src, tmp_path, sig):
  # SIGKILL (nothing runs after it) at four moments; SIGTERM at two. SIGINT shares SIGTERM's
  # handler (test_signal_during_conversion sends all three at one moment).
  for i, moment in enumerate(_moments(seed=int(sig), n=4 if sig == signal.SIGKILL else 2)):
    parent = tmp_path / f"m{i}"
    parent.mkdir()
    rc, err = _interrupt_at(big_src, str(parent), sig, moment)
    _check_after_signal(big_src, str(parent), sig, rc, err)
