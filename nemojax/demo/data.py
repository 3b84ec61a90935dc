"""Chat transcripts of the demo task in Nemotron's format, their tokenizer, and training batches.

A training example is the prompt exactly as inference renders it (the chat template with
``add_generation_prompt=True``) followed by the assistant's completion, tokenized separately and
concatenated, so the model is trained on the very token sequences it is later given and asked for:

  thinking on   prompt …<SPECIAL_11>Assistant\\n<think>\\n
                completion {trace}</think>\\n\\n{answer}\\n<SPECIAL_12>
  thinking off  prompt …<SPECIAL_11>Assistant\\n<think></think>
                completion {answer}\\n<SPECIAL_12>
  budget b      prompt as thinking on
                completion {first b tokens of the trace}.\\n</think>\\n\\n{answer}\\n<SPECIAL_12>

``\\n<SPECIAL_12>`` is what the template writes after an assistant turn, and the text after
``</think>`` is what it keeps of one, so a finished reply renders back into later turns unchanged;
some transcripts are second questions after such an answered turn (``turns=2``), so the model
also answers in a multi-turn chat.

The budget form is NVIDIA's forced close (``.\\n</think>\\n\\n``, appended by the client when the
budget runs out, SPEC section 5): the loss skips those forced tokens (the model never has to write
them) but trains the answer after them, so a cut-off model still gives its best guess.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from nemojax.chat_template import END_OF_TURN, THINK_CLOSE
from nemojax.demo.bpe import build_tokenizer
from nemojax.demo.task import MAX_OPERANDS, Problem, sample_problem
from nemojax.tokenizer import Tokenizer

__all__ = [
    "MODES", "Encoded", "TokenizedTask", "build_demo_tokenizer", "make_batch", "messages_for",
]

# Thinking on, thinking off, thinking cut by a budget.
MODES = ("think", "no_think", "budget")
DEFAULT_MIX = (0.5, 0.25, 0.25)

# The tokenizer is trained on digit-free text only: BPE then has no merge that involves a digit,
# so every digit is one token whatever surrounds it (" 7" is "Ġ" + "7", "56" is "5" + "6").
_CORPUS_LINES = (
    "System", "User", "Assistant", "What is the last digit of", "The last digit is",
    " × ", " + ", " = ", "?", ".", "\n", "\n\n", "/think", "/no_think",
)
TOKENIZER_VOCAB_SIZE = 320


def build_demo_tokenizer(out_dir: str | Path) -> Tokenizer:
  """Builds the demo's tokenizer (Nemotron special tokens, byte-level BPE, one token per digit)."""
  corpus = [line for line in _CORPUS_LINES for _ in range(64)]
  tok = build_tokenizer(corpus, TOKENIZER_VOCAB_SIZE, out_dir, think_as_special=True)
  for d in "0123456789":
    if tok.encode(f" {d}{d}") != tok.encode(" ") + tok.encode(d) * 2:
      raise RuntimeError(f"demo tokenizer merged a digit: {d!r}")
  return tok


def messages_for(problem: Problem, thinking: bool, variant: int = 0,
                 history: Sequence[Problem] = ()) -> list[dict[str, str]]:
  """The conversation asking `problem`, with the reasoning switch written in one of three ways.

  variant 0: the marker in a system message; 1: appended to the last user message; 2: no marker
  (the template's default, reasoning on) when `thinking`, else in the system message. All render
  the same prompt (the template removes markers), which is the point: users write them anywhere.
  `history` problems come first as earlier turns, answered with their trace and answer (the
  template keeps only the answer of an earlier turn).
  """
  marker = "/think" if thinking else "/no_think"
  turns: list[dict[str, str]] = []
  for earlier in history:
    turns.append({"role": "user", "content": earlier.question})
    turns.append({"role": "assistant", "content": f"<think>\n{earlier.reasoning}</think>\n\n"
                                                  f"{earlier.answer_text}"})
  if variant == 1:
    return turns + [{"role": "user", "content": f"{problem.question} {marker}"}]
  turns.append({"role": "user", "content": problem.question})
  if variant == 2 and thinking:
    return turns
  return [{"role": "system", "content": marker}] + turns


@dataclasses.dataclass(frozen=True)
class Encoded:
  """One tokenized transcript: ids and the loss mask (1 on tokens the model must produce)."""

  ids: list[int]
  mask: list[int]
  prompt_len: int


