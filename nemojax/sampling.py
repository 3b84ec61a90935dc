"""Sampling rules: greedy, temperature, top-k and top-p, per row, as arrays inside jit.

A rule is a small frozen dataclass (`SamplingParams`); the decode loop receives its values as
arrays of shape [b], so changing temperature or top-p between calls never recompiles, and rows of
one batch may use different rules. Conventions inside the arrays: temperature 0 means greedy,
top_k 0 means no top-k filter, top_p 1 means no nucleus filter. The only static choice is the
mode (`mode_for`): all-greedy, sampling, or sampling with a top-k/top-p filter somewhere in the
batch; a decode loop compiles once per mode it meets.

Randomness: with one key per row ([b, 2], from the row's seed) a row draws from
`fold_in(key[row], step)`, so its tokens depend only on its seed, the step and its own logits:
never on its position in the batch or on the other rows. With one key for the batch ([2]) row i
draws from `fold_in(fold_in(key, step), i)`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

f32 = jnp.float32


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_real(x) -> bool:
  return (isinstance(x, (int, float, np.integer, np.floating))
          and not isinstance(x, (bool, np.bool_)))


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How to pick the next token.

  Attributes:
    temperature: 0 for greedy (argmax); > 0 scales the logits before sampling.
    top_k: keep only the k most likely tokens (None: no limit).
    top_p: keep the smallest set of most likely tokens whose probability reaches p (None: 1).
  """

  temperature: float = 0.0
  top_k: int | None = None
  top_p: float | None = None

  def __post_init__(self):
    t, k, p = self.temperature, self.top_k, self.top_p
    if not _is_real(t) or not math.isfinite(t) or t < 0:
      raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r:.40}")
    if k is not None and (not _is_int(k) or not 1 <= k < 2**31):
      raise ValueError(f"top_k must be None or an integer in [1, 2**31), got {k!r:.40}")
    if p is not None and (not _is_real(p) or not 0.0 < p <= 1.0):
      raise ValueError(f"top_p must be None or a number in (0, 1], got {p!r:.40}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


Greedy = SamplingParams  # `Greedy()` reads well at call sites


def as_arrays(params: SamplingParams | Sequence[SamplingParams], batch: int):
  """[b]-shaped (temperature, top_k, top_p) arrays for one rule or one rule per row."""
  rules = [params] * batch if isinstance(params, SamplingParams) else params
  if (not isinstance(rules, (list, tuple)) or len(rules) != batch
      or any(not isinstance(r, SamplingParams) for r in rules)):
    raise ValueError(f"sampling_params must be a SamplingParams or one per prompt ({batch}), "
                     f"got {params!r:.80}")
  temperature = np.array([r.temperature for r in rules], np.float32)
  top_k = np.array([r.top_k or 0 for r in rules], np.int32)
  top_p = np.array([1.0 if r.top_p is None else r.top_p for r in rules], np.float32)
  return temperature, top_k, top_p


def _filter(scaled, top_k, top_p):
  """Masks (to -inf) what top-k and top-p exclude. scaled [b, v]; top_k [b]; top_p [b]."""
  v = scaled.shape[-1]
  desc = -jnp.sort(-scaled, axis=-1)  # [b, v] descending
  k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)  # [b]
  rank = jnp.arange(v)[None, :]
  in_k = rank < k[:, None]
  probs = jax.nn.softmax(jnp.where(in_k, desc, -jnp.inf), axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly before each token
  keep = in_k & (before < top_p[:, None])  # the first token is always kept
  n_keep = jnp.maximum(keep.sum(-1), 1)
  threshold = jnp.take_along_axis(desc, (n_keep - 1)[:, None], axis=-1)  # [b, 1]
  return jnp.where(scaled < threshold, -jnp.inf, scaled)


MODES = ("auto", "greedy", "sample", "filter")


def mode_for(temperature: np.ndarray, top_k: np.ndarray, top_p: np.ndarray) -> str:
  """The cheapest `sample` mode that is exact for these per-row rules (host-side arrays)."""
  stochastic = temperature > 0
  if not stochastic.any():
    return "greedy"
  if ((top_k[stochastic] > 0) | (top_p[stochastic] < 1.0)).any():
    return "filter"
  return "sample"


@functools.partial(jax.jit, static_argnames=("mode",))
def sample(logits: jax.Array, key: jax.Array, step: jax.Array, temperature: jax.Array,
           top_k: jax.Array, top_p: jax.Array, *, mode: str = "auto") -> jax.Array:
  """Next tokens [b] int32 from logits [b, v] under per-row rules (see module docstring).

  `key` is raw key data: [b, 2] (one key per row) or [2] (one for the batch).

  `mode` fixes at trace time what every row may need: "greedy" (argmax only), "sample" (no top-k
  or top-p filter), "filter" (everything), or "auto" (decided on the device with `lax.cond`).
  A decode loop passes a fixed mode (`mode_for`): on GPUs each `lax.cond` waits for its
  predicate on the host, which a loop that runs once per token cannot afford.
  """
  if mode not in MODES:
    raise ValueError(f"sample: mode must be one of {MODES}, got {mode!r}")
  logits = logits.astype(f32)
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  if mode == "greedy":
    return greedy

  def stochastic():
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
    if mode == "filter":
      scaled = _filter(scaled, top_k, top_p)
    elif mode == "auto":
      needs_filter = jnp.any((top_k > 0) | (top_p < 1.0))
      scaled = jax.lax.cond(needs_filter, _filter, lambda s, *_: s, scaled, top_k, top_p)
    if key.ndim == 2:  # one key per row
      row_keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(key)
    else:
      step_key = jax.random.fold_in(key, step)
      row_keys = jax.vmap(lambda i: jax.random.fold_in(step_key, i))(jnp.arange(logits.shape[0]))
    drawn = jax.vmap(jax.random.categorical)(row_keys, scaled).astype(jnp.int32)
    return jnp.where(temperature > 0, drawn, greedy)

  if mode == "auto":
    return jax.lax.cond(jnp.all(temperature == 0), lambda: greedy, stochastic)
  return stochastic()
