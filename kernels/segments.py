"""Packed sequences: documents laid end to end in one row, told apart by `segment_ids`.

With segment_ids s [b, t] (any integers), a new document starts at every position where the id
changes: boundary_t = (s_t ≠ s_{t−1}) for t > 0. The document index

    doc_t = Σ_{0<k≤t} boundary_k                      # 0, 0, 1, 1, 1, 2, ... (non-decreasing)

is what every kernel compares ("same document" is doc_i == doc_j), so that an id reused by a later
document (or a padding id between documents) never joins two of them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def document_index(segment_ids: jax.Array) -> jax.Array:
  """int32 [b, t] index of each position's document within its row (0 for the first)."""
  s = jnp.asarray(segment_ids)
  if s.ndim != 2:
    raise ValueError(f"segment_ids must be [batch, time], got shape {s.shape}")
  boundary = (s[:, 1:] != s[:, :-1]).astype(jnp.int32)
  return jnp.concatenate([jnp.zeros_like(boundary[:, :1]), jnp.cumsum(boundary, axis=1)], axis=1)
