"""`nemojax.generate`: text in, `Generation`s out, with reasoning control and thinking budgets.

Prompts may be strings (one user message each, rendered with the chat template), chat message
lists, or token ids (used as they are). Reasoning is on by default, as in NVIDIA's template;
`thinking=False` (or `/no_think` in a message) turns it off, `thinking_budget=N` caps it per row
inside the jitted decode loop (see `sampler.py`). Defaults follow NVIDIA's recommendation:
temperature 0.6 and top-p 0.95 with reasoning on, greedy with it off; explicit arguments win.
"""

from __future__ import annotations

import dataclasses
from typing import Any
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from nemojax import sampling
from nemojax.compilation import Notifier
from nemojax.model import NemotronH
from nemojax.engine import DEFAULT_BUDGET_GRACE, ThinkingBudget
from nemojax.sampler import RowResult, Sampler, ThinkingControl
from nemojax.tokenizer import THINK_CLOSE, THINK_OPEN, Tokenizer

REASONING_DEFAULTS = sampling.SamplingParams(temperature=0.6, top_p=0.95)
ANSWER_DEFAULTS = sampling.SamplingParams()  # greedy


@dataclasses.dataclass
class Generation:
  """One row's output.

  Attributes:
    text: everything generated, decoded (the stop token or stop string excluded).
    tokens: generated token ids (a stop token included, as it was generated; with a stop
      string, through the token that completed it).
    reasoning: the thought before `</think>` (None when reasoning was off).
    answer: the text after `</think>` (all of `text` when reasoning was off).
    num_reasoning_tokens: tokens generated inside the thought (`</think>` and forced text
      excluded).
    finish_reason: "stop" (stop token or string) or "length" (max_new_tokens reached).
    cached_prompt_tokens: prompt tokens restored from the sampler's prefix cache instead of
      being prefilled (0 without a prefix cache).
  """

  text: str
  tokens: list[int]
  reasoning: str | None
  answer: str
  num_reasoning_tokens: int
  finish_reason: str
  cached_prompt_tokens: int = 0


def _is_messages(x) -> bool:
  return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(m, Mapping) for m in x)


def _is_ids(x) -> bool:
  return (isinstance(x, (list, tuple, np.ndarray))
          and all(isinstance(t, (int, np.integer)) for t in x))


def _normalize_prompts(prompts) -> list:
  """A single prompt or a batch, as a list of str | messages | ids."""
  if isinstance(prompts, str) or _is_messages(prompts):
    return [prompts]
  if isinstance(prompts, np.ndarray):
    return [list(map(int, row)) for row in (prompts[None] if prompts.ndim == 1 else prompts)]
  if _is_ids(prompts) and len(prompts) > 0:
    return [list(map(int, prompts))]
  if isinstance(prompts, (list, tuple)) and prompts:
    return list(prompts)
  raise ValueError("prompts must be a string, a chat (list of message dicts), a list of token "
                   f"ids, or a non-empty list of those; got {prompts!r:.60}")


def _per_row(value, n: int, name: str) -> list:
  if isinstance(value, (list, tuple)):
    if len(value) != n:
      raise ValueError(f"{name} has {len(value)} values for {n} prompts")
    return list(value)
  return [value] * n


def _split_reasoning(text: str, reasoning_open: bool) -> tuple[str | None, str]:
  if not reasoning_open:
    return None, text.strip()
  i = text.find(THINK_CLOSE)
  if i < 0:
    return text.strip(), ""
  return text[:i].strip(), text[i + len(THINK_CLOSE):].strip()


ROLES = ("system", "user", "assistant", "tool")


def _check_messages(i: int, messages: Sequence[Mapping]) -> None:
  for j, m in enumerate(messages):
    if m.get("role") not in ROLES:
      raise ValueError(f"prompts[{i}][{j}]: role must be one of {', '.join(ROLES)}, "
                       f"got {m.get('role')!r:.40}")
    if not isinstance(m.get("content"), str):
      raise ValueError(f"prompts[{i}][{j}]: content must be a string, got "
                       f"{type(m.get('content')).__name__}")


