"""Causal GQA attention over a heads-major KV cache in pure JAX: the XLA path and the kernel's
specification.

Legend: b batch, t queries, h query heads, kv key/value heads, r = h / kv query heads per KV
head, m = r·t rows of one KV head, s keys (cache positions), n key blocks, d head dim.

    o = softmax(q·kᵀ / sqrt(d) + mask) · v

Query head i reads KV head i // r. The query at cache index i (queries sit at pos .. pos+t−1)
of row b may attend key j when start[b] ≤ j ≤ i and j < num_keys: left pads are never attended,
nor keys not yet written. With `segment_ids` [b, s] (packed documents, a full forward: see
`kernels/segments.py`) it may attend only keys of its own document. Keys and values are stored
heads-major, [b, kv, s, d], so that every product below is a plain batched matmul over (b, kv)
with no transposed copy of the cache.

Two schedules (`attention` picks by the number of queries):
- `attention_blocked`, many queries (full forward, prefill chunks): keys in blocks with an online
  softmax, so memory is bounded by [b, h, t, block] scores rather than [b, h, t, s]; with
  `num_keys` only the blocks up to the last written key are visited.
- `attention_split`, few queries (a decode step): one pass over the whole cache, split into blocks
  that are reduced in parallel and merged by their log-sum-exp ("split-K"). No loop, hence no
  device-to-host synchronisation inside the step; the cost is proportional to the cache size,
  which the sampler sizes to the request.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from einops import rearrange

from nemojax.kernels.segments import document_index

f32 = jnp.float32
NEG = -1e30  # finite "minus infinity": fully masked rows stay finite instead of NaN
DEFAULT_KEY_BLOCK = 1024
MAX_SPLIT_QUERIES = 16  # up to this many queries per call use the loop-free split-K schedule


def _allowed(k_idx, q_pos, start, num_keys, docs=None):
  """Mask [b, 1, m, s] (key index k_idx [s], query index q_pos [m], row start [b]); docs, if
  given, is (document of each query row [b, m], document of every key [b, s_all])."""
  ok = k_idx[None, :] <= q_pos[:, None]  # [m, s]
  if num_keys is not None:
    ok = ok & (k_idx[None, :] < num_keys)
  ok = ok[None, None] & (k_idx >= start[:, None])[:, None, None, :]
  if docs is not None:
    q_doc, k_doc = docs
    ok = ok & (q_doc[:, :, None] == k_doc[:, k_idx][:, None, :])[:, None]
  return ok


def split_block_size(s: int, target_blocks: int = 32, min_block: int = 128) -> int:
  """Block length for split-K: the largest divisor of s not above max(s // target, min_block)."""
  cap = max(s // target_blocks, min_block)
  if s <= cap:
    return s
  blk = next(n for n in range(cap, 0, -1) if s % n == 0)
  return blk if blk >= 64 else s  # an awkward length: one block (correct, less parallel)


def _split(qg, k, v, q_pos, start, num_keys, scale, docs=None):
  """Loop-free attention over all s keys. qg [b, kv, m, d]; k/v [b, kv, s, d]; q_pos [m]."""
  s = k.shape[2]
  nb = s // split_block_size(s)
  k_idx = jnp.arange(s)
  allowed = rearrange(_allowed(k_idx, q_pos, start, num_keys, docs), "b o m (n s) -> b o n m s",
                      n=nb)
  # Block index n is a batch dimension of both products (kept ahead of m and s, which XLA's CPU
  # dot requires for bf16 × bf16 -> f32).
  scores = jnp.einsum("bkmd,bknsd->bknms", qg, rearrange(k, "b k (n s) d -> b k n s d", n=nb),
                      preferred_element_type=f32) * scale
  scores = jnp.where(allowed, scores, NEG)
  m_blk = scores.max(-1)  # [b, kv, n, m]
  p = jnp.exp(scores - m_blk[..., None])
  l_blk = p.sum(-1)
  acc = jnp.einsum("bknms,bknsd->bknmd", p.astype(v.dtype),
                   rearrange(v, "b k (n s) d -> b k n s d", n=nb), preferred_element_type=f32)
  w = jnp.exp(m_blk - m_blk.max(2, keepdims=True))  # [b, kv, n, m]: each block's share
  return (acc * w[..., None]).sum(2) / (l_blk * w).sum(2)[..., None]  # [b, kv, m, d]


def _blocked(qg, k, v, q_pos, start, num_keys, scale, key_block, docs=None):
  """Online softmax over key blocks. qg [b, kv, m, d]; k/v [b, kv, s, d]; q_pos [m]."""
  b, kv, m, d = qg.shape
  s = k.shape[2]
  blk = min(key_block, s)
  n_blocks = -(-s // blk)

  def body(i, carry):
    mx, l, acc = carry  # [b, kv, m], [b, kv, m], [b, kv, m, d]
    # The last block is shifted back to stay in bounds; keys it re-visits are masked out.
    lo = jnp.minimum(i * blk, s - blk)
    k_idx = lo + jnp.arange(blk)
    allowed = _allowed(k_idx, q_pos, start, num_keys, docs) & (k_idx >= i * blk)
    k_blk = jax.lax.dynamic_slice_in_dim(k, lo, blk, axis=2)
    v_blk = jax.lax.dynamic_slice_in_dim(v, lo, blk, axis=2)
    sc = jnp.einsum("bkmd,bksd->bkms", qg, k_blk, preferred_element_type=f32) * scale
    sc = jnp.where(allowed, sc, NEG)
    m_new = jnp.maximum(mx, sc.max(-1))
    p = jnp.exp(sc - m_new[..., None])
    correction = jnp.exp(mx - m_new)
    acc = acc * correction[..., None] + jnp.einsum(
        "bkms,bksd->bkmd", p.astype(v_blk.dtype), v_blk, preferred_element_type=f32)
    return m_new, l * correction + p.sum(-1), acc

  carry = (jnp.full((b, kv, m), NEG, f32), jnp.zeros((b, kv, m), f32),
           jnp.zeros((b, kv, m, d), f32))
  # Without num_keys the trip count is static, so the loop stays reverse-differentiable.
  upper = n_blocks if num_keys is None else jnp.minimum((num_keys + blk - 1) // blk, n_blocks)
  # Each key block's scores are recomputed in the backward pass (jax.checkpoint) instead of being
  # kept: saving them costs ~19 bytes x b.h.t^2 per layer (88 GiB at 8 x 4096 tokens, 9B widths).
  _, l, acc = jax.lax.fori_loop(0, upper, jax.checkpoint(body), carry)
  return acc / l[..., None]


def _run(schedule, q, k, v, pos, start, num_keys, segment_ids=None):
  """Checks shapes, groups the queries by KV head, runs `schedule`, ungroups: [b, t, h, d]."""
  b, t, h, d = q.shape
  kv, s = k.shape[1], k.shape[2]
  if k.shape != (b, kv, s, d) or v.shape != k.shape or h % kv:
    raise ValueError(f"attention: q [b, t, h, d] = {q.shape} needs k and v [b, kv, s, d] with h "
                     f"a multiple of kv, got k {k.shape} and v {v.shape}")
  r = h // kv
  qg = rearrange(q, "b t (kv r) d -> b kv (r t) d", kv=kv)
  q_pos = jnp.tile(pos + jnp.arange(t, dtype=jnp.int32), r)  # [m]: index of each row of qg
  num_keys = None if num_keys is None else jnp.asarray(num_keys, jnp.int32)
  docs = None
  if segment_ids is not None:
    if segment_ids.shape != (b, s):
      raise ValueError(f"attention: segment_ids must be [batch, keys] = {(b, s)}, "
                       f"got {segment_ids.shape}")
    k_doc = document_index(segment_ids)
    docs = (k_doc[:, q_pos], k_doc)
  out = schedule(qg, k, v, q_pos, jnp.asarray(start, jnp.int32), num_keys, 1.0 / (d ** 0.5),
                 docs=docs)
  return rearrange(out, "b kv (r t) d -> b t (kv r) d", r=r).astype(q.dtype)


@jax.jit
def attention_split(q, k, v, pos, start, num_keys=None, segment_ids=None):
  """The split-K schedule; arguments and result as in `attention`."""
  return _run(_split, q, k, v, pos, start, num_keys, segment_ids)


@functools.partial(jax.jit, static_argnames=("key_block",))
def attention_blocked(q, k, v, pos, start, num_keys=None, segment_ids=None, *,
                      key_block: int = DEFAULT_KEY_BLOCK):
  """The blocked online-softmax schedule; arguments and result as in `attention`."""
  return _run(functools.partial(_blocked, key_block=key_block), q, k, v, pos, start, num_keys,
              segment_ids)


def attention(q, k, v, pos, start, num_keys=None, *, key_block: int = DEFAULT_KEY_BLOCK,
              segment_ids=None):
  """Causal GQA attention with left-pad masking (the signature of the Pallas kernel's).

  Args:
    q: [b, t, h, d] queries at cache indices pos .. pos+t−1.
    k, v: [b, kv, s, d] keys and values (heads-major), h a multiple of kv.
    pos: int32 scalar (traced or not), index of the first query.
    start: [b] int32, index of each row's first real key.
    num_keys: None (all s keys may be attended) or an int32 scalar count of keys written so far;
      the blocked schedule skips the blocks beyond it, the split schedule masks them.
    key_block: keys per online-softmax block.
    segment_ids: None or [b, s] ids of the keys' documents (packed sequences): a query attends
      only keys of its own document.

  Returns:
    [b, t, h, d] in q.dtype. Rows whose query sits before `start` (padding) hold arbitrary
    finite values.
  """
  t, s = q.shape[1], k.shape[2]
  if t <= MAX_SPLIT_QUERIES or min(key_block, s) == s:
    return attention_split(q, k, v, pos, start, num_keys, segment_ids)
  return attention_blocked(q, k, v, pos, start, num_keys, segment_ids, key_block=key_block)
