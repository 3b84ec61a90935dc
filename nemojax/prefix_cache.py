"""Prefix cache: decode states saved at token boundaries, reused by prompts that start the same way.

A Mamba state cannot be rolled back like a KV cache, so what is saved is a snapshot at an exact
token boundary: after the first L tokens of a prompt, one row's

    conv [K−1, conv_dim], ssm [h, p, n]   per Mamba layer (the state after L tokens)
    k, v [kv, Lb, hd]                      per attention layer (positions 0..L−1; Lb = ladder(L))

keyed by those L token ids. A new prompt resumes from its longest saved prefix and prefills only
the rest; the result is the same computation as prefilling everything, so greedy tokens match.

Snapshots stay on the device (sharded as the cache was) and are evicted least recently used
first when their bytes would exceed the budget. The Sampler decides where to save (prefill-chunk
boundaries, every prompt's end, and points a caller asks for, such as where a chat's next turn
will diverge); see `sampler.py` for how rows resume inside a batch.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nemojax.cache import Cache, KVState, MambaState
from nemojax.engine import cache_ladder

DEFAULT_BUDGET = 1 << 30  # bytes of device memory for saved states

__all__ = ["DEFAULT_BUDGET", "PrefixCache", "Snapshot"]


@dataclasses.dataclass
class Snapshot:
  """One row's decode state after `length` tokens (layers as in `Cache.layers`, no batch axis)."""

  length: int
  layers: tuple
  nbytes: int


def _key(tokens: Sequence[int]) -> bytes:
  return np.asarray(tokens, np.int32).tobytes()


class PrefixCache:
  """Snapshots keyed by token prefix, under a byte budget (least recently used evicted first).

  Snapshots a caller asked for (`put(..., requested=True)`: the Sampler's `save_at`, such as
  where a chat's next turn diverges) outrank the automatic ones (chunk multiples, prompt ends):
  the automatic ones are evicted first, and an automatic snapshot is not saved if it would
  displace a requested one. Without that, at Nano-9B widths and a 16k-token chat history (~0.7 GB
  per snapshot, 1 GiB budget) the prompt end that a chat never reuses evicted the one state the
  next turn resumes from (H200, 2026-12-02: `cached_prompt_tokens` 0).

  Args:
    max_bytes: the budget (0 keeps nothing).
    every: also save at every multiple of this many prompt tokens (None: the Sampler's prefill
      chunk). Finer boundaries let prompts that share a shorter prefix resume too.
  """

  def __init__(self, max_bytes: int = DEFAULT_BUDGET, *, every: int | None = None):
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, (int, np.integer)) \
        or max_bytes < 0:
      raise ValueError(f"prefix cache max_bytes must be an integer >= 0, got {max_bytes!r:.40}")
    if every is not None and (isinstance(every, bool) or not isinstance(every, (int, np.integer))
                              or every < 1):
      raise ValueError(f"prefix cache every must be None or an integer >= 1, got {every!r:.40}")
    self.max_bytes = int(max_bytes)
    self.every = None if every is None else int(every)
    self._entries: collections.OrderedDict[bytes, Snapshot] = collections.OrderedDict()
    self._requested: set[bytes] = set()  # keys saved with requested=True
    self._lengths: collections.Counter = collections.Counter()
    self.nbytes = 0
    self.hits = 0  # prompt tokens served from saved states (all calls)

  def __len__(self) -> int:
    return len(self._entries)

  def __contains__(self, tokens: Sequence[int]) -> bool:
    return _key(tokens) in self._entries

  def clear(self) -> None:
    """Drops every snapshot."""
    self._entries.clear()
    self._requested.clear()
    self._lengths.clear()
    self.nbytes = 0

  def lookup(self, tokens: Sequence[int], max_len: int) -> Snapshot | None:
    """The snapshot of the longest saved prefix of `tokens` no longer than `max_len` (or None)."""
    arr = np.asarray(tokens, np.int32)
    for n in sorted(self._lengths, reverse=True):
      if n > max_len or n > len(arr):
        continue
      snap = self._entries.get(arr[:n].tobytes())
      if snap is not None:
        self._entries.move_to_end(arr[:n].tobytes())
        return snap
    return None

  def fits(self, nbytes: int) -> bool:
    return nbytes <= self.max_bytes

  def victims(self, nbytes: int, requested: bool = False) -> list[bytes] | None:
    """Keys a new snapshot of `nbytes` would evict (automatic ones first, least recently used
    first; requested ones only for a requested snapshot), or None if it would not be saved."""
    if not self.fits(nbytes):
      return None
    need = self.nbytes + nbytes - self.max_bytes
    order = [k for k in self._entries if k not in self._requested]
    if requested:
      order += [k for k in self._entries if k in self._requested]
    out = []
    for key in order:
      if need <= 0:
        break
      out.append(key)
      need -= self._entries[key].nbytes
    return out if need <= 0 else None

  def mark_requested(self, tokens: Sequence[int]) -> None:
    """Ranks the saved snapshot of `tokens` (if any) as requested."""
    key = _key(tokens)
    if key in self._entries:
      self._requested.add(key)

  def put(self, tokens: Sequence[int], snap: Snapshot, *, requested: bool = False) -> None:
    """Saves `snap` as the state after `tokens`, evicting over budget as `victims` says."""
    key = _key(tokens)
    if key in self._entries:
      self._entries.move_to_end(key)
      if requested:
        self._requested.add(key)
      return
    drop = self.victims(snap.nbytes, requested)
    if drop is None:
      return
    for old in drop:
      self._drop(old)
    self._entries[key] = snap
    if requested:
      self._requested.add(key)
    self._lengths[snap.length] += 1
    self.nbytes += snap.nbytes

  def _drop(self, key: bytes) -> None:
    self._requested.discard(key)
    snap = self._entries.pop(key)
    self._lengths[snap.length] -= 1
    if not self._lengths[snap.length]:
      del self._lengths[snap.length]
    self.nbytes -= snap.nbytes