def _encode_prompts(prompts, tokenizer, thinking, budgets, vocab_size: int):
  """(ids, reasoning-open flags) per row."""
  ids, opens = [], []
  for i, (p, think, budget) in enumerate(zip(prompts, thinking, budgets)):
    if isinstance(p, str) or _is_messages(p):
      if tokenizer is None:
        raise ValueError(f"prompts[{i}] is text: pass tokenizer= to render and encode it")
      messages = [{"role": "user", "content": p}] if isinstance(p, str) else list(p)
      _check_messages(i, messages)
      if budget == 0:
        think = False  # a zero budget is reasoning off: nothing to close
      opens.append(tokenizer.reasoning_enabled(messages, think))
      ids.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                               thinking=think, tokenize=True))
    elif _is_ids(p) and len(p) > 0:
      row = [int(t) for t in p]
      if min(row) < 0 or max(row) >= vocab_size:
        raise ValueError(f"prompts[{i}] has token ids outside [0, {vocab_size}): "
                         f"min {min(row)}, max {max(row)}")
      tail = tokenizer.decode(row[-8:]) if tokenizer is not None else ""
      opens.append(tail.rstrip().endswith(THINK_OPEN))
      ids.append(row)
    else:
      raise ValueError(f"prompts[{i}] must be a non-empty string, chat or list of token ids, "
                       f"got {p!r:.80}")
  return ids, opens


def _sampling_rules(opens, temperature, top_p, top_k) -> list[sampling.SamplingParams]:
  """Per row: NVIDIA's defaults for reasoning on / off, overridden by explicit arguments."""
  rules = []
  for open_ in opens:
    base = REASONING_DEFAULTS if open_ else ANSWER_DEFAULTS
    rules.append(sampling.SamplingParams(
        temperature=base.temperature if temperature is None else temperature,
        top_k=base.top_k if top_k is None else top_k,
        top_p=base.top_p if top_p is None else top_p))
  return rules


def _stop_strings(stop) -> list[str]:
  stops = [stop] if isinstance(stop, str) else stop
  if stops is None:
    return []
  if not isinstance(stops, (list, tuple)) or any(not isinstance(s, str) or not s for s in stops):
    raise ValueError(f"stop must be a non-empty string or a list of them, got {stop!r:.80}")
  return list(stops)


def _stop_token_ids(stop_tokens, tokenizer, model) -> list[int]:
  if stop_tokens is None:
    return sorted(set(tokenizer.eos_ids if tokenizer is not None else model.config.eos_token_ids))
  vocab = model.config.vocab_size
  if (not isinstance(stop_tokens, (list, tuple, np.ndarray))
      or any(not _is_int(t) or not 0 <= t < vocab for t in stop_tokens)):
    raise ValueError(f"stop_tokens must be a list of token ids in [0, {vocab}), "
                     f"got {stop_tokens!r:.80}")
  return sorted(set(int(t) for t in stop_tokens))


def _thinking_control(tokenizer, model, opens, budget: ThinkingBudget) -> ThinkingControl | None:
  """The `</think>` data when any row reasons (it also counts reasoning tokens without a budget)."""
  if tokenizer is None:
    if budget.needs_control(opens):
      raise ValueError("thinking_budget needs tokenizer= (to know the </think> tokens)")
    return None
  if not any(opens):
    return None
  return ThinkingControl(
      close_marker=tuple(tokenizer.think_tokens().close),
      close_text=tuple(tokenizer.budget_close_ids()),
      newline_mask=(tokenizer.newline_token_mask(model.config.vocab_size)
                    if budget.policy == "newline" else None))