class TokenizedTask:
  """Renders and tokenizes demo transcripts with one tokenizer, caching the fixed pieces."""

  def __init__(self, tokenizer: Tokenizer):
    self.tokenizer = tokenizer
    tok = tokenizer
    self.end_of_turn = tok.token_to_id(END_OF_TURN)
    self.think_close = tok.token_to_id(THINK_CLOSE)
    if self.end_of_turn is None or self.think_close is None:
      raise ValueError(f"{tok!r} lacks {END_OF_TURN} or {THINK_CLOSE} as single tokens")
    self.close_after_trace = tok.encode(f"{THINK_CLOSE}\n\n")
    self.budget_close = list(tok.budget_close_ids())
    self.pad_id = tok.pad_id

  def prompt_ids(self, problem: Problem, thinking: bool, variant: int = 0,
                 history: Sequence[Problem] = ()) -> list[int]:
    """The rendered generation prompt, ending in ``<think>\\n`` or ``<think></think>``."""
    return self.tokenizer.apply_chat_template(messages_for(problem, thinking, variant, history),
                                              add_generation_prompt=True, tokenize=True)

  def trace_ids(self, problem: Problem) -> list[int]:
    return self.tokenizer.encode(problem.reasoning)

  def answer_ids(self, problem: Problem) -> list[int]:
    return self.tokenizer.encode(problem.answer_text + "\n") + [self.end_of_turn]

  def encode(self, problem: Problem, mode: str, budget: int | None = None,
             variant: int = 0, history: Sequence[Problem] = ()) -> Encoded:
    """Prompt + completion ids of one transcript and its loss mask.

    Args:
      problem: The problem.
      mode: ``"think"``, ``"no_think"`` or ``"budget"`` (see the module docstring).
      budget: Reasoning tokens kept in ``"budget"`` mode (0 ... len(trace) - 1).
      variant: How the conversation writes the reasoning switch (`messages_for`).
      history: Problems asked and answered in earlier turns.
    """
    if mode not in MODES:
      raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    prompt = self.prompt_ids(problem, mode != "no_think", variant, history)
    answer = self.answer_ids(problem)
    if mode == "no_think":
      pieces = [(answer, 1)]
    elif mode == "think":
      pieces = [(self.trace_ids(problem), 1), (self.close_after_trace, 1), (answer, 1)]
    else:
      trace = self.trace_ids(problem)
      if budget is None or not 0 <= budget < len(trace):
        raise ValueError(f"budget must be in [0, {len(trace)}) for this trace, got {budget}")
      pieces = [(trace[:budget], 1), (self.budget_close, 0), (answer, 1)]
    ids, mask = list(prompt), [0] * len(prompt)
    for piece, weight in pieces:
      ids += piece
      mask += [weight] * len(piece)
    return Encoded(ids=ids, mask=mask, prompt_len=len(prompt))

  def sample(self, rng: np.random.Generator, mix: Sequence[float] = DEFAULT_MIX,
             turns: int = 1) -> Encoded:
    """A random training transcript: a training-split problem in a random mode and variant.

    With ``turns=2`` the problem is the second question of a conversation whose first question
    (another problem) was already answered.
    """
    history = tuple(sample_problem(rng) for _ in range(turns - 1))
    problem = sample_problem(rng)
    mode = MODES[int(rng.choice(len(MODES), p=np.asarray(mix) / np.sum(mix)))]
    budget = None
    if mode == "budget":
      budget = int(rng.integers(0, len(self.trace_ids(problem))))
    return self.encode(problem, mode, budget, variant=int(rng.integers(0, 3)), history=history)

  def max_length(self, turns: int = 1) -> int:
    """The longest transcript `sample` can produce: the longest chains, every result two digits
    (9 + 9 = 18, 8 + 9 = 17, ...), cut one token before the end of the trace."""
    worst = Problem("+", (9,) * MAX_OPERANDS)
    history = (worst,) * (turns - 1)
    cut = len(self.trace_ids(worst)) - 1
    return max(len(self.encode(worst, "think", history=history).ids),
               len(self.encode(worst, "budget", budget=cut, history=history).ids))


def make_batch(task: TokenizedTask, rng: np.random.Generator, batch_size: int, seq_len: int,
               mix: Sequence[float] = DEFAULT_MIX, turns: int = 1) -> dict[str, np.ndarray]:
  """A right-padded batch ``{"tokens": int32 [b, seq_len], "mask": float32 [b, seq_len]}``.

  Args:
    task: Renders and tokenizes the transcripts.
    rng: Draws the problems, modes and budgets.
    batch_size: Transcripts in the batch.
    seq_len: Padded length; at least ``task.max_length(turns)``.
    mix: Odds of thinking on, off and cut by a budget.
    turns: 1, or 2 for second questions after an answered first one (`TokenizedTask.sample`).
  """
  tokens = np.full((batch_size, seq_len), task.pad_id, np.int32)
  mask = np.zeros((batch_size, seq_len), np.float32)
  for i in range(batch_size):
    ex = task.sample(rng, mix, turns)
    if len(ex.ids) > seq_len:
      raise ValueError(f"transcript of {len(ex.ids)} tokens does not fit seq_len={seq_len}")
    tokens[i, :len(ex.ids)] = ex.ids
    mask[i, :len(ex.mask)] = ex.mask
  return {"tokens": tokens, "mask": mask}
