"""MoE benchmarks for the GPU machine: the routed experts alone, and Nemotron 3 Nano 30B-A3B.

Parts (comma-separated `--parts`):
  ffn      the routed-expert FFN (`kernels/moe`) at 1, 64 and 8192 tokens on the 30B-A3B shape
           (128 experts of up [1856, 2688] and down [2688, 1856], top-6, bf16): XLA ragged_dot,
           XLA gather (only where m·k ≤ 4·e: it reads m·k expert matrices), and the Mosaic GPU
           kernel in its default config and a few variants. Median ms, the roofline
           t* = max(bytes / 4.3 TB/s, FLOPs / 790 TFLOP/s) with bytes = the touched experts'
           weights + activations and FLOPs = 4·m·k·d·f, efficiency t*/t, and the error against
           the dense oracle on the first 16 rows. At prefill also JAX's example Hopper kernel
           (`jax.experimental.pallas.ops.gpu.ragged_dot_mgpu`) for comparison, and for the
           kernel's default configuration a breakdown (layout + row gather, up, down, combine):
           t* leaves out the sorted design's own traffic (the k-fold copy of the rows, h and the
           per-pair outputs through HBM), which the breakdown shows.
  decode   the whole model (random bf16 weights, `nemojax.testing.random_model`, ~63 GB) through
           the engine's decode loop at batch 1 and 64 (context 1024): ms/step, tok/s, roofline
           from the bytes a step reads (non-expert weights, the experts the batch touches, the
           recurrent state read and written, the KV cache). The touched experts are counted, not
           assumed: the routers' picks on one eager step after the timed ones (random weights
           route far from uniformly; the uniform expectation is kept as `roofline_uniform_ms`).
  prefill  an 8k prompt through `Sampler` (TTFT), roofline from FLOPs (2·active parameters per
           token + causal attention).
  long     a 131072-token prompt, prefill in chunks of 8192 (TTFT; skipped by default).

`--model-impls` runs decode/prefill per routed-expert implementation (None = the dispatcher's
choice, "pallas" = the kernel). Each measurement is wrapped: a failure is recorded with its
error and the rest still runs; a time budget (`--budget-s`) skips what would not fit. Results
go to OUT/moe.json (written after every part) and a table is printed last. `--smoke` runs a tiny
configuration on the CPU (the kernel on Mosaic GPU's interpreter) in seconds.

Usage on the device machine (about 3-4 minutes, compilation included; `--budget-s` guards it):
  python benchmarks/moe.py --out $OUT
  python benchmarks/moe.py --parts long --model-impls pallas --out $OUT   # the 128k prompt
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp
from jax import lax
from flax import nnx
import numpy as np

import nemojax
from nemojax import engine, jit
from nemojax import moe as moe_lib
from nemojax import testing as T
from nemojax.kernels import moe as kmoe
from nemojax.kernels import platform
from nemojax.kernels.moe import pallas_mosaic_gpu as kernel
from nemojax.sampler import Sampler

HBM = 4.3e12
MXU = 790e12
RESULTS: dict = {}
ROWS: list[tuple] = []
T0 = time.perf_counter()


def log(*a):
  print(f"[{elapsed():6.1f} s]", *a, flush=True)


def elapsed():
  return time.perf_counter() - T0


def time_fn(fn, *args, min_batch_ms=20.0, reps=7):
  """Median ms per call (warm-up, then `reps` batches of back-to-back calls)."""
  jax.block_until_ready(fn(*args))
  t = time.perf_counter()
  jax.block_until_ready(fn(*args))
  one = max(time.perf_counter() - t, 1e-6)
  n = max(1, min(200, int(min_batch_ms / 1e3 / one)))
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    for _ in range(n):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t) / n * 1e3)
  return statistics.median(times)


def time_in_graph(fn, x, *rest, calls=32, reps=7):
  """Median ms per call of fn(x, *rest) called `calls` times back to back in one jitted
  program, as a decode step calls it: Python's dispatch per call (~20-45 µs on the H200 machine)
  would otherwise dwarf a 20 µs kernel. The loop is unrolled (a rolled loop of the nudge alone
  took 12 µs per trip on the H200, 2026-12-01). Each call's input is nudged by the previous output
  (+1e-30·sum, value unchanged), so XLA can neither hoist nor merge the calls; the nudge (a
  reduction and an add, a few µs) is included."""
  def many(x, *rest):
    def body(_, carry):
      y = fn(carry, *rest)
      return carry + (jnp.sum(y.astype(jnp.float32)) * 1e-30).astype(carry.dtype)
    return lax.fori_loop(0, calls, body, x, unroll=True)
  return time_fn(jax.jit(many), x, *rest, reps=reps) / calls


def rel(a, r):
  a, r = np.asarray(a, np.float32).ravel(), np.asarray(r, np.float32).ravel()
  return float(np.linalg.norm(a - r) / np.linalg.norm(r)) if np.isfinite(a).all() else math.nan


def guarded(out: dict, name: str, args, fn):
  """Runs fn() into out[name]; records the error instead of raising; honours the budget."""
  if elapsed() > args.budget_s:
    out[name] = {"skipped": f"time budget {args.budget_s:.0f} s spent"}
    log(name, "skipped (budget)")
    return None
  try:
    out[name] = fn()
    log(name, out[name])
    save(args)  # a hang or a fault later (the process killed) keeps what was measured
    return out[name]
  except Exception as e:  # one failure must not lose the other measurements
    out[name] = {"error": f"{type(e).__name__}: {e}"[:600]}
    log(name, "ERROR", out[name]["error"])
    traceback.print_exc(limit=3)
    return None


# ------------------------------------------------------------------------------------------------
def ffn_inputs(m, e, k, d, f, seed):
  ks = jax.random.split(jax.random.key(seed), 5)
  x = jax.random.normal(ks[0], (m, d), jnp.bfloat16)
  ids = jnp.argsort(jax.random.uniform(ks[1], (m, e)), axis=1)[:, :k].astype(jnp.int32)
  w = jax.random.uniform(ks[2], (m, k), jnp.float32)
  up = (jax.random.normal(ks[3], (e, f, d), jnp.bfloat16) * (d ** -0.5)).astype(jnp.bfloat16)
  down = (jax.random.normal(ks[4], (e, d, f), jnp.bfloat16) * (f ** -0.5)).astype(jnp.bfloat16)
  return x, ids, w, up, down


def ffn_roofline_ms(ids, m, d, f):
  touched = len(np.unique(np.asarray(ids)))
  k = ids.shape[1]
  nbytes = touched * 2 * d * f * 2 + m * d * 2 + m * d * 4
  flops = 4 * m * k * d * f
  return 1e3 * max(nbytes / HBM, flops / MXU), touched


def ffn_variants(m, k, e, smoke):
  """The kernel configurations to time at m tokens: the default first."""
  if smoke:
    return {"pallas": kernel.Config(tile_m=64, tile_n=64, num_stages=2)}
  out = {"pallas": None}
  if m * k < 8 * e:
    out.update({"pallas[t16x64x8]": kernel.Config(16, 64, 8, transposed=True),
                "pallas[t16x128x4]": kernel.Config(16, 128, 4, transposed=True),
                "pallas[64x64x6]": kernel.Config(64, 64, 6)})
  else:
    out.update({"pallas[ws128x256x3]": kernel.Config(128, 256, 3, warp_specialized=True),
                "pallas[ws128x256x3,bf16]": kernel.Config(128, 256, 3, down_dtype="bfloat16",
                                                          warp_specialized=True),
                "pallas[128x128x3,bf16]": kernel.Config(128, 128, 3, down_dtype="bfloat16"),
                "pallas[128x128x4,f32]": kernel.Config(128, 128, 4)})
  return out


def kernel_breakdown(x, ids, w, up, down, *, interpret, reps):
  """Where the default kernel configuration's time goes: layout + row gather, the two grouped
  GEMMs alone, and the final gather + weighted sum (ms each, separately jitted)."""
  m, k = ids.shape
  e, f, d = up.shape
  cfg = kernel.default_config(m * k, e, min(d, f))  # as moe_ffn chooses

  def layout(x, ids):
    if kernel.per_pair(m, k, e):
      src, dest, te = kernel.pair_layout(ids, cfg.tile_m)
    else:
      src, dest, te = kernel.padded_layout(ids, e, cfg.tile_m)
    return jnp.take(x, src, axis=0), dest, te

  xs, dest, te = jax.jit(layout)(x, ids)
  # The weights and tile map are arguments: closed over, a jit embeds them as constants (1.3 GB
  # of experts) and XLA's constant folding stalls the compile for minutes.
  gm = lambda a, wt, te, act, dt: kernel.grouped_matmul(a, wt, te, activation=act, out_dtype=dt,
                                                        config=cfg, interpret=interpret)
  up_fn = jax.jit(lambda a, wt, te: gm(a, wt, te, "relu2", jnp.bfloat16))
  h = up_fn(xs, up, te)
  h = h.T if cfg.transposed else h
  down_fn = jax.jit(lambda a, wt, te: gm(a, wt, te, "none", jnp.dtype(cfg.down_dtype)))
  ys = down_fn(h, down, te)

  def combine(ys, dest, w):
    y = jnp.take(ys, dest, axis=1).T if cfg.transposed else jnp.take(ys, dest, axis=0)
    return jnp.einsum("mkd,mk->md", y.reshape(m, k, d), w, preferred_element_type=jnp.float32)
  return dict(layout_ms=time_fn(jax.jit(layout), x, ids, reps=reps),
              up_ms=time_fn(up_fn, xs, up, te, reps=reps),
              down_ms=time_fn(down_fn, h, down, te, reps=reps),
              combine_ms=time_fn(jax.jit(combine), ys, dest, w, reps=reps),
              config=str(cfg))


def jax_mgpu_ffn(x, ids, w, up, down):
  """The routed FFN through JAX's example Hopper kernel `ragged_dot_mgpu` (a public comparison
  point, no padding: tiles straddling two groups are computed for each), relu² in XLA."""
  from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu
  m, k = ids.shape
  order, sizes = kmoe.sort_by_expert(ids, up.shape[0])
  xs = jnp.take(x, order // k, axis=0)
  mm = lambda lhs, rhs, bn: ragged_dot_mgpu.ragged_dot(
      lhs, rhs, group_sizes=sizes, block_m=128, block_n=bn, block_k=64, max_concurrent_steps=4,
      grid_block_n=1, transpose_rhs=True)
  h = jnp.square(jax.nn.relu(mm(xs, up, 64).astype(jnp.float32))).astype(jnp.bfloat16)
  ys = mm(h, down, 128)
  y = jnp.take(ys, jnp.argsort(order), axis=0).reshape(m, k, -1)
  return jnp.einsum("mkd,mk->md", y.astype(jnp.float32), w)


def part_ffn(args, kernels: bool):
  """The XLA rows (kernels=False) or the kernel rows (kernels=True) at every token count."""
  e, k, d, f = args.shape
  interpret = not platform.mosaic_gpu_available()
  res = RESULTS.setdefault("ffn", {})
  for m in args.tokens:
    x, ids, w, up, down = ffn_inputs(m, e, k, d, f, seed=m)
    roof, touched = ffn_roofline_ms(ids, m, d, f)
    row = res.setdefault(f"m{m}", dict(roofline_ms=roof, touched_experts=touched))
    sl = slice(0, min(m, 16))
    want = np.asarray(kmoe.moe_ffn_dense(x[sl], ids[sl], w[sl], up, down))
    fns = {}
    if not kernels:
      fns["ragged_dot"] = lambda *a: kmoe.moe_ffn(*a, implementation="ragged_dot")
      if m * k <= 4 * e:
        fns["gather"] = lambda *a: kmoe.moe_ffn(*a, implementation="gather")
    else:
      for name, cfg in ffn_variants(m, k, e, args.smoke).items():
        fns[name] = (lambda c: lambda *a: kernel.moe_ffn(*a, config=c, interpret=interpret))(cfg)
      if not interpret and m * k >= 8 * e:
        fns["jax_ragged_dot_mgpu"] = jax_mgpu_ffn

    for name, fn in fns.items():
      def measure(fn=fn):
        jf = jax.jit(fn)
        t = time.perf_counter()
        got = jax.block_until_ready(jf(x, ids, w, up, down))
        compile_s = time.perf_counter() - t
        err = rel(got[sl], want)
        ms = time_fn(jf, x, ids, w, up, down, reps=1 if args.smoke else 7)
        out = dict(ms=ms, efficiency=roof / ms, err=err, ok=err <= T.tolerance("bfloat16",
                                                                              "kernel"),
                   compile_s=compile_s)
        if m * k < 8 * e and not interpret:  # decode sizes, also as a decode step runs them
          g = time_in_graph(fn, x, ids, w, up, down)
          out.update(ms_in_graph=g, efficiency_in_graph=roof / g)
        return out
      r = guarded(row, name, args, measure)
      if r:
        ROWS.append((f"ffn m={m} {name}", f"{r['ms']:.3f} ms", f"err {r['err']:.1e}",
                     f"{roof:.3f} ms", f"{r['efficiency']:.0%}"))
        if "ms_in_graph" in r:
          ROWS.append((f"ffn m={m} {name}, in a jitted loop", f"{r['ms_in_graph']:.3f} ms", "",
                       f"{roof:.3f} ms", f"{r['efficiency_in_graph']:.0%}"))
    if kernels:
      guarded(row, "pallas_breakdown", args, lambda: kernel_breakdown(
          x, ids, w, up, down, interpret=interpret, reps=1 if args.smoke else 7))
    save(args)


# ------------------------------------------------------------------------------------------------
def expert_bytes(cfg):
  return 2 * cfg.moe_expert_dim * cfg.moe_intermediate_size * 2


def moe_layers(cfg):
  return sum(t == nemojax.LayerType.MOE for t in cfg.layer_types)


def uniform_touched(cfg, b):
  """Expected distinct experts per layer if each row's k experts were uniform at random."""
  e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
  return e * (1 - (1 - k / e) ** b)


