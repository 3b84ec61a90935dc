"""Mamba-2 state-space duality (SSD) scan in plain JAX: the specification of every SSD kernel.

Legend: b batch, t time, h heads, p head dim, n state, g groups, r heads per group (h = g·r),
c chunks, l / s positions inside a chunk (query / source).

Per head, with state `S ∈ R^{p×n}` and inputs already discretised by the caller's `dt`:

    S_t = exp(dt_t·A) · S_{t−1} + dt_t · x_t ⊗ B_t
    y_t = S_t · C_t + D · x_t

Head `h` reads B and C of group `h // r` (consecutive heads share a group).

`ssd_naive` runs that recurrence with a `lax.scan` over time in fp32: slow, obviously right, the
oracle. `ssd_chunked` is the chunked algorithm (SPEC section 2): within a chunk of Q steps the
output is a masked "attention" `(C_l·B_s) exp(Σ_{s<k≤l} a_k) X_s`; chunk-end states are passed
between chunks by an associative scan; each chunk adds the contribution of the state it starts
from. Both take any sequence length; `ssd_chunked` pads to a multiple of Q with steps that have
dt = 0 (no decay, no input), so the final state is exact.

Packed sequences (`segment_ids` [b, t], see `kernels/segments.py`): at the first position t of a
document the state restarts, S_t = dt_t · x_t ⊗ B_t, as if exp(Σ a) were 0 over any span that
crosses a boundary. `ssd_naive` resets S before adding token t's input; `ssd_chunked` masks the
intra-chunk decay L[l, s] to same-document pairs (like the causal mask), keeps a position's input
in its chunk's end state only if the chunk ends in its document, lets the entering state reach
only positions of the document it belongs to, and passes no state across a chunk that holds a
boundary. The initial state belongs to the first document of each row; the final state is the
last document's.

Shapes: x [b, t, h, p]; dt [b, t, h] (positive, after softplus); A [h] (negative);
B, C [b, t, g, n]; D [h] or None; initial_state [b, h, p, n] or None.
Returns y [b, t, h, p] in x.dtype and the final state [b, h, p, n] in float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from nemojax.kernels.segments import document_index

f32 = jnp.float32


def _check_shapes(x, dt, A, B, C, D, initial_state):
  if x.ndim != 4:
    raise ValueError(f"ssd: x must be [batch, time, heads, head_dim], got shape {x.shape}")
  b, t, h, p = x.shape
  if dt.shape != (b, t, h):
    raise ValueError(f"ssd: dt must be {(b, t, h)} to match x {x.shape}, got {dt.shape}")
  if A.shape != (h,):
    raise ValueError(f"ssd: A must be ({h},), got {A.shape}")
  if B.ndim != 4 or B.shape[:2] != (b, t) or B.shape != C.shape:
    raise ValueError(f"ssd: B and C must be [batch, time, groups, state] matching x {x.shape}, "
                     f"got B {B.shape}, C {C.shape}")
  g, n = B.shape[2:]
  if h % g:
    raise ValueError(f"ssd: heads ({h}) must be a multiple of groups ({g})")
  if D is not None and D.shape != (h,):
    raise ValueError(f"ssd: D must be ({h},), got {D.shape}")
  if initial_state is not None and initial_state.shape != (b, h, p, n):
    raise ValueError(f"ssd: initial_state must be {(b, h, p, n)}, got {initial_state.shape}")
  return b, t, h, p, g, n


def _check_segments(segment_ids, b, t):
  if segment_ids is not None and segment_ids.shape != (b, t):
    raise ValueError(f"ssd: segment_ids must be [batch, time] = {(b, t)}, "
                     f"got {segment_ids.shape}")


@jax.jit
def ssd_naive(x, dt, A, B, C, D=None, initial_state=None, segment_ids=None):
  """The SSD recurrence, one time step at a time, in float32 (the oracle)."""
  b, t, h, p, g, n = _check_shapes(x, dt, A, B, C, D, initial_state)
  _check_segments(segment_ids, b, t)
  doc = jnp.zeros((b, t), jnp.int32) if segment_ids is None else document_index(segment_ids)
  # A document's first position: the state restarts there (never at t = 0, the initial state's).
  reset = jnp.concatenate([jnp.zeros((b, 1), bool), doc[:, 1:] != doc[:, :-1]], axis=1)
  r = h // g
  state = (jnp.zeros((b, h, p, n), f32) if initial_state is None
           else initial_state.astype(f32))
  A = A.astype(f32)
  Dv = jnp.zeros((h,), f32) if D is None else D.astype(f32)

  def step(state, inputs):
    x_t, dt_t, B_t, C_t, reset_t = inputs  # [b, h, p], [b, h], [b, g, n], [b, g, n], [b]
    B_h = jnp.repeat(B_t, r, axis=1)  # [b, h, n]
    C_h = jnp.repeat(C_t, r, axis=1)
    decay = jnp.where(reset_t[:, None], 0.0, jnp.exp(dt_t * A))  # [b, h]
    state = (decay[:, :, None, None] * state
             + jnp.einsum("bhp,bhn->bhpn", dt_t[:, :, None] * x_t, B_h))
    y_t = jnp.einsum("bhpn,bhn->bhp", state, C_h) + Dv[:, None] * x_t
    return state, y_t

  xs = (x.astype(f32).swapaxes(0, 1), dt.astype(f32).swapaxes(0, 1),
        B.astype(f32).swapaxes(0, 1), C.astype(f32).swapaxes(0, 1), reset.swapaxes(0, 1))
  state, ys = jax.lax.scan(step, state, xs)
  return ys.swapaxes(0, 1).astype(x.dtype), state


def _segsum(a):
  """exp-argument of the intra-chunk decay: out[..., l, s] = Σ_{s<k≤l} a[..., k], -inf for s > l.

  Built by a masked cumulative sum rather than a difference of cumsums, which would lose
  precision when the cumulative decay is large.
  """
  q = a.shape[-1]
  rep = jnp.broadcast_to(a[..., :, None], a.shape + (q,))  # rep[..., k, s] = a[k]
  rep = jnp.where(jnp.tril(jnp.ones((q, q), bool), -1), rep, 0.0)  # keep k > s
  seg = jnp.cumsum(rep, axis=-2)  # [..., l, s] = Σ_{s<k≤l} a[k]
  return jnp.where(jnp.tril(jnp.ones((q, q), bool), 0), seg, -jnp.inf)


def _document_masks(segment_ids, nc: int, q: int):
  """Masks of the chunked algorithm for packed rows (module docstring), shaped to broadcast
  against [b, c, g, r, ...]: same [b, c, 1, 1, l, s], to_end [b, c, 1, 1, l] (input kept in the
  chunk's end state), from_start [b, c, 1, 1, l] (entering state reaches l), passes [b, c, 1, 1]
  (the entering state crosses the whole chunk)."""
  doc = document_index(segment_ids)
  b, t = doc.shape
  doc = jnp.pad(doc, [(0, 0), (0, nc * q - t)], mode="edge").reshape(b, nc, q)  # pads: last doc
  # Document of the state entering each chunk: the previous chunk's last, 0 (the initial's) first.
  prev = jnp.concatenate([jnp.zeros((b, 1), doc.dtype), doc[:, :-1, -1]], axis=1)  # [b, c]
  same = doc[..., :, None] == doc[..., None, :]
  to_end = doc == doc[..., -1:]
  from_start = doc == prev[..., None]
  passes = doc[..., -1] == prev
  return (same[:, :, None, None], to_end[:, :, None, None], from_start[:, :, None, None],
          passes[:, :, None, None])


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def ssd_chunked(x, dt, A, B, C, D=None, initial_state=None, segment_ids=None, *,
                chunk_size: int = 128):
  """The chunked SSD algorithm in XLA; same contract as `ssd_naive`."""
  b, t, h, p, g, n = _check_shapes(x, dt, A, B, C, D, initial_state)
  _check_segments(segment_ids, b, t)
  r = h // g
  q = int(chunk_size)
  if q <= 0:
    raise ValueError(f"ssd: chunk_size must be positive, got {chunk_size}")
  if t == 0:
    raise ValueError("ssd: the sequence is empty (time dimension 0)")
  q = min(q, t)  # a short sequence is one short chunk
  pad = (-t) % q
  nc = (t + pad) // q

  def to_chunks(v):
    v = jnp.pad(v, [(0, 0), (0, pad)] + [(0, 0)] * (v.ndim - 2))
    return v.reshape((b, nc, q) + v.shape[2:])

  xf = x.astype(f32)
  dtf = dt.astype(f32)
  X = to_chunks(xf * dtf[..., None]).reshape(b, nc, q, g, r, p)  # [b, c, l, g, r, p]
  a = to_chunks(dtf * A.astype(f32)).reshape(b, nc, q, g, r)  # [b, c, l, g, r]
  a = jnp.moveaxis(a, 2, -1)  # [b, c, g, r, l]
  Bc = to_chunks(B.astype(f32))  # [b, c, l, g, n]
  Cc = to_chunks(C.astype(f32))

  a_cum = jnp.cumsum(a, axis=-1)  # [b, c, g, r, l]
  packed = None if segment_ids is None else _document_masks(segment_ids, nc, q)
  # 1. Intra-chunk (diagonal blocks).
  seg = _segsum(a)
  L = jnp.exp(seg if packed is None else jnp.where(packed[0], seg, -jnp.inf))  # [b, c, g, r, l, s]
  CB = jnp.einsum("bclgn,bcsgn->bcgls", Cc, Bc)
  y_diag = jnp.einsum("bcgls,bcgrls,bcsgrp->bclgrp", CB, L, X)

  # 2. State at the end of each chunk, from that chunk's inputs alone.
  decay_to_end = jnp.exp(a_cum[..., -1:] - a_cum)  # [b, c, g, r, l]
  if packed is not None:
    decay_to_end = jnp.where(packed[1], decay_to_end, 0.0)
  chunk_states = jnp.einsum("bclgn,bcgrl,bclgrp->bcgrpn", Bc, decay_to_end, X)

  # 3. Pass states between chunks: end_c = exp(A_c) end_{c-1} + S_c, as an associative scan
  #    over (log-decay, state) pairs.
  chunk_decay = a_cum[..., -1]  # [b, c, g, r]
  if packed is not None:  # log 0: the scan's sums stay -inf and its exp 0, never NaN
    chunk_decay = jnp.where(packed[3], chunk_decay, -jnp.inf)

  def combine(left, right):
    la, sa = left
    lb, sb = right
    return la + lb, jnp.exp(lb)[..., None, None] * sa + sb

  log_decay_cum, ends = jax.lax.associative_scan(combine, (chunk_decay, chunk_states), axis=1)
  if initial_state is not None:
    init = initial_state.astype(f32).reshape(b, 1, g, r, p, n)
    ends = ends + jnp.exp(log_decay_cum)[..., None, None] * init
  else:
    init = jnp.zeros((b, 1, g, r, p, n), f32)
  starts = jnp.concatenate([init, ends[:, :-1]], axis=1)  # state entering each chunk
  final_state = ends[:, -1].reshape(b, h, p, n)

  # 4. Contribution of the entering state to each position.
  decay_from_start = jnp.exp(a_cum)
  if packed is not None:
    decay_from_start = jnp.where(packed[2], decay_from_start, 0.0)
  y_off = jnp.einsum("bclgn,bcgrpn,bcgrl->bclgrp", Cc, starts, decay_from_start)

  y = (y_diag + y_off).reshape(b, nc * q, h, p)[:, :t]
  if D is not None:
    y = y + D.astype(f32)[None, None, :, None] * xf
  return y.astype(x.dtype), final_state


@jax.jit
def ssd_update(state, x, dt, A, B, C, D=None):
  """One decode step of the recurrence for a batch of single tokens.

  Shapes: state [b, h, p, n] (float32), x [b, h, p], dt [b, h], A [h], B, C [b, g, n], D [h].
  Returns y [b, h, p] in x.dtype and the new state in float32.
  """
  b, h, p = x.shape
  g = B.shape[1]
  r = h // g
  xf = x.astype(f32)
  dtf = dt.astype(f32)
  Bf = B.astype(f32).reshape(b, g, 1, -1)
  Cf = C.astype(f32).reshape(b, g, 1, -1)
  decay = jnp.exp(dtf * A.astype(f32)).reshape(b, g, r, 1, 1)
  s = state.astype(f32).reshape(b, g, r, p, -1)
  X = (dtf[..., None] * xf).reshape(b, g, r, p)
  # Written as broadcasts and a sum rather than einsums so that XLA emits one fused pass over
  # the state (read, update, contract with C) instead of materialising it between two products.
  s = decay * s + X[..., None] * Bf[:, :, :, None, :]
  y = jnp.sum(s * Cf[:, :, :, None, :], axis=-1).reshape(b, h, p)
  if D is not None:
    y = y + D.astype(f32)[None, :, None] * xf
  return y.astype(x.dtype), s.reshape(b, h, p, -1)
