"""Causal GQA attention: reference (pure JAX), Pallas kernel (over a KV cache), cuDNN for the
full forward, and the dispatcher."""

from nemojax.kernels.attention.api import (
  IMPLEMENTATIONS,
  attention,
  cudnn_usable,
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
           "attention_blocked", "attention_split", "cudnn_usable", "resolve_implementation",
           "split_block_size", "supports"]
