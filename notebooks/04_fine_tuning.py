# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3
#     name: python3
# ---

# %% [markdown]
# # 4. Fine-tuning with LoRA under a thinking budget
#
# LoRA adapters on a small reasoning task (the demo's last-digit chains, made longer), trained
# with `nemojax.train`; accuracy against the thinking budget before and after, and the loss curve.
#
# **Modes.** `NEMOJAX_NOTEBOOK_TINY=1`: the built-in demo model and a handful of steps, offline,
# seconds on a CPU (the tests; the loss must fall, accuracy barely moves). `NEMOJAX_MODEL=DIR`: a
# converted checkpoint. `NEMOJAX_DOWNLOAD=1`: download NVIDIA's checkpoint and convert it.
# Neither: the 9B shape with random weights and the demo tokenizer (memory and step time are
# real; accuracy is not).
#
# **TPU** was not available to run this here. On a TPU runtime the training step picks the XLA
# SSD scan through the dispatcher (its backward is XLA's autodiff of the chunked form, not the
# Pallas backward kernel) and XLA attention; `remat="full"` matters more there, with 16-32 GB of
# HBM per chip against the H200's 141 GB.

# %% [markdown]
# ## Set-up
# On a fresh Colab GPU or TPU runtime: put a copy of this repository on the runtime (clone it or
# upload it as `nemojax/`) and run `!pip install -q -e "nemojax[notebooks]"` in a cell first.
# Colab ships jax; on a GPU runtime install `jax[cuda12]` if `jax.devices()` shows only a CPU.

# %%

import jax
import numpy as np
from flax import nnx

import nemojax
from nemojax.testing import notebook_model
from nemojax.demo import data as demo_data
from nemojax.demo import task as demo_task
from nemojax.lora import LORA_PARAM, apply_lora, merge_lora
from nemojax.train import TrainConfig, Trainer, fit

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
# ## The task: longer chains than the demo model saw
# The demo model was trained on chains of 3-7 digits. Here it is fine-tuned on chains of 10-12
# (the demo's transcripts: thinking on, off, and cut by a budget, loss on the assistant's tokens
# only). Held-out problems are asked before and after, under several thinking budgets.

# %%
MIN_OPS, MAX_OPS = 10, 12
task = demo_data.TokenizedTask(tok)
heldout = demo_task.heldout_problems(8, min_operands=MIN_OPS,
                                     max_operands=MAX_OPS)
# 9B: one batch of 32 rows and 256 new tokens, the shapes notebook 1 compiled (JAX's disk cache).
budgets = (0, 16, None) if TINY else (0, 32, 128, None)


def read_digit(answer: str) -> int | None:
  """The demo's "The last digit is d." or, for other models, the last digit in the answer."""
  d = demo_task.parse_answer(answer)
  digits = [c for c in answer if c.isdigit()]
  return d if d is not None else (int(digits[-1]) if digits else None)


def accuracy_by_budget(m) -> dict:
  rows = [(b, q) for b in budgets for q in heldout]
  gens = nemojax.generate(m, [q.question for _, q in rows], tokenizer=tok, temperature=0.0,
                          thinking=True, thinking_budget=[b for b, _ in rows],
                          max_new_tokens=128 if TINY else 256)
  return {b: float(np.mean([read_digit(g.answer) == q.answer
                            for (bb, q), g in zip(rows, gens) if bb == b])) for b in budgets}


before = accuracy_by_budget(model)
print("before:", {str(b): f"{100 * a:.0f}%" for b, a in before.items()})

# %% [markdown]
# ## LoRA: adapters on every projection, the base frozen
# `apply_lora` wraps the Mamba in/out, attention q/k/v/o and MLP up/down projections with rank-r
# adapters (B starts at zero, so the model is unchanged until the first step); the trainer gets
# `wrt=LORA_PARAM` and updates only those. With the 9B model: bf16 base, float32 adapters and
# Adam moments, every block rematerialised, a chunked LM-head loss.

