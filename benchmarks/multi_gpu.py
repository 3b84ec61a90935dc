"""Multi-device benchmark: a sharded model's prefill, decode and train step over a mesh.

Ready for a machine of several GPUs (one host, or several with --distributed); `--smoke` runs
the same code on CPU with 8 fake devices and a tiny model, and checks the sharded logits and
greedy tokens against the unsharded model's.

    python benchmarks/multi_gpu.py --mesh tensor=8                       # 9B shape, random weights
    python benchmarks/multi_gpu.py --mesh data=2,tensor=4 --model /ckpt/nemotron-9b
    python benchmarks/multi_gpu.py --mesh fsdp=8 --parts train --train-batch 8 --seq 2048
    python benchmarks/multi_gpu.py --smoke --out /tmp                    # CPU, a minute

Multi-host: start one process per host with the same arguments plus --distributed (calls
`jax.distributed.initialize()`, which reads the cluster from the environment, e.g. SLURM or
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID); the mesh spans every process's
devices, each process loads only its addressable shards, and process 0 writes the JSON.

Reported per part: wall time after one warm-up call, throughput, and each device's peak memory
(`memory_stats()`; absent on CPU).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

if "--smoke" in sys.argv and "xla_force_host_platform_device_count" not in os.environ.get(
    "XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import nemojax
from nemojax import sharding
from nemojax.config import NemotronHConfig
from nemojax.train import TrainConfig, Trainer

SMOKE_CONFIG = dict(hidden_size=64, intermediate_size=128, num_attention_heads=8,
                    num_key_value_heads=4, head_dim=8, mamba_num_heads=8, mamba_head_dim=8,
                    n_groups=4, ssm_state_size=8)


def parse_mesh(text: str) -> jax.sharding.Mesh:
  """'data=2,tensor=4' -> a mesh over all devices (one axis may be -1: the rest)."""
  names, sizes = [], []
  for item in text.split(","):
    name, _, size = item.partition("=")
    names.append(name.strip())
    sizes.append(int(size))
  if -1 in sizes:
    sizes[sizes.index(-1)] = jax.device_count() // -int(np.prod(sizes))
  if int(np.prod(sizes)) != jax.device_count():
    raise ValueError(f"--mesh {text!r} has {int(np.prod(sizes))} devices, "
                     f"but {jax.device_count()} are present")
  return jax.make_mesh(tuple(sizes), tuple(names))


def peak_memory_gib() -> list[float] | None:
  stats = [d.memory_stats() for d in jax.local_devices()]
  if not all(stats):
    return None
  return [s.get("peak_bytes_in_use", 0) / 2 ** 30 for s in stats]


def timed(fn, repeats: int = 1):
  fn()  # compile + warm-up
  t0 = time.perf_counter()
  for _ in range(repeats):
    out = fn()
  jax.block_until_ready(out)
  return out, (time.perf_counter() - t0) / repeats


def bench_generate(model, args, rng) -> dict:
  prompts = [rng.integers(0, model.config.vocab_size, args.prompt_len).tolist()
             for _ in range(args.batch)]
  sampler = nemojax.Sampler(model, prefill_chunk=args.chunk)
  _, t1 = timed(lambda: [r.tokens for r in sampler(prompts, max_new_tokens=1)])
  _, tn = timed(lambda: [r.tokens for r in sampler(prompts, max_new_tokens=args.new_tokens)])
  decode_s = max(tn - t1, 1e-9)
  return {"prefill_s": t1, "prefill_tok_s": args.batch * args.prompt_len / t1,
          "decode_tok_s": args.batch * (args.new_tokens - 1) / decode_s,
          "ms_per_step": 1e3 * decode_s / max(args.new_tokens - 1, 1)}


def bench_train(model, args, rng) -> dict:
  trainer = Trainer(model, TrainConfig(warmup_steps=1))
  state = trainer.init_state()
  batch = {"tokens": jnp.asarray(rng.integers(0, model.config.vocab_size,
                                              (args.train_batch, args.seq + 1)), jnp.int32)}
  state, metrics = trainer.step(state, batch)  # compile
  jax.block_until_ready(metrics["loss"])
  t0 = time.perf_counter()
  for _ in range(args.steps):
    state, metrics = trainer.step(state, batch)
  loss = float(metrics["loss"])
  dt = (time.perf_counter() - t0) / args.steps
  return {"step_s": dt, "train_tok_s": args.train_batch * args.seq / dt, "loss": loss}


def smoke_check(model, config, args) -> dict:
  """Sharded vs unsharded logits and greedy tokens (the tiny model fits one device)."""
  single = nemojax.NemotronH(config, dtype=jnp.float32, rngs=nnx.Rngs(args.seed))
  ids = np.random.default_rng(0).integers(0, config.vocab_size, (4, 16)).astype(np.int32)
  a, b = np.asarray(model(ids)), np.asarray(single(ids))
  err = float(np.linalg.norm(a - b) / np.linalg.norm(b))
  prompts = [[5, 17, 3], [9, 1, 44, 2, 8, 100, 7], [3] * 12, [60, 61, 62, 63, 64]]
  same = ([r.tokens for r in nemojax.Sampler(model)(prompts, max_new_tokens=6)]
          == [r.tokens for r in nemojax.Sampler(single)(prompts, max_new_tokens=6)])
  return {"logits_rel_err": err, "greedy_tokens_equal": same}


def build_model(args, mesh):
  if args.model:
    return nemojax.load(args.model, jnp.dtype(args.dtype), mesh=mesh), None
  config = getattr(NemotronHConfig, args.config)()
  if args.smoke:
    config = config.replace(**SMOKE_CONFIG)
  build = lambda: nemojax.NemotronH(config, dtype=jnp.dtype(args.dtype), rngs=nnx.Rngs(args.seed))
  return sharding.init_model(build, sharding.make_layout(mesh, config)), config


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--mesh", default=None, help="e.g. tensor=8, data=2,tensor=4, fsdp=-1")
  p.add_argument("--model", default=None, help="checkpoint directory (default: random weights)")
  p.add_argument("--config", default="nano_9b_v2", help="preset for random weights")
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--parts", default="generate,train")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--prompt-len", type=int, default=2048)
  p.add_argument("--chunk", type=int, default=1024)
  p.add_argument("--new-tokens", type=int, default=128)
  p.add_argument("--train-batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=2048)
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--distributed", action="store_true", help="jax.distributed.initialize()")
  p.add_argument("--smoke", action="store_true", help="CPU, 8 fake devices, tiny model, checks")
  p.add_argument("--out", default="benchmarks")
  args = p.parse_args(argv)
  if args.smoke:
    args.config, args.dtype = "tiny", "float32"
    args.mesh = args.mesh or "data=2,tensor=4"
    args.batch, args.prompt_len, args.new_tokens, args.chunk = 4, 24, 8, 16
    args.train_batch, args.seq, args.steps = 4, 16, 1
  if args.distributed:
    jax.distributed.initialize()
  mesh = parse_mesh(args.mesh or f"tensor={jax.device_count()}")
  print(f"jax {jax.__version__}, {jax.device_count()} devices ({jax.devices()[0].device_kind}), "
        f"{jax.process_count()} processes, mesh {dict(mesh.shape)}", flush=True)
  t0 = time.perf_counter()
  model, config = build_model(args, mesh)
  result = {"date": datetime.date.today().isoformat(), "jax": jax.__version__,
            "device_kind": jax.devices()[0].device_kind, "devices": jax.device_count(),
            "processes": jax.process_count(), "mesh": dict(mesh.shape), "args": vars(args),
            "load_s": time.perf_counter() - t0}
  rng = np.random.default_rng(args.seed)
  if "generate" in args.parts:
    result["generate"] = bench_generate(model, args, rng)
    print("generate", result["generate"], flush=True)
  if "train" in args.parts:
    if args.smoke or args.dtype == "float32":
      result["train"] = bench_train(model, args, rng)
    else:  # AdamW on bf16 weights loses small updates; time it in float32 (--dtype float32)
      result["train"] = {"skipped": "train needs --dtype float32"}
    print("train", result["train"], flush=True)
  result["peak_memory_gib"] = peak_memory_gib()
  if args.smoke:
    result["check"] = smoke_check(model, config, args)
    print("check", result["check"], flush=True)
    if result["check"]["logits_rel_err"] > 1e-5 or not result["check"]["greedy_tokens_equal"]:
      print("ERROR: the sharded model disagrees with the unsharded one")
      return 1
  if jax.process_index() == 0:
    os.makedirs(args.out, exist_ok=True)
    kind = "smoke" if args.smoke else jax.devices()[0].platform
    with open(os.path.join(args.out, f"multi_gpu_{kind}.json"), "w") as f:
      json.dump(result, f, indent=1, default=str)
  return 0


if __name__ == "__main__":
  sys.exit(main())
