"""benchmarks/train.py runs end to end on CPU at tiny sizes (device time is scarce)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_train_script(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  cases = "bf16_b1,mixed_b8_accum4_full,lora16_b4_full"
  proc = subprocess.run(
      [sys.executable, "benchmarks/train.py", "--config", "tiny", "--seq", "24", "--steps", "1",
       "--warmup", "0", "--cases", cases, "--out", str(tmp_path)],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  rows = json.loads((tmp_path / "train_bench.json").read_text())["rows"]
  assert [r["case"] for r in rows] == cases.split(",")
  for r in rows:
    assert "error" not in r, r
    assert r["finite"] and r["tokens_per_s"] > 0 and r["compile_s"] > 0
  lora = rows[2]
  assert lora["lora_rank"] == 16 and 0 < lora["params_trained"] < lora["params_total"]
  assert rows[1]["train_config"]["grad_accum_steps"] == 4
