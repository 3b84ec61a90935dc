"""The shipped demo model and its task: transcripts, accuracy with reasoning, thinking budgets."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import nemojax
from nemojax.config import LayerType
from nemojax.demo import demo_model_path
from nemojax.demo.data import MODES, TokenizedTask, messages_for
from nemojax.demo.decode import answer
from nemojax.demo.task import (MAX_OPERANDS, MIN_OPERANDS, Problem, heldout_problems, is_heldout,
                               parse_answer, sample_problem)
from nemojax.tokenizer import BUDGET_CLOSE_TEXT

N_PROBLEMS = 48
# Measured on the shipped model with these 48 held-out problems (float32 and bfloat16 alike):
# reasoning on 100%, budget 40: 75%, budget 24: 56%, budget 8: 38%, off: 40%, second question of a
# chat with reasoning: 100%. The thresholds leave a margin for other machines' rounding.
MIN_ACCURACY_THINKING = 0.95
MIN_GAP_ON_OFF = 0.35


@pytest.fixture(scope="module")
def tokenizer():
  return nemojax.Tokenizer.from_pretrained(demo_model_path())


@pytest.fixture(scope="module")
def task(tokenizer):
  return TokenizedTask(tokenizer)


@pytest.fixture(scope="module")
def model():
  return nemojax.load(demo_model_path(), dtype=jnp.float32, ssd_implementation="xla")


@pytest.fixture(scope="module")
def problems():
  return heldout_problems(N_PROBLEMS, seed=2024)


@pytest.fixture(scope="module")
def first_turns(problems):
  """Other held-out problems, asked and answered before each of `problems` in a chat."""
  return [p for p in heldout_problems(3 * N_PROBLEMS, seed=2024) if p not in problems][:N_PROBLEMS]


@pytest.fixture(scope="module")
def accuracies(model, tokenizer, problems):
  """Accuracy and replies per setting: (thinking, budget) -> (accuracy, answers)."""
  out = {}
  for thinking, budget in ((True, None), (True, 40), (True, 24), (True, 8), (True, 0),
                           (False, None)):
    replies = answer(model, tokenizer, problems, thinking=thinking, budget=budget)
    acc = float(np.mean([r.digit == p.answer for r, p in zip(replies, problems)]))
    out[thinking, budget] = (acc, replies)
  return out


# ------------------------------------------------------------------------------------------------
# The task and its transcripts (no model needed)


def test_problem_trace_and_answer():
  p = Problem("×", (7, 8, 3, 9))
  assert p.question == "What is the last digit of 7 × 8 × 3 × 9?"
  assert p.reasoning == "7 × 8 = 56\n6 × 3 = 18\n8 × 9 = 72\n"
  assert p.answer == (7 * 8 * 3 * 9) % 10 == 2
  assert p.answer_text == "The last digit is 2."
  assert parse_answer("...\n</think>\n\nThe last digit is 2.") == 2
  assert parse_answer("no idea") is None
  s = Problem("+", (9, 9, 4))
  assert s.reasoning == "9 + 9 = 18\n8 + 4 = 12\n" and s.answer == 2


def test_heldout_split_is_disjoint_and_fixed():
  rng = np.random.default_rng(0)
  train = [sample_problem(rng) for _ in range(2000)]
  assert not any(is_heldout(p) for p in train)
  assert {p.op for p in train} == {"×", "+"}
  assert {len(p.operands) for p in train} == set(range(MIN_OPERANDS, MAX_OPERANDS + 1))
  held = heldout_problems(50, seed=5)
  assert all(is_heldout(p) for p in held) and len(set(held)) == 50
  assert held == heldout_problems(50, seed=5)


def test_digits_are_single_tokens(tokenizer):
  ids = tokenizer.encode("What is the last digit of 12 × 345?\n67 + 8 = 90\n")
  for i in ids:
    piece = tokenizer.decode([i])
    assert not any(c.isdigit() for c in piece) or piece.strip().isdigit() and len(piece) == 1, piece
  assert len(tokenizer.think_tokens().open) == 1 and len(tokenizer.think_tokens().close) == 1
  assert 12 in tokenizer.eos_ids and 2 in tokenizer.eos_ids


@pytest.mark.parametrize("mode", MODES)
def test_transcripts_render_in_nemotron_chat_format(tokenizer, task, mode):
  rng = np.random.default_rng(1)
  for _ in range(5):
    p = sample_problem(rng)
    thinking = mode != "no_think"
    prompts = {tokenizer.apply_chat_template(messages_for(p, thinking, v)) for v in range(3)}
    assert len(prompts) == 1, "where the /think marker is written must not change the prompt"
    prompt = prompts.pop()
    assert prompt.startswith("<SPECIAL_10>System\n")
    assert f"<SPECIAL_11>User\n{p.question}\n" in prompt
    opening = "<think>\n" if thinking else "<think></think>"
    assert prompt.endswith("<SPECIAL_11>Assistant\n" + opening)
    budget = 5 if mode == "budget" else None
    ex = task.encode(p, mode, budget)
    text = tokenizer.decode(ex.ids)
    assert text.startswith(prompt) and ex.prompt_len == len(tokenizer.encode(prompt))
    completion = text[len(prompt):]
    assert completion.endswith(p.answer_text + "\n<SPECIAL_12>")
    if mode == "think":
      assert completion == p.reasoning + "</think>\n\n" + p.answer_text + "\n<SPECIAL_12>"
    elif mode == "no_think":
      assert completion == p.answer_text + "\n<SPECIAL_12>"
    else:
      cut = tokenizer.decode(tokenizer.encode(p.reasoning)[:budget])
      assert completion == cut + BUDGET_CLOSE_TEXT + p.answer_text + "\n<SPECIAL_12>"
    # The loss covers exactly what the model writes: not the prompt, not the forced close.
    trained = tokenizer.decode([i for i, m in zip(ex.ids, ex.mask) if m])
    expected = completion.replace(BUDGET_CLOSE_TEXT, "") if mode == "budget" else completion
    assert trained == expected
    assert len(ex.ids) <= task.max_length()
    # A finished reply rendered back as an earlier turn is what the template keeps of it.
    history = [{"role": "user", "content": p.question},
               {"role": "assistant", "content": completion.removesuffix("\n<SPECIAL_12>")},
               {"role": "user", "content": "Thanks"}]
    rendered = tokenizer.apply_chat_template(history)
    kept = f"<SPECIAL_11>Assistant\n{p.answer_text}\n<SPECIAL_12>\n<SPECIAL_11>User\nThanks"
    assert kept in rendered


def test_second_turn_transcripts(tokenizer, task):
  rng = np.random.default_rng(2)
  for _ in range(5):
    ex = task.sample(rng, turns=2)
    text = tokenizer.decode(ex.ids)
    assert text.count("<SPECIAL_11>User\n") == 2 and text.count("<SPECIAL_12>") == 2
    first_answer = text.split("<SPECIAL_11>Assistant\n")[1]
    assert first_answer.startswith("The last digit is ")  # earlier reasoning is not shown
    assert len(ex.ids) <= task.max_length(turns=2)
    assert sum(ex.mask) > 0 and not any(ex.mask[:ex.prompt_len])


# ------------------------------------------------------------------------------------------------
# The shipped model


def test_demo_model_ships_as_small_hf_directory(model):
  path = demo_model_path()
  for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
    assert (path / name).is_file(), name
  assert (path / "model.safetensors").stat().st_size < 4 * 2**20
  assert set(model.config.layer_types) == {LayerType.MAMBA, LayerType.ATTENTION, LayerType.MLP}


def test_reasoning_on_solves_heldout_problems(accuracies, problems):
  acc, replies = accuracies[True, None]
  assert acc >= MIN_ACCURACY_THINKING, acc
  # The trace is the worked computation, not just a correct digit.
  exact = np.mean([r.reasoning.strip() == p.reasoning.strip() for r, p in zip(replies, problems)])
  assert exact >= MIN_ACCURACY_THINKING
  assert all(r.text.endswith("<SPECIAL_12>") for r in replies)


def test_answers_second_question_of_a_chat(model, tokenizer, problems, first_turns):
  replies = answer(model, tokenizer, problems, thinking=True,
                   history=[(h,) for h in first_turns])
  acc = float(np.mean([r.digit == p.answer for r, p in zip(replies, problems)]))
  assert acc >= MIN_ACCURACY_THINKING, acc


def test_reasoning_beats_answering_directly(accuracies):
  on, off = accuracies[True, None][0], accuracies[False, None][0]
  assert on - off >= MIN_GAP_ON_OFF, (on, off)
  # Thinking off really means no thought.
  replies = accuracies[False, None][1]
  assert all(r.num_reasoning_tokens == 0 and r.digit is not None for r in replies)


def test_accuracy_falls_as_thinking_budget_shrinks(accuracies):
  acc = {key: a for key, (a, _) in accuracies.items()}
  assert acc[True, None] > acc[True, 40] > acc[True, 24] > acc[True, 8], acc


@pytest.mark.parametrize("budget", [0, 8, 24])
def test_budget_forces_close_and_model_still_answers(accuracies, budget):
  for r in accuracies[True, budget][1]:
    assert r.num_reasoning_tokens <= budget
    assert r.digit is not None, r.text  # a best guess after the forced ".\n</think>\n\n"
  forced = [r for r in accuracies[True, budget][1] if BUDGET_CLOSE_TEXT in r.text]
  assert len(forced) >= len(accuracies[True, budget][1]) // 2
  assert all(r.num_reasoning_tokens == budget for r in forced)
