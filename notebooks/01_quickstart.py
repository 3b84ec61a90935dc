# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3
#     name: python3
# ---

# %% [markdown]
# # 1. Quickstart: load, generate, reason under a budget
#
# Load Nemotron-Nano-9B-v2 (or the built-in demo model), generate with `/think` and `/no_think`,
# stream tokens, and give every row of one batch its own thinking budget; then plot accuracy and
# reasoning length against the budget.
#
# **Modes.** `NEMOJAX_NOTEBOOK_TINY=1`: the demo model (a 188k-parameter Nemotron-H trained by
# nemojax on last-digit chains), offline, seconds on a CPU; the tests run this. `NEMOJAX_MODEL=DIR`:
# a converted checkpoint. `NEMOJAX_DOWNLOAD=1`: download NVIDIA's checkpoint (~18 GB) and convert
# it first. Neither: the 9B shape with random weights and the demo tokenizer, which measures
# memory and time but writes nonsense.
#
# **TPU** was not available to run this here. On a TPU runtime nothing needs editing: the SSD and
# attention dispatchers (`implementation=None`) pick their XLA paths, since the Pallas kernels
# are Mosaic GPU (Hopper) only. The 9B model's bf16 weights (17.8 GB) need more HBM than a v5e
# chip's 16 GB (a v6e has 32 GB, a v5p 95 GB); the first call of each shape compiles longer.

# %% [markdown]
# ## Set-up
# On a fresh Colab GPU or TPU runtime: put a copy of this repository on the runtime (clone it or
# upload it as `nemojax/`) and run `!pip install -q -e "nemojax[notebooks]"` in a cell first.
# Colab ships jax; on a GPU runtime install `jax[cuda12]` if `jax.devices()` shows only a CPU.

# %%
import time

import jax
import numpy as np

import nemojax
from nemojax.testing import notebook_model
from nemojax.demo import task as demo_task

try:
  import matplotlib.pyplot as plt
except ImportError:  # plots are optional: every number is printed as well
  plt = None

SETUP = notebook_model()  # NEMOJAX_NOTEBOOK_TINY / NEMOJAX_MODEL / NEMOJAX_DOWNLOAD choose
model, tok = SETUP.model, SETUP.tokenizer
TINY, CHECKPOINT, DTYPE, MEANINGFUL = SETUP.tiny, SETUP.checkpoint, SETUP.dtype, SETUP.meaningful
print("backend:", jax.default_backend(), "| devices:", jax.devices())
print(f"tiny: {TINY} | checkpoint: {CHECKPOINT} | layers: {model.config.hybrid_override_pattern}")
print("weights:", "trained" if MEANINGFUL else "RANDOM (no checkpoint on this machine): shapes, "
      "memory and times are real; text, accuracies and maps are not")
print("TPU: not available to run this here (see the TPU note for what changes there)")

# %% [markdown]
# ## Reasoning on and off
# `thinking=True` / `False` writes `/think` or `/no_think` into the system prompt (a marker in a
# message works the same). With reasoning on, `Generation.reasoning` holds the thought and
# `Generation.answer` what follows `</think>`.

# %%
question = demo_task.heldout_problems(1)[0]
on, off = (nemojax.generate(model, question.question, tokenizer=tok, thinking=t,
                            max_new_tokens=96 if TINY else 256, temperature=0.0)[0]
           for t in (True, False))
print(question.question, "-> expected", question.answer)
print(f"[/think]    {on.num_reasoning_tokens} reasoning tokens\n{on.reasoning}\n-> {on.answer!r}")
print(f"[/no_think] {off.answer!r}")
if not MEANINGFUL:
  print(f"(random weights: tokens such as {on.tokens[:6]} mostly lie outside the demo tokenizer's "
        f"{tok.vocab_size} ids, so the text above is empty or noise)")
assert off.reasoning is None and off.num_reasoning_tokens == 0
assert on.reasoning is not None

# %% [markdown]
# ## Streaming
# `stream=fn(row, delta)` is called as text is decoded; the deltas of a row add up to its text.

# %%
pieces = []
g = nemojax.generate(model, question.question, tokenizer=tok, max_new_tokens=48 if TINY else 256,
                     temperature=0.0, stream=lambda row, delta: pieces.append(delta))[0]
print(f"{len(pieces)} deltas:", pieces[:12])
assert "".join(pieces) == g.text

# %% [markdown]
# ## Per-row thinking budgets
# One batch: every problem asked once per budget. A row that reaches its budget gets
# `".\n</think>\n\n"` forced in (NVIDIA's client rule) and answers from the partial thought;
# budget 0 is reasoning off. The budget is enforced inside the jitted decode loop, per row.


# %%
def read_digit(answer: str) -> int | None:
  """The demo's "The last digit is d." or, for other models, the last digit in the answer."""
  d = demo_task.parse_answer(answer)
  digits = [c for c in answer if c.isdigit()]
  return d if d is not None else (int(digits[-1]) if digits else None)


# The 9B run keeps one batch of 32 rows and 256 new tokens: one compiled shape, seconds of decode.
problems = demo_task.heldout_problems(8)
budgets = (0, 8, 16, 24, 32, None) if TINY else (0, 32, 128, None)
rows = [(b, p) for b in budgets for p in problems]
t0 = time.perf_counter()
gens = nemojax.generate(model, [p.question for _, p in rows], tokenizer=tok, temperature=0.0,
                        thinking=True, thinking_budget=[b for b, _ in rows],
                        max_new_tokens=80 if TINY else 256)
print(f"{len(rows)} rows in {time.perf_counter() - t0:.1f} s")
table = []
for b in budgets:
  got = [(g, p) for (bb, p), g in zip(rows, gens) if bb == b]
  acc = np.mean([read_digit(g.answer) == p.answer for g, p in got])
  length = np.mean([g.num_reasoning_tokens for g, _ in got])
  table.append((b, acc, length))
  assert all(g.num_reasoning_tokens <= (b if b is not None else 10**9) for g, _ in got)
print("| budget | accuracy | mean reasoning tokens |\n|---|---|---|")
for b, acc, length in table:
  print(f"| {'none' if b is None else b} | {100 * acc:.0f}% | {length:.1f} |")

# %%
if plt is not None:
  labels = ["none" if b is None else str(b) for b, _, _ in table]
  fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
  ax[0].plot(labels, [100 * a for _, a, _ in table], "o-")
  ax[0].set(xlabel="thinking budget (tokens)", ylabel="accuracy (%)", ylim=(0, 105),
            title="accuracy against the budget")
  ax[1].bar(labels, [n for _, _, n in table])
  ax[1].set(xlabel="thinking budget (tokens)", ylabel="mean reasoning tokens",
            title="reasoning length")
  fig.tight_layout()
  plt.show()
if not MEANINGFUL:
  print("(random weights: the table measures the machinery, not the model)")
