"""Dispatch for the routed experts of a MoE layer (see `reference.py` for the math and shapes).

`implementation`:
  None          the best available: "pallas" on a Hopper-or-newer NVIDIA GPU when the kernel
                supports the shapes, traces on this JAX and has been verified on hardware
                (`pallas_mosaic_gpu.HARDWARE_VERIFIED`); else "xla".
  "pallas"      the Mosaic GPU grouped GEMMs (`pallas_mosaic_gpu.py`); without a Hopper GPU they
                run on Mosaic GPU's CPU interpreter (slow: for tests); an error for shapes they
                do not support (bf16, d and f multiples of 64).
  "xla"         XLA, choosing by size (`xla_strategy`): gather the chosen experts' weights when
                m·k is small (decode), else sort by expert and grouped matmul (prefill).
  "ragged_dot"  always sort + `jax.lax.ragged_dot_general` (the reference path).
  "gather"      always gather weights + batched matmul.
  "dense"       every expert on every token (the oracle; tests only).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from nemojax.kernels import platform
from nemojax.kernels.moe import reference

IMPLEMENTATIONS = ("xla", "pallas", "ragged_dot", "gather", "dense")
_KERNEL = "moe.pallas_mosaic_gpu"

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


def _kernel_traces(mod, num_rows, top_k, num_experts, d, f, dtype) -> bool:
  """Whether the compiled kernel traces at these shapes on this JAX (once per shape)."""
  S = jax.ShapeDtypeStruct
  args = (S((num_rows, d), dtype), S((num_rows, top_k), jnp.int32),
          S((num_rows, top_k), jnp.float32), S((num_experts, f, d), dtype),
          S((num_experts, d, f), dtype))
  return platform.traces(_KERNEL, functools.partial(mod.moe_ffn, interpret=False), *args)


def _pallas_usable(num_rows, top_k, num_experts, d, f, dtype) -> bool:
  if d is None or f is None or dtype is None or not platform.mosaic_gpu_available():
    return False
  mod = platform.kernel_module(_KERNEL)  # None, with one warning, if it fails on this JAX
  if mod is None or not mod.HARDWARE_VERIFIED:
    return False
  config = mod.default_config(num_rows * top_k, num_experts, min(d, f))
  return (mod.supports(d=d, f=f, dtype=dtype, config=config)
          and _kernel_traces(mod, num_rows, top_k, num_experts, d, f, jnp.dtype(dtype)))


def resolve_implementation(implementation: str | None, *, num_rows: int, top_k: int,
                           num_experts: int, d: int | None = None, f: int | None = None,
                           dtype=None) -> str:
  """The concrete function `moe_ffn` will run ("pallas", "ragged_dot", "gather" or "dense").

  `d`, `f` and `dtype` (the expert weights') let None pick the kernel; without them None means
  "xla".
  """
  if implementation is not None and implementation not in IMPLEMENTATIONS:
    raise ValueError(f"moe_ffn: implementation must be one of {IMPLEMENTATIONS} or None, "
                     f"got {implementation!r}")
  if implementation is None and _pallas_usable(num_rows, top_k, num_experts, d, f, dtype):
    return "pallas"
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
                                num_experts=up.shape[0], d=up.shape[2], f=up.shape[1],
                                dtype=up.dtype)
  if impl == "pallas":
    from nemojax.kernels.moe import pallas_mosaic_gpu  # noqa: PLC0415  (chosen: errors surface)
    return pallas_mosaic_gpu.moe_ffn(x, expert_ids, weights, up, down,
                                     interpret=not platform.mosaic_gpu_available())
  return _FNS[impl](x, expert_ids, weights, up, down)
