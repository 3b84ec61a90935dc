"""Forward and forward+backward of one SSD layer: nemojax vs jax-linear-attention vs mamba_ssm.

Run through `benchmarks/ssd.py --backward` (same flags for shapes, head dims, mamba path). One
layer, H=128, N=128, G=8, bf16 x/B/C, fp32 dt/A/D, chunk 128; loss = sum(y·w) with gradients for
x, dt, B, C (and A, D for ours, which costs nothing extra); all in the same process on the same
random inputs. jax-linear-attention 0.1.0 (`simple_gla` on Mosaic GPU, grouped B/C, scale 1, D·x
added outside) runs at head dim 64 only; put its wheel's install dir on PYTHONPATH. Gradient
errors: ‖Δ‖/‖ref‖ per input against the XLA chunked reference's VJP in fp32 (matmul precision
"highest") on the same bf16-rounded inputs, up to `--grad-check-max-tokens` tokens.
"""

from __future__ import annotations

import json
import os
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np


def _inputs(key, b, L, h, p, g, n):
  ks = jax.random.split(key, 8)
  x = jax.random.normal(ks[0], (b, L, h, p), jnp.bfloat16)
  dt = jax.nn.softplus(jax.random.normal(ks[1], (b, L, h), jnp.float32) - 2.0)
  A = -jnp.exp(jax.random.uniform(ks[2], (h,), jnp.float32, 0.0, np.log(16.0)))
  B = (jax.random.normal(ks[3], (b, L, g, n), jnp.float32) / np.sqrt(n)).astype(jnp.bfloat16)
  C = (jax.random.normal(ks[4], (b, L, g, n), jnp.float32) / np.sqrt(n)).astype(jnp.bfloat16)
  D = jax.random.normal(ks[5], (h,), jnp.float32)
  w = jax.random.normal(ks[6], (b, L, h, p), jnp.float32)
  return x, dt, A, B, C, D, w


def _rel(a, r):
  a = np.asarray(a, np.float32).ravel()
  r = np.asarray(r, np.float32).ravel()
  if not np.all(np.isfinite(a)):
    return float("nan")
  return float(np.linalg.norm(a - r) / max(np.linalg.norm(r), 1e-30))


def run(args, *, H, N, G, time_fn, configs):
  """Times and checks every shape; returns the rows (also written to $OUT/ssd_bwd.json)."""
  from nemojax.kernels.ssd import reference
  from nemojax.kernels.ssd import pallas_mosaic_gpu_bwd as pmg  # the differentiable entry

  torch = mamba = jla_gla = None
  if "mamba" in args.impls:
    try:
      import torch
      from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined as mamba
    except Exception as e:
      print(f"mamba_ssm unavailable: {e!r}")
  if "jla" in args.impls:
    try:
      from jla.ops.mosaic_gpu.scalar_gate import simple_gla as jla_gla
    except Exception as e:
      print(f"jax-linear-attention unavailable: {e!r}")

  def ours_loss(config):
    def f(x, dt, A, B, C, D, w):
      y, _ = pmg.ssd(x, dt, A, B, C, D, chunk_size=128, config=config, interpret=args.smoke)
      return jnp.sum(y.astype(jnp.float32) * w)
    return f

  def jla_loss(x, dt, A, B, C, D, w):
    y, _ = jla_gla(C, B, (x.astype(jnp.float32) * dt[..., None]).astype(x.dtype), dt * A,
                   scale=1.0)
    y = y.astype(jnp.float32) + D[:, None] * x.astype(jnp.float32)
    return jnp.sum(y * w)

  def ref_loss(x, dt, A, B, C, D, w):
    with jax.default_matmul_precision("highest"):
      y, _ = reference.ssd_chunked(x.astype(jnp.float32), dt, A, B.astype(jnp.float32),
                                   C.astype(jnp.float32), D, chunk_size=128)
    return jnp.sum(y * w)

  argn = (0, 1, 2, 3, 4, 5)
  rows = []
  key = jax.random.key(1)
  for p in [int(v) for v in args.head_dims.split(",")]:
    for shape in args.shapes.split(","):
      b, L = (int(v) for v in shape.lower().split("x"))
      key, sub = jax.random.split(key)
      inp = _inputs(sub, b, L, H, p, G, N)
      row = dict(shape=shape, p=p)
      fns = {}
      for name, cfg in configs.items():
        fns[f"ours{name}_fwd"] = jax.jit(lambda *a, cfg=cfg: pmg.ssd(
            *a[:6], chunk_size=128, config=cfg, interpret=args.smoke)[0])
        fns[f"ours{name}_bwd"] = jax.jit(jax.grad(ours_loss(cfg), argn))
      if jla_gla is not None and p in (64, 128):
        fns["jla_fwd"] = jax.jit(lambda *a: jla_gla(a[4], a[3], (a[0] * a[1][..., None]).astype(
            a[0].dtype), a[1] * a[2], scale=1.0)[0])
        fns["jla_bwd"] = jax.jit(jax.grad(jla_loss, (0, 1, 3, 4)))
      ref = None
      if b * L <= args.grad_check_max_tokens:
        try:
          ref = jax.device_get(jax.jit(jax.grad(ref_loss, argn))(*inp))
        except Exception as e:
          row["ref_error"] = repr(e)[:300]
      _time_jax(row, fns, inp, ref, time_fn)
      if mamba is not None:
        _time_mamba(row, inp, mamba, torch, time_fn, ref)
      del inp, ref
      rows.append(row)
      print(json.dumps(row), flush=True)
      if args.out:
        with open(os.path.join(args.out, "ssd_bwd.json"), "w") as fh:
          json.dump(rows, fh, indent=1)
  print_table(rows, list(configs))
  return rows


