"""Checkpoint conversion: HF -> nemojax -> HF round trips, atomic output, the CLI (bad input:
test_checkpoint_errors.py).

The references are independent of nemojax: transformers' PyTorch model (logits) and the original
safetensors files (bytes per tensor).
"""

import copy
import hashlib
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors import safe_open

import nemojax
from nemojax import NemotronHConfig
from nemojax import testing as T
from nemojax.cli import main as nemojax_main
from nemojax.convert import api, cli, orbax_io

CFG = NemotronHConfig.tiny()
EXTRA = {"tokenizer.json": '{"version": "1.0"}', "tokenizer_config.json": "{}",
         "chat_template.jinja": "{{ messages }}", "README.md": "not copied"}


def _add_extra_files(d):
  for name, text in EXTRA.items():
    with open(os.path.join(d, name), "w") as f:
      f.write(text)
  os.makedirs(os.path.join(d, "additional_chat_templates"))
  with open(os.path.join(d, "additional_chat_templates", "tool_use.jinja"), "w") as f:
    f.write("{{ tools }}")
  return d


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
  """The PyTorch model and its checkpoints: fp32 single file, fp32 sharded, bf16 sharded."""
  model = T.make_hf_model(CFG, seed=3)
  root = tmp_path_factory.mktemp("hf")
  dirs = {
      "single": T.save_hf(model, root / "single"),
      "sharded": T.save_hf(model, root / "sharded", max_shard_size="20KB"),
  }
  bf16 = copy.deepcopy(model).to(torch.bfloat16)
  dirs["bf16"] = T.save_hf(bf16, root / "bf16", max_shard_size="40KB")
  for d in dirs.values():
    _add_extra_files(d)
  ids = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 2 * CFG.chunk_size + 3))
  return model, dirs, ids, T.hf_logits(model, ids)


def _tensors(d):
  """name -> (safetensors dtype string, shape, raw bytes) of every tensor in an HF dir."""
  out = {}
  for f in sorted(os.listdir(d)):
    if f.endswith(".safetensors"):
      with safe_open(os.path.join(d, f), framework="np") as st_:
        for k in st_.keys():
          sl = st_.get_slice(k)
          out[k] = (sl.get_dtype(), tuple(sl.get_shape()), st_.get_tensor(k).tobytes())
  return out


def _leftovers(parent, name):
  return sorted(e for e in os.listdir(parent) if e == name or e.startswith(f".{name}."))


# --------------------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["single", "sharded"])
def test_round_trip_fp32(ref, kind, tmp_path, capsys):
  model, dirs, ids, want = ref
  src = dirs[kind]
  out, back = tmp_path / "nj", tmp_path / "back"
  assert cli.main([src, str(out), "--dtype", "float32"]) == 0
  summary = capsys.readouterr().out.strip()
  assert summary.startswith("convert: 41 tensors") and str(out) in summary

  # HF -> nemojax: logits equal the PyTorch model's.
  assert orbax_io.is_nemojax_checkpoint(out)
  ours = nemojax.load(out, dtype=jnp.float32)
  assert ours.config == CFG
  assert T.rel_err(ours(ids), want) <= T.RTOL["float32"]

  # Manifest: source files with their sha256, original dtypes, copied files.
  man = json.loads((out / "nemojax.json").read_text())
  assert man["format"] == "nemojax" and man["dtype"] == "float32" and man["lossless"]
  for entry in man["source"]["files"]:
    with open(os.path.join(src, entry["name"]), "rb") as f:
      assert entry["sha256"] == hashlib.sha256(f.read()).hexdigest()
  assert {t["hf_dtype"] for t in man["tensors"]} == {"F32"}
  for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
               "generation_config.json", "config.json"):
    assert (out / name).is_file(), name
  assert (out / "additional_chat_templates" / "tool_use.jinja").is_file()
  assert not (out / "README.md").exists()

  # nemojax -> HF: every tensor bit-identical; transformers loads it and agrees.
  assert nemojax_main(["export", str(out), str(back), "--max-shard-size", "60KB"]) == 0
  assert _tensors(back) == _tensors(src)
  assert (back / "model.safetensors.index.json").is_file() and (back / "tokenizer.json").is_file()
  assert (back / "additional_chat_templates" / "tool_use.jinja").is_file()
  from transformers import AutoModelForCausalLM
  again = AutoModelForCausalLM.from_pretrained(back).float().eval()
  T.unclamp_dt_(again)
  np.testing.assert_array_equal(T.hf_logits(again, ids), want)
  assert _leftovers(tmp_path, "nj") == ["nj"] and _leftovers(tmp_path, "back") == ["back"]


