"""Training throughput and memory of `nemojax.train.Trainer` at real sizes (issue #14).

Each case (`CASES`; `--cases`, comma-separated) names its model: "slice" is Nano-9B-v2's widths
with its first 15 blocks (M-M-M-MM-M-M-M*, 3.25B parameters), "nano9b" the whole Nano-9B-v2 shape
(8.9B; the LoRA target); random weights, sequences of `--seq` tokens (4096) of random ids, every
next token a target. `--config tiny` runs every case on a tiny model instead, to check the script
on a CPU in seconds before spending device time. The default list is the two targets (slice full
fine-tune 8 x 4096, 9B LoRA r16 4 x 4096) and the slice target's batch with bf16 weights +
float32 moments (the precision comparison).

Each case runs in its own process, so that its peak device memory is its own: model init, the
first step (its wall time less one step's is the compile time), `--warmup` more steps, then the
median of `--steps` timed steps (`--profile`: then one more step under jax.profiler, summarised
by `profiling.summarize_trace`: GPU time by kernel and by JAX operation path). Reported: seconds
per step, tokens/s, MFU and peak memory (`peak_bytes_in_use`); an out-of-memory is a result row.

MFU counts 6·N FLOPs per token for a full fine-tune and 4·N for LoRA (forward 2N, backward to the
activations 2N; the frozen weights get no gradient), N = the parameters that multiply activations
(everything but the embedding table; for LoRA the frozen base), against 790 TFLOP/s of bf16 dense
matmul on the H200. Recomputation under remat and attention's own FLOPs are not counted.
`mfu_6n_total` repeats the issue's accounting (6 x all parameters).

`--estimate` needs no device: each case's step is compiled on the CPU from abstract inputs
(`Trainer.lower`; no weights allocated) and XLA's memory analysis reported: arguments, donated
(aliased) bytes, temporaries and peak = arguments + outputs - donated + temporaries. The CPU
compile runs the XLA SSD and attention paths (on the GPU the SSD is the Pallas kernel, whose
backward holds less), so the estimate is an upper bound for the GPU, less fragmentation and the
model weights a caller still holds.

Results go to OUT/train_bench.json (OUT/train_memory_estimate.json with --estimate), one row per
case, and a table is printed last.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
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
from nemojax.model import NemotronH
from nemojax.train import TrainConfig, Trainer

PEAK_FLOPS = 790e12
SLICE_PATTERN = "M-M-M-MM-M-M-M*"
# `--estimate` compiles on the CPU with XLA's optimization-barrier expander off: the CPU pipeline
# otherwise drops jax.checkpoint's barriers before CSE, which merges each block's recomputation
# back into the forward pass and undoes rematerialisation (the GPU pipeline drops them only after
# scheduling, so remat holds there). Nothing compiled there runs, so LLVM does not optimise the
# machine code (buffer assignment is the same; ~30% less compile time on the CPU, 2026-12-02).
REMAT_XLA_FLAG = "--xla_disable_hlo_passes=cse_barrier_expander --xla_backend_optimization_level=0"


@dataclasses.dataclass(frozen=True)
class Case:
  """One measurement: the model ("slice" or "nano9b"), rows per step, TrainConfig overrides and
  the LoRA rank (None: full fine-tune)."""

  model: str
  batch: int
  overrides: dict
  rank: int | None = None


# "bf16" is the 2026-12-01 baseline: bf16 weights and moments, full logits, no remat.
BASELINE = dict(master_weights=False, moment_dtype=None, loss_chunk_size=None)
BF16W = dict(master_weights=False)  # bf16 weights, float32 moments
CASES: dict[str, Case] = {
    # The default list: the two targets and the slice target's batch with bf16 weights +
    # float32 moments (the precision comparison).
    "slice_mixed_b8_full": Case("slice", 8, dict(remat="full")),
    "slice_bf16w_b8_full": Case("slice", 8, dict(BF16W, remat="full")),
    "9b_lora16_b4_full": Case("nano9b", 4, dict(remat="full"), 16),
    # Others, by name. The 9B target in 4 micro-batches fits even without per-key-block remat
    # in the XLA attention's backward (see RESULTS.md); dots recomputes no matmul.
    "9b_lora16_b4_accum4_full": Case("nano9b", 4, dict(remat="full", grad_accum_steps=4), 16),
    "slice_mixed_b8_dots": Case("slice", 8, dict(remat="dots")),
    # Remat that keeps the first product of the MLP (and Mamba) blocks: no matmul recomputed.
    "slice_mixed_b8_mlp": Case("slice", 8, dict(remat="mlp")),
    "slice_mixed_b8_mlp_mamba": Case("slice", 8, dict(remat="mlp_mamba")),
    "9b_lora16_b4_mlp": Case("nano9b", 4, dict(remat="mlp"), 16),
    "9b_lora16_b4_mlp_mamba": Case("nano9b", 4, dict(remat="mlp_mamba"), 16),
    "slice_bf16_b1": Case("slice", 1, BASELINE),
    "slice_mixed_b1": Case("slice", 1, {}),
    "slice_mixed_b4_full": Case("slice", 4, dict(remat="full")),
    "slice_mixed_b4_dots": Case("slice", 4, dict(remat="dots")),
    "slice_mixed_b4_offload": Case("slice", 4, dict(remat="offload")),
    "slice_bf16w_b8_dots": Case("slice", 8, dict(BF16W, remat="dots")),
    "slice_mixed_b8_accum4_full": Case("slice", 8, dict(remat="full", grad_accum_steps=4)),
    "9b_lora16_b4_dots": Case("nano9b", 4, dict(remat="dots"), 16),
    "9b_lora16_b4_accum2_full": Case("nano9b", 4, dict(remat="full", grad_accum_steps=2), 16),
    "slice_bf16w_b8_accum4_full": Case("slice", 8, dict(BF16W, remat="full",
                                                         grad_accum_steps=4)),
    "9b_lora16_b8_full": Case("nano9b", 8, dict(remat="full"), 16),
}
DEFAULT_CASES = "slice_mixed_b8_full,slice_bf16w_b8_full,9b_lora16_b4_full"


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


def build(name: str, args, *, abstract: bool = False):
  """(case, model config, trainer, all parameters, matmul parameters) of one case."""
  case = CASES[name]
  cfg = model_config(args.config or case.model)
  if abstract:  # shapes only: nothing allocated (`--estimate`)
    def make():
      m = NemotronH(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0), ssd_implementation="xla")
      return apply_lora(m, case.rank) if case.rank is not None else m
    model = nnx.eval_shape(make)
  else:
    model = T.random_model(cfg)
    if case.rank is not None:
      apply_lora(model, case.rank)
  base = nnx.state(model, nnx.All(nnx.Param, nnx.Not(LORA_PARAM)))  # LoRA: the frozen base
  total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(base))
  matmul_params = total - int(np.prod(model.backbone.embeddings.weight.shape))
  config = TrainConfig(**{"learning_rate": 1e-5, "warmup_steps": 10, "total_steps": 10_000,
                          **case.overrides})
  trainer = Trainer(model, config, wrt=LORA_PARAM if case.rank is not None else nnx.Param)
  return case, cfg, trainer, total, matmul_params


def describe(name: str, case: Case, cfg, trainer, total: int, args) -> dict:
  return {"case": name, "config": args.config or case.model, "batch": case.batch,
          "seq": args.seq, "lora_rank": case.rank,
          "train_config": {k: v for k, v in dataclasses.asdict(trainer.config).items()
                           if k in case.overrides or k == "loss_chunk_size"},
          "params_total": int(total)}


def estimate_case(name: str, args) -> dict:
  """XLA's memory analysis of the step compiled on the CPU from abstract inputs (GiB)."""
  case, cfg, trainer, total, _ = build(name, args, abstract=True)
  t0 = time.perf_counter()
  ma = trainer.lower(case.batch, args.seq + 1).compile().memory_analysis()
  g = 2.0 ** 30
  arg, out = ma.argument_size_in_bytes / g, ma.output_size_in_bytes / g
  alias, temp = ma.alias_size_in_bytes / g, ma.temp_size_in_bytes / g
  return {**describe(name, case, cfg, trainer, total, args), "estimate": "cpu-compiled",
          "arguments_gib": arg, "outputs_gib": out, "donated_gib": alias, "temp_gib": temp,
          "peak_gib": arg + out - alias + temp, "compile_s": time.perf_counter() - t0}


