"""End-to-end benchmarks of nemojax on the GPU machine (9B-v2 shape, random bf16 weights).

Parts (comma-separated `--parts`):
  numerics  transformers' NemotronH with random bf16 weights -> save_pretrained -> nemojax.load;
            logits on a 2k-token prompt against HF in fp32 (relative error, top-1 agreement per
            position), for nemojax bf16 and HF bf16. The loaded model is then used by the
            parts below.
  hf        transformers' PyTorch NemotronH (no mamba_ssm kernels): prefill 1k/8k and greedy
            decode at batch 1, measured in this run (the anchor).
  prefill   nemojax prefill at 8k with the XLA and the Pallas SSD (time, tokens/s, TTFT).
  long      a 131072-token prompt + 256 new tokens at batch 1: TTFT and peak device memory.
  decode    decode step time at batch 1/8/64 and contexts 1k/8k/32k/128k (cache contents random:
            the work of a step depends on the context length, not on the values; the cache is
            sized to the context plus the new tokens, as the Sampler sizes it).
  profile   jax.profiler traces of a few decode steps and one prefill, summarised: GPU busy
            time against wall time and the kernels that take the most time.

Every time is a median over repeats after warm-up; compile time is reported separately. Results
go to OUT/e2e.json and a table is printed last. `--config tiny` runs everything on the CPU in
seconds, to check the script before spending device time.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import nemojax
from nemojax import engine, jit
from nemojax import testing as T
from nemojax.sampler import Sampler
from nemojax.cache import KVState, MambaState

RESULTS: dict = {}
ROWS: list[tuple] = []
HBM = 4.3e12
MXU = 790e12


def log(*a):
  print(*a, flush=True)


def median_time(fn, repeats=5, warmup=1):
  for _ in range(warmup):
    jax.block_until_ready(fn())
  ts = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    ts.append(time.perf_counter() - t)
  return statistics.median(ts)


def peak_bytes():
  try:
    return jax.devices()[0].memory_stats().get("peak_bytes_in_use", 0)
  except Exception:  # CPU has no memory stats
    return 0


# ------------------------------------------------------------------------------------------------
def random_model(cfg, dtype=jnp.bfloat16):
  """The 9B-v2 shape with random weights (`nemojax.testing.random_model`): device memory peaks at
  the weights plus one tensor, so the peak measured by `long` is the program's."""
  return T.random_model(cfg, dtype)


def hf_random_model(cfg, dtype_name, device):
  import torch
  torch.manual_seed(0)
  default = torch.get_default_dtype()
  torch.set_default_dtype(getattr(torch, dtype_name))  # build in the target dtype: no fp32 copy
  try:
    with torch.device(device):
      model = __import__("transformers").NemotronHForCausalLM(T.hf_config(cfg))
  finally:
    torch.set_default_dtype(default)
  model = model.to(getattr(torch, dtype_name)).eval()
  g = torch.Generator(device=device).manual_seed(0)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("A_log"):
        p.copy_(torch.log(torch.rand(p.shape, generator=g, device=device) * 15 + 1))
      elif name.endswith(".D") or name.endswith("norm.weight") or name.endswith("norm_f.weight"):
        p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g, device=device))
      elif name.endswith("dt_bias"):
        p.copy_(torch.randn(p.shape, generator=g, device=device) - 3.0)
      elif "conv1d" in name:
        p.copy_(torch.randn(p.shape, generator=g, device=device) * 0.3)
      elif "embeddings" in name:
        p.copy_(torch.randn(p.shape, generator=g, device=device))
      else:
        p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]), generator=g)
  T.unclamp_dt_(model)
  return model