def test_bf16_checkpoint_round_trips_with_original_dtypes(ref, tmp_path):
  """bf16 source -> nemojax bf16 (A_log, D, dt_bias, norms upcast to fp32) -> identical bf16."""
  _, dirs, _, _ = ref
  out, back = tmp_path / "nj", tmp_path / "back"
  report = api.convert(dirs["bf16"], out)  # default dtype: bfloat16
  assert report.notes == ()
  stored = {t.spec.hf_name: t for t in orbax_io.read(out).tensors}
  assert stored["backbone.layers.0.mixer.A_log"].dtype == np.float32
  assert stored["backbone.layers.0.mixer.in_proj.weight"].dtype == jnp.bfloat16
  api.export(out, back, max_shard_size="1MB")
  assert (back / "model.safetensors").is_file()  # one shard: no index, like save_pretrained
  assert _tensors(back) == _tensors(dirs["bf16"])


def test_fp32_to_bf16_is_reported_as_lossy(ref, tmp_path, capsys):
  _, dirs, _, _ = ref
  assert cli.main([dirs["single"], str(tmp_path / "nj")]) == 0
  err = capsys.readouterr().err
  assert "rounded to bfloat16" in err and "float32" in err
  man = json.loads((tmp_path / "nj" / "nemojax.json").read_text())
  assert man["lossless"] is False and man["dtype"] == "bfloat16"
  # export restores the original dtype (values rounded), or the one asked for
  api.export(tmp_path / "nj", tmp_path / "a")
  assert {v[0] for v in _tensors(tmp_path / "a").values()} == {"F32"}
  api.export(tmp_path / "nj", tmp_path / "b", dtype="bfloat16")
  assert {v[0] for v in _tensors(tmp_path / "b").values()} == {"BF16"}


def _params(model):
  from flax import nnx
  return jax.tree.leaves_with_path(nnx.to_pure_dict(nnx.state(model)))


def test_save_model_and_load_with_sharding(ref, tmp_path):
  """save(model) of an in-memory model (as after fine-tuning), restored into given shardings."""
  _, dirs, _, _ = ref
  model = nemojax.load(dirs["single"], dtype=jnp.float32)
  api.save(model, tmp_path / "ft", copy_from=dirs["single"], part_bytes=100_000)
  assert len(orbax_io.read(tmp_path / "ft").parts) > 2
  assert (tmp_path / "ft" / "tokenizer.json").is_file()
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("x",))
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  again = nemojax.load(tmp_path / "ft", dtype=jnp.float32, sharding=lambda spec: rep)
  for (path, a), (path2, b) in zip(_params(model), _params(again), strict=True):
    assert path == path2 and b.sharding == rep and a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # bf16 load of the same files: matmul weights cast on restore, the fp32 policy kept
  half = nemojax.load(tmp_path / "ft")
  assert half.backbone.layers[0].mixer.in_proj.weight[...].dtype == jnp.bfloat16
  assert half.backbone.layers[0].mixer.A_log[...].dtype == jnp.float32
  api.export(tmp_path / "ft", tmp_path / "back")
  assert _tensors(tmp_path / "back") == _tensors(dirs["single"])
  # model -> HF directly (what the demo trainer writes its model with)
  api.export_model(model, tmp_path / "hf", copy_from=dirs["single"], max_shard_size="60KB")
  assert _tensors(tmp_path / "hf") == _tensors(dirs["single"])
  assert (tmp_path / "hf" / "tokenizer.json").is_file()


