"""Summaries of jax.profiler traces (`e2e.py --parts profile`, `train.py --profile`).

`summarize_trace` reads the perfetto trace a `jax.profiler.trace(..., create_perfetto_trace=True)`
wrote and reports GPU busy time against wall time, time by kernel kind (matmul, Pallas, copies,
other XLA fusions), the kernels that take the most time, idle gaps with what the host did during
them, and the GPU time by the JAX operation path XLA records with each kernel (`by_op`: the
op_name metadata with numbers dropped, e.g. "transpose(jvp(checkpoint))/dot_general"), which
splits a training step into forward, recomputation and backward.
"""

from __future__ import annotations

import bisect
import glob
import gzip
import json
import os
import re


def _op_path(args: dict) -> str | None:
  """The JAX op path XLA attached to a kernel event, if any (its longest "/"-joined string arg)."""
  best = None
  for v in args.values():
    if isinstance(v, str) and "/" in v and (best is None or len(v) > len(best)):
      best = v
  if best is None:
    return None
  path = re.sub(r"\d+", "", best)
  parts = [p for p in path.split("/") if p and not p.startswith("jit(") and p != "jit(main)"]
  return "/".join(parts[-3:]) if parts else None


def summarize_trace(trace_dir, wall_s, top=18, top_ops=30):
  """GPU time by kernel from a jax.profiler perfetto trace: busy vs wall, and the top kernels."""
  files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
                 + glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"),
                             recursive=True))
  if not files:
    return {"error": f"no trace file under {trace_dir}"}
  with gzip.open(files[-1]) as f:
    events = json.load(f)
  events = events.get("traceEvents", events) if isinstance(events, dict) else events
  names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  gpu_pids = {pid for pid, n in names.items() if "GPU" in n or "gpu" in n}
  spans, by_name, by_op, sample_args = [], {}, {}, []
  for e in events:
    if e.get("ph") != "X" or e.get("pid") not in gpu_pids:
      continue
    t0, dur = float(e["ts"]), float(e.get("dur", 0))
    spans.append((t0, t0 + dur))
    n = e.get("name", "?")
    tot, cnt = by_name.get(n, (0.0, 0))
    by_name[n] = (tot + dur, cnt + 1)
    args = e.get("args", {}) or {}
    if len(sample_args) < 3:
      sample_args.append({k: str(v)[:160] for k, v in args.items()})
    op = _op_path(args) or "?"
    tot, cnt = by_op.get(op, (0.0, 0))
    by_op[op] = (tot + dur, cnt + 1)
  busy, end, gaps = 0.0, None, []
  for a, z in sorted(spans):  # union of kernel intervals, and the idle gaps between them
    if end is not None and a - end > 100.0:
      gaps.append((end, a))
    if end is None or z > end:
      busy += z - (a if end is None else max(a, end))
      end = z
  # What the host was doing while the GPU sat idle for more than 0.1 ms.
  host_in_gaps = {}
  gaps.sort()
  starts = [g[0] for g in gaps]
  for e in events:
    if e.get("ph") != "X" or e.get("pid") in gpu_pids or not gaps:
      continue
    t0, t1 = float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0))
    i = max(bisect.bisect_right(starts, t0) - 1, 0)
    overlap = 0.0
    while i < len(gaps) and gaps[i][0] < t1:
      overlap += max(0.0, min(t1, gaps[i][1]) - max(t0, gaps[i][0]))
      i += 1
    if overlap > 0:
      n = e.get("name", "?")[:80]
      host_in_gaps[n] = host_in_gaps.get(n, 0.0) + overlap
  def kind(n):
    low = n.lower()
    if any(w in low for w in ("gemm", "xmma", "cutlass", "nvjet", "cublas", "sm90_", "triton_gemm",
                              "matmul")):
      return "matmul"
    if "mosaic" in low or "pallas" in low or "ssd" in low:
      return "pallas"
    if "memcpy" in low or "memset" in low:
      return "copy"
    return "xla fusion/other"
  kinds = {}
  for n, (tot, cnt) in by_name.items():
    k = kinds.setdefault(kind(n), [0.0, 0])
    k[0] += tot
    k[1] += cnt
  topk = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]
  return dict(file=os.path.basename(files[-1]), processes=sorted(set(names.values()))[:12],
              wall_ms=1e3 * wall_s, gpu_busy_ms=busy / 1e3, kernels=len(spans),
              by_kind={k: dict(ms=v[0] / 1e3, count=v[1]) for k, v in kinds.items()},
              top=[dict(name=n[:120], ms=tot / 1e3, count=cnt) for n, (tot, cnt) in topk],
              idle_gaps=dict(count=len(gaps), ms=sum(z - a for a, z in gaps) / 1e3,
                             longest_ms=max((z - a for a, z in gaps), default=0) / 1e3),
              host_during_gaps=[dict(name=n, ms=v / 1e3) for n, v in sorted(
                  host_in_gaps.items(), key=lambda kv: -kv[1])[:12]],
              by_op=[dict(op=n[:160], ms=tot / 1e3, count=cnt) for n, (tot, cnt) in sorted(
                  by_op.items(), key=lambda kv: -kv[1][0])[:top_ops]],
              sample_args=sample_args)
