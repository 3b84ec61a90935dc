"""Attention's XLA schedules (blocked online softmax, loop-free split-K) against a dense softmax,
and the dispatcher's rules."""

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from nemojax import testing as T
from nemojax.kernels import attention as A
from nemojax.kernels import platform


def dense_reference(q, k, v, q_pos, start):
  """Masked softmax attention in float64. q [b,t,h,d]; k/v [b,kv,s,d]."""
  b, t, nh, d = q.shape
  kv, s = k.shape[1], k.shape[2]
  kk = np.repeat(k, nh // kv, axis=1).astype(np.float64)  # [b, h, s, d]
  vv = np.repeat(v, nh // kv, axis=1).astype(np.float64)
  scores = np.einsum("bthd,bhsd->bhts", q.astype(np.float64), kk) / np.sqrt(d)
  j = np.arange(s)
  allowed = (j[None, None, None, :] <= q_pos[None, None, :, None]) & (
      j[None, None, None, :] >= start[:, None, None, None])
  scores = np.where(allowed, scores, -np.inf)
  with np.errstate(invalid="ignore"):  # pad queries see no key: NaN rows, skipped by the tests
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
@pytest.mark.parametrize("schedule", ["auto", "split", "blocked"])
def test_schedules_match_dense(t, s, pos, key_block, schedule):
  rng = np.random.default_rng(t * 1000 + s)
  b, kv, r, d = 3, 2, 3, 8
  q = rng.standard_normal((b, t, kv * r, d)).astype(np.float32)
  k = rng.standard_normal((b, kv, s, d)).astype(np.float32)
  v = rng.standard_normal((b, kv, s, d)).astype(np.float32)
  q_pos = (pos + np.arange(t)).astype(np.int32)
  start = np.array([0, 3, min(pos, 11)], np.int32)
  want = dense_reference(q, k, v, q_pos, start)
  num_keys = None if pos == 0 and t == s else jnp.int32(pos + t)
  args = (jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.int32(pos), jnp.asarray(start),
          num_keys)
  if schedule == "auto":
    got = A.attention(*args, implementation="xla", key_block=key_block)
  elif schedule == "split":
    got = A.attention_split(*args)
  else:
    got = A.attention_blocked(*args, key_block=key_block)
  chex.assert_shape(got, q.shape)
  real = q_pos[None, :] >= start[:, None]  # queries at pad positions attend nothing: skip them
  assert np.all(np.isfinite(np.asarray(got)))
  T.assert_close(np.asarray(got)[real], want[real], "float32", "independent", schedule)


def test_keys_beyond_num_keys_are_not_attended():
  """Garbage after the written keys (a stale cache) changes nothing, in either schedule."""
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((1, 20, 2, 8)), jnp.float32)
  k, v = (jnp.asarray(rng.standard_normal((1, 1, 64, 8)), jnp.float32) for _ in range(2))
  start, pos, nk = jnp.zeros((1,), jnp.int32), 10, 30
  clean = A.attention_blocked(q, k, v, pos, start, nk, key_block=16)
  k2, v2 = k.at[:, :, nk:].set(1e4), v.at[:, :, nk:].set(1e4)
  for fn in (A.attention_split, lambda *a: A.attention_blocked(*a, key_block=16)):
    T.assert_close(fn(q, k2, v2, pos, start, nk), clean, "float32", "same")


def test_split_block_size_divides_and_bounds_the_block():
  for s in (1, 100, 4096, 131168, 262144 + 256):
    blk = A.split_block_size(s)
    assert s % blk == 0 and (blk >= 64 or blk == s)
  assert A.split_block_size(4099 * 2) == 4099 * 2  # no useful divisor: one block


def test_dispatch_rules():
  shapes = dict(head_dim=128, cache_len=1024, dtype=jnp.bfloat16)
  auto = A.resolve_implementation(None, num_queries=512, **shapes)
  assert auto == ("pallas" if platform.mosaic_gpu_available() else "xla")
  assert A.resolve_implementation("pallas", num_queries=512, **shapes) == "pallas"
  # A decode step and a full forward (the differentiable path) always run in XLA.
  assert A.resolve_implementation("pallas", num_queries=A.MAX_SPLIT_QUERIES, **shapes) == "xla"
  assert A.resolve_implementation("pallas", num_queries=512, over_cache=False, **shapes) == "xla"
  assert A.resolve_implementation("xla", num_queries=512, **shapes) == "xla"
  assert not A.supports(head_dim=48, cache_len=1024, dtype=jnp.bfloat16)
  with pytest.raises(ValueError, match="implementation"):
    A.resolve_implementation("triton", num_queries=512, **shapes)


def test_mismatched_kv_heads_are_refused():
  q = jnp.zeros((1, 4, 3, 8))
  kv = jnp.zeros((1, 2, 16, 8))
  with pytest.raises(ValueError, match="multiple of kv"):
    A.attention(q, kv, kv, 0, jnp.zeros((1,), jnp.int32))
