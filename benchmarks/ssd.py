"""SSD scan benchmark for the GPU machine: our Pallas kernel vs the XLA reference vs mamba_ssm.

Every shape of BENCHMARKS.md's table (1×4096, 1×16384, 1×65536, 1×131072, 8×8192; H=128, N=128,
G=8; head dims 80 and 64; chunks 128 and 256), all implementations in the same process on the same
random inputs (bf16 x/B/C, fp32 dt_raw/A/D/dt_bias, softplus(dt_raw + dt_bias) inside every timed
function). Prints median ms, the roofline t*, efficiency t*/t and the ratio to mamba_ssm; checks
‖Δ‖/‖ref‖ of y and the final state against an fp32 reference (XLA chunked, matmul precision
"highest") at every shape.

mamba_ssm is not a dependency: copy its Triton files under a git-ignored folder (see
BENCHMARKS.md), carry it, and put it on PYTHONPATH (`--mamba-path third_party`).

Usage on the device machine:
  python benchmarks/ssd.py --mamba-path third_party --out $OUT
  python benchmarks/ssd.py --shapes 1x4096 --head-dims 80 --chunks 128 --impls pallas,mamba
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # share the GPU with torch

import jax
import jax.numpy as jnp
import numpy as np

SHAPES = ["1x4096", "1x16384", "1x65536", "1x131072", "8x8192"]
H, N, G = 128, 128, 8
# BENCHMARKS.md roofline of one SSD layer: 45.6 KB of HBM traffic per token (P=80) at the measured
# 4.3 TB/s copy rate (the 8.14 MFLOP per token at 790 TFLOP/s give about the same time).
COPY_BW = 4.3e12


def min_bytes_per_token(p: int) -> float:
  # x and y in bf16, B and C in bf16, dt in fp32 (read once, written once).
  return H * p * 2 * 2 + 2 * G * N * 2 + H * 4


def roofline_ms(b: int, L: int, p: int) -> float:
  return b * L * min_bytes_per_token(p) / COPY_BW * 1e3


def parse_shape(s):
  b, L = s.lower().split("x")
  return int(b), int(L)


def make_inputs(key, b, L, p, dtype=jnp.bfloat16):
  ks = jax.random.split(key, 8)
  x = jax.random.normal(ks[0], (b, L, H, p), dtype)
  dt_raw = jax.random.normal(ks[1], (b, L, H), jnp.float32) - 2.0
  A = -jnp.exp(jax.random.uniform(ks[2], (H,), jnp.float32, np.log(1.0), np.log(16.0)))
  B = jax.random.normal(ks[3], (b, L, G, N), dtype)
  C = jax.random.normal(ks[4], (b, L, G, N), dtype)
  D = jax.random.normal(ks[5], (H,), jnp.float32)
  dt_bias = jax.random.normal(ks[6], (H,), jnp.float32) * 0.5
  return x, dt_raw, A, B, C, D, dt_bias


def time_fn(fn, args, sync, *, min_batch_ms=20.0, reps=7):
  """Median ms per call: warm-up, then `reps` batches of back-to-back calls, synchronised."""
  out = fn(*args)
  sync(out)
  t0 = time.perf_counter()
  out = fn(*args)
  sync(out)
  one = max(time.perf_counter() - t0, 1e-6)
  k = max(1, min(200, int(min_batch_ms / 1e3 / one)))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    for _ in range(k):
      out = fn(*args)
    sync(out)
    times.append((time.perf_counter() - t0) / k * 1e3)
  return float(np.median(times)), times


def rel(a, r):
  a = np.asarray(a, np.float32).ravel()
  r = np.asarray(r, np.float32).ravel()
  if not np.all(np.isfinite(a)):
    return float("nan")
  return float(np.linalg.norm(a - r) / np.linalg.norm(r))


def _parse_args():
  ap = argparse.ArgumentParser()
  ap.add_argument("--shapes", default=",".join(SHAPES))
  ap.add_argument("--head-dims", default="80,64")
  ap.add_argument("--chunks", default="128,256")
  ap.add_argument("--impls", default="pallas,xla,mamba,jla",
                  help="of pallas, xla, mamba, jla, jla_kernel (jla's kernel alone)")
  ap.add_argument("--mamba-path", default=None)
  ap.add_argument("--no-check", action="store_true")
  ap.add_argument("--variant-shapes", default="", help="time the variants only at these shapes")
  ap.add_argument("--xla-max-tokens", type=int, default=1 << 17,
                  help="skip timing the XLA reference above this many tokens")
  ap.add_argument("--step", action="store_true", help="also time the decode-step update")
  ap.add_argument("--step-only", action="store_true", help="time only the decode-step update")
  ap.add_argument("--config", default="", help="pallas Config overrides, e.g. num_stages=2")
  ap.add_argument("--variants", default="",
                  help="extra pallas configs timed side by side, ';'-separated override lists")
  ap.add_argument("--out", default=os.environ.get("OUT"))
  ap.add_argument("--smoke", action="store_true", help="tiny CPU run of the harness itself")
  ap.add_argument("--backward", action="store_true",
                  help="forward and forward+backward vs jax-linear-attention and mamba_ssm "
                       "(benchmarks/ssd_backward.py)")
  ap.add_argument("--grad-check-max-tokens", type=int, default=1 << 17)
  args = ap.parse_args()
  return args


def make_config(spec):
  """A pallas Config from "key=value,..." overrides."""
  from nemojax.kernels.ssd import pallas_mosaic_gpu_bwd as pmg
  overrides = dict(kv.split("=") for kv in spec.split(",") if kv)
  conv = lambda k, v: (v == "True") if v in ("True", "False") else type(
      getattr(pmg.DEFAULT_CONFIG, k))(v)
  return pmg.Config(**{k: conv(k, v) for k, v in overrides.items()})


def _load_baselines(args, impls):
  """jla's simple_gla, torch and mamba_ssm's scan, each None (and dropped from `impls`) if
  missing."""
  mamba_chunk_scan_combined = None
  jla_gla = None
  if "jla" in impls or "jla_kernel" in impls:
    try:
      from jla.ops.mosaic_gpu.scalar_gate import simple_gla as jla_gla
    except Exception as e:
      print(f"jax-linear-attention unavailable: {e!r}")
      for name in ("jla", "jla_kernel"):
        if name in impls:
          impls.remove(name)
  torch = None
  if "mamba" in impls:
    try:
      if args.mamba_path:
        sys.path.insert(0, args.mamba_path)
      import torch
      from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception as e:  # keep going without the baseline
      print(f"mamba_ssm unavailable: {e!r}")
      impls.remove("mamba")

  return jla_gla, torch, mamba_chunk_scan_combined


def _make_fns(args, config, variants, jla_gla):
  """The jitted implementations, each (x, dt_raw, A, B, C, D, dt_bias, chunk) → (y, state)."""
  from nemojax.kernels.ssd import reference
  from nemojax.kernels.ssd import pallas_mosaic_gpu_bwd as pmg

  def softplus(v):
    return jnp.logaddexp(v, 0.0)

  def ours(x, dt_raw, A, B, C, D, dt_bias, chunk, config=config):
    dt = softplus(dt_raw + dt_bias)
    return pmg.ssd(x, dt, A, B, C, D, chunk_size=chunk, config=config, interpret=args.smoke)

  def xla(x, dt_raw, A, B, C, D, dt_bias, chunk):
    dt = softplus(dt_raw + dt_bias)
    return reference.ssd_chunked(x, dt, A, B, C, D, chunk_size=chunk)

  def ref32(x, dt_raw, A, B, C, D, dt_bias, chunk):
    dt = softplus(dt_raw + dt_bias)
    with jax.default_matmul_precision("highest"):
      return reference.ssd_chunked(x.astype(jnp.float32), dt, A, B.astype(jnp.float32),
                                   C.astype(jnp.float32), D, chunk_size=chunk)

  jit_ours = jax.jit(ours, static_argnums=7)
  jit_variants = {k: jax.jit(functools.partial(ours, config=c), static_argnums=7)
                  for k, c in variants.items()}
  jit_xla = jax.jit(xla, static_argnums=7)

  def jla(x, dt_raw, A, B, C, D, dt_bias, chunk):
    del chunk  # jla's own chunk (64)
    dt = softplus(dt_raw + dt_bias)
    y, s = jla_gla(C, B, (x * dt[..., None]).astype(x.dtype), dt * A, scale=1.0,
                   output_final_state=True)
    y = y.astype(jnp.float32) + D[:, None] * x.astype(jnp.float32)
    return y.astype(x.dtype), jnp.swapaxes(s, -1, -2)  # jla's state is [h, n, p]

  jit_jla = jax.jit(jla, static_argnums=7)
  jit_ref = jax.jit(ref32, static_argnums=7)

  # "jla_kernel": jla's kernel alone, its inputs formed outside the timed call (x·dt in bf16 and
  # the log-decay dt·A: what `jla` above computes in XLA first), no final state: what the jla
  # column would be if SSD's dt were fused into its kernel. Not checked (y without D·x).
  def jla_inputs(x, dt_raw, A, B, C, D, dt_bias, chunk):
    dt = softplus(dt_raw + dt_bias)
    return C, B, (x * dt[..., None]).astype(x.dtype), dt * A

  jit_jla_kernel = (jax.jit(jla_inputs, static_argnums=7),
                    jax.jit(lambda c, b, u, g: jla_gla(c, b, u, g, scale=1.0,
                                                        output_final_state=False)[0]))
  return jit_ours, jit_variants, jit_xla, jit_jla, jit_ref, jit_jla_kernel


def _run_backward(args, config, make_config):
  """`--backward`: benchmarks/ssd_backward.py with the same configs."""
  if args.mamba_path:
    sys.path.insert(0, args.mamba_path)
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import ssd_backward
  configs = {"": config} | {f"[{v}]": make_config(v) for v in args.variants.split(";") if v}
  return ssd_backward.run(args, H=H, N=N, G=G, time_fn=time_fn, configs=configs)


def main():
  args = _parse_args()
  if args.smoke:  # few heads so that the CPU interpreter finishes quickly
    global H, G
    H, G = 4, 2

  config = make_config(args.config)
  impls = args.impls.split(",")
  variants = {f"pallas[{v}]": make_config(v) for v in args.variants.split(";") if v}
  impls += list(variants)
  if args.backward:
    return _run_backward(args, config, make_config)
  jla_gla, torch, mamba_chunk_scan_combined = _load_baselines(args, impls)
  print(f"jax {jax.__version__}, devices {jax.devices()}, config {config}")
  if torch is not None:
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")

  jit_ours, jit_variants, jit_xla, jit_jla, jit_ref, jit_jla_kernel = _make_fns(
      args, config, variants, jla_gla)
  jsync = lambda o: jax.block_until_ready(o)
  rows = []
  key = jax.random.key(0)
  for p in ([] if args.step_only else [int(v) for v in args.head_dims.split(",")]):
    for chunk in [int(v) for v in args.chunks.split(",")]:
      for shape in args.shapes.split(","):
        b, L = parse_shape(shape)
        key, sub = jax.random.split(key)
        inp = make_inputs(sub, b, L, p)
        row = dict(shape=shape, p=p, chunk=chunk, roofline_ms=roofline_ms(b, L, p))
        ref = None
        if not args.no_check:
          try:
            ref = jax.device_get(jit_ref(*inp, chunk))
          except Exception as e:
            row["ref_error"] = repr(e)[:300]
        for impl in impls:
          only = args.variant_shapes.split(",") if args.variant_shapes else None
          if impl in variants and only and shape not in only:
            continue
          try:
            if impl == "mamba":
              ms, out = _time_mamba(row, inp, chunk, torch, mamba_chunk_scan_combined)
            elif impl == "jla_kernel":
              if p not in (64, 128):
                continue
              kin = jax.block_until_ready(jit_jla_kernel[0](*inp, chunk))
              row[f"{impl}_ms"], _ = time_fn(jit_jla_kernel[1], kin, jsync)
              continue
            else:
              if impl == "xla" and b * L > args.xla_max_tokens:
                continue
              if impl == "jla" and p not in (64, 128):
                continue
              f = jit_variants.get(impl) or {"pallas": jit_ours, "jla": jit_jla}.get(impl, jit_xla)
              t0 = time.perf_counter()
              out = jax.block_until_ready(f(*inp, chunk))
              row[f"{impl}_first_s"] = time.perf_counter() - t0
              ms, _ = time_fn(lambda *a: f(*a, chunk), inp, jsync)
              out = jax.device_get(out)
            row[f"{impl}_ms"] = ms
            if ref is not None:
              row[f"{impl}_err_y"] = rel(out[0], ref[0])
              row[f"{impl}_err_state"] = rel(out[1], ref[1])
          except Exception as e:
            row[f"{impl}_error"] = repr(e)[:2000]
            traceback.print_exc()
        del inp
        rows.append(row)
        print(json.dumps(row), flush=True)
        _save(args, rows)  # after every shape, so that a run cut short still leaves its numbers
  if args.step or args.step_only:
    rows.extend(bench_step(impls, torch, jsync, reps=4 if args.smoke else 100,
                           batches=(1, 4) if args.smoke else (1, 64)))
  _save(args, rows)
  print_table(rows)


def _time_mamba(row, inp, chunk, torch, mamba_chunk_scan_combined):
  """mamba_ssm's scan on the same inputs: (median ms, outputs as numpy); first call in `row`."""
  xt, dtt, At, Bt, Ct, Dt, dbt = [torch.from_dlpack(v) for v in inp]

  def fn():
    return mamba_chunk_scan_combined(xt, dtt, At, Bt, Ct, chunk, D=Dt, dt_bias=dbt,
                                     dt_softplus=True, return_final_states=True)
  t0 = time.perf_counter()
  out = fn()
  torch.cuda.synchronize()
  row["mamba_first_s"] = time.perf_counter() - t0
  ms, _ = time_fn(fn, (), lambda o: torch.cuda.synchronize())
  return ms, [o.float().cpu().numpy() for o in out]


