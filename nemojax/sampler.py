"""`Sampler`: batches of token-id prompts through the engine, with streaming and stop checks.

Layout of a batch. Prompts are left-padded to a common length `P + 1`, where P (the prefill
length) is rounded up to a bucket: a power of two up to the prefill chunk, then a multiple of it.
The first P columns are prefilled chunk by chunk (one compiled shape per bucket); the last column
holds every row's final prompt token, which the first decode step feeds. The cache has a fixed
size, so a new prompt length that falls in a compiled bucket reuses the compiled functions.

A call runs in four stages: the request (validated, padded, its memory estimated before anything
is compiled), the loop config (knobs as arrays), prefill, and decode segments. The host gets
control back after each segment to stream new tokens and check stop strings; without either, a
single segment runs to the end. See `engine.py` for the loop itself and the thinking budget.

Prefix cache (`prefix_cache=`, see `prefix_cache.py`). Row i (E = its prompt length − 1 prefilled
tokens, first token at column start_i = W − E) may resume from a snapshot after L tokens: the
snapshot is restored into row i when prefill reaches column start_i + L, and only the columns
after it matter for that row (what the row computed before is overwritten). A row holds no pad
between its tokens, so the Mamba states stay exact. Prefill runs from the first column any row
needs, stopping at every column where a row resumes or saves a snapshot (prefill-chunk multiples,
the prompt's end, points the caller asks for); between stops it runs the chunk, then pieces of
power-of-four lengths (`piece`), so a stop anywhere compiles at most six shapes (chunk 1024:
1024, 256, 64, 16, 4, 1) per cache length. Powers of two made that eleven: a 9B-shape chat's
first 16,875-token turn compiled every size from 1 to 1024 (H200, 2026-12-02: 141 s, compiles
included).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nemojax import engine, jit, memory, prefix_cache, sampling
from nemojax.compilation import Notifier
from nemojax.engine import DEFAULT_BUDGET_GRACE, FINISH_REASONS, ThinkingBudget, ThinkingControl
from nemojax.model import NemotronH
from nemojax.prefix_cache import PrefixCache

__all__ = ["PrefixCache", "RowResult", "Sampler", "ThinkingBudget", "ThinkingControl"]


# Greedy decoding unless a request says otherwise (SamplingParams is immutable).
DEFAULT_SAMPLING = sampling.SamplingParams()


@dataclasses.dataclass
class RowResult:
  """One row's tokens.

  Attributes:
    tokens: generated ids (a stop token included, as it was generated).
    finish_reason: "stop" or "length".
    num_reasoning_tokens: tokens generated inside the thought (forced text and `</think>`
      excluded).
    reasoning_counts: per token, the reasoning tokens counted up to and including it (to cut a
      row where a stop string ends it: `cut(k)`).
    cached_prompt_tokens: prompt tokens restored from the prefix cache (not prefilled).
  """

  tokens: list[int]
  finish_reason: str | None
  num_reasoning_tokens: int
  reasoning_counts: list[int] = dataclasses.field(default_factory=list, repr=False)
  cached_prompt_tokens: int = 0

  def cut(self, k: int) -> RowResult:
    """The row ended after its first `k` tokens (a stop string): tokens and count cut there."""
    k = min(k, len(self.tokens))
    count = self.reasoning_counts[k - 1] if 0 < k <= len(self.reasoning_counts) else 0
    return RowResult(self.tokens[:k], "stop", count, self.reasoning_counts[:k],
                     self.cached_prompt_tokens)


@dataclasses.dataclass
class Request:
  """A validated batch, laid out for the engine."""

  ids: np.ndarray  # [b, bucket + 1] left-padded prompts
  start: np.ndarray  # [b] first real column per row
  bucket: int  # prefilled columns (the decode column's index)
  cache_len: int
  max_new_tokens: int
  first: int = 0  # first column prefill runs (later when rows resume from saved states)
  prefill_len: int = 0  # cache positions during prefill (0: cache_len)
  resume: list = dataclasses.field(default_factory=list)  # per row: Snapshot or None
  saves: list = dataclasses.field(default_factory=list)  # per row: token counts to save at
  asked: list = dataclasses.field(default_factory=list)  # per row: those the caller asked for

  @property
  def batch_size(self) -> int:
    return self.ids.shape[0]


def piece(n: int, chunk: int) -> int:
  """Tokens the next prefill call takes when `n` remain before a stop: the chunk, or the largest
  power of four <= n (so at most six shapes with a chunk of 1024)."""
  if n >= chunk:
    return chunk
  return 1 << (2 * ((n.bit_length() - 1) // 2))


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def seeds_per_row(seed, n: int) -> list[int]:
  """One seed per row from an int or one int per prompt; a one-line ValueError otherwise."""
  seeds = list(seed) if isinstance(seed, (list, tuple, np.ndarray)) else [seed] * n
  if len(seeds) != n:
    raise ValueError(f"seed has {len(seeds)} values for {n} prompts")
  for s in seeds:
    if not _is_int(s) or not -2**63 <= s < 2**63:
      raise ValueError(f"seed must be an integer in [-2**63, 2**63) or one per prompt, "
                       f"got {s!r:.60}")
  return [int(s) for s in seeds]


def _as_prefix_cache(value) -> PrefixCache | None:
  if value is None or value is False or (_is_int(value) and value == 0):
    return None
  if value is True:
    return PrefixCache()
  if isinstance(value, PrefixCache):
    return value
  if _is_int(value) and value > 0:
    return PrefixCache(int(value))
  raise ValueError(f"prefix_cache must be a PrefixCache, a byte budget, True or None, got "
                   f"{value!r:.40}")


def _check_stream_args(stop_tokens, vocab: int, control, segment, should_stop) -> None:
  if (not isinstance(stop_tokens, (list, tuple, np.ndarray))
      or any(not _is_int(t) or not 0 <= t < vocab for t in stop_tokens)):
    raise ValueError(f"stop_tokens must be a list of token ids in [0, {vocab}), "
                     f"got {stop_tokens!r:.60}")
  if control is not None and not isinstance(control, ThinkingControl):
    raise ValueError(f"thinking_control must be a ThinkingControl or None, got {control!r:.60}")
  if segment is not None and (not _is_int(segment) or segment < 1):
    raise ValueError(f"segment must be None or an integer >= 1, got {segment!r:.40}")
  if should_stop is not None and not callable(should_stop):
    raise ValueError(f"should_stop must be a function (row, tokens) or None, got "
                     f"{should_stop!r:.40}")


class Sampler:
  """Generates token ids for batches of prompts with one compiled prefill and decode per shape.

  Args:
    model: the model (its parameters are split out once and passed to jitted functions).
    cache_size: fixed number of cache positions (pads + prompt + new tokens). None: sized per
      call from the prompt bucket and `max_new_tokens`, on the ladder of `engine.cache_ladder`
      (so calls with similar sizes share compiled code).
    prefill_chunk: tokens per prefill call; bounds activation memory for long prompts.
    min_bucket: smallest prefill bucket.
    prefix_cache: keep decode states of prompt prefixes for later calls: a `PrefixCache`, a byte
      budget, True (the default budget) or None / False / 0 (off).
    progress: True prints one line on stderr before a program compiles for the first time; a
      function receives the line instead.
  """

  def __init__(self, model: NemotronH, *, cache_size: int | None = None, prefill_chunk: int = 1024,
               min_bucket: int = 16, prefix_cache: PrefixCache | int | bool | None = None,
               progress=None):
    if not _is_int(prefill_chunk) or prefill_chunk < 1 or prefill_chunk & (prefill_chunk - 1):
      raise ValueError(f"prefill_chunk must be a power of two, got {prefill_chunk!r}")
    if cache_size is not None and (not _is_int(cache_size) or cache_size < 1):
      raise ValueError(f"cache_size must be None or an integer >= 1, got {cache_size!r}")
    if not _is_int(min_bucket) or min_bucket < 1:
      raise ValueError(f"min_bucket must be an integer >= 1, got {min_bucket!r}")
    if not isinstance(model, NemotronH):
      raise ValueError(f"model must be a nemojax.NemotronH, got {type(model).__name__}")
    self.model = model
    self.config = model.config
    self.cache_size = cache_size
    self.prefill_chunk = int(prefill_chunk)
    self.min_bucket = min(int(min_bucket), self.prefill_chunk)
    self.prefix_cache = _as_prefix_cache(prefix_cache)
    self.notifier = Notifier(progress)
    self.graph, self.params = jit.split(model)

  @staticmethod
  def compiled_shapes() -> dict[str, int]:
    """How many programs the prefill and decode functions hold in this process (for tests)."""
    return engine.compiled_shapes()

  # ----------------------------------------------------------------------------------------------
  def prefill_bucket(self, prompt_len: int) -> int:
    """Prefilled columns for a prompt of `prompt_len` tokens (the last token is decoded)."""
    p = max(prompt_len - 1, 1)
    if p <= self.prefill_chunk:
      return max(engine.next_pow2(p), self.min_bucket)
    return -(-p // self.prefill_chunk) * self.prefill_chunk

  def cache_len(self, bucket: int, max_new_tokens: int) -> int:
    """Cache positions for a request: `cache_size`, or the need on the cache ladder."""
    if self.cache_size is not None:
      return self.cache_size
    return engine.cache_ladder(bucket + max_new_tokens)

  def validate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> tuple[int, int]:
    """Checks a request before anything is compiled; returns (bucket, cache length)."""
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not isinstance(prompts, (list, tuple, np.ndarray)) or len(prompts) == 0:
      raise ValueError("prompts must be a non-empty list of token-id lists")
    vocab = self.config.vocab_size
    for i, p in enumerate(prompts):
      if not isinstance(p, (list, tuple, np.ndarray)) or len(p) == 0:
        raise ValueError(f"prompts[{i}] is empty or not a list: at least one token id is needed")
      if not all(_is_int(t) for t in (p.tolist() if isinstance(p, np.ndarray) else p)):
        raise ValueError(f"prompts[{i}] must be a flat sequence of integer token ids")
      lo, hi = min(p), max(p)
      if lo < 0 or hi >= vocab:
        raise ValueError(f"prompts[{i}] has token ids outside [0, {vocab}): min {lo}, max {hi}")
    longest = max(len(p) for p in prompts)
    bucket = self.prefill_bucket(longest)
    need = bucket + int(max_new_tokens)
    cache_len = self.cache_len(bucket, int(max_new_tokens))
    if need > cache_len:
      raise ValueError(
          f"prompt of {longest} tokens (padded to {bucket + 1}) plus max_new_tokens="
          f"{max_new_tokens} needs {need} cache positions, but cache_size is {cache_len}; "
          "shorten the prompt, lower max_new_tokens or raise cache_size")
    memory.check_fits(self.config, self.model.dtype, batch=len(prompts), cache_len=cache_len,
                      buffer_len=cache_len, chunk=min(bucket, self.prefill_chunk),
                      max_new_tokens=int(max_new_tokens),
                      cache_size_given=self.cache_size is not None)
    return bucket, cache_len

  def request(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
              save_at: Sequence[Sequence[int]] | None = None) -> Request:
    """Validates and left-pads a batch (every row's last prompt token in the last column), and
    finds where each row resumes and saves when there is a prefix cache."""
    bucket, cache_len = self.validate(prompts, max_new_tokens)
    b = len(prompts)
    if save_at is not None and (
        not isinstance(save_at, (list, tuple)) or len(save_at) != b
        or any(not isinstance(r, (list, tuple)) or not all(_is_int(x) for x in r)
               for r in save_at)):
      raise ValueError(f"save_at must be one list of token counts per prompt ({b}), got "
                       f"{save_at!r:.60}")
    width = bucket + 1
    ids = np.zeros((b, width), np.int32)
    start = np.zeros((b,), np.int32)
    for i, p in enumerate(prompts):
      ids[i, width - len(p):] = np.asarray(p, np.int32)
      start[i] = width - len(p)
    resume, saves, asked = [None] * b, [[] for _ in range(b)], [set() for _ in range(b)]
    remaining = max(len(p) - 1 for p in prompts)
    if self.prefix_cache is not None:
      every = self.prefix_cache.every or self.prefill_chunk
      for i, p in enumerate(prompts):
        end = len(p) - 1
        resume[i] = self.prefix_cache.lookup(p, end) if end > 0 else None
        have = resume[i].length if resume[i] is not None else 0
        asked[i] = {int(x) for x in (save_at[i] if save_at is not None else ())}
        saves[i] = sorted(n for n in {*range(every, end, every), end, *asked[i]}
                          if have < n <= end)
      remaining = max(len(p) - 1 - (r.length if r else 0) for p, r in zip(prompts, resume))
    first = bucket - self.prefill_bucket(remaining + 1) if remaining > 0 else bucket
    prefill_len = self.cache_size or engine.cache_ladder(bucket)
    return Request(ids=ids, start=start, bucket=bucket, cache_len=cache_len,
                   max_new_tokens=int(max_new_tokens), first=first, prefill_len=prefill_len,
                   resume=resume, saves=saves, asked=asked)

  def prefill(self, req: Request):
    """The cache after every prompt column but the last: chunk by chunk from `req.first`, rows
    resuming from and saving snapshots at their columns, then extended to `req.cache_len`."""
    b = req.batch_size
    cache = self.model.init_cache(b, req.prefill_len or req.cache_len)
    cache = cache.replace(start=jnp.asarray(req.start), pos=jnp.int32(req.first))
    stops: dict[int, list] = {}  # column -> [(row, snapshot to restore | token count to save)]
    for i in range(b):
      if req.resume and req.resume[i] is not None:
        stops.setdefault(int(req.start[i]) + req.resume[i].length, []).append((i, req.resume[i]))
      for n in (req.saves[i] if req.saves else ()):
        stops.setdefault(int(req.start[i]) + n, []).append((i, n))
    columns = sorted({req.first, req.bucket, *stops})
    for lo, hi in zip(columns, columns[1:] + [None]):
      cache = self._stop(cache, req, stops.get(lo, ()))
      while hi is not None and lo < hi:
        t = piece(hi - lo, self.prefill_chunk)
        chunk = jnp.asarray(req.ids[:, lo:lo + t])
        self.notifier.before("prefill", f"prefill for {b} x {t} tokens (cache "
                             f"{cache.max_len})", self.graph, cache, chunk)
        cache = engine.prefill(self.graph, self.params, cache, chunk)
        lo += t
    return engine.extend(cache, req.cache_len)

  def _stop(self, cache, req: Request, events):
    """Restores (snapshot) and saves (token count) rows' states at the current column."""
    for row, what in events:
      start = int(req.start[row])
      if isinstance(what, prefix_cache.Snapshot):
        cache = prefix_cache.restore(cache, row, start, what)
        continue
      tokens = req.ids[row, start:start + what]
      store = self.prefix_cache
      asked = bool(req.asked) and what in req.asked[row]
      if tokens in store:
        if asked:
          store.mark_requested(tokens)
        continue
      if store.victims(prefix_cache.snapshot_bytes(cache, what), asked) is None:
        continue  # too large, or would displace a snapshot a caller asked for
      store.put(tokens, prefix_cache.take(cache, row, start, what), requested=asked)
    return cache

  # ----------------------------------------------------------------------------------------------
  def stream(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             sampling_params: sampling.SamplingParams | Sequence[sampling.SamplingParams] = (
                 DEFAULT_SAMPLING),
             seed: int | Sequence[int] = 0, stop_tokens: Sequence[int] = (),
             reasoning_open: Sequence[bool] | bool = False,
             thinking_budget: ThinkingBudget | Sequence[int | None] | int | None = None,
             budget_policy: str = "hard", budget_grace: int = DEFAULT_BUDGET_GRACE,
             thinking_control: ThinkingControl | None = None,
             segment: int | None = None,
             should_stop: Callable[[int, list[int]], bool] | None = None,
             save_at: Sequence[Sequence[int]] | None = None,
             ) -> Iterator[tuple[list[list[int]], list[RowResult] | None]]:
    """Runs generation, yielding after every segment.

    Args:
      prompts: token-id lists.
      max_new_tokens: bound on generated tokens per row.
      sampling_params: one rule or one per row.
      seed: an int or one per row; a row's draws depend only on its seed and prompt.
      stop_tokens: ids that end a row (included in its tokens).
      reasoning_open: per row (or one for all): the prompt ends inside an open thought.
      thinking_budget, budget_policy, budget_grace: see `ThinkingBudget` (a ThinkingBudget
        passes through as it is).
      thinking_control: the `</think>` ids and closing text (needed by a budget).
      segment: decode steps between yields (None: one segment to the end).
      should_stop: `(row, tokens so far) -> bool`, lets the caller end a row between segments.
      save_at: per row, prompt token counts after which to save the state as well (with a
        prefix cache), e.g. where a chat's next prompt will stop sharing this one.
    Yields:
      (new_tokens_per_row, None) while running and finally (new_tokens_per_row, results).
    """
    req = self.request(prompts, max_new_tokens, save_at)
    b = req.batch_size
    seeds = seeds_per_row(seed, b)
    if isinstance(reasoning_open, (bool, np.bool_)):
      reasoning_open = [bool(reasoning_open)] * b
    if (not isinstance(reasoning_open, (list, tuple, np.ndarray)) or len(reasoning_open) != b
        or any(not isinstance(o, (bool, np.bool_)) for o in reasoning_open)):
      raise ValueError(f"reasoning_open must be a bool or one bool per prompt ({b}), "
                       f"got {reasoning_open!r:.60}")
    budget = ThinkingBudget.per_row(thinking_budget, b, budget_policy, budget_grace)
    if budget.needs_control(reasoning_open) and thinking_control is None:
      raise ValueError("thinking_budget needs thinking_control (the </think> and closing ids)")
    _check_stream_args(stop_tokens, self.config.vocab_size, thinking_control, segment,
                       should_stop)
    cfg, mode = engine.loop_config(
        vocab_size=self.config.vocab_size, max_new_tokens=req.max_new_tokens,
        sampling_params=sampling_params, seeds=seeds, stop_tokens=stop_tokens, budget=budget,
        reasoning_open=reasoning_open, control=thinking_control)
    state = engine.init_state(self.prefill(req), req.ids[:, -1],
                              max_new_tokens=req.max_new_tokens, reasoning_open=reasoning_open,
                              control=thinking_control, buffer=req.cache_len)
    cached = [r.length if r is not None else 0 for r in req.resume] if req.resume else [0] * b
    self.notifier.before("decode", f"decode loop for batch {b}, cache {req.cache_len} ({mode})",
                         self.graph, state, cfg, mode)
    yield from self._segments(state, cfg, mode, req.max_new_tokens,
                              segment or req.max_new_tokens, should_stop, cached)

  def _segments(self, state: engine.LoopState, cfg: engine.LoopConfig, mode: str,
                max_new_tokens: int, segment: int, should_stop, cached: list[int]):
    b = state.tokens.shape[0]
    emitted = [0] * b
    stopped = np.zeros((b,), bool)  # rows the caller ended
    until = 0
    while True:
      until = min(until + segment, max_new_tokens)
      state = engine.decode_segment(self.graph, self.params, state, cfg, jnp.int32(until), mode)
      count, done, tokens = jax.device_get((state.count, state.done, state.tokens))
      new = [tokens[i, emitted[i]:count[i]].tolist() for i in range(b)]
      emitted = [int(c) for c in count]
      if should_stop is not None:
        for i in range(b):
          if not done[i] and should_stop(i, tokens[i, :count[i]].tolist()):
            stopped[i] = True
        if stopped.any():
          done = done | stopped
          state = state.replace(done=jnp.asarray(done),
                                reason=jnp.where(jnp.asarray(stopped), 1, state.reason))
      if done.all() or until >= max_new_tokens:
        break
      yield new, None
    yield new, self._results(state, tokens, count, cached)

  @staticmethod
  def _results(state: engine.LoopState, tokens, count, cached: list[int]) -> list[RowResult]:
    reason, think_count, counts = jax.device_get(
        (state.reason, state.think_count, state.reasoning))
    return [RowResult(tokens=tokens[i, :count[i]].tolist(),
                      finish_reason=FINISH_REASONS[int(reason[i])] or "length",
                      num_reasoning_tokens=int(think_count[i]),
                      reasoning_counts=counts[i, :count[i]].tolist(),
                      cached_prompt_tokens=cached[i])
            for i in range(len(count))]

  def __call__(self, prompts: Sequence[Sequence[int]], **kw) -> list[RowResult]:
    """Generates for every prompt; see `stream` for the arguments."""
    events = collections.deque(self.stream(prompts, **kw), maxlen=1)  # the last holds the results
    return events[0][1]