def routed_experts(model, state) -> list[int]:
  """Distinct routed experts each MoE layer picks for the rows' next step (one eager step from
  the loop state, routers recorded; nothing kept). Random weights route far from uniformly, so
  the decode roofline counts these rather than `uniform_touched`."""
  picked = []
  route = moe_lib.Router.__call__

  def recording(self, x):
    weights, ids = route(self, x)
    picked.append(len(np.unique(np.asarray(ids))))
    return weights, ids

  moe_lib.Router.__call__ = recording
  try:
    with jax.disable_jit():
      model(state.last[:, None], cache=state.cache)
  finally:
    moe_lib.Router.__call__ = route
  return picked


def decode_roofline_ms(model, cfg, b, ctx, touched):
  """Bytes one step reads: weights but the input embedding and unused experts, state r/w, KV.
  `touched`: distinct experts per MoE layer (mean over layers)."""
  n_moe = moe_layers(cfg)
  e = cfg.n_routed_experts
  weights = 2 * (cfg.num_params() - cfg.vocab_size * cfg.hidden_size)
  weights -= n_moe * e * expert_bytes(cfg)
  weights += n_moe * touched * expert_bytes(cfg)
  cache = jax.eval_shape(lambda: model.init_cache(b, ctx))
  kv = recurrent = 0
  for layer in cache.layers:
    if layer is None:
      continue
    nbytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(layer))
    if isinstance(layer, nemojax.KVState):
      kv += nbytes
    else:
      recurrent += 2 * nbytes
  return 1e3 * (weights + recurrent + kv) / HBM