def _check_types(model, tokenizer, sampler, stream) -> None:
  if not isinstance(model, NemotronH):
    raise ValueError(f"model must be a nemojax.NemotronH, got {type(model).__name__}")
  if tokenizer is not None and not isinstance(tokenizer, Tokenizer):
    raise ValueError(f"tokenizer must be a nemojax.Tokenizer or None, got "
                     f"{type(tokenizer).__name__}")
  if sampler is not None and (not isinstance(sampler, Sampler) or sampler.model is not model):
    raise ValueError("sampler must be None or a nemojax.Sampler built for this model")
  if stream is not None and not callable(stream):
    raise ValueError(f"stream must be a function (row, text_delta) or None, got {stream!r:.40}")


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def generate(model: NemotronH, prompts, *, tokenizer: Tokenizer | None = None,
             max_new_tokens: int = 256, temperature: float | None = None,
             top_p: float | None = None, top_k: int | None = None,
             seed: int | Sequence[int] = 0,
             thinking: bool | None | Sequence[bool | None] = None,
             thinking_budget: int | None | Sequence[int | None] = None,
             budget_policy: str = "hard", budget_grace: int = DEFAULT_BUDGET_GRACE,
             stop: str | Sequence[str] | None = None,
             stop_tokens: Sequence[int] | None = None,
             stream: Callable[[int, str], Any] | None = None,
             cache_size: int | None = None, prefill_chunk: int = 1024,
             sampler: Sampler | None = None,
             progress: bool | Callable[[str], Any] | None = None) -> list[Generation]:
  """Generates a completion for each prompt.

  Args:
    model: a `NemotronH` (e.g. from `nemojax.load`).
    prompts: a string, a chat (list of {"role", "content"} dicts), token ids, or a list of those.
    tokenizer: needed for text prompts and for decoding (`nemojax.Tokenizer`).
    max_new_tokens: bound on generated tokens per row (reasoning, forced text and answer).
    temperature, top_p, top_k: sampling; None takes NVIDIA's defaults per row (0.6 / 0.95 with
      reasoning on, greedy with it off).
    seed: an int, or one int per prompt; a row's samples depend only on its own seed and prompt
      (not on its position in the batch): pass different seeds for different samples of one
      prompt.
    thinking: True / False switches reasoning on / off (inserting /think or /no_think); None
      leaves it to the messages (on unless they say /no_think). One value or one per prompt.
    thinking_budget: max reasoning tokens (None = unlimited; 0 = reasoning off). One or per row.
    budget_policy: "hard" closes the thought at the budget; "newline" waits for the end of the
      line, at most `budget_grace` tokens longer.
    stop: stop strings (the text is cut before them; `tokens` and `num_reasoning_tokens` end
      with the token that completed the stop string).
    stop_tokens: stop token ids (default: the tokenizer's end-of-turn and end-of-text ids).
    stream: `fn(row, text_delta)` called as text is produced; the deltas of a row concatenate
      to its final `text`.
    cache_size, prefill_chunk: passed to the `Sampler` (cache positions; prefill chunk length).
    sampler: reuse a configured `Sampler` instead (its prefix cache, if any, is kept across
      calls: prompts that start like earlier ones resume from saved states).
    progress: True prints one line on stderr before a program compiles for the first time
      (compiling takes seconds); a function receives the line instead.
  Returns:
    One `Generation` per prompt, in order.
  Raises:
    ValueError / TypeError: a bad argument (the message names it), or a request whose cache
      would not fit in device memory; raised before anything is compiled.
  """
  return _generate(model, prompts, tokenizer=tokenizer, max_new_tokens=max_new_tokens,
                   temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                   thinking=thinking, thinking_budget=thinking_budget,
                   budget_policy=budget_policy, budget_grace=budget_grace, stop=stop,
                   stop_tokens=stop_tokens, stream=stream, cache_size=cache_size,
                   prefill_chunk=prefill_chunk, sampler=sampler, progress=progress)


def _generate(model, prompts, *, tokenizer, max_new_tokens, temperature, top_p, top_k, seed,
              thinking, thinking_budget, budget_policy, budget_grace, stop, stop_tokens, stream,
              cache_size, prefill_chunk, sampler, progress, save_at=None) -> list[Generation]:
  """`generate`, plus `save_at` (per row, prompt token counts to save states at)."""
  _check_types(model, tokenizer, sampler, stream)
  rows = _normalize_prompts(prompts)
  n = len(rows)
  think_flags = _per_row(thinking, n, "thinking")
  for f in think_flags:
    if f is not None and not isinstance(f, (bool, np.bool_)):
      raise ValueError(f"thinking must be True, False or None (or one per prompt), got {f!r:.40}")
  budget = ThinkingBudget.per_row(thinking_budget, n, budget_policy, budget_grace)
  ids, opens = _encode_prompts(rows, tokenizer, think_flags, budget.tokens,
                               model.config.vocab_size)
  rules = _sampling_rules(opens, temperature, top_p, top_k)
  stops = _stop_strings(stop)
  stop_ids = _stop_token_ids(stop_tokens, tokenizer, model)
  control = _thinking_control(tokenizer, model, opens, budget)

  sampler = sampler or Sampler(model, cache_size=cache_size, prefill_chunk=prefill_chunk)
  notifier = sampler.notifier
  if progress is not None:  # this call's choice; the sampler's own is back afterwards
    sampler.notifier = Notifier(progress)
  texts = (_TextTracker(tokenizer, n, set(stop_ids), stops, stream) if tokenizer is not None
           else None)
  results: list[RowResult] | None = None
  try:
    for new, results in sampler.stream(
        ids, max_new_tokens=max_new_tokens, sampling_params=rules, seed=seed,
        stop_tokens=stop_ids, reasoning_open=opens, thinking_budget=budget,
        thinking_control=control, segment=16 if (stream is not None or stops) else None,
        should_stop=texts.hit_stop_string if (texts is not None and stops) else None,
        save_at=save_at):
      if texts is not None:
        texts.update(new, final=results is not None)
  finally:
    sampler.notifier = notifier
  return [_generation(r, texts, i, opens[i]) for i, r in enumerate(results)]


