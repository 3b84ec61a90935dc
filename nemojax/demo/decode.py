"""Asking the demo model its problems, through `nemojax.generate` (greedy, per-row budgets).

Thinking budget, per row (SPEC section 5, NVIDIA's client rule, the sampler's "hard" policy): a
row whose prompt opened a thought may write `budget` reasoning tokens; if it has not closed the
thought by then, ``".\\n</think>\\n\\n"`` is force-fed and greedy decoding goes on with the answer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from nemojax.demo.data import TokenizedTask
from nemojax.demo.task import Problem, parse_answer
from nemojax.generate import generate
from nemojax.model import NemotronH
from nemojax.tokenizer import Tokenizer

__all__ = ["Answer", "answer"]


@dataclasses.dataclass(frozen=True)
class Answer:
  """One decoded reply.

  Attributes:
    text: Everything generated (forced budget text included), special tokens kept.
    reasoning: The text before ``</think>`` ("" when thinking was off).
    reply: The text after ``</think>`` (all of `text` when thinking was off), end token removed.
    digit: The last digit stated in `reply`, or None when it states none.
    num_reasoning_tokens: Tokens written before ``</think>`` (forced ones excluded).
    tokens: The generated ids, up to and including the end token.
  """

  text: str
  reasoning: str
  reply: str
  digit: int | None
  num_reasoning_tokens: int
  tokens: tuple[int, ...]


def answer(model: NemotronH, tokenizer: Tokenizer, problems: Sequence[Problem], thinking: bool,
           budget: int | None = None, max_new_tokens: int = 96,
           history: Sequence[Sequence[Problem]] | None = None) -> list[Answer]:
  """Asks the model each problem (greedy) and reads its stated last digit.

  Args:
    model: The demo model (or any model trained on the demo task).
    tokenizer: Its tokenizer.
    problems: The problems, asked in one batch.
    thinking: Reasoning on (prompt ends ``<think>\\n``) or off (``<think></think>``).
    budget: Thinking budget in tokens (None: unlimited); ignored when `thinking` is False.
    max_new_tokens: Generation limit per problem.
    history: Per problem, problems asked and answered in earlier turns of the conversation.

  Returns:
    One `Answer` per problem.
  """
  task = TokenizedTask(tokenizer)
  history = history if history is not None else [()] * len(problems)
  prompts = [task.prompt_ids(p, thinking, history=h) for p, h in zip(problems, history)]
  gens = generate(model, prompts, tokenizer=tokenizer, max_new_tokens=max_new_tokens,
                  temperature=0.0, thinking_budget=budget if thinking else None)
  results = []
  for g in gens:
    reasoning = g.reasoning if g.reasoning is not None else ""
    results.append(Answer(text=tokenizer.decode(g.tokens), reasoning=reasoning,
                          reply=g.answer, digit=parse_answer(g.answer),
                          num_reasoning_tokens=g.num_reasoning_tokens, tokens=tuple(g.tokens)))
  return results
