"""Causal GQA attention over a KV cache: reference (pure JAX), Pallas kernel, dispatcher."""

from nemojax.kernels.attention.api import (
  IMPLEMENTATIONS,
  attention,
  resolve_implementation,
  supports,
)
from nemojax.kernels.attention.reference import (
  DEFAULT_KEY_BLOCK,
  MAX_SPLIT_QUERIES,
  attention_blocked,
  attention_split,
  split_block_size,
)

__all__ = ["DEFAULT_KEY_BLOCK", "IMPLEMENTATIONS", "MAX_SPLIT_QUERIES", "attention",
           "attention_blocked", "attention_split", "resolve_implementation", "split_block_size",
           "supports"]