def part_numerics(cfg, args, device):
  import torch
  torch.backends.cuda.matmul.allow_tf32 = False
  model = hf_random_model(cfg, "bfloat16", device)
  tmp = tempfile.mkdtemp(dir=args.tmp)
  t = time.perf_counter()
  model.save_pretrained(tmp)
  RESULTS["save_pretrained_s"] = time.perf_counter() - t
  t = time.perf_counter()
  ours = nemojax.load(tmp, dtype=jnp.bfloat16)
  jax.block_until_ready(nnx.state(ours))
  RESULTS["nemojax_load_s"] = time.perf_counter() - t
  log(f"save_pretrained {RESULTS['save_pretrained_s']:.1f}s, nemojax.load "
      f"{RESULTS['nemojax_load_s']:.1f}s")
  L = args.numerics_len
  ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, L))
  with torch.no_grad():
    tid = torch.as_tensor(ids, device=device)
    hf16 = model(tid).logits.float().cpu().numpy()[0]
    model.float()
    hf32 = model(tid).logits.float().cpu().numpy()[0]
  del model
  torch.cuda.empty_cache() if device == "cuda" else None
  t = time.perf_counter()
  ours16 = np.asarray(ours(ids))[0]
  RESULTS["nemojax_2k_forward_first_call_s"] = time.perf_counter() - t

  def cmp(a, ref):
    return dict(rel_err=float(np.linalg.norm(a - ref) / np.linalg.norm(ref)),
                top1_agree=float((a.argmax(-1) == ref.argmax(-1)).mean()))

  RESULTS["numerics"] = {"prompt_len": L, "nemojax_bf16_vs_hf_fp32": cmp(ours16, hf32),
                         "hf_bf16_vs_hf_fp32": cmp(hf16, hf32),
                         "nemojax_bf16_vs_hf_bf16": cmp(ours16, hf16)}
  log(json.dumps(RESULTS["numerics"], indent=1))
  shutil.rmtree(tmp, ignore_errors=True)
  return ours


def part_hf(cfg, args, device):
  import torch
  model = hf_random_model(cfg, "bfloat16", device)
  torch.cuda.reset_peak_memory_stats() if device == "cuda" else None

  def sync():
    if device == "cuda":
      torch.cuda.synchronize()

  out = {}
  for L in args.hf_prefill:
    ids = torch.randint(0, cfg.vocab_size, (1, L), device=device)
    with torch.no_grad():
      model(ids, logits_to_keep=1)
      sync()
      ts = []
      for _ in range(3):
        t = time.perf_counter()
        model(ids, logits_to_keep=1)
        sync()
        ts.append(time.perf_counter() - t)
    out[f"prefill_{L}_ms"] = 1e3 * statistics.median(ts)
  ids = torch.randint(0, cfg.vocab_size, (1, 1024), device=device)
  n = args.hf_decode_tokens
  with torch.no_grad():
    model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    sync()
    t = time.perf_counter()
    model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    sync()
    t4 = time.perf_counter() - t
    t = time.perf_counter()
    model.generate(ids, max_new_tokens=n + 4, min_new_tokens=n + 4, do_sample=False)
    sync()
    tn = time.perf_counter() - t
  out["decode_b1_ms_per_token"] = 1e3 * (tn - t4) / n
  out["peak_gib"] = (torch.cuda.max_memory_allocated() / 2**30) if device == "cuda" else 0
  RESULTS["hf"] = out
  log("hf", out)
  del model
  torch.cuda.empty_cache() if device == "cuda" else None


# ------------------------------------------------------------------------------------------------
def prefill_roofline_s(batch, L):
  """BENCHMARKS.md: b·L·(15.42e9 + 40,960·L + 0.22e9) / 790e12 (9B-v2 shape)."""
  return batch * L * (15.42e9 + 40960 * L + 0.22e9) / MXU


