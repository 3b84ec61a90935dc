"""The GPU-machine benchmark scripts run end to end on CPU at tiny sizes.

Device time is scarce: a script that breaks should break here, not on the GPU machine.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args, tmp_path, timeout=600):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, *args, "--out", str(tmp_path)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "ERROR" not in proc.stdout, proc.stdout[-3000:]
  return proc.stdout


@pytest.mark.slow
def test_e2e_script(tmp_path):
  _run(["benchmarks/e2e.py", "--config", "tiny", "--parts", "long,prefill,decode,profile",
        "--prefill-len", "64", "--prefill-chunks", "32", "--impls", "xla", "--long-len", "80",
        "--long-new", "2", "--long-chunk", "32", "--batches", "1", "--contexts", "32",
        "--decode-steps", "2", "--profile-cases", "decode_b1_ctx32,prefill_64"], tmp_path)
  res = json.loads((tmp_path / "e2e.json").read_text())
  assert res["long"]["new_tokens"] == 2 and res["long"]["prefill_chunk32_temp_gib"] > 0
  assert res["prefill"]["xla_chunk32"]["ttft_ms"] > 0
  assert res["decode"]["b1_ctx32"]["ms_per_step"] > 0
  assert set(res["profile"]) == {"decode_b1_ctx32", "prefill_64"}
  assert (tmp_path / "trace_prefill_64.json.gz").exists()


@pytest.mark.slow
def test_ssd_script(tmp_path):
  _run(["benchmarks/ssd.py", "--smoke", "--shapes", "1x130", "--head-dims", "64", "--chunks",
        "128", "--impls", "xla", "--step"], tmp_path)
  rows = json.loads((tmp_path / "ssd_bench.json").read_text())
  assert rows[0]["xla_err_y"] < 1e-2 and sum(r.get("step", False) for r in rows) == 4


@pytest.mark.slow
def test_attention_script(tmp_path):
  _run(["benchmarks/attention.py", "--smoke"], tmp_path)
  rows = json.loads((tmp_path / "attention_bench.json").read_text())
  assert rows[0]["pallas_err"] < 1e-2 and rows[0]["pallas_finite"]