def test_overwrite_replaces_and_failure_keeps_the_old(ref, tmp_path, monkeypatch):
  _, dirs, _, _ = ref
  out = tmp_path / "nj"
  api.convert(dirs["single"], out, dtype="float32")
  with pytest.raises(FileExistsError, match="already exists.*--overwrite"):
    api.convert(dirs["single"], out)
  api.convert(dirs["bf16"], out, overwrite=True)
  assert json.loads((out / "nemojax.json").read_text())["dtype"] == "bfloat16"

  def boom(self):
    raise OSError("disk on fire")

  monkeypatch.setattr(orbax_io.PartWriter, "flush", boom)
  with pytest.raises(OSError, match="disk on fire"):
    api.convert(dirs["single"], out, dtype="float32", overwrite=True)
  assert _leftovers(tmp_path, "nj") == ["nj"]
  assert orbax_io.read(out).manifest["dtype"] == "bfloat16"  # still the bf16 conversion


def test_refuses_to_replace_other_directories(ref, tmp_path):
  _, dirs, _, _ = ref
  precious = tmp_path / "precious"
  precious.mkdir()
  (precious / "thesis.tex").write_text("years of work")
  with pytest.raises(FileExistsError, match="not a nemojax checkpoint"):
    api.convert(dirs["single"], precious, overwrite=True)
  assert (precious / "thesis.tex").read_text() == "years of work"
  with pytest.raises(ValueError, match="must not be, contain or lie inside"):
    api.convert(dirs["single"], os.path.join(dirs["single"], "out"))


def test_validate_only_writes_nothing(ref, tmp_path, capsys):
  _, dirs, _, _ = ref
  assert cli.main([dirs["sharded"], str(tmp_path / "nj"), "--validate-only"]) == 0
  out = capsys.readouterr().out
  assert out.startswith("ok: ") and "41 tensors valid" in out and "nothing written" in out
  assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------------
def _parser_options(parser):
  return [(a.option_strings or [a.metavar or a.dest], a.help) for a in parser._actions
          if a.dest != "help"]


@pytest.mark.parametrize("command", ["convert", "export"])
def test_help_documents_every_option(command, capsys):
  with pytest.raises(SystemExit) as e:
    nemojax_main([command, "--help"])
  assert e.value.code == 0
  text = " ".join(capsys.readouterr().out.split())
  import argparse
  parser = argparse.ArgumentParser()
  sub = parser.add_subparsers()
  cli.register(sub)
  options = _parser_options(sub.choices[command])
  for names, help_text in options:
    assert help_text and len(help_text) > 15, names
    for name in names:
      assert name in text, name
  expected = {"convert": ["--dtype", "--validate-only", "--overwrite", "--no-sha256",
                          "--progress", "--no-progress", "HF_DIR", "OUT_DIR"],
              "export": ["--dtype", "--max-shard-size", "--overwrite", "NEMOJAX_DIR", "HF_DIR"]}
  for name in expected[command]:
    assert name in text


def test_python_m_nemojax_convert_help():
  p = subprocess.run([sys.executable, "-m", "nemojax.convert", "--help"], capture_output=True,
                     text=True, timeout=120)
  assert p.returncode == 0 and "--validate-only" in p.stdout and "--dtype" in p.stdout


def test_max_shard_size_parsing():
  from nemojax.convert.safetensors_out import parse_size
  assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30
  assert parse_size("20KB") == 20_000 and parse_size(123) == 123
  assert parse_size("1.5MB") == 1_500_000
  for bad in ("five", "-1GB", "0", "5XB"):
    with pytest.raises(ValueError, match="max shard size"):
      parse_size(bad)