def decode_state(model, cfg, b, ctx, steps):
  """A loop state whose cache holds `ctx` positions (random state contents do not change work)."""
  s_max = -(-(ctx + 2 * steps + 64) // 256) * 256
  cache = model.init_cache(b, s_max).replace(pos=jnp.int32(ctx))
  # Distinct tokens per row, at the start and at every step: identical rows would all route to
  # the same six experts and read a fraction of the weights the roofline counts. Greedy decoding
  # of a random model collapses every row onto one token after a step (measured on the H200:
  # batch 64 then ran at 158% of the roofline), so the rows sample at temperature 1, each with
  # its own seed.
  tokens = jax.random.randint(jax.random.key(b), (b,), 0, cfg.vocab_size, jnp.int32)
  state = engine.init_state(cache, tokens, max_new_tokens=2 * steps)
  lcfg, mode = engine.loop_config(vocab_size=cfg.vocab_size, max_new_tokens=2 * steps,
                                  sampling_params=nemojax.SamplingParams(temperature=1.0),
                                  seeds=list(range(b)))
  return state, lcfg, mode


def part_decode(model, cfg, args, impls):
  res = RESULTS.setdefault("decode", {})
  steps, ctx = args.decode_steps, args.context
  for impl in impls:
    moe_lib.set_implementation(model, None if impl == "auto" else impl)
    graph, params = jit.split(model)
    for b in args.batches:
      def measure(b=b):
        state, lcfg, mode = decode_state(model, cfg, b, ctx, steps)
        t = time.perf_counter()
        state = engine.decode_segment(graph, params, state, lcfg, jnp.int32(1), mode)
        jax.block_until_ready(state.tokens)
        first = time.perf_counter() - t
        t = time.perf_counter()
        state = engine.decode_segment(graph, params, state, lcfg, jnp.int32(1 + steps),
                                      mode)
        jax.block_until_ready(state.tokens)
        per = (time.perf_counter() - t) / steps
        picked = routed_experts(model, state)
        touched = float(np.mean(picked))
        roof = decode_roofline_ms(model, cfg, b, ctx, touched)
        return dict(ms_per_step=1e3 * per, tok_per_s=b / per, roofline_ms=roof,
                    efficiency=roof / (1e3 * per), compile_s=first,
                    experts_per_layer=picked, uniform_experts=uniform_touched(cfg, b),
                    roofline_uniform_ms=decode_roofline_ms(model, cfg, b, ctx,
                                                           uniform_touched(cfg, b)),
                    finite=bool(np.isfinite(np.asarray(state.tokens)).all()))
      r = guarded(res, f"{impl}_b{b}_ctx{ctx}", args, measure)
      if r:
        experts = np.mean(r["experts_per_layer"])
        ROWS.append((f"decode b={b} ctx={ctx} ({impl}, {experts:.1f} experts/layer)",
                     f"{r['ms_per_step']:.2f} ms",
                     f"{r['tok_per_s']:,.0f} tok/s", f"{r['roofline_ms']:.2f} ms",
                     f"{r['efficiency']:.0%}"))
    save(args)
  moe_lib.set_implementation(model, None)


def prefill_roofline_ms(cfg, L):
  n_attn = sum(t == nemojax.LayerType.ATTENTION for t in cfg.layer_types)
  active = cfg.num_params(active=True) - cfg.vocab_size * cfg.hidden_size  # input embedding
  attn = n_attn * 2 * L * L * cfg.num_attention_heads * cfg.head_dim  # causal QK and PV
  return 1e3 * (2 * active * L + attn) / MXU


def part_prefill(model, cfg, args, impls, L, chunk, key):
  res = RESULTS.setdefault("prefill", {})
  ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (1, L)).tolist()
  for impl in impls:
    moe_lib.set_implementation(model, None if impl == "auto" else impl)

    def measure():
      smp = Sampler(model, prefill_chunk=min(chunk, L), cache_size=L + 256)
      t = time.perf_counter()
      smp(ids, max_new_tokens=1)
      first = time.perf_counter() - t
      t = time.perf_counter()
      smp(ids, max_new_tokens=1)
      ttft = time.perf_counter() - t
      roof = prefill_roofline_ms(cfg, L)
      return dict(ttft_ms=1e3 * ttft, tok_per_s=L / ttft, roofline_ms=roof,
                  efficiency=roof / (1e3 * ttft), first_call_s=first, chunk=min(chunk, L))
    r = guarded(res, f"{impl}_{key}", args, measure)
    if r:
      ROWS.append((f"prefill {L} ({impl}) TTFT", f"{r['ttft_ms']:.1f} ms",
                   f"{r['tok_per_s']:,.0f} tok/s", f"{r['roofline_ms']:.1f} ms",
                   f"{r['efficiency']:.0%}"))
    save(args)
  moe_lib.set_implementation(model, None)


