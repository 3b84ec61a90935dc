"""Prefill attention over a KV cache on the GPU machine: the Pallas flash kernel vs the XLA path.

Shapes of Nano-9B-v2 (40 query heads, 8 KV heads, head dim 128, bf16): a chunk of t queries at
cache index pos over a heads-major cache of s positions. Checks ‖Δ‖/‖ref‖ of both against the XLA
path in fp32 (real rows only), then times both (median over repeats after warm-up, compile
separate). t* = causal FLOPs (4·d per visible query-key pair and head) / 790 TFLOP/s.

Usage: python benchmarks/attention.py [--out DIR] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from nemojax.kernels.attention import pallas_mosaic_gpu as fa
from nemojax.kernels.attention import reference

MXU = 790e12


def visible_pairs(t, pos, start, num_keys):
  q = pos + np.arange(t)
  return int(np.sum(np.maximum(np.minimum(q + 1, num_keys) - start, 0)))


def median_ms(fn, *args, repeats=7):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return 1e3 * float(np.median(times))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default=os.environ.get("OUT"))
  ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU interpreter")
  args = ap.parse_args()
  interpret = args.smoke
  h, kv, d = (4, 2, 64) if args.smoke else (40, 8, 128)
  # (name, batch, t, pos, s, starts, timed)
  cases = ([("odd", 2, 100, 150, 384, [0, 37], False)] if args.smoke else [
      ("check odd", 2, 300, 500, 1024, [0, 37], False),
      ("prefill 8k (one chunk)", 1, 8192, 0, 8704, [0], True),
      ("chunk 1k at 127k", 1, 1024, 130048, 131584, [0], True),
  ])
  rows = []
  rng = np.random.default_rng(0)
  for name, b, t, pos, s, starts, timed in cases:
    q = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((b, kv, s, d)), jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal((b, kv, s, d)), jnp.bfloat16)
    start = jnp.asarray(starts, jnp.int32)
    q_pos = pos + jnp.arange(t, dtype=jnp.int32)
    nk = pos + t
    row = dict(case=name, b=b, t=t, pos=pos, s=s)
    kern = jax.jit(lambda q, k, v, p, st, n: fa.attention(q, k, v, p, st, n, interpret=interpret))
    xla = jax.jit(reference.attention)
    t0 = time.perf_counter()
    try:
      got = np.asarray(jax.block_until_ready(kern(q, k, v, jnp.int32(pos), start, jnp.int32(nk))),
                       np.float32)
    except Exception as e:  # noqa: BLE001 (record any failure and go on to the next case)
      row["pallas_error"] = f"{type(e).__name__}: {e}"[:1500]
      rows.append(row)
      print(json.dumps(row), flush=True)
      continue
    row["pallas_first_s"] = time.perf_counter() - t0
    ref = np.asarray(xla(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                         jnp.int32(pos), start, jnp.int32(nk)))
    real = np.asarray(q_pos)[None, :] >= np.asarray(starts)[:, None]
    row["pallas_err"] = float(np.linalg.norm((got - ref)[real]) / np.linalg.norm(ref[real]))
    row["pallas_finite"] = bool(np.isfinite(got).all())
    if timed:
      flops = 4 * d * h * sum(visible_pairs(t, pos, st, nk) for st in starts)
      row["roofline_ms"] = 1e3 * flops / MXU
      row["pallas_ms"] = median_ms(kern, q, k, v, jnp.int32(pos), start, jnp.int32(nk))
      row["xla_ms"] = median_ms(xla, q, k, v, jnp.int32(pos), start, jnp.int32(nk))
      x16 = np.asarray(xla(q, k, v, jnp.int32(pos), start, jnp.int32(nk)), np.float32)
      row["xla_bf16_err"] = float(np.linalg.norm((x16 - ref)[real]) / np.linalg.norm(ref[real]))
    rows.append(row)
    print(json.dumps(row), flush=True)
  if args.out:
    with open(os.path.join(args.out, "attention_bench.json"), "w") as f:
      json.dump(rows, f, indent=1)
  print("\n| case | pallas ms | xla ms | t* ms | pallas eff | speed-up | err pallas "
        "| err xla bf16 |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    g = lambda k, f="{:.3f}", r=r: f.format(r[k]) if k in r else "-"
    eff = f"{r['roofline_ms'] / r['pallas_ms']:.0%}" if "pallas_ms" in r else "-"
    sp = f"{r['xla_ms'] / r['pallas_ms']:.1f}x" if "pallas_ms" in r else "-"
    print(f"| {r['case']} | {g('pallas_ms')} | {g('xla_ms')} | {g('roofline_ms')} | {eff} | {sp} "
          f"| {g('pallas_err', '{:.1e}')} | {g('xla_bf16_err', '{:.1e}')} |")
  for r in rows:
    if "pallas_error" in r:
      print("ERROR", r["case"], r["pallas_error"][:600])


if __name__ == "__main__":
  main()