def _time_jax(row, fns, inp, ref, time_fn):
  """Times (and checks the gradients of) every jitted function into `row`."""
  jsync = jax.block_until_ready
  for name, fn in fns.items():
    try:
      t0 = time.perf_counter()
      out = jsync(fn(*inp))
      row[f"{name}_first_s"] = round(time.perf_counter() - t0, 2)
      row[f"{name}_ms"], _ = time_fn(fn, inp, jsync)
      if name.endswith("_bwd"):
        out = jax.device_get(out)
        row[f"{name}_nan"] = not all(np.isfinite(np.asarray(o, np.float32)).all() for o in out)
        if ref is not None and name.startswith("ours"):
          for nm, o, r in zip(["x", "dt", "A", "B", "C", "D"], out, ref):
            row[f"{name}_err_{nm}"] = _rel(o, r)
        if ref is not None and name.startswith("jla"):
          row[f"{name}_err_x"] = _rel(out[0], ref[0])
    except Exception as e:
      row[f"{name}_error"] = repr(e)[:1500]
      traceback.print_exc()


def _time_mamba(row, inp, mamba, torch, time_fn, ref):
  """mamba_ssm forward and forward+backward (torch autograd) into `row`."""
  try:
    tin = [torch.from_dlpack(v) for v in inp]
    xt, dtt, At, Bt, Ct, Dt, wt = tin

    def mfwd():
      return mamba(xt, dtt, At, Bt, Ct, 128, D=Dt)

    leaves = [v.detach().clone().requires_grad_(True) for v in (xt, dtt, Bt, Ct)]

    def mbwd():
      y = mamba(leaves[0], leaves[1], At, leaves[2], leaves[3], 128, D=Dt)
      return torch.autograd.grad((y.float() * wt).sum(), leaves)
    sync = lambda o: torch.cuda.synchronize()
    row["mamba_fwd_ms"], _ = time_fn(lambda: mfwd(), (), sync)
    row["mamba_bwd_ms"], _ = time_fn(lambda: mbwd(), (), sync)
    if ref is not None:
      row["mamba_bwd_err_x"] = _rel(mbwd()[0].float().cpu().numpy(), ref[0])
  except Exception as e:
    row["mamba_error"] = repr(e)[:1500]
    traceback.print_exc()


def print_table(rows, names):
  print("\n| P | b×L | ours fwd | jla fwd | mamba fwd | ours fwd+bwd | jla fwd+bwd | mamba fwd+bwd "
        "| ours/mamba | worst grad err (x dt A B C D) |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  f = lambda r, k: f"{r[k]:.3f}" if k in r else "-"
  for r in rows:
    ratio = (f"{r['ours_bwd_ms'] / r['mamba_bwd_ms']:.2f}"
             if "ours_bwd_ms" in r and "mamba_bwd_ms" in r else "-")
    errs = " ".join(f"{r[k]:.1e}" for k in sorted(r) if k.startswith("ours_bwd_err_"))
    print(f"| {r['p']} | {r['shape']} | {f(r, 'ours_fwd_ms')} | {f(r, 'jla_fwd_ms')} "
          f"| {f(r, 'mamba_fwd_ms')} | {f(r, 'ours_bwd_ms')} | {f(r, 'jla_bwd_ms')} "
          f"| {f(r, 'mamba_bwd_ms')} | {ratio} | {errs or '-'} |")
  for r in rows:
    extra = [f"{k[4:-3]} {v:.3f}" for k, v in r.items()
             if k.startswith("ours[") and k.endswith("_ms")]
    if extra:
      print(f"variants {r['shape']} P={r['p']}: " + "; ".join(extra))
  for r in rows:
    for k, v in r.items():
      if k.endswith("error"):
        print("ERROR", r["shape"], r["p"], k, v[:300])
