"""The demo task: the last digit of a chain of single-digit products or sums, reasoned step by step.

A problem is ``What is the last digit of 7 × 8 × 3 × 9?`` (or the same with ``+``). The reasoning
trace carries only the last digit from one step to the next, one line per operation:

    <think>
    7 × 8 = 56
    6 × 3 = 18
    8 × 9 = 72
    </think>

    The last digit is 2.

Why reasoning matters here: each line is a multiplication-table fact plus a copy, which a small
model learns quickly, but the answer itself is the composition of k−1 such steps. Answering
directly means tracking the running last digit through the whole chain in one forward pass, and
the tiny demo model cannot: with thinking off it is right only when the digit is guessable (a 5
times an even factor ends in 0, sums and products keep some parity structure). A thinking budget
cuts the trace after some tokens; the model then knows the running digit only part of the way and
has to guess the rest, so accuracy falls as the budget shrinks.

Problems are split deterministically into training and held-out sets by a hash of their text
(`is_heldout`), so evaluation never sees a problem the model was trained on.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Iterator, Sequence

import numpy as np

__all__ = [
    "MAX_OPERANDS", "MIN_OPERANDS", "OPS", "Problem", "heldout_problems", "is_heldout",
    "parse_answer", "sample_problem",
]

# Operator symbol -> (function, smallest operand). 0 and 1 make products trivial, so factors
# start at 2; addends start at 1.
OPS = {"×": (lambda a, b: a * b, 2), "+": (lambda a, b: a + b, 1)}
MIN_OPERANDS = 3
MAX_OPERANDS = 7
ANSWER_PREFIX = "The last digit is "
HELDOUT_MODULUS = 8  # one problem in 8 is held out


@dataclasses.dataclass(frozen=True)
class Problem:
  """A chain ``d_1 op d_2 op ... op d_k`` of single digits; the task is its last digit.

  Attributes:
    op: ``"×"`` or ``"+"``.
    operands: The digits d_1 ... d_k.
  """

  op: str
  operands: tuple[int, ...]

  def __post_init__(self):
    if self.op not in OPS:
      raise ValueError(f"Problem.op must be one of {list(OPS)}, got {self.op!r}")
    if len(self.operands) < 2 or any(not 0 <= d <= 9 for d in self.operands):
      raise ValueError(f"Problem.operands must be two or more digits, got {self.operands!r}")

  @property
  def question(self) -> str:
    """The user's message."""
    return f"What is the last digit of {f' {self.op} '.join(map(str, self.operands))}?"

  def steps(self) -> list[tuple[int, int, int]]:
    """(running last digit, next operand, their full result) for each line of the trace."""
    fn = OPS[self.op][0]
    out, acc = [], self.operands[0]
    for d in self.operands[1:]:
      full = fn(acc, d)
      out.append((acc, d, full))
      acc = full % 10
    return out

  @property
  def answer(self) -> int:
    """The last digit of the whole chain."""
    return self.steps()[-1][2] % 10

  @property
  def reasoning(self) -> str:
    """The step-by-step trace: one ``a op b = r`` line per operation, each ending in a newline."""
    return "".join(f"{a} {self.op} {b} = {r}\n" for a, b, r in self.steps())

  @property
  def answer_text(self) -> str:
    """The final answer as the assistant states it."""
    return f"{ANSWER_PREFIX}{self.answer}."


def parse_answer(text: str) -> int | None:
  """The digit after the last ``"The last digit is "`` in `text`, or None when there is none."""
  i = text.rfind(ANSWER_PREFIX)
  if i < 0:
    return None
  tail = text[i + len(ANSWER_PREFIX):]
  return int(tail[0]) if tail[:1].isdigit() else None


def is_heldout(problem: Problem) -> bool:
  """Whether `problem` belongs to the held-out evaluation set (a fixed hash of its question)."""
  return zlib.crc32(problem.question.encode("utf-8")) % HELDOUT_MODULUS == 0


def sample_problem(rng: np.random.Generator, *, heldout: bool = False,
                   min_operands: int = MIN_OPERANDS, max_operands: int = MAX_OPERANDS) -> Problem:
  """A random problem from the training split (or the held-out split when `heldout`).

  The operator is × or + with equal odds and the chain length uniform in
  [min_operands, max_operands].
  """
  while True:
    op = "×" if rng.random() < 0.5 else "+"
    k = int(rng.integers(min_operands, max_operands + 1))
    low = OPS[op][1]
    problem = Problem(op, tuple(int(d) for d in rng.integers(low, 10, size=k)))
    if is_heldout(problem) == heldout:
      return problem


def heldout_problems(n: int, seed: int = 1234, *, min_operands: int = MIN_OPERANDS,
                     max_operands: int = MAX_OPERANDS) -> list[Problem]:
  """`n` distinct held-out problems, the same for the same arguments."""
  rng = np.random.default_rng(seed)
  seen: dict[Problem, None] = {}
  while len(seen) < n:
    seen.setdefault(sample_problem(rng, heldout=True, min_operands=min_operands,
                                   max_operands=max_operands))
  return list(seen)


def problems_from(rng: np.random.Generator, n: int, **kwargs) -> Iterator[Problem]:
  """`n` training problems from `rng`."""
  for _ in range(n):
    yield sample_problem(rng, **kwargs)


def accuracy(problems: Sequence[Problem], predicted: Sequence[int | None]) -> float:
  """Share of problems whose predicted last digit is right (None counts as wrong)."""
  if not problems:
    return 0.0
  return sum(p.answer == a for p, a in zip(problems, predicted)) / len(problems)
