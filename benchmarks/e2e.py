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
            the work of a step depends on the context length, not on the values).

Every time is a median over repeats after warm-up; compile time is reported separately. Results
go to OUT/e2e.json and a table is printed last. `--config tiny` runs everything on the CPU in
seconds, to check the script before spending device time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import nemojax  # noqa: E402
from nemojax import sampler as S  # noqa: E402
from nemojax.cache import KVState, MambaState  # noqa: E402

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
def hf_random_model(cfg, dtype_name, device):
  import torch
  from nemojax import testing as T
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
  import shutil
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
    smp = S.Sampler(model, prefill_chunk=min(args.prefill_chunk, L), cache_size=L + 512)
    try:
      t = time.perf_counter()
      smp(ids, max_new_tokens=1)
      compile_s = time.perf_counter() - t
      ttft = median_time(lambda: smp(ids, max_new_tokens=1)[0].tokens, repeats=3, warmup=0)
    except Exception as e:  # record, do not abort the whole run
      out[impl] = {"error": f"{type(e).__name__}: {e}"[:400]}
      log(impl, "failed:", out[impl]["error"])
      continue
    roof = prefill_roofline_s(1, L)
    out[impl] = dict(compile_s=compile_s, ttft_ms=1e3 * ttft, tok_per_s=L / ttft,
                     roofline_ms=1e3 * roof, efficiency=roof / ttft)
    ROWS.append((f"prefill {L} ({impl}) TTFT", f"{1e3 * ttft:.1f} ms", f"{L / ttft:,.0f} tok/s",
                 f"{1e3 * roof:.1f} ms", f"{roof / ttft:.2f}"))
    log(impl, out[impl])
  model.set_ssd_implementation(None)
  RESULTS["prefill"] = out


def part_long(model, cfg, args):
  L, new = args.long_len, args.long_new
  ids = np.random.default_rng(2).integers(0, cfg.vocab_size, (1, L)).tolist()
  smp = S.Sampler(model, prefill_chunk=args.prefill_chunk, cache_size=L + new + 256)
  t = time.perf_counter()
  res = smp(ids, max_new_tokens=new)  # first call: includes compilation
  first = time.perf_counter() - t
  t = time.perf_counter()
  smp(ids, max_new_tokens=1)
  ttft = time.perf_counter() - t
  roof = prefill_roofline_s(1, L)
  out = dict(prompt=L, new_tokens=len(res[0].tokens), first_call_s=first, ttft_s=ttft,
             ttft_roofline_s=roof, ttft_over_roofline=ttft / roof,
             peak_device_gib=peak_bytes() / 2**30)
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


def part_decode(model, cfg, args):
  graphdef, params = nnx.split(model)
  out = {}
  steps = args.decode_steps
  for b in args.batches:
    ctxs = [c for c in args.contexts if b * c * 16384 + b * 150e6 <= args.max_state_bytes]
    if not ctxs:
      continue
    s_max = max(ctxs) + steps + 64
    for ctx in ctxs:
      cache = random_cache(model, b, s_max, ctx, jax.random.key(b * 7 + ctx))
      state = S.LoopState(
          cache=cache, last=jnp.ones((b,), jnp.int32), tokens=jnp.zeros((b, 2 * steps), jnp.int32),
          count=jnp.zeros((b,), jnp.int32), done=jnp.zeros((b,), bool),
          reason=jnp.zeros((b,), jnp.int32), step=jnp.zeros((), jnp.int32),
          thinking=jnp.zeros((b,), bool), think_count=jnp.zeros((b,), jnp.int32),
          forcing=jnp.full((b,), -1, jnp.int32), recent=jnp.full((b, 1), -1, jnp.int32))
      lcfg = S.LoopConfig(
          max_new=jnp.full((b,), 2 * steps, jnp.int32), temperature=jnp.zeros((b,)),
          top_k=jnp.zeros((b,), jnp.int32), top_p=jnp.ones((b,)),
          key=jax.random.key_data(jax.random.key(0)), stop_ids=jnp.full((8,), -1, jnp.int32),
          budget=jnp.full((b,), -1, jnp.int32), grace=jnp.full((b,), -1, jnp.int32),
          newline=jnp.zeros((cfg.vocab_size,), bool), close_text=jnp.zeros((1,), jnp.int32),
          close_marker=jnp.full((1,), -2, jnp.int32))
      t = time.perf_counter()
      state = S._decode_jit(graphdef, params, state, lcfg, jnp.int32(1))  # compile + 1 step
      jax.block_until_ready(state.tokens)
      compile_s = time.perf_counter() - t
      t = time.perf_counter()
      state = S._decode_jit(graphdef, params, state, lcfg, jnp.int32(1 + steps))
      jax.block_until_ready(state.tokens)
      per_step = (time.perf_counter() - t) / steps
      roof = decode_roofline_s(b, ctx)
      out[f"b{b}_ctx{ctx}"] = dict(ms_per_step=1e3 * per_step, tok_per_s=b / per_step,
                                   roofline_ms=1e3 * roof, efficiency=roof / per_step,
                                   compile_or_first_s=compile_s)
      ROWS.append((f"decode b={b} ctx={ctx}", f"{1e3 * per_step:.2f} ms",
                   f"{b / per_step:,.0f} tok/s", f"{1e3 * roof:.2f} ms", f"{roof / per_step:.2f}"))
      log(f"decode b={b} ctx={ctx}", out[f"b{b}_ctx{ctx}"])
      del state, cache
  RESULTS["decode"] = out


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--config", default="nano_9b_v2")
  p.add_argument("--parts", default="numerics,hf,prefill,long,decode")
  p.add_argument("--out", default=os.environ.get("OUT", "."))
  p.add_argument("--tmp", default=None)
  p.add_argument("--numerics-len", type=int, default=2048)
  p.add_argument("--hf-prefill", type=int, nargs="*", default=[1024, 8192])
  p.add_argument("--hf-decode-tokens", type=int, default=16)
  p.add_argument("--prefill-len", type=int, default=8192)
  p.add_argument("--prefill-chunk", type=int, default=8192)
  p.add_argument("--impls", nargs="*", default=["xla", "pallas"])
  p.add_argument("--long-len", type=int, default=131072)
  p.add_argument("--long-new", type=int, default=256)
  p.add_argument("--batches", type=int, nargs="*", default=[1, 8, 64])
  p.add_argument("--contexts", type=int, nargs="*", default=[1024, 8192, 32768, 131072])
  p.add_argument("--decode-steps", type=int, default=32)
  p.add_argument("--max-state-bytes", type=float, default=40e9)
  p.add_argument("--order", default=None, help="comma-separated order of the parts")
  args = p.parse_args()
  cfg = getattr(nemojax.NemotronHConfig, args.config)()
  parts = args.parts.split(",")
  device = "cuda" if jax.devices()[0].platform == "gpu" else "cpu"
  RESULTS.update(config=args.config, device=str(jax.devices()[0].device_kind),
                 date=time.strftime("%Y-%m-%d"), jax=jax.__version__, parts=parts)
  log("device", RESULTS["device"], "jax", jax.__version__)
  model = None

  def dump():
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "e2e.json"), "w") as f:
      json.dump(RESULTS | {"rows": ROWS}, f, indent=1)

  order = ["numerics", "hf", "long", "prefill", "decode"]
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
          model = nemojax.NemotronH(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
          jax.block_until_ready(nnx.state(model))
          RESULTS["random_init_s"] = time.perf_counter() - t
          log(f"random init {RESULTS['random_init_s']:.1f}s")
        {"long": part_long, "prefill": part_prefill, "decode": part_decode}[part](model, cfg, args)
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