def part_prefill(model, cfg, args):
  out = {}
  L = args.prefill_len
  ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (1, L)).tolist()
  for impl in args.impls:
    model.set_ssd_implementation(impl)
    for chunk in args.prefill_chunks:
      name = f"{impl}_chunk{min(chunk, L)}"
      smp = Sampler(model, prefill_chunk=min(chunk, L), cache_size=L + 512)
      try:
        t = time.perf_counter()
        smp(ids, max_new_tokens=1)
        compile_s = time.perf_counter() - t
        ttft = median_time(lambda: smp(ids, max_new_tokens=1)[0].tokens, repeats=3, warmup=0)
      except Exception as e:  # record, do not abort the whole run
        out[name] = {"error": f"{type(e).__name__}: {e}"[:400]}
        log(name, "failed:", out[name]["error"])
        continue
      roof = prefill_roofline_s(1, L)
      out[name] = dict(compile_s=compile_s, ttft_ms=1e3 * ttft, tok_per_s=L / ttft,
                       roofline_ms=1e3 * roof, efficiency=roof / ttft)
      ROWS.append((f"prefill {L} ({impl}, chunks of {min(chunk, L)}) TTFT", f"{1e3 * ttft:.1f} ms",
                   f"{L / ttft:,.0f} tok/s", f"{1e3 * roof:.1f} ms", f"{roof / ttft:.2f}"))
      log(name, out[name])
  model.set_ssd_implementation(None)
  RESULTS["prefill"] = out


def part_long(model, cfg, args):
  L, new = args.long_len, args.long_new
  ids = np.random.default_rng(2).integers(0, cfg.vocab_size, (1, L)).tolist()
  smp = Sampler(model, prefill_chunk=args.long_chunk, cache_size=L + new + 256)
  t = time.perf_counter()
  res = smp(ids, max_new_tokens=new)  # first call: includes compilation
  first = time.perf_counter() - t
  t = time.perf_counter()
  smp(ids, max_new_tokens=1)
  ttft = time.perf_counter() - t
  roof = prefill_roofline_s(1, L)
  out = dict(prompt=L, chunk=args.long_chunk, new_tokens=len(res[0].tokens),
             first_call_s=first, ttft_s=ttft,
             ttft_roofline_s=roof, ttft_over_roofline=ttft / roof,
             peak_device_gib=peak_bytes() / 2**30)
  # Device memory the compiled prefill program needs beyond its arguments, per chunk size.
  graph, params = jit.split(model)
  cache = jax.eval_shape(lambda: model.init_cache(1, L + new + 256))
  for chunk in sorted({args.long_chunk, 2 * args.long_chunk}):
    ids_abs = jax.ShapeDtypeStruct((1, chunk), jnp.int32)
    try:
      mem = engine.prefill.lower(graph, params, cache, ids_abs).compile().memory_analysis()
      out[f"prefill_chunk{chunk}_temp_gib"] = mem.temp_size_in_bytes / 2**30
      out[f"prefill_chunk{chunk}_args_gib"] = mem.argument_size_in_bytes / 2**30
    except Exception as e:  # memory_analysis is best effort on some backends
      out[f"prefill_chunk{chunk}_temp_gib"] = f"{type(e).__name__}: {e}"[:200]
  RESULTS["long"] = out
  ROWS.append((f"prompt {L} + {new} new: TTFT", f"{ttft:.2f} s", f"{L / ttft:,.0f} tok/s",
               f"{roof:.2f} s", f"{roof / ttft:.2f}"))
  ROWS.append((f"prompt {L} + {new} new: peak device memory", f"{out['peak_device_gib']:.1f} GiB",
               "", "22 GiB target", ""))
  log("long", out)


def random_cache(model, b, s_max, ctx, key):
  cache = model.init_cache(b, s_max)
  layers = []
  for i, layer in enumerate(cache.layers):
    k1, k2, key = jax.random.split(jax.random.fold_in(key, i), 3)
    if isinstance(layer, MambaState):
      layers.append(MambaState(conv=jax.random.normal(k1, layer.conv.shape, layer.conv.dtype),
                               ssm=0.1 * jax.random.normal(k2, layer.ssm.shape, jnp.float32)))
    elif isinstance(layer, KVState):
      layers.append(KVState(k=jax.random.normal(k1, layer.k.shape, layer.k.dtype),
                            v=jax.random.normal(k2, layer.v.shape, layer.v.dtype)))
    else:
      layers.append(None)
  return cache.replace(layers=tuple(layers), pos=jnp.int32(ctx))