def _generation(r: RowResult, texts: _TextTracker | None, i: int, reasoning_open: bool):
  if texts is None:
    return Generation(text="", tokens=r.tokens, reasoning=None, answer="",
                      num_reasoning_tokens=r.num_reasoning_tokens, finish_reason=r.finish_reason,
                      cached_prompt_tokens=r.cached_prompt_tokens)
  if texts.stopped[i]:  # a stop string: the row ends with the token that completed it
    r = r.cut(texts.stop_token_count[i])
  text = texts.final_text(i)
  reasoning, answer = _split_reasoning(text, reasoning_open)
  return Generation(text=text, tokens=r.tokens, reasoning=reasoning, answer=answer,
                    num_reasoning_tokens=r.num_reasoning_tokens, finish_reason=r.finish_reason,
                    cached_prompt_tokens=r.cached_prompt_tokens)


class _TextTracker:
  """Incremental text per row: streaming deltas, stop strings, and the final text."""

  def __init__(self, tokenizer: Tokenizer, n: int, stop_tokens: set[int], stops: list[str],
               callback):
    self.streams = [tokenizer.decode_stream() for _ in range(n)]
    self.text = [""] * n
    self.emitted = [0] * n
    self.seen = [0] * n  # tokens fed to the text so far
    self.cum = [0] * n  # tokens the sampler has reported through `update`
    self.stopped = [False] * n
    self.fed = [0] * n  # tokens turned into text (or ending it)
    self.stop_token_count = [0] * n  # tokens up to the one that completed a stop string
    self.ended = [False] * n  # a stop token was generated: nothing after it is text
    self.stop_tokens = stop_tokens
    self.stops = stops
    self.hold = max((len(s) for s in stops), default=1) - 1
    self.callback = callback

  def _feed(self, i: int, tokens: list[int]) -> None:
    for t in tokens:
      if self.ended[i] or self.stopped[i]:
        return
      self.fed[i] += 1
      if t in self.stop_tokens:
        self.ended[i] = True
        return
      self.text[i] += self.streams[i].step(t)
      self._cut_at_stop(i)

  def _cut_at_stop(self, i: int) -> None:
    hits = [j for j in (self.text[i].find(s) for s in self.stops) if j >= 0]
    if hits:
      self.text[i] = self.text[i][:min(hits)]
      self.stopped[i] = True
      self.stop_token_count[i] = self.fed[i]

  def hit_stop_string(self, row: int, tokens: list[int]) -> bool:
    """The sampler's between-segments check: feeds the row's newest tokens, reports a hit."""
    self._feed(row, tokens[self.seen[row]:])
    self.seen[row] = max(self.seen[row], len(tokens))
    return self.stopped[row]

  def update(self, new: list[list[int]], final: bool) -> None:
    for i, toks in enumerate(new):
      skip = self.seen[i] - self.cum[i]  # already fed by hit_stop_string
      self._feed(i, toks[skip:])
      self.cum[i] += len(toks)
      self.seen[i] = max(self.seen[i], self.cum[i])
      if final and not (self.ended[i] or self.stopped[i]):
        self.text[i] += self.streams[i].finish()
        self._cut_at_stop(i)
      safe = len(self.text[i]) if (final or self.stopped[i] or self.ended[i]) \
          else max(self.emitted[i], len(self.text[i]) - self.hold)
      if self.callback is not None and safe > self.emitted[i]:
        self.callback(i, self.text[i][self.emitted[i]:safe])
      self.emitted[i] = max(self.emitted[i], safe)

  def final_text(self, i: int) -> str:
    return self.text[i]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
  n = min(len(a), len(b))
  return next((i for i in range(n) if a[i] != b[i]), n)