def run_case(name: str, args) -> dict:
  case, cfg, trainer, total, matmul_params = build(name, args)
  rng = np.random.default_rng(0)
  batch = {"tokens": jnp.asarray(rng.integers(0, cfg.vocab_size, (case.batch, args.seq + 1)),
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
  profile = None
  if args.profile:  # one more step under jax.profiler: where the GPU time goes
    from profiling import summarize_trace
    trace_dir = os.path.join(args.out, f"trace_{name}")
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      t0 = time.perf_counter()
      state, _ = step(state)
      wall = time.perf_counter() - t0
    profile = summarize_trace(trace_dir, wall, top=30, top_ops=40)
    shutil.rmtree(trace_dir, ignore_errors=True)
    log(json.dumps(profile, indent=1))
  tokens = case.batch * args.seq
  flops_per_token = (4 if case.rank is not None else 6) * matmul_params
  trained = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  return {
      **describe(name, case, cfg, trainer, total, args), "params_trained": int(trained),
      "s_per_step": s, "tokens_per_s": tokens / s,
      "mfu": flops_per_token * tokens / s / PEAK_FLOPS,
      "mfu_6n_total": 6 * total * tokens / s / PEAK_FLOPS,
      "compile_s": max(first - s, 0.0), "first_step_s": first,
      "peak_gib": peak_bytes() / 2**30, "loss_first": first_loss, "loss_last": losses[-1],
      "finite": bool(np.isfinite(losses).all()),
      **({"profile": profile} if profile else {}),
  }


def run_isolated(name: str, args) -> dict:
  """Runs one case in a fresh process (its own peak memory); an out-of-memory is a result.

  `--config tiny` without `--estimate` runs in this process: a check of the script on a CPU,
  with no device memory to keep apart and no process start-up worth paying per case.
  """
  if args.config == "tiny" and not args.estimate:
    return run_case(name, args)
  cmd = [sys.executable, __file__, "--case", name, "--seq", str(args.seq), "--steps",
         str(args.steps), "--warmup", str(args.warmup)]
  cmd += ["--config", args.config] if args.config else []
  cmd += ["--estimate"] if args.estimate else []
  cmd += ["--profile", "--out", args.out] if args.profile else []
  env = dict(os.environ)
  if args.estimate:
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + REMAT_XLA_FLAG).strip()
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.case_timeout,
                          env=env)
  except subprocess.TimeoutExpired:
    return {"case": name, "batch": CASES[name].batch, "seq": args.seq, "error": "timeout"}
  for line in proc.stdout.splitlines():
    if line.startswith("RESULT "):
      return json.loads(line[len("RESULT "):])
  tail = (proc.stdout + proc.stderr)[-2000:]
  oom = "RESOURCE_EXHAUSTED" in tail or "out of memory" in tail.lower()
  log(f"  {name}: {'out of memory' if oom else 'failed'} (exit {proc.returncode})\n{tail}")
  return {"case": name, "config": args.config or CASES[name].model, "batch": CASES[name].batch,
          "seq": args.seq, "error": "out of memory" if oom else f"exit {proc.returncode}"}


