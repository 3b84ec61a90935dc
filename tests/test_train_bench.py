"""benchmarks/train.py and benchmarks/train_curve.py run end to end on CPU at tiny sizes (device
time is scarce)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, JAX_PLATFORMS="cpu")


def _run(*args, timeout=600):
  proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True,
                        text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc


@pytest.mark.slow
def test_train_script(tmp_path):
  cases = "slice_mixed_b8_accum4_full,9b_lora16_b4_full"
  _run("benchmarks/train.py", "--config", "tiny", "--seq", "24", "--steps", "1", "--warmup", "0",
       "--cases", cases, "--out", str(tmp_path))
  rows = json.loads((tmp_path / "train_bench.json").read_text())["rows"]
  assert [r["case"] for r in rows] == cases.split(",")
  for r in rows:
    assert "error" not in r, r
    assert r["finite"] and r["tokens_per_s"] > 0 and r["compile_s"] > 0
  lora = rows[1]
  assert lora["lora_rank"] == 16 and 0 < lora["params_trained"] < lora["params_total"]
  assert rows[0]["train_config"]["grad_accum_steps"] == 4


def test_default_cases_are_the_targets_and_the_precision_comparison():
  spec = importlib.util.spec_from_file_location("train_bench", ROOT / "benchmarks" / "train.py")
  bench = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = bench  # dataclasses look their module up there
  try:
    spec.loader.exec_module(bench)
  finally:
    del sys.modules[spec.name]
  default = [bench.CASES[name] for name in bench.DEFAULT_CASES.split(",")]
  slice_full = [c for c in default if c.model == "slice" and c.batch == 8 and c.rank is None
                and c.overrides.get("remat") == "full"]
  # The slice target, and the same batch with bf16 weights + float32 moments.
  assert {c.overrides.get("master_weights", True) for c in slice_full} == {True, False}
  assert any(c.model == "nano9b" and c.batch == 4 and c.rank == 16 for c in default)


@pytest.mark.slow
def test_memory_estimate_mode(tmp_path):
  _run("benchmarks/train.py", "--estimate", "--config", "tiny", "--seq", "32", "--cases",
       "slice_mixed_b8_full,9b_lora16_b4_full", "--out", str(tmp_path))
  rows = json.loads((tmp_path / "train_memory_estimate.json").read_text())["rows"]
  for r in rows:
    assert r["estimate"] == "cpu-compiled" and r["temp_gib"] > 0, r
    assert r["peak_gib"] >= r["arguments_gib"], r
  full, lora = rows
  assert full["donated_gib"] == pytest.approx(full["arguments_gib"], rel=0.05)  # the whole state
  assert lora["donated_gib"] < 0.9 * lora["arguments_gib"]  # the adapters' state, not the base


def test_loss_curve_smoke(tmp_path):
  proc = _run("benchmarks/train_curve.py", "--smoke", "--steps", "6", "--out", str(tmp_path))
  result = json.loads((tmp_path / "train_curve.json").read_text())
  losses = result["train_loss"]
  assert len(losses) == 6 and all(0 < x < 10 for x in losses)
  assert losses[-1] < losses[0]  # falls from ~ln 256 even in six steps
  assert result["eval"][-1]["step"] == 6 and result["loss_unit"] == "nats per byte"
  plot = "train_curve.png" if importlib.util.find_spec("matplotlib") else "train_curve.svg"
  assert (tmp_path / plot).stat().st_size > 1000, proc.stdout
