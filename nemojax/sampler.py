"""Prefill and a jitted decode loop: batches of mixed prompt lengths, stop tokens, streaming,
sampling rules and per-row thinking budgets.

Layout of a batch. Prompts are left-padded to a common length `P + 1`, where P (the prefill
length) is rounded up to a bucket: a power of two up to the prefill chunk, then a multiple of it.
The first P columns are prefilled chunk by chunk (one compiled shape per bucket); the last column
holds every row's final prompt token, which the first decode step feeds. The cache has a fixed
size, so a new prompt length that falls in a compiled bucket reuses the compiled functions.

The decode loop is one `lax.while_loop` over a donated state. It runs in segments: the host gets
control back after `segment` steps to stream new tokens and check stop strings; without either,
a single segment runs to the end. The loop body has no data-dependent control flow (on GPUs each
`lax.cond` or inner loop makes the host wait for the device): the sampling mode (greedy, sampling,
sampling with top-k/top-p) is fixed per call from the rules, and attention reads the cache
without a loop.

Thinking budget (SPEC §5). A row that starts inside `<think>` counts its reasoning tokens; once
`budget` are spent without `</think>`, the closing text (".\n</think>\n\n" tokenised) is
force-fed — at once under the "hard" policy, or after the next token that ends a line under
"newline" (at most `grace` tokens later) — and the answer is sampled after it. A model that writes
`</think>` itself ends its thought as usual. `max_new_tokens` bounds everything.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from nemojax import sampling
from nemojax.cache import Cache
from nemojax.model import NemotronH

FINISH_REASONS = {0: None, 1: "stop", 2: "length"}


@struct.dataclass
class LoopState:
  cache: Cache
  last: jax.Array  # [b] token fed at the next step
  tokens: jax.Array  # [b, n] generated tokens
  count: jax.Array  # [b] tokens generated so far
  done: jax.Array  # [b] bool
  reason: jax.Array  # [b] 0 running, 1 stop token, 2 length
  step: jax.Array  # [] steps taken
  thinking: jax.Array  # [b] bool: inside an open thought
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
  key: jax.Array
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


@dataclasses.dataclass
class RowResult:
  tokens: list[int]
  finish_reason: str | None  # "stop" or "length"
  num_reasoning_tokens: int
  stop_string: str | None = None


def _decode_segment(graphdef, params, state: LoopState, cfg: LoopConfig, seg_end,
                    mode: str = "auto") -> LoopState:
  model = nnx.merge(graphdef, params)
  b, n = state.tokens.shape
  rows = jnp.arange(b)
  c = cfg.close_text.shape[0]

  def body(st: LoopState) -> LoopState:
    logits, cache = model(st.last[:, None], cache=st.cache)
    sampled = sampling.sample(logits[:, 0], cfg.key, st.step, cfg.temperature, cfg.top_k,
                              cfg.top_p, mode=mode)
    # Does the budget close the thought before this token?
    over = (st.thinking & (st.forcing < 0) & (cfg.budget >= 0)
            & (st.think_count >= cfg.budget))
    hard = cfg.grace < 0
    line_ended = cfg.newline[st.last] | (st.think_count >= cfg.budget + cfg.grace)
    forcing = jnp.where(over & (hard | line_ended), 0, st.forcing)
    forced = forcing >= 0
    tok = jnp.where(forced, cfg.close_text[jnp.clip(forcing, 0, c - 1)], sampled)

    active = ~st.done
    recent = jnp.concatenate([st.recent[:, 1:], tok[:, None]], axis=1)
    wrote_close = jnp.all(recent == cfg.close_marker[None, :], axis=-1)
    next_forcing = jnp.where(forced, forcing + 1, -1)
    force_done = forced & (next_forcing >= c)
    next_forcing = jnp.where(force_done, -1, next_forcing)
    thinking = st.thinking & ~wrote_close & ~force_done
    # Reasoning tokens: sampled inside the thought, the `</think>` pieces themselves excluded.
    m = cfg.close_marker.shape[0]
    think_count = (st.think_count + (st.thinking & ~forced).astype(jnp.int32)
                   - jnp.where(st.thinking & ~forced & wrote_close, m, 0))

    stop = ~forced & jnp.any(tok[:, None] == cfg.stop_ids[None, :], axis=-1)
    slot = jnp.minimum(st.count, n - 1)
    tokens = st.tokens.at[rows, slot].set(jnp.where(active, tok, st.tokens[rows, slot]))
    count = st.count + active.astype(jnp.int32)
    length = ~stop & (count >= cfg.max_new)
    reason = jnp.where(active & stop, 1, jnp.where(active & length, 2, st.reason))

    keep = lambda new, old: jnp.where(active.reshape((b,) + (1,) * (new.ndim - 1)), new, old)
    return LoopState(
        cache=cache, last=keep(tok, st.last), tokens=tokens, count=count,
        done=st.done | (active & (stop | length)), reason=reason, step=st.step + 1,
        thinking=keep(thinking, st.thinking), think_count=keep(think_count, st.think_count),
        forcing=keep(next_forcing, st.forcing), recent=keep(recent, st.recent))

  cond = lambda st: (st.step < seg_end) & ~jnp.all(st.done)
  return jax.lax.while_loop(cond, body, state)


def _prefill_chunk(graphdef, params, cache: Cache, ids: jax.Array) -> Cache:
  model = nnx.merge(graphdef, params)
  _, cache = model.hidden_states(ids, cache=cache)
  return cache


class _Structure:
  """The model's GraphDef as a static jit argument that hashes in O(1).

  jit hashes static arguments on every call; a GraphDef's hash walks the whole module tree
  (milliseconds for the 9B model, paid per prefill chunk and per decode segment). Handles are
  interned, so equal structures share one handle (and the compiled code) and compare by identity.
  """

  __slots__ = ("graphdef", "_hash")

  def __init__(self, graphdef):
    self.graphdef = graphdef
    self._hash = hash(graphdef)

  def __hash__(self):
    return self._hash

  def __eq__(self, other):
    return self is other


_STRUCTURES: dict = {}


def structure(graphdef) -> _Structure:
  """The interned static handle of a GraphDef (what `_prefill_jit` and `_decode_jit` take)."""
  handle = _STRUCTURES.get(graphdef)
  if handle is None:
    handle = _STRUCTURES[graphdef] = _Structure(graphdef)
  return handle


# Compiled once per (model structure, shapes) for the whole process: every Sampler of a model
# shares them, so `generate()` may build a Sampler per call without recompiling.
_prefill_jit = jax.jit(lambda s, *a: _prefill_chunk(s.graphdef, *a), static_argnums=0,
                       donate_argnums=(2,))
_decode_jit = jax.jit(lambda s, *a: _decode_segment(s.graphdef, *a), static_argnums=(0, 5),
                      donate_argnums=(2,))


def _next_pow2(x: int) -> int:
  return 1 << max(0, (x - 1).bit_length())


class Sampler:
  """Generates token ids for batches of prompts with one compiled prefill and decode per shape.

  Args:
    model: the model (its parameters are split out once and passed to jitted functions).
    cache_size: fixed number of cache positions (pads + prompt + new tokens). None: sized per
      call from the prompt bucket and `max_new_tokens` (rounded up so calls with similar sizes
      share compiled code).
    prefill_chunk: tokens per prefill call; bounds activation memory for long prompts.
    min_bucket: smallest prefill bucket.
  """

  def __init__(self, model: NemotronH, *, cache_size: int | None = None, prefill_chunk: int = 1024,
               min_bucket: int = 16):
    if prefill_chunk < 1 or prefill_chunk & (prefill_chunk - 1):
      raise ValueError(f"prefill_chunk must be a power of two, got {prefill_chunk}")
    self.model = model
    self.config = model.config
    self.cache_size = cache_size
    self.prefill_chunk = prefill_chunk
    self.min_bucket = min(min_bucket, prefill_chunk)
    self.graphdef, self.params = nnx.split(model)
    self.structure = structure(self.graphdef)

  @staticmethod
  def compiled_shapes() -> dict[str, int]:
    """How many programs the prefill and decode functions hold in this process (for tests)."""
    return {"prefill": _prefill_jit._cache_size(), "decode": _decode_jit._cache_size()}

  # ----------------------------------------------------------------------------------------------
  def prefill_bucket(self, prompt_len: int) -> int:
    """Prefilled columns for a prompt of `prompt_len` tokens (the last token is decoded)."""
    p = max(prompt_len - 1, 1)
    if p <= self.prefill_chunk:
      return max(_next_pow2(p), self.min_bucket)
    return -(-p // self.prefill_chunk) * self.prefill_chunk

  def _cache_len(self, bucket: int, max_new: int) -> int:
    need = bucket + max_new
    if self.cache_size is not None:
      return self.cache_size
    return -(-need // 256) * 256  # calls with similar sizes share compiled code

  def validate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> tuple[int, int]:
    """Checks a request before anything is compiled; returns (bucket, cache length)."""
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if len(prompts) == 0:
      raise ValueError("no prompts given")
    vocab = self.config.vocab_size
    for i, p in enumerate(prompts):
      if len(p) == 0:
        raise ValueError(f"prompt {i} is empty: at least one token is needed")
      arr = np.asarray(p)
      if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"prompt {i} must be a flat sequence of token ids")
      if arr.min() < 0 or arr.max() >= vocab:
        raise ValueError(f"prompt {i} has token ids outside [0, {vocab}): "
                         f"min {arr.min()}, max {arr.max()}")
    longest = max(len(p) for p in prompts)
    bucket = self.prefill_bucket(longest)
    cache_len = self._cache_len(bucket, int(max_new_tokens))
    if bucket + int(max_new_tokens) > cache_len:
      raise ValueError(
          f"prompt of {longest} tokens (padded to {bucket + 1}) plus max_new_tokens="
          f"{max_new_tokens} needs {bucket + int(max_new_tokens)} cache positions, but the cache "
          f"holds {cache_len}; shorten the prompt, lower max_new_tokens or raise cache_size")
    return bucket, cache_len

  # ----------------------------------------------------------------------------------------------
  def stream(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             sampling_params: sampling.SamplingParams | Sequence[sampling.SamplingParams] = (
                 sampling.SamplingParams()),
             seed: int = 0, stop_tokens: Sequence[int] = (),
             thinking: Sequence[bool] | bool = False,
             thinking_budget: Sequence[int | None] | int | None = None,
             budget_policy: str = "hard", budget_grace: int = 64,
             thinking_control: ThinkingControl | None = None,
             segment: int | None = None,
             should_stop: Callable[[int, list[int]], bool] | None = None,
             ) -> Iterator[tuple[list[list[int]], list[RowResult] | None]]:
    """Runs generation, yielding after every segment.

    Yields (new_tokens_per_row, None) while running and finally ([...], results). `should_stop`
    (row, tokens so far) -> bool lets the caller end a row between segments (stop strings).
    """
    b = len(prompts)
    bucket, cache_len = self.validate(prompts, max_new_tokens)
    if isinstance(thinking, bool):
      thinking = [thinking] * b
    if thinking_budget is None or isinstance(thinking_budget, (int, np.integer)):
      thinking_budget = [thinking_budget] * b
    if len(thinking) != b or len(thinking_budget) != b:
      raise ValueError(f"thinking and thinking_budget need one value per prompt ({b})")
    for i, budget in enumerate(thinking_budget):
      if budget is not None and budget < 0:
        raise ValueError(f"thinking_budget for prompt {i} must be None or >= 0, got {budget}")
    if budget_policy not in ("hard", "newline"):
      raise ValueError(f"budget_policy must be 'hard' or 'newline', got {budget_policy!r}")
    uses_budget = any(t and bud is not None for t, bud in zip(thinking, thinking_budget))
    if uses_budget and thinking_control is None:
      raise ValueError("a thinking budget needs thinking_control (the </think> and closing ids)")
    temperature, top_k, top_p = sampling.as_arrays(sampling_params, b)
    mode = sampling.mode_for(temperature, top_k, top_p)  # static: no lax.cond in the loop

    # Left-pad to bucket + 1 columns: every row's last prompt token sits in the last column.
    width = bucket + 1
    ids = np.zeros((b, width), np.int32)
    start = np.zeros((b,), np.int32)
    for i, p in enumerate(prompts):
      ids[i, width - len(p):] = np.asarray(p, np.int32)
      start[i] = width - len(p)

    n = _next_pow2(max(int(max_new_tokens), 16))
    control = thinking_control or ThinkingControl(close_marker=(-2,), close_text=(0,))
    newline = (control.newline_mask if control.newline_mask is not None
               else np.zeros((self.config.vocab_size,), bool))
    if newline.shape[0] < self.config.vocab_size:
      newline = np.pad(newline, (0, self.config.vocab_size - newline.shape[0]))
    stop_ids = np.full((max(8, _next_pow2(len(stop_tokens))),), -1, np.int32)
    stop_ids[:len(stop_tokens)] = np.asarray(stop_tokens, np.int32)
    cfg = LoopConfig(
        max_new=jnp.full((b,), int(max_new_tokens), jnp.int32),
        temperature=jnp.asarray(temperature), top_k=jnp.asarray(top_k), top_p=jnp.asarray(top_p),
        key=jax.random.key_data(jax.random.key(seed)),
        stop_ids=jnp.asarray(stop_ids),
        budget=jnp.asarray([-1 if (bud is None or not t) else bud
                            for t, bud in zip(thinking, thinking_budget)], jnp.int32),
        grace=jnp.full((b,), -1 if budget_policy == "hard" else budget_grace, jnp.int32),
        newline=jnp.asarray(newline[:self.config.vocab_size]),
        close_text=jnp.asarray(control.close_text, jnp.int32),
        close_marker=jnp.asarray(control.close_marker, jnp.int32))

    cache = self.model.init_cache(b, cache_len)
    cache = cache.replace(start=jnp.asarray(start))
    chunk = min(bucket, self.prefill_chunk)
    for lo in range(0, bucket, chunk):
      cache = _prefill_jit(self.structure, self.params, cache, jnp.asarray(ids[:, lo:lo + chunk]))

    state = LoopState(
        cache=cache, last=jnp.asarray(ids[:, -1]), tokens=jnp.zeros((b, n), jnp.int32),
        count=jnp.zeros((b,), jnp.int32), done=jnp.zeros((b,), bool),
        reason=jnp.zeros((b,), jnp.int32), step=jnp.zeros((), jnp.int32),
        thinking=jnp.asarray(thinking, bool), think_count=jnp.zeros((b,), jnp.int32),
        forcing=jnp.full((b,), -1, jnp.int32),
        recent=jnp.full((b, len(control.close_marker)), -1, jnp.int32))

    seg = int(max_new_tokens) if segment is None else max(1, int(segment))
    emitted = [0] * b
    stopped_early: dict[int, bool] = {}
    step = 0
    while True:
      step = min(step + seg, int(max_new_tokens))
      state = _decode_jit(self.structure, self.params, state, cfg, jnp.int32(step), mode)
      count, done, tokens = jax.device_get((state.count, state.done, state.tokens))
      new = [tokens[i, emitted[i]:count[i]].tolist() for i in range(b)]
      emitted = [int(c) for c in count]
      if should_stop is not None:
        for i in range(b):
          if not done[i] and should_stop(i, tokens[i, :count[i]].tolist()):
            stopped_early[i] = True
        if stopped_early:
          mask = np.zeros((b,), bool)
          mask[list(stopped_early)] = True
          done = done | mask
          state = state.replace(done=jnp.asarray(done),
                                reason=jnp.where(jnp.asarray(mask), 1, state.reason))
      if done.all() or step >= int(max_new_tokens):
        break
      yield new, None
    reason, think_count = jax.device_get((state.reason, state.think_count))
    results = [RowResult(tokens=tokens[i, :count[i]].tolist(),
                         finish_reason=FINISH_REASONS[int(reason[i])] or "length",
                         num_reasoning_tokens=int(think_count[i])) for i in range(b)]
    yield new, results

  def __call__(self, prompts: Sequence[Sequence[int]], **kw) -> list[RowResult]:
    """Generates for every prompt; see `stream` for the arguments."""
    results = None
    for _, results in self.stream(prompts, **kw):
      pass
    return results