def _save(args, rows):
  if args.out:
    with open(os.path.join(args.out, "ssd_bench.json"), "w") as fh:
      json.dump(rows, fh, indent=1)


def bench_step(impls, torch, jsync, reps=100, batches=(1, 64)):
  """Decode-step state update (one token): XLA vs mamba_ssm `selective_state_update`.

  Device time per update: `reps` updates back to back inside one jitted `fori_loop` (ours, the
  outputs summed so that nothing is dead code) and inside one captured CUDA graph (mamba_ssm), so
  host launch cost is excluded from both.
  """
  from nemojax.kernels.ssd import reference
  out = []
  for p in (80, 64):
    for bsz in batches:
      ks = jax.random.split(jax.random.key(bsz + p), 8)
      state = jax.random.normal(ks[0], (bsz, H, p, N), jnp.float32)
      x = jax.random.normal(ks[1], (bsz, H, p), jnp.bfloat16)
      dt = jax.nn.softplus(jax.random.normal(ks[2], (bsz, H), jnp.float32))
      A = -jnp.exp(jax.random.normal(ks[3], (H,), jnp.float32))
      B = jax.random.normal(ks[4], (bsz, G, N), jnp.bfloat16)
      C = jax.random.normal(ks[5], (bsz, G, N), jnp.bfloat16)
      D = jax.random.normal(ks[6], (H,), jnp.float32)
      row = dict(step=True, batch=bsz, p=p,
                 roofline_ms=2 * bsz * H * p * N * 4 / COPY_BW * 1e3)

      @jax.jit
      def loop(state, x=x, dt=dt, A=A, B=B, C=C, D=D):
        def body(i, carry):
          s, acc = carry
          y, s = reference.ssd_update(s, x, dt, A, B, C, D)
          return s, acc + y.astype(jnp.float32)
        return jax.lax.fori_loop(0, reps, body, (state, jnp.zeros(x.shape, jnp.float32)))

      ms, _ = time_fn(loop, (state,), jsync)
      row["xla_ms"] = ms / reps
      if torch is not None and "mamba" in impls:
        try:
          from mamba_ssm.ops.triton.selective_state_update import selective_state_update
          ts = torch.from_dlpack(state).clone()
          tx, tdt, tB, tC = (torch.from_dlpack(v) for v in (x, dt, B, C))
          tA = torch.from_dlpack(A)[:, None, None].expand(H, p, N)
          tD = torch.from_dlpack(D)[:, None].expand(H, p)
          tdt = tdt[:, :, None].expand(bsz, H, p)
          tbias = torch.zeros((H,), device=ts.device)[:, None].expand(H, p)  # tied, like vLLM
          step = lambda: selective_state_update(ts, tx, tdt, tA, tB, tC, D=tD, dt_bias=tbias)
          stream = torch.cuda.Stream()
          stream.wait_stream(torch.cuda.current_stream())
          with torch.cuda.stream(stream):
            for _ in range(3):  # compile and warm up outside the graph
              step()
          torch.cuda.current_stream().wait_stream(stream)
          graph = torch.cuda.CUDAGraph()
          with torch.cuda.graph(graph):
            for _ in range(reps):
              step()
          ms, _ = time_fn(graph.replay, (), lambda o: torch.cuda.synchronize())
          row["mamba_ms"] = ms / reps
        except Exception as e:
          row["mamba_error"] = repr(e)[:300]
      print(json.dumps(row), flush=True)
      out.append(row)
  return out