def table(rows: list[dict]) -> str:
  head = (f"{'case':<26} {'batch':>5} {'s/step':>8} {'tok/s':>9} {'MFU':>6} {'peak GiB':>9} "
          f"{'compile s':>9}")
  lines = [head, "-" * len(head)]
  for r in rows:
    if "error" in r:
      lines.append(f"{r['case']:<26} {r['batch']:>5} {r['error']}")
    elif "estimate" in r:
      lines.append(f"{r['case']:<26} {r['batch']:>5} {'-':>8} {'-':>9} {'-':>6} "
                   f"{r['peak_gib']:>9.1f} {r['compile_s']:>9.1f}  (CPU estimate: temp "
                   f"{r['temp_gib']:.1f}, arguments {r['arguments_gib']:.1f}, donated "
                   f"{r['donated_gib']:.1f})")
    else:
      lines.append(f"{r['case']:<26} {r['batch']:>5} {r['s_per_step']:>8.3f} "
                   f"{r['tokens_per_s']:>9.0f} {r['mfu']:>6.1%} {r['peak_gib']:>9.1f} "
                   f"{r['compile_s']:>9.1f}")
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default=None,
                 help="override every case's model: slice, nano9b or tiny (CPU smoke test)")
  p.add_argument("--cases", default=DEFAULT_CASES, help=f"comma-separated, of: {','.join(CASES)}")
  p.add_argument("--seq", type=int, default=4096, help="tokens per row")
  p.add_argument("--steps", type=int, default=3, help="timed steps (median)")
  p.add_argument("--warmup", type=int, default=1, help="untimed steps after the first")
  p.add_argument("--estimate", action="store_true",
                 help="no device: compile each step on the CPU and report XLA's memory analysis")
  p.add_argument("--profile", action="store_true",
                 help="trace one more step with jax.profiler and report where the GPU time goes")
  p.add_argument("--case-timeout", type=int, default=600, help="seconds per case process")
  p.add_argument("--out", default="benchmarks/out", help="directory for the JSON")
  p.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
  args = p.parse_args()
  if args.case:
    run = estimate_case if args.estimate else run_case
    print("RESULT " + json.dumps(run(args.case, args)), flush=True)
    return
  names = [c for c in args.cases.split(",") if c]
  unknown = [c for c in names if c not in CASES]
  if unknown:
    raise SystemExit(f"--cases: unknown {unknown}; expected some of {','.join(CASES)}")
  device = "CPU (compiled estimate)" if args.estimate else jax.devices()[0].device_kind
  log(f"device: {device}; jax {jax.__version__}; seq {args.seq}")
  rows = []
  for name in names:
    log(f"case {name} ...")
    rows.append(run_isolated(name, args))
    log(f"  {rows[-1]}")
  os.makedirs(args.out, exist_ok=True)
  result = {"device": device, "jax": jax.__version__, "date": time.strftime("%Y-%m-%d"),
            "rows": rows}
  name = "train_memory_estimate.json" if args.estimate else "train_bench.json"
  with open(os.path.join(args.out, name), "w") as f:
    json.dump(result, f, indent=1)
  log(table(rows))


if __name__ == "__main__":
  main()