# ------------------------------------------------------------------------------------------------
def save(args):
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "moe.json"), "w") as fh:
      json.dump(RESULTS, fh, indent=1, default=str)


def print_table():
  print("\n| case | time | rate / error | roofline | efficiency |\n|---|---|---|---|---|")
  for row in ROWS:
    print("| " + " | ".join(row) + " |")
  errors = [(part, "", rows["error"][:160]) for part, rows in RESULTS.items()
            if isinstance(rows, dict) and "error" in rows]
  errors += [(part, name, v["error"][:160]) for part, rows in RESULTS.items()
             if isinstance(rows, dict) for name, v in rows.items()
             if isinstance(v, dict) and "error" in v]
  for sub in RESULTS.get("ffn", {}).values():
    errors += [("ffn", name, v["error"][:160]) for name, v in sub.items()
               if isinstance(v, dict) and "error" in v]
  for m, row in RESULTS.get("ffn", {}).items():
    b = row.get("pallas_breakdown", {})
    if "up_ms" in b:
      print(f"kernel breakdown {m}: layout+gather {b['layout_ms']:.3f} ms, up {b['up_ms']:.3f} ms, "
            f"down {b['down_ms']:.3f} ms, combine {b['combine_ms']:.3f} ms ({b['config']})")
  for part, name, msg in errors:
    print(f"failed: {part} {name}: {msg}")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default=os.environ.get("OUT", ""))
  p.add_argument("--smoke", action="store_true", help="tiny config on the CPU")
  p.add_argument("--parts", default="ffn,decode,prefill")
  p.add_argument("--tokens", default="1,64,8192", help="ffn token counts")
  p.add_argument("--batches", default="1,64")
  p.add_argument("--context", type=int, default=1024)
  p.add_argument("--decode-steps", type=int, default=32)
  p.add_argument("--prefill-len", type=int, default=8192)
  p.add_argument("--long-len", type=int, default=131072)
  p.add_argument("--model-impls", default="pallas,xla",
                 help="routed-expert implementations for decode/prefill (auto = dispatcher, "
                      "which picks the kernel on Hopper since it was verified there)")
  p.add_argument("--budget-s", type=float, default=270.0,
                 help="skip measurements that would start after this many seconds")
  args = p.parse_args(argv)
  split = lambda s: [v for v in s.split(",") if v]
  args.parts = split(args.parts)
  args.tokens = [int(v) for v in split(args.tokens)]
  args.batches = [int(v) for v in split(args.batches)]
  args.model_impls = split(args.model_impls)
  if args.smoke:
    args.shape = (8, 2, 128, 192)  # e, k, d, f
    args.tokens = [t for t in args.tokens if t <= 64] or [1]
    args.prefill_len, args.long_len, args.context = 64, 96, 32
    args.decode_steps = 2
  else:
    args.shape = (128, 6, 2688, 1856)
  return args


