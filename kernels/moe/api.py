"""Dispatch for the routed experts of a MoE layer (see `reference.py` for the math and shapes).

`implementation`:
  None          the best available: today "xla" everywhere. A Mosaic GPU grouped-GEMM kernel
                ("pallas", for Hopper) will slot in here, chosen on a GPU that supports it.
  "xla"         XLA, choosing by size (`xla_strategy`): gather the chosen experts' weights when
                m·k is small (decode), else sort by expert and grouped matmul (prefill).
  "ragged_dot"  always sort + `jax.lax.ragged_dot_general` (the reference path).
  "gather"      always gather weights + batched matmul.
  "dense"       every expert on every token (the oracle; tests only).
"""

from __future__ import annotations

from nemojax.kernels.moe import reference

IMPLEMENTATIONS = ("xla", "ragged_dot", "gather", "dense")

_FNS = {
    "ragged_dot": reference.moe_ffn_sorted,
    "gather": reference.moe_ffn_gather,
    "dense": reference.moe_ffn_dense,
}


def xla_strategy(num_rows: int, top_k: int, num_experts: int) -> str:
  """"gather" when the m·k chosen matrices are fewer than the e experts, else "ragged_dot".

  Gathering reads m·k expert matrices (duplicates included) and does no sorting; the grouped
  matmul reads all e experts' weights once whatever the routing. Decode (one token per row, a few
  rows) therefore gathers; prefill sorts. Shapes are static under jit, so this is a trace-time
  choice.
  """
  return "gather" if num_rows * top_k < num_experts else "ragged_dot"


def resolve_implementation(implementation: str | None, *, num_rows: int, top_k: int,
                           num_experts: int) -> str:
  """The concrete function name `moe_ffn` will run ("ragged_dot", "gather" or "dense")."""
  if implementation is not None and implementation not in IMPLEMENTATIONS:
    raise ValueError(f"moe_ffn: implementation must be one of {IMPLEMENTATIONS} or None, "
                     f"got {implementation!r}")
  if implementation in (None, "xla"):
    return xla_strategy(num_rows, top_k, num_experts)
  return implementation


def moe_ffn(x, expert_ids, weights, up, down, *, implementation: str | None = None):
  """Routed-expert output [m, d] float32 for rows x [m, d]; see `reference` for the contract.

  Args:
    x: [m, d] rows (tokens), any float dtype.
    expert_ids: [m, k] int, the chosen experts.
    weights: [m, k] combine weights (float32).
    up: [e, f, d] and down: [e, d, f], stacked expert weights (HF layout: out, in).
    implementation: see the module docstring.
  """
  if x.ndim != 2 or expert_ids.shape != weights.shape or expert_ids.shape[0] != x.shape[0]:
    raise ValueError(f"moe_ffn: expected x [m, d] and expert_ids, weights [m, k]; got "
                     f"{x.shape}, {expert_ids.shape}, {weights.shape}")
  if up.shape[2] != x.shape[1] or down.shape[1:] != (up.shape[2], up.shape[1]):
    raise ValueError(f"moe_ffn: expected up [e, f, {x.shape[1]}] and down [e, {x.shape[1]}, f]; "
                     f"got {up.shape} and {down.shape}")
  impl = resolve_implementation(implementation, num_rows=x.shape[0], top_k=expert_ids.shape[1],
                                num_experts=up.shape[0])
  return _FNS[impl](x, expert_ids, weights, up, down)