# ------------------------------------------------------------------------------------------------
def snapshot_bytes(cache: Cache, length: int) -> int:
  """Bytes of one row's snapshot after `length` tokens, without making it."""
  total = 0
  for layer in cache.layers:
    if isinstance(layer, MambaState):
      total += (layer.conv.size * layer.conv.dtype.itemsize
                + layer.ssm.size * layer.ssm.dtype.itemsize) // cache.batch_size
    elif isinstance(layer, KVState):
      kv, _, hd = layer.k.shape[1:]
      total += 2 * kv * cache_ladder(length) * hd * layer.k.dtype.itemsize
  return total


def _take_row(layers: tuple, row, start, length, size: int) -> tuple:
  """Row `row`'s states; K/V positions start..start+length−1 moved to 0..length−1 of `size`."""
  out = []
  for layer in layers:
    if isinstance(layer, MambaState):
      out.append(MambaState(conv=layer.conv[row], ssm=layer.ssm[row]))
    elif isinstance(layer, KVState):
      j = jnp.arange(size)
      src = jnp.clip(start + j, 0, layer.k.shape[2] - 1)
      keep = (j < length)[None, :, None]
      out.append(KVState(*(jnp.where(keep, x[row][:, src], jnp.zeros((), x.dtype))
                           for x in (layer.k, layer.v))))
    else:
      out.append(None)
  return tuple(out)


def _put_row(layers: tuple, row, start, length, snap: tuple) -> tuple:
  """`layers` with row `row` set from `snap`: K/V 0..length−1 written at start..start+length−1."""
  out = []
  for layer, saved in zip(layers, snap):
    if isinstance(layer, MambaState):
      out.append(MambaState(conv=layer.conv.at[row].set(saved.conv),
                            ssm=layer.ssm.at[row].set(saved.ssm)))
    elif isinstance(layer, KVState):
      j = jnp.arange(layer.k.shape[2])
      src = jnp.clip(j - start, 0, saved.k.shape[1] - 1)
      inside = ((j >= start) & (j < start + length))[None, :, None]
      out.append(KVState(*(x.at[row].set(jnp.where(inside, y[:, src], x[row]))
                           for x, y in ((layer.k, saved.k), (layer.v, saved.v)))))
    else:
      out.append(None)
  return tuple(out)


_take_row_jit = jax.jit(_take_row, static_argnums=(4,))
_put_row_jit = jax.jit(_put_row, donate_argnums=(0,))


def take(cache: Cache, row: int, start: int, length: int) -> Snapshot:
  """The snapshot of row `row` of `cache`, whose tokens start at index `start`, after `length`."""
  layers = _take_row_jit(cache.layers, jnp.int32(row), jnp.int32(start), jnp.int32(length),
                         cache_ladder(length))
  return Snapshot(length=int(length), layers=layers, nbytes=snapshot_bytes(cache, length))


def restore(cache: Cache, row: int, start: int, snap: Snapshot) -> Cache:
  """`cache` (donated) with row `row` holding `snap`'s state, its tokens from index `start`."""
  layers = _put_row_jit(cache.layers, jnp.int32(row), jnp.int32(start), jnp.int32(snap.length),
                        snap.layers)
  return cache.replace(layers=layers)