def model_config(args):
  if not args.smoke:
    return nemojax.NemotronHConfig.nemotron_3_nano_30b_a3b()
  e, k, d, f = args.shape
  return T.MOE_CONFIGS["moe"].replace(
      hidden_size=d, n_routed_experts=e, num_experts_per_tok=k, moe_intermediate_size=f)


def run_phase(args, kernels: bool, model, cfg):
  """The kernel's measurements (kernels=True) or XLA's. main runs the kernel first: it has been
  verified on an H200 and its rows matter most when a run is cut short (the 2026-12-01 run, XLA
  first, ran out of time before the kernel's 64- and 8192-token rows)."""
  name = "kernel" if kernels else "xla"
  impls = [i for i in args.model_impls if (i == "pallas") == kernels]
  try:
    if "ffn" in args.parts:
      part_ffn(args, kernels)
    if model is not None and impls:
      if "decode" in args.parts:
        part_decode(model, cfg, args, impls)
      if "prefill" in args.parts:
        part_prefill(model, cfg, args, impls, args.prefill_len, 8192, f"{args.prefill_len}")
      if "long" in args.parts:
        part_prefill(model, cfg, args, impls, args.long_len, 8192, f"{args.long_len}")
  except Exception as e:  # keep what was measured; report the failure
    RESULTS[f"{name}_phase_error"] = {"error": f"{type(e).__name__}: {e}"[:600]}
    log(f"ERROR {name} phase", RESULTS[f"{name}_phase_error"])
    traceback.print_exc(limit=5)
  save(args)


