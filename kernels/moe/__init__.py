"""Routed experts of a mixture-of-experts layer: reference (pure JAX) and the dispatcher."""

from nemojax.kernels.moe.api import moe_ffn, resolve_implementation, xla_strategy
from nemojax.kernels.moe.reference import (grouped_matmul, moe_ffn_dense, moe_ffn_gather,
                                           moe_ffn_sorted, sort_by_expert)

__all__ = ["moe_ffn", "resolve_implementation", "xla_strategy", "grouped_matmul", "moe_ffn_dense",
           "moe_ffn_gather", "moe_ffn_sorted", "sort_by_expert"]