def decode_roofline_s(b, ctx):
  return (16.60e9 + b * (2 * 141.6e6 + 3.98e6 + ctx * 16384)) / HBM


def decode_inputs(model, cfg, b, ctx, steps):
  """A loop state whose cache holds `ctx` random tokens, sized as the Sampler would size it."""
  s_max = -(-(ctx + 2 * steps + 64) // 256) * 256
  cache = random_cache(model, b, s_max, ctx, jax.random.key(b * 7 + ctx))
  state = engine.init_state(cache, jnp.ones((b,), jnp.int32), max_new_tokens=2 * steps)
  lcfg, _ = engine.loop_config(vocab_size=cfg.vocab_size, max_new_tokens=2 * steps,
                               sampling_params=nemojax.SamplingParams(), seeds=[0] * b)
  return state, lcfg


def part_decode(model, cfg, args):
  graph, params = jit.split(model)
  out = {}
  steps = args.decode_steps
  for b in args.batches:
    for ctx in args.contexts:
      if b * ctx * 16384 + b * 150e6 > args.max_state_bytes:
        continue
      state, lcfg = decode_inputs(model, cfg, b, ctx, steps)
      t = time.perf_counter()
      # compile + 1 step
      state = engine.decode_segment(graph, params, state, lcfg, jnp.int32(1), "greedy")
      jax.block_until_ready(state.tokens)
      compile_s = time.perf_counter() - t
      t = time.perf_counter()
      state = engine.decode_segment(graph, params, state, lcfg, jnp.int32(1 + steps), "greedy")
      jax.block_until_ready(state.tokens)
      per_step = (time.perf_counter() - t) / steps
      roof = decode_roofline_s(b, ctx)
      out[f"b{b}_ctx{ctx}"] = dict(ms_per_step=1e3 * per_step, tok_per_s=b / per_step,
                                   roofline_ms=1e3 * roof, efficiency=roof / per_step,
                                   compile_or_first_s=compile_s)
      ROWS.append((f"decode b={b} ctx={ctx}", f"{1e3 * per_step:.2f} ms",
                   f"{b / per_step:,.0f} tok/s", f"{1e3 * roof:.2f} ms", f"{roof / per_step:.2f}"))
      log(f"decode b={b} ctx={ctx}", out[f"b{b}_ctx{ctx}"])
      del state
  RESULTS["decode"] = out


# ------------------------------------------------------------------------------------------------
def part_profile(model, cfg, args):
  """Traces a few decode steps and one prefill chunk; reports where the GPU time goes."""
  from profiling import summarize_trace
  graph, params = jit.split(model)
  out = {}
  cases = [c for c in args.profile_cases.split(",") if c]
  for case in cases:
    trace_dir = os.path.join(args.out, "trace_" + case)
    if case.startswith("decode"):  # decode_b1_ctx1024
      _, bs, cs = case.split("_")
      b, ctx = int(bs[1:]), int(cs[3:])
      steps = 8
      state, lcfg = decode_inputs(model, cfg, b, ctx, steps)
      state = engine.decode_segment(graph, params, state, lcfg, jnp.int32(1), "greedy")
      jax.block_until_ready(state.tokens)
      run = lambda s0=state: engine.decode_segment(graph, params, s0, lcfg, jnp.int32(1 + steps),
                                                   "greedy")
      per = steps
    else:  # prefill_8192
      L = int(case.split("_")[1])
      ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (1, L)).tolist()
      smp = Sampler(model, prefill_chunk=min(args.prefill_chunks[-1], L), cache_size=L + 512)
      smp(ids, max_new_tokens=1)
      run = lambda: smp(ids, max_new_tokens=1)[0].tokens
      per = 1
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      t = time.perf_counter()
      jax.block_until_ready(run())
      wall = time.perf_counter() - t
    summary = summarize_trace(trace_dir, wall)
    for f in glob.glob(os.path.join(trace_dir, "**", "*.json.gz"), recursive=True)[:1]:
      shutil.copy(f, os.path.join(args.out, f"trace_{case}.json.gz"))  # flat: comes back whole
    shutil.rmtree(trace_dir, ignore_errors=True)
    summary["per"] = per
    out[case] = summary
    log(case, json.dumps(summary, indent=1))
  RESULTS["profile"] = out


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--config", default="nano_9b_v2")
  p.add_argument("--parts", default="numerics,hf,prefill,long,decode,profile")
  p.add_argument("--out", default=os.environ.get("OUT", "."))
  p.add_argument("--tmp", default=None)
  p.add_argument("--numerics-len", type=int, default=2048)
  p.add_argument("--hf-prefill", type=int, nargs="*", default=[1024, 8192])
  p.add_argument("--hf-decode-tokens", type=int, default=16)
  p.add_argument("--prefill-len", type=int, default=8192)
  p.add_argument("--prefill-chunks", type=int, nargs="*", default=[1024, 8192])
  p.add_argument("--long-chunk", type=int, default=1024)
  p.add_argument("--impls", nargs="*", default=["xla", "pallas"])
  p.add_argument("--long-len", type=int, default=131072)
  p.add_argument("--long-new", type=int, default=256)
  p.add_argument("--batches", type=int, nargs="*", default=[1, 8, 64])
  p.add_argument("--contexts", type=int, nargs="*", default=[1024, 8192, 32768, 131072])
  p.add_argument("--decode-steps", type=int, default=32)
  p.add_argument("--max-state-bytes", type=float, default=40e9)
  p.add_argument("--order", default=None, help="comma-separated order of the parts")
  p.add_argument("--attention", default="auto", choices=["auto", "xla", "pallas"],
                 help="prefill attention over the cache (decode steps always use XLA)")
  p.add_argument("--profile-cases", default="decode_b1_ctx1024,decode_b64_ctx16384,prefill_8192")
  args = p.parse_args()
  cfg = getattr(nemojax.NemotronHConfig, args.config)()
  parts = args.parts.split(",")
  device = "cuda" if jax.devices()[0].platform == "gpu" else "cpu"
  RESULTS.update(attention=args.attention, config=args.config,
                 device=str(jax.devices()[0].device_kind),
                 date=time.strftime("%Y-%m-%d"), jax=jax.__version__, parts=parts)
  log("device", RESULTS["device"], "jax", jax.__version__)
  model = None

  def dump():
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "e2e.json"), "w") as f:
      json.dump(RESULTS | {"rows": ROWS}, f, indent=1)

  order = ["numerics", "hf", "long", "prefill", "decode", "profile"]
  if args.order:
    order = args.order.split(",")
  try:
    for part in order:
      if part not in parts:
        continue
      if part == "numerics":
        model = part_numerics(cfg, args, device)
      elif part == "hf":
        part_hf(cfg, args, device)
      else:
        if model is None:
          t = time.perf_counter()
          model = random_model(cfg)
          model.set_attention_implementation(None if args.attention == "auto" else args.attention)
          RESULTS["random_init_s"] = time.perf_counter() - t
          RESULTS["peak_after_init_gib"] = peak_bytes() / 2**30
          log(f"random init {RESULTS['random_init_s']:.1f}s, "
              f"peak {RESULTS['peak_after_init_gib']:.2f} GiB")
        {"long": part_long, "prefill": part_prefill, "decode": part_decode,
         "profile": part_profile}[part](model, cfg, args)
      dump()
  finally:
    RESULTS["peak_device_gib_process"] = peak_bytes() / 2**30
    dump()
    log("\n| what | median | rate | roofline | efficiency |\n|---|---|---|---|---|")
    for r in ROWS:
      log("| " + " | ".join(r) + " |")
    if "hf" in RESULTS:
      log("HF transformers (same run):", json.dumps(RESULTS["hf"]))
    if "numerics" in RESULTS:
      log("numerics:", json.dumps(RESULTS["numerics"]))


if __name__ == "__main__":
  sys.exit(main())
