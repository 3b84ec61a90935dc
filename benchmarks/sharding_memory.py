"""Per-device memory of the compiled prefill and train step as the mesh grows (no weights needed).

The model is built from abstract arrays (`jax.ShapeDtypeStruct` with the layout's shardings), the
prefill chunk (`nemojax.engine.prefill`: one chunk into a fixed-size cache) and the train step
(`Trainer`, AdamW) are lowered and compiled for each mesh, and XLA's `memory_analysis()` gives
the bytes each device needs: arguments (weights, cache, optimizer state), outputs and temporaries.
Runs on CPU with fake devices, so the table needs no accelerator:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/sharding_memory.py
    python benchmarks/sharding_memory.py --config tiny --devices 1,2 --out /tmp   # smoke

Meshes: prefill over `tensor` (n devices), train over `fsdp` (n devices). Expected: weights,
cache and optimizer state per device fall as 1/n (up to the replicated norms and the parts a
dimension does not divide); temporaries fall less (each layer's weights are gathered whole
under FSDP, and the residual stream is whole on every tensor shard).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

# Fake CPU devices for the meshes; no LLVM optimisation (the table needs buffer sizes, which
# XLA's HLO passes decide, not fast code), which makes the 9B compiles several times faster.
for flag in ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0"):
  if flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402

from nemojax import engine, sharding  # noqa: E402
from nemojax.checkpoint import abstract_model  # noqa: E402
from nemojax.config import NemotronHConfig  # noqa: E402
from nemojax.jit import split  # noqa: E402
from nemojax.train import TrainConfig, Trainer, TrainState  # noqa: E402

GIB = 2.0 ** 30


def sharded_abstract_model(config: NemotronHConfig, layout: sharding.Layout, dtype):
  """The model with ShapeDtypeStruct leaves that carry the layout's shardings."""
  model = abstract_model(config, dtype)
  graphdef, state = nnx.split(model)
  pure = nnx.to_pure_dict(state)

  def place(path, x):
    keys = [getattr(k, "key", getattr(k, "idx", k)) for k in path]
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(
        layout.mesh, layout.param_spec(keys, x.shape)))

  nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(place, pure))
  return sharding.attach(nnx.merge(graphdef, state), layout)


def _memory(compiled) -> dict[str, float]:
  m = compiled.memory_analysis()
  out = {"args_gib": m.argument_size_in_bytes / GIB, "out_gib": m.output_size_in_bytes / GIB,
         "temp_gib": m.temp_size_in_bytes / GIB}
  alias = getattr(m, "alias_size_in_bytes", 0) / GIB  # donated inputs reused as outputs
  out["total_gib"] = out["args_gib"] + out["out_gib"] - alias + out["temp_gib"]
  return out


def prefill_memory(config, n: int, batch: int, chunk: int, cache_len: int, dtype) -> dict:
  mesh = jax.make_mesh((n,), ("tensor",), axis_types=(AxisType.Auto,))
  layout = sharding.make_layout(mesh, config)
  model = sharded_abstract_model(config, layout, dtype)
  graph, params = split(model)
  cache = jax.eval_shape(lambda: model.init_cache(batch, cache_len))
  specs = layout.cache_specs(cache)
  cache = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                          sharding=NamedSharding(mesh, s)),
                       cache, specs)
  ids = jax.ShapeDtypeStruct((batch, chunk), jnp.int32,
                             sharding=NamedSharding(mesh, jax.sharding.PartitionSpec()))
  return _memory(engine.prefill.lower(graph, params, cache, ids).compile())


def train_memory(config, n: int, batch: int, seq: int, dtype) -> dict:
  mesh = jax.make_mesh((n,), ("fsdp",), axis_types=(AxisType.Auto,))
  layout = sharding.make_layout(mesh, config)
  trainer = Trainer(sharded_abstract_model(config, layout, dtype), TrainConfig())
  params = nnx.state(trainer.model(trainer._params), nnx.Param)
  shapes = jax.eval_shape(lambda p: TrainState(
      step=jnp.zeros((), jnp.int32), params=p, opt_state=trainer.optimizer.init(p),
      rng=jax.random.PRNGKey(0)), params)
  state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                       shapes, layout.tree_shardings(shapes))
  tokens = jax.ShapeDtypeStruct((batch, seq + 1), jnp.int32, sharding=NamedSharding(
      mesh, layout.spec(("batch", None), (batch, seq + 1))))
  rest = nnx.state(trainer.model(state.params), nnx.Not(nnx.Param))
  return _memory(trainer._step.lower(trainer.graph, state, rest, {"tokens": tokens}).compile())


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="nano_9b_v2", help="a NemotronHConfig preset name")
  p.add_argument("--devices", default="1,2,4,8", help="mesh sizes")
  p.add_argument("--parts", default="prefill,train")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--chunk", type=int, default=1024, help="prefill chunk length")
  p.add_argument("--cache-len", type=int, default=8192)
  p.add_argument("--seq", type=int, default=1024, help="train sequence length")
  p.add_argument("--out", default="benchmarks", help="directory for sharding_memory.json")
  args = p.parse_args(argv)
  config = getattr(NemotronHConfig, args.config)()
  rows = []
  for part in args.parts.split(","):
    for n in (int(x) for x in args.devices.split(",")):
      if n > jax.device_count():
        print(f"skip {part} on {n} devices: only {jax.device_count()}")
        continue
      t0 = time.perf_counter()
      if part == "prefill":
        mem = prefill_memory(config, n, args.batch, args.chunk, args.cache_len, jnp.bfloat16)
      else:  # train in float32 weights + AdamW moments (the Trainer's CPU-safe default)
        mem = train_memory(config, n, args.batch, args.seq, jnp.float32)
      rows.append({"part": part, "devices": n, **mem, "compile_s": time.perf_counter() - t0})
      print(f"{part:8s} n={n}  args {mem['args_gib']:8.2f}  out {mem['out_gib']:8.2f}  "
            f"temp {mem['temp_gib']:8.2f}  total {mem['total_gib']:8.2f} GiB/device  "
            f"({rows[-1]['compile_s']:.0f} s)", flush=True)
  result = {"date": datetime.date.today().isoformat(), "jax": jax.__version__,
            "backend": jax.default_backend(), "config": args.config, "batch": args.batch,
            "chunk": args.chunk, "cache_len": args.cache_len, "seq": args.seq, "rows": rows}
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "sharding_memory.json"), "w") as f:
    json.dump(result, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