def build_model(args):
  if not any(p in args.parts for p in ("decode", "prefill", "long")):
    return None, None
  try:
    cfg = model_config(args)
    t = time.perf_counter()
    model = T.random_model(cfg, jnp.bfloat16)
    jax.block_until_ready(nnx.state(model))
    RESULTS["model"] = dict(build_s=time.perf_counter() - t, params=cfg.num_params(),
                            active=cfg.num_params(active=True))
    log("model", RESULTS["model"])
    return model, cfg
  except Exception as e:
    RESULTS["model_error"] = {"error": f"{type(e).__name__}: {e}"[:600]}
    log("ERROR model", RESULTS["model_error"])
    return None, None


def main(argv=None):
  args = parse_args(argv)
  RESULTS["meta"] = dict(device=str(jax.devices()[0]), jax=jax.__version__, smoke=args.smoke,
                         date=time.strftime("%Y-%m-%d"), shape_e_k_d_f=args.shape,
                         hardware_verified=kernel.HARDWARE_VERIFIED)
  log(RESULTS["meta"])
  model, cfg = build_model(args)
  run_phase(args, True, model, cfg)
  run_phase(args, False, model, cfg)
  RESULTS["total_s"] = elapsed()
  save(args)
  print_table()
  return 0


if __name__ == "__main__":
  sys.exit(main())
