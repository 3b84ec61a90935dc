"""Peak host memory of `nemojax convert` / `export` / `load` against the checkpoint size.

Writes a synthetic HF checkpoint with Nano-9B-v2's real tensor shapes (so the largest tensors, the
1.17 GB embeddings and lm_head, are the real ones) but fewer layers, shard by shard with
safetensors (no torch model is ever built). Each step then runs as the only child of a fresh
Python, whose `getrusage(RUSAGE_CHILDREN).ru_maxrss` is thus that step's peak RSS. Finally checks
that HF -> nemojax -> HF gave back every tensor bit for bit. Everything is written under a
temporary directory that is removed at the end (unless --keep).

    python benchmarks/convert_memory.py                      # ~5 GB checkpoint
    python benchmarks/convert_memory.py --pattern M-M-M-M*M-M-M-M- --shard-gb 2
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from nemojax.config import NemotronHConfig
from nemojax.convert.names import tensor_specs

GB = 1e9


def write_checkpoint(path: str, config: NemotronHConfig, shard_bytes: float, seed: int = 0) -> int:
  """Random bf16 tensors (finite, |x| < 2) in shards of about `shard_bytes`; returns data bytes."""
  rng = np.random.default_rng(seed)
  specs = tensor_specs(config)
  shards: list[list] = [[]]
  size = 0
  for spec in specs:
    n = int(np.prod(spec.shape)) * 2
    if shards[-1] and size + n > shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(spec)
    size += n
  weight_map = {}
  total = 0
  for i, shard in enumerate(shards):
    name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    tensors = {}
    for spec in shard:
      bits = rng.integers(0, 1 << 16, spec.shape, dtype=np.uint16) & np.uint16(0xBFFF)
      tensors[spec.hf_name] = bits.view(ml_dtypes.bfloat16)
      weight_map[spec.hf_name] = name
      total += bits.nbytes
    save_file(tensors, os.path.join(path, name), metadata={"format": "pt"})
    del tensors
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
  cfg = config.to_hf_config()
  cfg["dtype"] = "bfloat16"
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(cfg, f)
  return total


def run_isolated(cmd: list[str]) -> tuple[float, float, str]:
  """Runs `cmd` under a fresh Python whose only child is `cmd`, so RUSAGE_CHILDREN is its peak."""
  probe = (
      "import resource, subprocess, sys, time, json\n"
      "t = time.perf_counter()\n"
      "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
      "wall = time.perf_counter() - t\n"
      "r = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024\n"
      "print(json.dumps({'rc': p.returncode, 'wall': wall, 'rss': r, 'out': p.stdout, "
      "'err': p.stderr[-2000:]}))\n")
  res = json.loads(subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True,
                                  text=True, check=True).stdout)
  if res["rc"]:
    raise SystemExit(f"{' '.join(cmd)} failed ({res['rc']}):\n{res['err']}")
  return res["wall"], res["rss"] / GB, res["out"].strip()


def same_tensors(a_dir: str, b_dir: str) -> int:
  """Compares every tensor's dtype, shape and bytes; returns how many were compared."""
  def index(d):
    with open(os.path.join(d, "model.safetensors.index.json")) as f:
      return json.load(f)["weight_map"]
  ia, ib = index(a_dir), index(b_dir)
  assert set(ia) == set(ib), "tensor names differ"
  for name in ia:
    with safe_open(os.path.join(a_dir, ia[name]), "np") as fa, \
         safe_open(os.path.join(b_dir, ib[name]), "np") as fb:
      x, y = fa.get_tensor(name), fb.get_tensor(name)
      assert x.dtype == y.dtype and x.shape == y.shape, name
      assert np.array_equal(x.view(np.uint8), y.view(np.uint8)), f"{name}: bytes differ"
  return len(ia)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--pattern", default="M-M-M*M-M-",
                  help="layer pattern with Nano-9B-v2 widths (default: %(default)s, ~5 GB)")
  ap.add_argument("--shard-gb", type=float, default=2.0, help="source shard size in GB")
  ap.add_argument("--dir", default=None, help="work directory (default: a new temp dir)")
  ap.add_argument("--keep", action="store_true", help="keep the files")
  args = ap.parse_args()

  config = NemotronHConfig.nano_9b_v2().replace(
      hybrid_override_pattern=args.pattern, num_hidden_layers=len(args.pattern))
  work = tempfile.mkdtemp(prefix="nemojax-convert-mem-", dir=args.dir)
  src, out, back = (os.path.join(work, d) for d in ("hf", "nemojax", "hf-back"))
  os.makedirs(src)
  py = sys.executable
  try:
    t0 = time.perf_counter()
    data = write_checkpoint(src, config, args.shard_gb * GB)
    largest = max(int(np.prod(s.shape)) * 2 for s in tensor_specs(config))
    print(f"synthetic checkpoint: {data / GB:.2f} GB of bf16 tensors in "
          f"{len(os.listdir(src)) - 2} shards, largest tensor {largest / GB:.2f} GB "
          f"(written in {time.perf_counter() - t0:.0f} s)", flush=True)
    rows = []
    steps = [
        ("python + import nemojax (baseline)", [py, "-c", "import nemojax, orbax.checkpoint"]),
        ("convert --validate-only", [py, "-m", "nemojax.convert", src, "--validate-only"]),
        ("convert (bf16, sha256)", [py, "-m", "nemojax.convert", src, out, "--no-progress"]),
        ("convert --no-sha256 --overwrite", [py, "-m", "nemojax.convert", src, out,
                                             "--no-progress", "--no-sha256", "--overwrite"]),
        ("export (original dtypes, 5GB shards)", [py, "-m", "nemojax.cli", "export", out, back,
                                                  "--no-progress"]),
        ("nemojax.load(nemojax dir), CPU bf16", [
            py, "-c", f"import nemojax; m = nemojax.load({out!r}); print('loaded')"]),
        ("nemojax.load(HF dir), CPU bf16 (for comparison)", [
            py, "-c", f"import nemojax; m = nemojax.load({src!r}); print('loaded')"]),
    ]
    for label, cmd in steps:
      wall, rss, stdout = run_isolated(cmd)
      rows.append((label, wall, rss))
      print(f"{label:48s} {wall:7.1f} s   peak RSS {rss:6.2f} GB   "
            f"({rss * GB / data:5.1%} of checkpoint)   {stdout.splitlines()[-1] if stdout else ''}",
            flush=True)
    n = same_tensors(src, back)
    print(f"round trip: {n} tensors bit-identical after HF -> nemojax -> HF")
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB
    print(f"\n{datetime.date.today()} {platform.machine()} {os.cpu_count()} CPUs {mem:.0f} GB RAM, "
          f"python {platform.python_version()}; checkpoint {data / GB:.2f} GB")
    print("| step | wall s | peak RSS GB | RSS / checkpoint |")
    print("|---|---:|---:|---:|")
    for label, wall, rss in rows:
      print(f"| {label} | {wall:.1f} | {rss:.2f} | {rss * GB / data:.0%} |")
  finally:
    if not args.keep:
      shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
  main()