def print_table(rows):
  print()
  print("| b×L | P | Q | t* ms | pallas ms | eff | xla ms | mamba ms | jla ms | pallas/mamba "
        "| err y | err state |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    if r.get("step"):
      continue
    f = lambda k, fmt="{:.3f}": fmt.format(r[k]) if k in r else "-"
    eff = f"{r['roofline_ms'] / r['pallas_ms']:.0%}" if "pallas_ms" in r else "-"
    ratio = (f"{r['pallas_ms'] / r['mamba_ms']:.2f}" if "pallas_ms" in r and "mamba_ms" in r
             else "-")
    print(f"| {r['shape']} | {r['p']} | {r['chunk']} | {r['roofline_ms']:.3f} | {f('pallas_ms')} "
          f"| {eff} | {f('xla_ms')} | {f('mamba_ms')} | {f('jla_ms')} | {ratio} "
          f"| {f('pallas_err_y', '{:.1e}')} "
          f"| {f('pallas_err_state', '{:.1e}')} |")
  steps = [r for r in rows if r.get("step")]
  if steps:
    print("\n| decode update | P | t* ms | xla ms | eff | mamba ms | xla/mamba |\n"
          "|---|---|---|---|---|---|---|")
    for r in steps:
      m = r.get("mamba_ms", float("nan"))
      print(f"| B={r['batch']} | {r['p']} | {r['roofline_ms']:.4f} | {r['xla_ms']:.4f} "
            f"| {r['roofline_ms'] / r['xla_ms']:.0%} | {m:.4f} | {r['xla_ms'] / m:.2f} |")
  for r in rows:
    extra = [f"{k[:-3]} {v:.3f} ms" for k, v in r.items()
             if (k.startswith("pallas[") or k == "jla_kernel_ms") and k.endswith("_ms")]
    if extra:
      print(f"variants {r['shape']} P={r['p']} Q={r['chunk']}: " + "; ".join(extra))
  errs = [(r.get("shape"), k, v[:200]) for r in rows for k, v in r.items() if k.endswith("error")]
  for e in errs:
    print("ERROR", *e)


if __name__ == "__main__":
  main()
