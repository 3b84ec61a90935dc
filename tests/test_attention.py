"""Both attention schedules (blocked online softmax, loop-free split-K) against a dense softmax."""

import numpy as np
import pytest

import jax.numpy as jnp

from nemojax import attention


def dense_reference(q, k, v, q_pos, start):
  """Masked softmax attention in float64. q [b,t,H,d]; k/v [b,kv,s,d]."""
  b, t, nh, d = q.shape
  kv, s = k.shape[1], k.shape[2]
  kk = np.repeat(k, nh // kv, axis=1).astype(np.float64)  # [b, H, s, d]
  vv = np.repeat(v, nh // kv, axis=1).astype(np.float64)
  scores = np.einsum("bthd,bhsd->bhts", q.astype(np.float64), kk) / np.sqrt(d)
  j = np.arange(s)
  allowed = (j[None, None, None, :] <= q_pos[None, None, :, None]) & (
      j[None, None, None, :] >= start[:, None, None, None])
  scores = np.where(allowed, scores, -np.inf)
  p = np.exp(scores - scores.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bhts,bhsd->bthd", p, vv)


@pytest.mark.parametrize("t,s,pos,key_block", [
    (1, 37, 36, 8),      # decode step, odd cache
    (1, 1000, 611, 64),  # decode step, split-K over many blocks
    (5, 257, 100, 16),   # a few queries (split schedule), prime cache length
    (40, 131, 77, 16),   # prefill chunk: blocked schedule, last block shifted back
    (24, 24, 0, 1024),   # full forward: one block
])
def test_attend_matches_dense(t, s, pos, key_block):
  rng = np.random.default_rng(t * 1000 + s)
  b, kv, r, d = 3, 2, 3, 8
  q = rng.standard_normal((b, t, kv * r, d)).astype(np.float32)
  k = rng.standard_normal((b, kv, s, d)).astype(np.float32)
  v = rng.standard_normal((b, kv, s, d)).astype(np.float32)
  q_pos = (pos + np.arange(t)).astype(np.int32)
  start = np.array([0, 3, min(pos, 11)], np.int32)
  want = dense_reference(q, k, v, q_pos, start)
  num_keys = None if pos == 0 and t == s else jnp.int32(pos + t)
  got = attention.attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(q_pos),
                         jnp.asarray(start), num_keys=num_keys, key_block=key_block)
  real = q_pos[None, :] >= start[:, None]  # queries at pad positions attend nothing: skip them
  assert np.all(np.isfinite(np.asarray(got)))
  np.testing.assert_allclose(np.asarray(got)[real], want[real], rtol=2e-5, atol=2e-5)


def test_split_size_divides_and_bounds_the_block():
  for s in (1, 100, 4096, 131168, 262144 + 256):
    blk = attention._split_size(s)
    assert s % blk == 0 and (blk >= 64 or blk == s)
  assert attention._split_size(4099 * 2) == 4099 * 2  # no useful divisor: one block
