"""Multi-GPU benchmark (tensor, expert and FSDP parallelism) against one GPU of the same lease.

Rows (`--rows`, default: every row the visible GPUs allow, n in 1, 2, 4, 8):

    dense-tp{n}   Nano-9B-v2 shape, random bf16 weights, mesh tensor=n: 8k-prompt time to first
                  token, decode at batch 1 (1k prompt) and batch 64 (1k prompts)
    moe-ep{n}     Nemotron 3 Nano 30B-A3B shape, mesh expert=n (experts split, everything else
                  replicated): 8k TTFT, decode at batch 64
    train-fsdp{n} Nano-9B-v2 shape, full fine-tune (fp32 master weights and moments, bf16 compute,
                  full remat), mesh fsdp=n, one 4096-token row per GPU (n >= 2: the 9B does not
                  fit one GPU for full fine-tuning)

Every row runs in its own process (its own peak memory; a failure or out-of-memory is a result
row). The n=1 rows run side by side, one GPU each, then the sharded rows one at a time. Sharded
rows run the Pallas SSD and attention kernels per shard (`model.set_*_implementation("pallas")`,
on a Hopper GPU); the n=1 rows take the automatic choice (the same kernels on one GPU).

Checked in the script: each sharded row's logits (a fixed [2, 512] prompt, the last 64
positions, float32) against its n=1 row within the bf16 model tolerance
(`nemojax.testing.TOLERANCES`), and greedy tokens of the batch-1 decode equal. Reported per row:
median times, tokens/s, the roofline (weights or active-expert bytes / (n * 4.3 TB/s) for
decode, FLOPs / (n * 790 TFLOP/s) for prefill and training), efficiency, scaling efficiency
(throughput / (n * the n=1 throughput)), peak memory per GPU, and for every row under 70%
scaling the collectives of one decode step read from the compiled program (count and bytes)
with a measured all-reduce time of that size: the profile that explains it.

    python benchmarks/multi_gpu.py --out $OUT                  # the GPU machine
    python benchmarks/multi_gpu.py --rows dense-tp1,dense-tp2 --out $OUT
    python benchmarks/multi_gpu.py --smoke --out /tmp          # CPU, 8 fake devices, tiny models

`--work DIR` keeps each row's JSON and logits; a later call with the same DIR adds its rows to
the table (and compares against the n=1 rows already there), so the rows can be split over calls.

Multi-host is not covered here (one process sees every GPU of one host).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time

if "--smoke" in sys.argv and "xla_force_host_platform_device_count" not in os.environ.get(
    "XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import nemojax
from nemojax import sharding
from nemojax import testing as T
from nemojax.config import NemotronHConfig
from nemojax.train import TrainConfig, Trainer

HBM_BYTES_S, PEAK_FLOPS = 4.3e12, 790e12
# The smoke run's rows (tensor parallelism of the dense model is also covered by the sharding
# tests; the script's paths are the same for every row kind).
SMOKE_ROWS = ["moe-ep1", "moe-ep4", "train-fsdp8"]
MESH_AXIS = {"dense-tp": "tensor", "moe-ep": "expert", "train-fsdp": "fsdp"}
PRESET = {"dense-tp": "nano_9b_v2", "moe-ep": "nemotron_3_nano_30b_a3b", "train-fsdp": "nano_9b_v2"}
SMOKE_CONFIGS = {
    "nano_9b_v2": dict(hidden_size=64, intermediate_size=128, num_attention_heads=8,
                       num_key_value_heads=4, head_dim=8, mamba_num_heads=8, mamba_head_dim=8,
                       n_groups=4, ssm_state_size=8),
    "nemotron_3_nano_30b_a3b": None,  # testing.MOE_CONFIGS["moe"]
}


def log(*a):
  print(*a, flush=True)


# ------------------------------------------------------------------------------------------------
# One row, in its own process
# ------------------------------------------------------------------------------------------------
def row_config(kind: str, smoke: bool) -> NemotronHConfig:
  preset = PRESET[kind]
  if not smoke:
    return getattr(NemotronHConfig, preset)()
  extra = SMOKE_CONFIGS[preset]
  return T.MOE_CONFIGS["moe"] if extra is None else NemotronHConfig.tiny(**extra)


def sizes(args, kind):
  """Prompt lengths and batches (small ones for --smoke)."""
  if args.smoke:
    return dict(ttft=24, prompt=12, batch=8, new=6, seq=16, logits=(2, 20))
  return dict(ttft=8192, prompt=1024, batch=64, new=args.new_tokens, seq=4096, logits=(2, 512))


def build(kind: str, n: int, args):
  config = row_config(kind, args.smoke)
  layout = None
  if n > 1:
    mesh = jax.make_mesh((n,), (MESH_AXIS[kind],), devices=jax.devices()[:n])
    layout = sharding.make_layout(mesh, config)
  dtype = jnp.float32 if args.smoke else jnp.bfloat16
  model = T.random_model(config, dtype, seed=args.seed, layout=layout)
  if layout is not None and jax.devices()[0].platform == "gpu":
    model.set_ssd_implementation("pallas")  # per shard (the automatic choice on a mesh is XLA)
    model.set_attention_implementation("pallas")
  return model, config


def timed(fn, repeats: int):
  fn()  # compile + warm-up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - t0)
  return out, statistics.median(times)


def bench_decode(model, batch: int, prompt: int, new: int, rng, repeats: int) -> dict:
  vocab = model.config.vocab_size
  prompts = [rng.integers(0, vocab, prompt).tolist() for _ in range(batch)]
  sampler = nemojax.Sampler(model)
  _, t1 = timed(lambda: sampler(prompts, max_new_tokens=1), repeats)
  out, tn = timed(lambda: sampler(prompts, max_new_tokens=new), repeats)
  step = max(tn - t1, 1e-9) / (new - 1)
  return {"ms_per_step": 1e3 * step, "tok_s": batch / step, "first_tokens": out[0].tokens[:8]}


def bench_ttft(model, length: int, rng, repeats: int) -> dict:
  prompt = [rng.integers(0, model.config.vocab_size, length).tolist()]
  sampler = nemojax.Sampler(model)
  _, t = timed(lambda: sampler(prompt, max_new_tokens=1), repeats)
  return {"ttft_s": t, "tok_s": length / t}


def bench_train(model, n: int, seq: int, rng, steps: int) -> dict:
  trainer = Trainer(model, TrainConfig(warmup_steps=1, remat="full"))
  state = trainer.init_state()
  tokens = jnp.asarray(rng.integers(0, model.config.vocab_size, (n, seq + 1)), jnp.int32)
  t0 = time.perf_counter()
  state, metrics = trainer.step(state, {"tokens": tokens})
  jax.block_until_ready(metrics["loss"])
  first = time.perf_counter() - t0
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, metrics = trainer.step(state, {"tokens": tokens})
    jax.block_until_ready(metrics["loss"])
    times.append(time.perf_counter() - t0)
  step = statistics.median(times)
  return {"step_s": step, "tok_s": n * seq / step, "first_step_s": first,
          "loss": float(metrics["loss"])}


def collectives(model, batch: int) -> dict:
  """Collectives of one decode-shaped forward (one token per row), from the compiled program."""
  graphdef, state = nnx.split(model)
  ids = jnp.zeros((batch, 1), jnp.int32)
  text = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x)).lower(state, ids).compile().as_text()
  ops, nbytes = {}, 0
  for line in text.splitlines():
    match = re.search(r" (all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter)"
                      r"(-start)?\(", line)
    if not match or "=" not in line[:match.start()]:
      continue
    ops[match.group(1)] = ops.get(match.group(1), 0) + 1
    for dtype, dims in re.findall(r"(bf16|f32|s32|f16|u32)\[([\d,]*)\]", line[:match.start()]):
      count = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
      nbytes += count * (2 if dtype in ("bf16", "f16") else 4)
  return {"ops": ops, "bytes": nbytes}


def allreduce_us(mesh_axis: str, n: int, nbytes: int) -> float:
  """Median time of one all-reduce of `nbytes` (f32) over n devices, us."""
  mesh = jax.make_mesh((n,), (mesh_axis,), devices=jax.devices()[:n])
  spec = jax.sharding.PartitionSpec(mesh_axis)
  x = jax.device_put(jnp.ones((n, max(nbytes // 4, 1)), jnp.float32),
                     jax.sharding.NamedSharding(mesh, spec))
  fn = jax.jit(jax.shard_map(lambda v: jax.lax.psum(v, mesh_axis), mesh=mesh, in_specs=spec,
                             out_specs=spec))
  _, t = timed(lambda: jax.block_until_ready(fn(x)), 20)
  return 1e6 * t


def run_row(name: str, args) -> dict:
  kind, n = re.fullmatch(r"([a-z-]+?)(\d+)", name).groups()
  n = int(n)
  s = sizes(args, kind)
  rng = np.random.default_rng(args.seed)
  t0 = time.perf_counter()
  model, config = build(kind, n, args)
  row = {"row": name, "devices": n, "mesh": {MESH_AXIS[kind]: n}, "model": PRESET[kind],
         "build_s": time.perf_counter() - t0}
  log(f"{name}: built in {row['build_s']:.1f} s")
  if kind == "train-fsdp":
    row["train"] = bench_train(model, n, s["seq"], rng, args.steps)
  else:
    ids = np.random.default_rng(123).integers(0, config.vocab_size, s["logits"]).astype(np.int32)
    logits = np.asarray(model(ids)[:, -64:], np.float32)
    np.save(os.path.join(args.work, f"{name}.logits.npy"), logits)
    row["ttft"] = bench_ttft(model, s["ttft"], rng, args.repeats)
    log(f"{name}: ttft {row['ttft']}")
    batches = (1, s["batch"]) if kind == "dense-tp" else (s["batch"],)
    for b in batches:
      row[f"decode{b}"] = bench_decode(model, b, s["prompt"], s["new"], rng, args.repeats)
      log(f"{name}: decode b{b} {row[f'decode{b}']}")
    if n > 1:
      row["collectives_b1"] = collectives(model, 1)
      row["collectives_b1"]["allreduce_1x_us"] = allreduce_us(
          MESH_AXIS[kind], n, row["collectives_b1"]["bytes"] //
          max(sum(row["collectives_b1"]["ops"].values()), 1))
  stats = [d.memory_stats() or {} for d in jax.devices()[:n]]
  row["peak_gib_per_device"] = [round(x.get("peak_bytes_in_use", 0) / 2 ** 30, 2) for x in stats]
  return row


# ------------------------------------------------------------------------------------------------
# Rooflines
# ------------------------------------------------------------------------------------------------
def model_facts(config: NemotronHConfig) -> dict:
  """Bytes and FLOPs that set the limits (bf16 weights, fp32 SSM state)."""
  embed = config.vocab_size * config.hidden_size
  total, active = config.num_params(), config.num_params(active=True)
  pattern = config.hybrid_override_pattern
  n_mamba, n_attn = pattern.count("M"), pattern.count("*")
  experts = getattr(config, "n_routed_experts", None) or 0
  expert_bytes = 0
  if experts:
    width = config.moe_latent_size or config.hidden_size
    expert_bytes = 2 * 2 * width * config.moe_intermediate_size  # one expert's up + down, bf16
  return {
      "weight_bytes": 2 * (total - embed), "active_params": active - embed,
      "params": total - embed, "experts": experts, "expert_bytes": expert_bytes,
      "moe_layers": pattern.count("E"), "top_k": getattr(config, "num_experts_per_tok", 0) or 0,
      "state_bytes": 4 * n_mamba * config.mamba_num_heads * config.mamba_head_dim
                     * config.ssm_state_size,
      "kv_bytes_per_token": 2 * 2 * n_attn * config.num_key_value_heads * config.head_dim,
      "attn_flops_per_token_per_len": 2 * n_attn * config.num_attention_heads * config.head_dim,
      "ssd_flops_per_token": 8.14e6 * n_mamba * (config.mamba_num_heads * config.mamba_head_dim
                                                  * config.ssm_state_size) / (128 * 80 * 128)}


def decode_roofline_s(facts: dict, batch: int, ctx: int, n: int) -> float:
  weights = facts["weight_bytes"]
  if facts["experts"]:  # only the experts some row chose are read
    e, k = facts["experts"], facts["top_k"]
    unique = e * (1 - (1 - k / e) ** batch)
    weights -= facts["moe_layers"] * (e - unique) * facts["expert_bytes"]
  per_row = 2 * facts["state_bytes"] + ctx * facts["kv_bytes_per_token"]
  return (weights + batch * per_row) / (n * HBM_BYTES_S)


def prefill_roofline_s(facts: dict, length: int, n: int) -> float:
  per_token = (2 * facts["active_params"] + facts["attn_flops_per_token_per_len"] * length
               + facts["ssd_flops_per_token"])
  return length * per_token / (n * PEAK_FLOPS)


# ------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------
def gpu_count() -> int:
  try:
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    return len([line for line in out.splitlines() if line.startswith("GPU ")])
  except (OSError, subprocess.SubprocessError):
    return 0


def default_rows(devices: int) -> list[str]:
  counts = [n for n in (1, 2, 4, 8) if n <= devices]
  return ([f"dense-tp{n}" for n in counts] + [f"moe-ep{n}" for n in counts]
          + [f"train-fsdp{n}" for n in counts if n > 1])


def launch(name: str, gpus: list[int] | None, args) -> subprocess.Popen:
  env = dict(os.environ, NCCL_NVLS_ENABLE="0")
  if gpus is not None:
    env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
  cmd = [sys.executable, os.path.abspath(__file__), "--row", name, "--work", args.work,
         "--seed", str(args.seed), "--repeats", str(args.repeats), "--steps", str(args.steps),
         "--new-tokens", str(args.new_tokens)] + (["--smoke"] if args.smoke else [])
  logf = open(os.path.join(args.work, f"{name}.log"), "w")  # noqa: SIM115
  return subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT)


def run_rows(rows: list[str], devices: int, args) -> dict:
  """The n=1 rows side by side (one GPU each), then the others one at a time."""
  count = lambda r: int(re.search(r"(\d+)$", r).group(1))
  singles = [r for r in rows if count(r) == 1]
  waves = ([singles] if len(singles) <= max(devices, 1) else [[r] for r in singles])
  waves += [[r] for r in rows if count(r) > 1 and count(r) <= devices]
  results = {}
  for wave in waves:
    gpus = [[i] if count(r) == 1 else list(range(count(r))) for i, r in enumerate(wave)]
    procs = {r: launch(r, None if args.smoke else g, args) for r, g in zip(wave, gpus)}
    t0 = time.perf_counter()
    for r, proc in procs.items():
      try:
        proc.wait(timeout=max(args.row_timeout - (time.perf_counter() - t0), 1))
      except subprocess.TimeoutExpired:
        proc.kill()
      path = os.path.join(args.work, f"{r}.json")
      if proc.returncode == 0 and os.path.exists(path):
        with open(path) as f:
          results[r] = json.load(f)
      else:
        with open(os.path.join(args.work, f"{r}.log")) as f:
          tail = f.read()[-1500:]
        results[r] = {"row": r, "error": f"exit {proc.returncode}", "log_tail": tail}
      log(f"{r}: {'error ' + results[r]['error'] if 'error' in results[r] else 'done'} "
          f"({time.perf_counter() - t0:.0f} s)")
  return results


def derive(results: dict, args) -> list[dict]:
  """Rooflines, efficiencies, scaling against the n=1 row, and the logits check."""
  table = []
  for name, row in results.items():
    kind, n = re.fullmatch(r"([a-z-]+?)(\d+)", name).groups()
    n, s = int(n), sizes(args, kind)
    facts = model_facts(row_config(kind, args.smoke))
    base = results.get(f"{kind}1", {})
    if "error" in row:
      table.append({"row": name, "part": "-", "error": row["error"]})
      continue
    if kind == "train-fsdp":
      tr = row["train"]
      mfu = 6 * facts["params"] * tr["tok_s"] / (n * PEAK_FLOPS)
      table.append({"row": name, "part": f"train {n}x{s['seq']}", "value": tr["tok_s"],
                    "unit": "tok/s", "time_ms": 1e3 * tr["step_s"], "eff": mfu,
                    "roofline_ms": 1e3 * tr["step_s"] * mfu, "scaling": None})
    else:
      check = None
      ref = os.path.join(args.work, f"{kind}1.logits.npy")
      if n > 1 and os.path.exists(ref):
        err = T.rel_err(np.load(os.path.join(args.work, f"{name}.logits.npy")), np.load(ref))
        check = {"logits_rel_err": err, "ok": err <= T.tolerance("bfloat16", "model")}
        row["check"] = check
      roof = prefill_roofline_s(facts, s["ttft"], n)
      t = row["ttft"]["ttft_s"]
      table.append({"row": name, "part": f"TTFT {s['ttft']}", "value": t * 1e3, "unit": "ms",
                    "time_ms": t * 1e3, "roofline_ms": roof * 1e3, "eff": roof / t,
                    "scaling": _scaling(base.get("ttft", {}).get("tok_s"),
                                        row["ttft"]["tok_s"], n), "check": check})
      for key in [k for k in row if k.startswith("decode")]:
        b = int(key[len("decode"):])
        d = row[key]
        roof = decode_roofline_s(facts, b, s["prompt"] + s["new"] // 2, n)
        table.append({"row": name, "part": f"decode b{b}", "value": d["tok_s"], "unit": "tok/s",
                      "time_ms": d["ms_per_step"], "roofline_ms": roof * 1e3,
                      "eff": roof * 1e3 / d["ms_per_step"],
                      "scaling": _scaling(base.get(key, {}).get("tok_s"), d["tok_s"], n),
                      "same_tokens": (None if n == 1 or key not in base else
                                      d["first_tokens"] == base[key]["first_tokens"])})
    table[-1]["peak_gib"] = max(row.get("peak_gib_per_device") or [0])
  return table


def _scaling(single, value, n):
  return None if not single or n == 1 else value / (n * single)


def print_table(table: list[dict]) -> None:
  log("| row | part | result | step/TTFT ms | roofline ms | efficiency | scaling vs 1 GPU "
      "| peak GiB/GPU | logits vs 1 GPU |")
  log("|---|---|---|---|---|---|---|---|---|")
  for r in table:
    if "error" in r:
      log(f"| {r['row']} | - | {r['error']} | | | | | | |")
      continue
    fmt = lambda v, spec: "-" if v is None else format(v, spec)
    check = r.get("check")
    log(f"| {r['row']} | {r['part']} | {r['value']:.4g} {r['unit']} | {r['time_ms']:.2f} "
        f"| {r['roofline_ms']:.2f} | {r['eff']:.0%} | {fmt(r.get('scaling'), '.0%')} "
        f"| {fmt(r.get('peak_gib'), '.1f')} "
        f"| {'-' if not check else ('ok ' if check['ok'] else 'FAIL ')}"
        f"{'' if not check else format(check['logits_rel_err'], '.1e')} |")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--rows", default=None, help="comma-separated (default: all the GPUs allow)")
  p.add_argument("--new-tokens", type=int, default=65)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--row-timeout", type=int, default=420, help="seconds per row process")
  p.add_argument("--smoke", action="store_true", help="CPU, 8 fake devices, tiny models")
  p.add_argument("--out", default=os.environ.get("OUT", "benchmarks"))
  p.add_argument("--work", default=None, help="row results and logits (default OUT/multi_gpu_work)")
  p.add_argument("--row", default=None, help=argparse.SUPPRESS)  # internal: one row, here
  args = p.parse_args(argv)
  if args.smoke:
    args.new_tokens, args.repeats, args.steps = 6, 1, 1
  if args.row:
    row = run_row(args.row, args)
    with open(os.path.join(args.work, f"{args.row}.json"), "w") as f:
      json.dump(row, f, indent=1, default=str)
    return 0
  os.makedirs(args.out, exist_ok=True)
  args.work = args.work or os.path.join(args.out, "multi_gpu_work")
  os.makedirs(args.work, exist_ok=True)
  devices = 8 if args.smoke else gpu_count()
  rows = args.rows.split(",") if args.rows else (SMOKE_ROWS if args.smoke
                                                 else default_rows(devices))
  log(f"multi_gpu: {devices} devices, rows {rows}")
  results = run_rows(rows, devices, args)
  for name in sorted(os.listdir(args.work)):  # rows of an earlier call in the same --work
    if name.endswith(".json") and name[:-5] not in results:
      with open(os.path.join(args.work, name)) as f:
        results[name[:-5]] = json.load(f)
  table = derive(results, args)
  kind = "smoke" if args.smoke else "gpu"
  with open(os.path.join(args.out, f"multi_gpu_{kind}.json"), "w") as f:
    json.dump({"date": datetime.date.today().isoformat(), "jax": jax.__version__,
               "devices": devices, "rows": results, "table": table}, f, indent=1, default=str)
  print_table(table)
  failed = [r["row"] for r in table if r.get("check") and not r["check"]["ok"]]
  if failed:
    log(f"ERROR: sharded logits differ from one GPU's beyond bf16 tolerance: {failed}")
  return 1 if failed or any("error" in r for r in table) else 0


if __name__ == "__main__":
  sys.exit(main())