class ChatSession:
  """A multi-turn chat that reuses the decode state of its history from turn to turn.

  Each `send` renders the whole history with the chat template and generates on it, exactly as
  `generate(model, history)` would, but the prompt resumes from the state saved at the end of
  the part the previous turn's prompt shares with it. NVIDIA's template re-renders an earlier
  assistant turn without the `<think>` that ended the previous prompt (and without its
  reasoning), so the previous prompt is shared only up to its generation-prompt suffix: that is
  where the state is saved (found by rendering the history with a stand-in reply and next turn).

  Args:
    model: the model.
    tokenizer: its `Tokenizer` (the chat template renders the history).
    system: an optional system message, kept by `reset`.
    sampler: a `Sampler` for this model; None: one with a prefix cache (`prefix_cache`).
    prefix_cache: the byte budget of the default sampler's saved states (True: the default).
    **defaults: `generate` arguments for every turn (a `send` may override them).
  """

  def __init__(self, model: NemotronH, *, tokenizer: Tokenizer, system: str | None = None,
               sampler: Sampler | None = None, prefix_cache: int | bool = True, **defaults):
    _check_types(model, tokenizer, sampler, None)
    if not isinstance(tokenizer, Tokenizer):
      raise ValueError("ChatSession needs tokenizer= (a nemojax.Tokenizer)")
    if system is not None and not isinstance(system, str):
      raise ValueError(f"system must be a string or None, got {type(system).__name__}")
    self.model = model
    self.tokenizer = tokenizer
    self.system = system
    self.sampler = sampler or Sampler(model, prefix_cache=prefix_cache,
                                      cache_size=defaults.pop("cache_size", None),
                                      prefill_chunk=defaults.pop("prefill_chunk", 1024))
    self.defaults = defaults
    self._history: list[dict] = []
    self.reset()

  @property
  def history(self) -> list[dict]:
    """The messages so far (a copy): system, then user and assistant turns."""
    return [dict(m) for m in self._history]

  def reset(self) -> None:
    """Forgets the turns (the system message stays; saved states stay valid for reuse)."""
    self._history = [{"role": "system", "content": self.system}] if self.system else []

  def _save_point(self, messages: list[dict], thinking) -> int:
    """Tokens this prompt shares with the next turn's (where the state is worth saving)."""
    render = lambda msgs: self.tokenizer.apply_chat_template(
        msgs, add_generation_prompt=True, thinking=thinking, tokenize=True)
    stand_in = [{"role": "assistant", "content": "X"}, {"role": "user", "content": "Y"}]
    return _common_prefix(render(messages), render(messages + stand_in))

  def send(self, message: str, **kwargs) -> Generation:
    """Adds a user message, generates the reply and adds it to the history.

    Args:
      message: the user's text.
      **kwargs: `generate` arguments for this turn (over the session's defaults).
    Returns:
      The reply's `Generation`; its `cached_prompt_tokens` counts the history not prefilled.
    """
    if not isinstance(message, str):
      raise ValueError(f"message must be a string, got {type(message).__name__}")
    for name in ("sampler", "tokenizer", "cache_size", "prefill_chunk"):
      if name in kwargs:
        raise ValueError(f"ChatSession.send: {name} is fixed by the session")
    kw = {**self.defaults, **kwargs}
    messages = self._history + [{"role": "user", "content": message}]
    thinking = False if kw.get("thinking_budget") == 0 else kw.get("thinking")
    save = self._save_point(messages, thinking)
    args = dict(max_new_tokens=256, temperature=None, top_p=None, top_k=None, seed=0,
                thinking=None, thinking_budget=None, budget_policy="hard",
                budget_grace=DEFAULT_BUDGET_GRACE, stop=None, stop_tokens=None, stream=None,
                progress=None)
    unknown = set(kw) - set(args)
    if unknown:
      raise ValueError(f"ChatSession.send: unknown argument(s) {', '.join(sorted(unknown))}")
    args.update(kw)
    gen = _generate(self.model, [messages], tokenizer=self.tokenizer, cache_size=None,
                    prefill_chunk=self.sampler.prefill_chunk, sampler=self.sampler,
                    save_at=[[save]], **args)[0]
    # The template drops earlier reasoning itself (it keeps what follows `</think>`).
    self._history = messages + [{"role": "assistant", "content": gen.text}]
    return gen
