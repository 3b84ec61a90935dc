"""The decode engine: jitted prefill chunks and decode segments over a donated loop state.

Everything here works on token ids and arrays; `Sampler` (sampler.py) builds requests on top of
it, and benchmarks drive these functions directly.

    graph, params = jit.split(model)
    cache = prefill(graph, params, cache, ids[:, lo:hi])      # one chunk, cache donated
    state = init_state(cache, last_tokens, max_new_tokens=..., reasoning_open=...)
    cfg = loop_config(...)                                     # per-call knobs, all arrays
    state = decode_segment(graph, params, state, cfg, until, mode)   # steps until `until`

The decode loop is one `lax.while_loop`. Its body has no data-dependent control flow (on GPUs
each `lax.cond` or inner loop makes the host wait for the device): the sampling mode is fixed per
call (`sampling.mode_for`), and attention reads the cache without a loop. Changing any knob's
value never recompiles; a new mode, batch size, cache length or token buffer length does.

Compiled shapes are kept few. Cache lengths lie on a ladder, 256·{1, 1.5}·2^k (`cache_ladder`),
and the token buffer is as long as the cache, so a sweep of max_new_tokens over 1..32768 with one
prompt bucket meets 16 cache lengths (256 to 49152), hence 16 decode programs. Prefill fills a
cache as long as the prompt bucket needs (not as long as the generation), and `extend` copies it
into the decode cache: prefill programs do not depend on max_new_tokens at all.

Thinking budget (SPEC §5). A row that starts inside `<think>` (`reasoning_open`) counts its
reasoning tokens; once `budget` are spent without `</think>`, the closing text (".\\n</think>\\n\\n"
tokenised) is force-fed — at once under the "hard" policy, or after the next token that ends a
line under "newline" (at most `grace` tokens later) — and the answer is sampled after it. A model
that writes `</think>` itself ends its thought as usual. `max_new_tokens` bounds everything.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import PartitionSpec as P

from nemojax import compilation, jit, sampling
from nemojax.cache import Cache, KVState

# The persistent compilation cache is on from the moment the engine is imported (before any of
# its programs compile); see compilation.py for the directory and how to switch it off.
compilation.enable_default()

FINISH_REASONS = {0: None, 1: "stop", 2: "length"}
DEFAULT_BUDGET_GRACE = 500  # "newline" policy: tokens the line may run past the budget
BUDGET_POLICIES = ("hard", "newline")


@struct.dataclass
class LoopState:
  """What the decode loop carries from step to step (donated to each segment)."""

  cache: Cache
  last: jax.Array  # [b] token fed at the next step
  tokens: jax.Array  # [b, n] generated tokens
  reasoning: jax.Array  # [b, n] reasoning tokens counted after each generated token
  count: jax.Array  # [b] tokens generated so far
  done: jax.Array  # [b] bool
  reason: jax.Array  # [b] 0 running, 1 stop token, 2 length
  step: jax.Array  # [] steps taken
  in_thought: jax.Array  # [b] bool: inside an open thought
  think_count: jax.Array  # [b] reasoning tokens so far
  forcing: jax.Array  # [b] position in the forced closing text, -1 when not forcing
  recent: jax.Array  # [b, m] last m tokens, to spot a `</think>` the model writes itself


@struct.dataclass
class LoopConfig:
  """Per-call knobs, all arrays (changing their values never recompiles)."""

  max_new: jax.Array  # [b]
  temperature: jax.Array  # [b]
  top_k: jax.Array  # [b]
  top_p: jax.Array  # [b]
  key: jax.Array  # [b, 2] uint32: one key per row, from the row's seed
  stop_ids: jax.Array  # [s] (-1 = unused slot)
  budget: jax.Array  # [b] (-1 = unlimited)
  grace: jax.Array  # [b] (-1 = "hard" policy; >= 0: "newline" policy with that grace)
  newline: jax.Array  # [v] bool: token ends a line
  close_text: jax.Array  # [c] forced closing text
  close_marker: jax.Array  # [m] the `</think>` ids


@dataclasses.dataclass(frozen=True)
class ThinkingControl:
  """Token-level data for the thinking budget (from `Tokenizer.think_tokens()` and friends)."""

  close_marker: tuple[int, ...]  # ids of `</think>`
  close_text: tuple[int, ...]  # ids of ".\n</think>\n\n", force-fed when the budget runs out
  newline_mask: np.ndarray | None = None  # [vocab] bool, needed by the "newline" policy


NO_CONTROL = ThinkingControl(close_marker=(-2,), close_text=(0,))  # never matches, never forced


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


@dataclasses.dataclass(frozen=True)
class ThinkingBudget:
  """Per-row caps on reasoning tokens and how a capped thought is closed (validated once).

  Attributes:
    tokens: per row, the most reasoning tokens (None: unlimited; 0: reasoning off).
    policy: "hard" closes the thought at the budget; "newline" at the end of the line.
    grace: with "newline", at most this many tokens past the budget.
  """

  tokens: tuple[int | None, ...]
  policy: str = "hard"
  grace: int = DEFAULT_BUDGET_GRACE

  def __post_init__(self):
    for i, t in enumerate(self.tokens):
      if t is not None and (not _is_int(t) or t < 0):
        raise ValueError(f"thinking_budget for prompt {i} must be None or an integer >= 0, "
                         f"got {t!r}")
    if self.policy not in BUDGET_POLICIES:
      raise ValueError(f"budget_policy must be 'hard' or 'newline', got {self.policy!r}")
    if not _is_int(self.grace) or self.grace < 0:
      raise ValueError(f"budget_grace must be an integer >= 0, got {self.grace!r}")

  @classmethod
  def per_row(cls, budget, n: int, policy: str = "hard",
              grace: int = DEFAULT_BUDGET_GRACE) -> ThinkingBudget:
    """One budget (or None) for every row, or one per row; a ThinkingBudget passes through."""
    if isinstance(budget, ThinkingBudget):
      if len(budget.tokens) != n:
        raise ValueError(f"thinking_budget has {len(budget.tokens)} values for {n} prompts")
      return budget
    if isinstance(budget, (list, tuple, np.ndarray)):
      if len(budget) != n:
        raise ValueError(f"thinking_budget has {len(budget)} values for {n} prompts")
      return cls(tuple(budget), policy, grace)
    return cls((budget,) * n, policy, grace)

  def limits(self, reasoning_open: Sequence[bool]) -> np.ndarray:
    """[b] int32 budgets for the loop: -1 where unlimited or where the row is not reasoning."""
    return np.asarray([-1 if (t is None or not o) else t
                       for t, o in zip(self.tokens, reasoning_open)], np.int32)

  def needs_control(self, reasoning_open: Sequence[bool]) -> bool:
    return bool((self.limits(reasoning_open) >= 0).any())


MIN_CACHE_LEN = 256


def cache_ladder(n: int) -> int:
  """The smallest cache length >= n on the ladder 256·{1, 1.5}·2^k (at most 1/3 unused; every
  value a multiple of 128, as the Pallas attention kernel's key blocks need)."""
  n = max(int(n), MIN_CACHE_LEN)
  p = next_pow2(n)
  return p * 3 // 4 if p * 3 // 4 >= n and p >= 2 * MIN_CACHE_LEN else p


def buffer_len(max_new_tokens: int) -> int:
  """Token buffer length for `max_new_tokens` alone (the Sampler passes its cache length)."""
  return cache_ladder(max_new_tokens)


def next_pow2(x: int) -> int:
  return 1 << max(0, (int(x) - 1).bit_length())


def row_keys(seeds: Sequence[int]) -> np.ndarray:
  """[b, 2] uint32 raw keys, one per row: the row's seed and nothing else decides its draws."""
  return np.asarray([[(s >> 32) & 0xFFFFFFFF, s & 0xFFFFFFFF] for s in seeds], np.uint32)


def loop_config(*, vocab_size: int, max_new_tokens: int, sampling_params, seeds: Sequence[int],
                stop_tokens: Sequence[int] = (), budget: ThinkingBudget | None = None,
                reasoning_open: Sequence[bool] | None = None,
                control: ThinkingControl | None = None) -> tuple[LoopConfig, str]:
  """The loop's knobs as arrays, and the static sampling mode they need."""
  b = len(seeds)
  temperature, top_k, top_p = sampling.as_arrays(sampling_params, b)
  reasoning_open = [False] * b if reasoning_open is None else list(reasoning_open)
  budget = budget or ThinkingBudget((None,) * b)
  control = control or NO_CONTROL
  newline = np.zeros((vocab_size,), bool)
  if control.newline_mask is not None:
    mask = np.asarray(control.newline_mask, bool)[:vocab_size]
    newline[:mask.shape[0]] = mask
  stop_ids = np.full((max(8, next_pow2(len(stop_tokens))),), -1, np.int32)
  stop_ids[:len(stop_tokens)] = np.asarray(stop_tokens, np.int32)
  grace = -1 if budget.policy == "hard" else budget.grace
  cfg = LoopConfig(
      max_new=jnp.full((b,), int(max_new_tokens), jnp.int32),
      temperature=jnp.asarray(temperature), top_k=jnp.asarray(top_k), top_p=jnp.asarray(top_p),
      key=jnp.asarray(row_keys(seeds)), stop_ids=jnp.asarray(stop_ids),
      budget=jnp.asarray(budget.limits(reasoning_open)),
      grace=jnp.full((b,), grace, jnp.int32), newline=jnp.asarray(newline),
      close_text=jnp.asarray(control.close_text, jnp.int32),
      close_marker=jnp.asarray(control.close_marker, jnp.int32))
  return cfg, sampling.mode_for(temperature, top_k, top_p)


def init_state(cache: Cache, last: jax.Array, *, max_new_tokens: int,
               reasoning_open: Sequence[bool] | jax.Array | None = None,
               control: ThinkingControl | None = None, buffer: int | None = None) -> LoopState:
  """The loop state after prefill: `last` [b] is each row's final prompt token (fed first).

  `buffer` (>= max_new_tokens) fixes the token buffer's length; None: `buffer_len`.
  """
  b = cache.batch_size
  n = buffer_len(max_new_tokens) if buffer is None else int(buffer)
  if n < max_new_tokens:
    raise ValueError(f"buffer={n} is shorter than max_new_tokens={max_new_tokens}")
  marker = len((control or NO_CONTROL).close_marker)
  open_ = jnp.zeros((b,), bool) if reasoning_open is None else jnp.asarray(reasoning_open, bool)
  return LoopState(
      cache=cache, last=jnp.asarray(last, jnp.int32), tokens=jnp.zeros((b, n), jnp.int32),
      reasoning=jnp.zeros((b, n), jnp.int32), count=jnp.zeros((b,), jnp.int32),
      done=jnp.zeros((b,), bool), reason=jnp.zeros((b,), jnp.int32),
      step=jnp.zeros((), jnp.int32), in_thought=open_, think_count=jnp.zeros((b,), jnp.int32),
      forcing=jnp.full((b,), -1, jnp.int32), recent=jnp.full((b, marker), -1, jnp.int32))


# ------------------------------------------------------------------------------------------------
def _next_token(st: LoopState, cfg: LoopConfig, sampled: jax.Array):
  """The token fed next (sampled, or forced by the budget) and the thought bookkeeping after it.

  Returns (token, forced, next_forcing, in_thought, think_count) [b] and recent [b, m].
  """
  c = cfg.close_text.shape[0]
  m = cfg.close_marker.shape[0]
  # Does the budget close the thought before this token?
  over = (st.in_thought & (st.forcing < 0) & (cfg.budget >= 0)
          & (st.think_count >= cfg.budget))
  hard = cfg.grace < 0
  line_ended = cfg.newline[st.last] | (st.think_count >= cfg.budget + cfg.grace)
  forcing = jnp.where(over & (hard | line_ended), 0, st.forcing)
  forced = forcing >= 0
  tok = jnp.where(forced, cfg.close_text[jnp.clip(forcing, 0, c - 1)], sampled)

  recent = jnp.concatenate([st.recent[:, 1:], tok[:, None]], axis=1)
  wrote_close = jnp.all(recent == cfg.close_marker[None, :], axis=-1)
  next_forcing = jnp.where(forced, forcing + 1, -1)
  force_done = forced & (next_forcing >= c)
  next_forcing = jnp.where(force_done, -1, next_forcing)
  in_thought = st.in_thought & ~wrote_close & ~force_done
  # Reasoning tokens: sampled inside the thought, the `</think>` pieces themselves excluded.
  sampled_in_thought = st.in_thought & ~forced
  think_count = (st.think_count + sampled_in_thought.astype(jnp.int32)
                 - jnp.where(sampled_in_thought & wrote_close, m, 0))
  return tok, forced, next_forcing, in_thought, think_count, recent


def _decode_segment(graph: jit.Graph, params, state: LoopState, cfg: LoopConfig, until,
                    mode: str = "auto") -> LoopState:
  """`decode_segment(graph, params, state, cfg, until, mode) -> state`: decode steps until
  `state.step == until` or every row is done (the state is donated). `mode` is static:
  "greedy", "sample", "filter" or "auto" (see `sampling.sample`)."""
  model = graph.merge(params)
  b, n = state.tokens.shape
  rows = jnp.arange(b)

  def body(st: LoopState) -> LoopState:
    logits, cache = model(st.last[:, None], cache=st.cache)
    sampled = sampling.sample(logits[:, 0], cfg.key, st.step, cfg.temperature, cfg.top_k,
                              cfg.top_p, mode=mode)
    tok, forced, next_forcing, in_thought, think_count, recent = _next_token(st, cfg, sampled)
    active = ~st.done
    stop = ~forced & jnp.any(tok[:, None] == cfg.stop_ids[None, :], axis=-1)
    slot = jnp.minimum(st.count, n - 1)
    write = lambda buf, new: buf.at[rows, slot].set(jnp.where(active, new, buf[rows, slot]))
    count = st.count + active.astype(jnp.int32)
    length = ~stop & (count >= cfg.max_new)
    reason = jnp.where(active & stop, 1, jnp.where(active & length, 2, st.reason))

    keep = lambda new, old: jnp.where(active.reshape((b,) + (1,) * (new.ndim - 1)), new, old)
    return LoopState(
        cache=cache, last=keep(tok, st.last), tokens=write(st.tokens, tok),
        reasoning=write(st.reasoning, think_count), count=count,
        done=st.done | (active & (stop | length)), reason=reason, step=st.step + 1,
        in_thought=keep(in_thought, st.in_thought),
        think_count=keep(think_count, st.think_count),
        forcing=keep(next_forcing, st.forcing), recent=keep(recent, st.recent))

  cond = lambda st: (st.step < until) & ~jnp.all(st.done)
  return jax.lax.while_loop(cond, body, state)


def _prefill_chunk(graph: jit.Graph, params, cache: Cache, ids: jax.Array) -> Cache:
  """`prefill(graph, params, cache, ids [b, t]) -> cache`: consumes one chunk of prompt columns
  at `cache.pos` (the cache is donated)."""
  _, cache = graph.merge(params).hidden_states(ids, cache=cache)
  return cache


def _extend(cache: Cache, length: int) -> Cache:
  """`extend(cache, length) -> cache` with every K/V buffer zero-padded to `length` positions."""
  def grow(layer):
    if not isinstance(layer, KVState):
      return layer
    pad = ((0, 0), (0, 0), (0, length - layer.k.shape[2]), (0, 0))
    return KVState(k=jnp.pad(layer.k, pad), v=jnp.pad(layer.v, pad))
  return cache.replace(layers=tuple(grow(layer) for layer in cache.layers))


def _loop_specs(layout, state: LoopState) -> LoopState:
  # The cache as the layout shards it; the per-row bookkeeping (a few ints per row) replicated.
  specs = jax.tree.map(lambda _: P(), state)
  return specs.replace(cache=layout.cache_specs(state.cache))


# Compiled once per (model structure, shapes) for the whole process: every Sampler of a model
# shares them, so `generate()` may build a Sampler per call without recompiling. On an Explicit
# mesh the outputs keep the shardings the state came in with (sharding.auto_call).
prefill = jit.jit(_prefill_chunk, donate_argnums=(2,),
                  out_specs=lambda layout, params, cache, ids: layout.cache_specs(cache))
decode_segment = jit.jit(_decode_segment, static_argnums=(5,), donate_argnums=(2,),
                         out_specs=lambda layout, params, state, *_: _loop_specs(layout, state))
_extend_jit = jax.jit(_extend, static_argnums=(1,))  # nothing to donate: shapes grow


def extend(cache: Cache, length: int) -> Cache:
  """The cache with `length` positions (a copy of a shorter prefill cache; cheap to compile)."""
  if cache.max_len < 0 or cache.max_len == length:
    return cache
  if cache.max_len > length:
    raise ValueError(f"extend: the cache has {cache.max_len} positions, more than {length}")
  return _extend_jit(cache, int(length))


def compiled_shapes() -> dict[str, int]:
  """How many programs `prefill` and `decode_segment` hold in this process (for tests)."""
  return {"prefill": prefill._cache_size(), "decode": decode_segment._cache_size()}