# %%
SEQ_LEN = 192
# 9B with random weights: a short run (the train step's first compile dominates); with NVIDIA's
# weights, raise steps to a few hundred to see the accuracy move.
steps = 8 if TINY else 30
batch_size = 8


def batch(step: int) -> dict:
  rng = np.random.default_rng([7, step])
  tokens = np.full((batch_size, SEQ_LEN), task.pad_id, np.int32)
  mask = np.zeros((batch_size, SEQ_LEN), np.float32)
  for i in range(batch_size):
    problem = demo_task.sample_problem(rng, min_operands=MIN_OPS, max_operands=MAX_OPS)
    mode = demo_data.MODES[int(rng.choice(3, p=[0.5, 0.25, 0.25]))]
    budget = int(rng.integers(0, len(task.trace_ids(problem)))) if mode == "budget" else None
    ex = task.encode(problem, mode, budget)
    assert len(ex.ids) <= SEQ_LEN, len(ex.ids)
    tokens[i, :len(ex.ids)], mask[i, :len(ex.mask)] = ex.ids, ex.mask
  return {"tokens": tokens, "mask": mask}


n_base = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
apply_lora(model, rank=8)
n_lora = sum(x.size for x in jax.tree.leaves(nnx.state(model, LORA_PARAM)))
print(f"{n_lora:,} trainable adapter parameters ({100 * n_lora / n_base:.2f}% of {n_base:,})")
config = TrainConfig(learning_rate=3e-3, warmup_steps=min(10, steps // 4), total_steps=steps,
                     weight_decay=0.0, remat="none" if TINY else "full")
trainer = Trainer(model, config, wrt=LORA_PARAM)
held_batch = batch(10**6)  # a fixed batch, never trained on: its loss is comparable across steps
state = trainer.init_state()
held_before = float(trainer.evaluate(state.params, held_batch))
state, history = fit(trainer, state, batch, steps, log_every=1 if TINY else 2, progress=False)
held_after = float(trainer.evaluate(state.params, held_batch))
losses = [h["loss"] for h in history]
print("training loss:", " ".join(f"{v:.3f}" for v in losses))
print(f"loss on a fixed held-out batch: {held_before:.4f} -> {held_after:.4f}")
assert np.all(np.isfinite(losses)) and held_after < held_before, "the loss should fall"
if plt is not None:
  fig, ax = plt.subplots(figsize=(6, 3))
  ax.plot([h["step"] for h in history], losses, "o-")
  ax.set(xlabel="step", ylabel="masked next-token loss", title="LoRA fine-tuning")
  plt.show()

# %% [markdown]
# ## After: merge the adapters and ask again
# `merge_lora` folds W ← W + (A·B)ᵀ into the base weights, so the tuned model has the original
# structure (and `nemojax.save` writes it like any checkpoint).

# %%
tuned = merge_lora(trainer.model(state))
after = accuracy_by_budget(tuned)
print("| thinking budget | before | after |\n|---|---|---|")
for b in budgets:
  print(f"| {'none' if b is None else b} | {100 * before[b]:.0f}% | {100 * after[b]:.0f}% |")
assert set(after) == set(before) and all(0 <= a <= 1 for a in after.values())
if plt is not None:
  labels = ["none" if b is None else str(b) for b in budgets]
  xs = np.arange(len(budgets))
  fig, ax = plt.subplots(figsize=(6, 3))
  ax.bar(xs - 0.2, [100 * before[b] for b in budgets], 0.4, label="before")
  ax.bar(xs + 0.2, [100 * after[b] for b in budgets], 0.4, label="after LoRA")
  ax.set(xticks=xs, xticklabels=labels, xlabel="thinking budget (tokens)", ylabel="accuracy (%)",
         title=f"held-out chains of {MIN_OPS}-{MAX_OPS} digits")
  ax.legend()
  plt.show()
if TINY:
  print(f"(TINY: {steps} steps only, so the accuracies barely move; run without TINY for more)")
