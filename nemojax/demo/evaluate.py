"""Accuracy of the demo model with reasoning on, off and under thinking budgets.

`python -m nemojax.demo.evaluate` asks held-out problems (never trained on, `task.is_heldout`)
greedily and prints a table: the Nemotron Nano 2 paper's budget-control figure in miniature.
Accuracy should be highest with unlimited thinking, fall as the budget shrinks (the trace is cut
and closed with ``".\\n</think>\\n\\n"``, so the model answers from a partial computation) and be
lowest with thinking off.
"""

from __future__ import annotations

import argparse
import time

import jax.numpy as jnp
import numpy as np

from nemojax.demo.decode import answer
from nemojax.demo.task import heldout_problems
from nemojax.model import NemotronH
from nemojax.tokenizer import Tokenizer

__all__ = ["DEFAULT_BUDGETS", "accuracy_table", "format_table"]

DEFAULT_BUDGETS = (0, 8, 16, 24, 32, 40, 48)


def accuracy_table(model: NemotronH, tokenizer: Tokenizer, n: int = 200, seed: int = 1234,
                   budgets=DEFAULT_BUDGETS) -> list[dict]:
  """Accuracy on `n` held-out problems for each setting.

  Returns:
    Rows ``{"setting", "thinking", "budget", "second_turn", "accuracy",
    "mean_reasoning_tokens"}``: thinking on without a budget, each budget in decreasing order,
    thinking off, then on and off for the same problems asked as the second question of a
    conversation (after another held-out problem and its answer).
  """
  problems = heldout_problems(2 * n, seed)
  problems, first_turns = problems[:n], problems[n:]
  settings = [("on", True, None, False)]
  settings += [(f"budget {b}", True, b, False) for b in sorted(budgets)[::-1]]
  settings += [("off", False, None, False), ("on, second turn", True, None, True),
               ("off, second turn", False, None, True)]
  rows = []
  for name, thinking, budget, second_turn in settings:
    history = [(h,) for h in first_turns] if second_turn else None
    results = answer(model, tokenizer, problems, thinking=thinking, budget=budget,
                     history=history)
    correct = [r.digit == p.answer for r, p in zip(results, problems)]
    rows.append({
        "setting": name, "thinking": thinking, "budget": budget, "second_turn": second_turn,
        "accuracy": round(float(np.mean(correct)), 4),
        "mean_reasoning_tokens": round(float(np.mean([r.num_reasoning_tokens for r in results])),
                                       1),
    })
  return rows


def format_table(rows: list[dict]) -> str:
  """A Markdown table of `accuracy_table`'s rows."""
  lines = ["| reasoning | thinking budget | accuracy | mean reasoning tokens |",
           "| --- | --- | --- | --- |"]
  for r in rows:
    budget = "-" if r["budget"] is None else str(r["budget"])
    on = "on" if r["thinking"] else "off"
    if r.get("second_turn"):
      on += " (second turn)"
    lines.append(f"| {on} | {budget if r['thinking'] else '-'} | {100 * r['accuracy']:.1f}% | "
                 f"{r['mean_reasoning_tokens']:.1f} |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  from nemojax.checkpoint import load  # noqa: PLC0415
  from nemojax.demo import demo_model_path  # noqa: PLC0415
  parser = argparse.ArgumentParser(prog="python -m nemojax.demo.evaluate", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default=None, help="model directory (default: the shipped demo)")
  parser.add_argument("-n", type=int, default=200, help="held-out problems")
  parser.add_argument("--seed", type=int, default=1234, help="picks the held-out problems")
  parser.add_argument("--budgets", type=int, nargs="*", default=list(DEFAULT_BUDGETS))
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  parser.add_argument("--show", type=int, default=0, help="print this many example replies")
  args = parser.parse_args(argv)
  path = args.model or str(demo_model_path())
  model = load(path, dtype=getattr(jnp, args.dtype), ssd_implementation="xla")
  tokenizer = Tokenizer.from_pretrained(path)
  t0 = time.perf_counter()
  rows = accuracy_table(model, tokenizer, n=args.n, seed=args.seed, budgets=args.budgets)
  print(f"{path}: {args.n} held-out problems, greedy, {args.dtype}, "
        f"{time.perf_counter() - t0:.1f} s")
  print(format_table(rows))
  if args.show:
    problems = heldout_problems(args.show, args.seed)
    for thinking, budget in ((True, None), (True, 8), (False, None)):
      for p, r in zip(problems, answer(model, tokenizer, problems, thinking, budget)):
        print(f"--- {p.question} (answer {p.answer}) thinking={thinking} budget={budget}")
        print(r.text)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
