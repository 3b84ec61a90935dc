"""Training throughput of `nemojax.train.Trainer` on the GPU machine (issue #14).

Model: `--config slice` is Nano-9B-v2's widths with its first 15 blocks (M-M-M-MM-M-M-M*, 3.25B
parameters), random weights; `--config tiny` runs every case on the CPU in seconds, to check the
script before spending device time. Sequences of `--seq` tokens (4096), random ids, every next
token a target.

Each case (`--cases`, comma-separated names of CASES) runs in its own process, so that its peak
device memory is its own: model init, the first step (its wall time less one step's is the
compile time), `--warmup` more steps, then the median of `--steps` timed steps. Reported:
seconds per step, tokens/s, MFU and peak memory (`peak_bytes_in_use`).

MFU counts 6·N FLOPs per token for a full fine-tune and 4·N for LoRA (forward 2N, backward to the
activations 2N; the frozen weights get no gradient), N = the parameters that multiply activations
(everything but the embedding table), against 790 TFLOP/s of bf16 dense matmul on the H200.
Attention's own FLOPs (one layer in 15, 4096 tokens) are left out. `mfu_6n_total` repeats the
issue's accounting (6 × all parameters) for comparison with its 2026-12-01 baseline.

Results go to OUT/train_bench.json (one row per case) and a table is printed last.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import nemojax
from nemojax import testing as T
from nemojax.lora import LORA_PARAM, apply_lora
from nemojax.train import TrainConfig, Trainer

PEAK_FLOPS = 790e12
SLICE_PATTERN = "M-M-M-MM-M-M-M*"

# name -> (batch, TrainConfig overrides, LoRA rank or None). "bf16" is the 2026-12-01 baseline:
# bf16 weights and moments, full logits, no remat.
BASELINE = dict(master_weights=False, moment_dtype=None, loss_chunk_size=None)
CASES: dict[str, tuple[int, dict, int | None]] = {
    "bf16_b1": (1, BASELINE, None),
    "bf16_b1_chunked": (1, dict(BASELINE, loss_chunk_size=1024), None),
    "mixed_b1": (1, {}, None),
    "bf16w_f32m_b1": (1, dict(master_weights=False), None),
    "mixed_b1_full": (1, dict(remat="full"), None),
    "mixed_b1_dots": (1, dict(remat="dots"), None),
    "mixed_b4_full": (4, dict(remat="full"), None),
    "mixed_b4_dots": (4, dict(remat="dots"), None),
    "mixed_b4_offload": (4, dict(remat="offload"), None),
    "bf16w_f32m_b4_full": (4, dict(master_weights=False, remat="full"), None),
    "mixed_b8_full": (8, dict(remat="full"), None),
    "mixed_b8_accum4_full": (8, dict(remat="full", grad_accum_steps=4), None),
    "lora16_b4_full": (4, dict(remat="full"), 16),
    "lora16_b8_dots": (8, dict(remat="dots"), 16),
}
DEFAULT_CASES = ",".join(CASES)


def log(*a):
  print(*a, flush=True)


def model_config(name: str) -> nemojax.NemotronHConfig:
  if name == "tiny":
    return nemojax.NemotronHConfig.tiny(vocab_size=256, hybrid_override_pattern="M-M*")
  if name == "nano9b":  # the whole Nano-9B-v2 shape (the LoRA target)
    return nemojax.NemotronHConfig.nano_9b_v2()
  if name == "slice":
    return dataclasses.replace(nemojax.NemotronHConfig.nano_9b_v2(),
                               hybrid_override_pattern=SLICE_PATTERN,
                               num_hidden_layers=len(SLICE_PATTERN))
  raise SystemExit(f"--config: got {name!r}, expected 'slice', 'nano9b' or 'tiny'")


def peak_bytes() -> int:
  try:
    return int((jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use", 0))
  except Exception:
    return 0


def run_case(name: str, args) -> dict:
  batch_size, overrides, rank = CASES[name]
  cfg = model_config(args.config)
  model = T.random_model(cfg)
  total = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  matmul_params = total - model.backbone.embeddings.weight.size
  if rank is not None:
    apply_lora(model, rank)
  config = TrainConfig(**{"learning_rate": 1e-5, "warmup_steps": 10, "total_steps": 10_000,
                          **overrides})
  trainer = Trainer(model, config, wrt=LORA_PARAM if rank is not None else nnx.Param)
  del model
  rng = np.random.default_rng(0)
  batch = {"tokens": jnp.asarray(rng.integers(0, cfg.vocab_size, (batch_size, args.seq + 1)),
                                 jnp.int32)}
  state = trainer.init_state()

  def step(state):
    state, metrics = trainer.step(state, batch)
    return state, float(metrics["loss"])  # the read-back waits for the step

  t0 = time.perf_counter()
  state, first_loss = step(state)
  first = time.perf_counter() - t0
  for _ in range(args.warmup):
    state, _ = step(state)
  times, losses = [], []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    state, loss = step(state)
    times.append(time.perf_counter() - t0)
    losses.append(loss)
  s = statistics.median(times)
  tokens = batch_size * args.seq
  flops_per_token = (4 if rank is not None else 6) * matmul_params
  trained = sum(x.size for x in jax.tree.leaves(state.params))
  return {
      "case": name, "config": args.config, "batch": batch_size, "seq": args.seq,
      "lora_rank": rank, "train_config": {k: v for k, v in dataclasses.asdict(config).items()
                                          if k in overrides or k == "loss_chunk_size"},
      "params_total": int(total), "params_trained": int(trained),
      "s_per_step": s, "tokens_per_s": tokens / s,
      "mfu": flops_per_token * tokens / s / PEAK_FLOPS,
      "mfu_6n_total": 6 * total * tokens / s / PEAK_FLOPS,
      "compile_s": max(first - s, 0.0), "first_step_s": first,
      "peak_gib": peak_bytes() / 2**30, "loss_first": first_loss, "loss_last": losses[-1],
      "finite": bool(np.isfinite(losses).all()),
  }


def run_isolated(name: str, args) -> dict:
  """Runs one case in a fresh process (its own peak memory); an out-of-memory is a result."""
  cmd = [sys.executable, __file__, "--case", name, "--config", args.config, "--seq",
         str(args.seq), "--steps", str(args.steps), "--warmup", str(args.warmup)]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.case_timeout)
  for line in proc.stdout.splitlines():
    if line.startswith("RESULT "):
      return json.loads(line[len("RESULT "):])
  tail = (proc.stdout + proc.stderr)[-2000:]
  oom = "RESOURCE_EXHAUSTED" in tail or "out of memory" in tail.lower()
  log(f"  {name}: {'out of memory' if oom else 'failed'} (exit {proc.returncode})\n{tail}")
  return {"case": name, "config": args.config, "batch": CASES[name][0], "seq": args.seq,
          "error": "out of memory" if oom else f"exit {proc.returncode}"}


def table(rows: list[dict]) -> str:
  head = (f"{'case':<22} {'batch':>5} {'s/step':>8} {'tok/s':>9} {'MFU':>6} {'peak GiB':>9} "
          f"{'compile s':>9}")
  lines = [head, "-" * len(head)]
  for r in rows:
    if "error" in r:
      lines.append(f"{r['case']:<22} {r['batch']:>5} {r['error']}")
      continue
    lines.append(f"{r['case']:<22} {r['batch']:>5} {r['s_per_step']:>8.3f} "
                 f"{r['tokens_per_s']:>9.0f} {r['mfu']:>6.1%} {r['peak_gib']:>9.1f} "
                 f"{r['compile_s']:>9.1f}")
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="slice", help="slice or nano9b (GPU), tiny (CPU smoke test)")
  p.add_argument("--cases", default=DEFAULT_CASES, help=f"comma-separated, of: {DEFAULT_CASES}")
  p.add_argument("--seq", type=int, default=4096, help="tokens per row")
  p.add_argument("--steps", type=int, default=5, help="timed steps (median)")
  p.add_argument("--warmup", type=int, default=1, help="untimed steps after the first")
  p.add_argument("--case-timeout", type=int, default=900, help="seconds per case process")
  p.add_argument("--out", default="benchmarks/out", help="directory for train_bench.json")
  p.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
  args = p.parse_args()
  if args.case:
    print("RESULT " + json.dumps(run_case(args.case, args)), flush=True)
    return
  names = [c for c in args.cases.split(",") if c]
  unknown = [c for c in names if c not in CASES]
  if unknown:
    raise SystemExit(f"--cases: unknown {unknown}; expected some of {DEFAULT_CASES}")
  log(f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}; config {args.config}, "
      f"seq {args.seq}")
  rows = []
  for name in names:
    log(f"case {name} ...")
    rows.append(run_isolated(name, args))
    log(f"  {rows[-1]}")
  os.makedirs(args.out, exist_ok=True)
  result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
            "date": time.strftime("%Y-%m-%d"), "rows": rows}
  with open(os.path.join(args.out, "train_bench.json"), "w") as f:
    json.dump(result, f, indent=1)
  log(table(rows))


if __name__ == "__main__":
  main()
