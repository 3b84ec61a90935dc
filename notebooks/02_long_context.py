# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3
#     name: python3
# ---

# %% [markdown]
# # 2. Long context: constant state, growing cache
#
# Nemotron-H keeps a fixed-size SSM state per Mamba-2 layer and a KV cache only in its few
# attention layers. Here: decode-state memory and time against the context length, and a 128k
# needle-in-a-haystack run when NVIDIA's weights are present.
#
# **Modes.** `NEMOJAX_NOTEBOOK_TINY=1`: the built-in demo model, short contexts, offline, seconds
# on a CPU (the tests). `NEMOJAX_MODEL=DIR`: a converted checkpoint. `NEMOJAX_DOWNLOAD=1`:
# download NVIDIA's checkpoint and convert it. Neither: the 9B shape with random weights, whose
# memory and timings are real (contexts up to 128k).
#
# **TPU** was not available to run this here. On a TPU runtime the attention dispatcher picks its
# XLA path (the flash-attention kernel is Mosaic GPU only), so prefill attention over long
# contexts runs as blocked XLA attention; the memory figures are identical, the timings will differ.

# %% [markdown]
# ## Set-up
# On a fresh Colab GPU or TPU runtime: put a copy of this repository on the runtime (clone it or
# upload it as `nemojax/`) and run `!pip install -q -e "nemojax[notebooks]"` in a cell first.
# Colab ships jax; on a GPU runtime install `jax[cuda12]` if `jax.devices()` shows only a CPU.

# %%
import time

import jax
import jax.numpy as jnp
import numpy as np

import nemojax
from nemojax.testing import notebook_model

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
# ## Memory: a constant SSM state beside a growing KV cache
# Per row, each Mamba-2 layer keeps a conv window and an SSM state `[h, p, n]` whatever the
# context; each attention layer keeps K and V for every position. Nano-9B-v2 has 27 Mamba layers
# and 4 attention layers (counted from the config, without allocating anything).

# %%
def state_bytes(config, context: int, batch: int = 1) -> tuple[int, int]:
  """(Mamba state bytes, KV cache bytes) of a bf16 decode cache, from shapes only."""
  shapes = jax.eval_shape(lambda: nemojax.init_cache(config, batch, context, jnp.bfloat16))
  size = lambda layers: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(layers))
  mamba = size([s for s in shapes.layers if isinstance(s, nemojax.MambaState)])
  kv = size([s for s in shapes.layers if isinstance(s, nemojax.KVState)])
  return mamba, kv


nano = nemojax.NemotronHConfig.nano_9b_v2()
contexts = [2**k for k in range(10, 18)] + [131072 * 2]
mem = np.array([state_bytes(nano, c) for c in contexts]) / 2**20
for c, (m, kv) in zip(contexts, mem):
  print(f"context {c:7d}: Mamba states {m:8.1f} MiB | KV cache {kv:9.1f} MiB")
assert np.all(mem[:, 0] == mem[0, 0]), "the SSM state must not grow with the context"
np.testing.assert_allclose(mem[:, 1] / np.array(contexts), mem[0, 1] / contexts[0])
total = nemojax.cache.cache_bytes(nano, 1, 131072, jnp.bfloat16) / 2**30
print(f"Nano-9B-v2, one row at 128k: {total:.2f} GiB of decode state "
      "(a pure transformer of this size with 56 attention layers would need 14x the KV cache)")

# %%
if plt is not None:
  fig, ax = plt.subplots(figsize=(6, 3.2))
  ax.loglog(contexts, mem[:, 1], "o-", label="KV cache (4 attention layers)")
  ax.loglog(contexts, mem[:, 0], "s-", label="SSM + conv state (27 Mamba layers)")
  ax.set(xlabel="context length (tokens)", ylabel="MiB per row", title="Nano-9B-v2 decode state")
  ax.legend()
  plt.show()

# %% [markdown]
# ## Time against context length
# Time to first token (prefill) and time per decoded token, measured on the loaded model through
# `nemojax.generate` with token-id prompts (each length is compiled once in a warm-up call).
# The decode step reads the whole KV cache of the 4 attention layers but only a fixed-size state
# for the Mamba layers, so it grows slowly with the context.

# %%
def timed(ids, new_tokens: int) -> float:
  t0 = time.perf_counter()
  g = nemojax.generate(model, [ids], tokenizer=tok, max_new_tokens=new_tokens, temperature=0.0,
                       thinking=None, stop_tokens=[])[0]
  assert len(g.tokens) == new_tokens and g.finish_reason == "length"
  return time.perf_counter() - t0


# Each length compiles its own prefill and decode programs (~15 s each for the 9B model).
lengths = (128, 512, 1024) if TINY else (2048, 16384, 131072)
steps = 128  # decode tokens timed per length: enough to stand out of the timer's noise
repeats = 3 if TINY else 1  # the best of `repeats`: tiny timings are noisy, 128k ones long
rng = np.random.default_rng(0)
timing = []
for n in lengths:
  ids = [int(i) for i in rng.integers(3, tok.vocab_size, n)]
  timed(ids, steps + 1)  # compiles this length's programs
  ttft = min(timed(ids, 1) for _ in range(repeats))
  per_token = (min(timed(ids, steps + 1) for _ in range(repeats)) - ttft) / steps
  timing.append((n, ttft, per_token))
  print(f"context {n:6d}: first token {1e3 * ttft:8.1f} ms | "
        f"decode {1e3 * per_token:6.2f} ms/token")
assert all(ttft > 0 and np.isfinite(step) for _, ttft, step in timing)

# %%
if plt is not None:
  n, ttft, step = map(np.array, zip(*timing))
  fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
  ax[0].loglog(n, ttft * 1e3, "o-")
  ax[0].set(xlabel="prompt length (tokens)", ylabel="time to first token (ms)",
            title="prefill")
  ax[1].semilogx(n, step * 1e3, "o-")
  ax[1].set(xlabel="context length (tokens)", ylabel="ms per decoded token", title="decode step",
            ylim=(0, None))
  fig.tight_layout()
  plt.show()

# %% [markdown]
# ## A needle in a haystack
# A pass-key sentence hidden at several depths of a long filler text, then a question about it.
# With NVIDIA's weights the context is 128k tokens at three depths; with random weights one 16k
# run (retrieval cannot happen, so the 128k run is kept for real weights); in TINY mode 512 tokens
# on the demo model, which was never trained to retrieve (these check the plumbing only).

# %%
context = 512 if TINY else (131072 if CHECKPOINT else 16384)
filler = "The grass is green. The sky is blue. The sun is yellow. Here we go again. "
needle = "The secret pass key is 68142. Remember it. "
question = "What is the secret pass key? Answer with the number only."
unit = len(tok.encode(filler))
depths = (0.1, 0.5, 0.9) if CHECKPOINT else (0.5,)
found = []
for depth in depths:
  reps = max(1, (context - 128) // unit)  # room for the question and template: one prefill bucket
  text = filler * int(reps * depth) + needle + filler * (reps - int(reps * depth))
  t0 = time.perf_counter()
  g = nemojax.generate(model, [[{"role": "user", "content": text + "\n\n" + question}]],
                       tokenizer=tok, thinking=False, max_new_tokens=16, temperature=0.0)[0]
  found.append("68142" in g.answer)
  print(f"depth {depth:.1f}, {len(tok.encode(text))} tokens, {time.perf_counter() - t0:.1f} s: "
        f"{g.answer.strip()!r} -> {'found' if found[-1] else 'missed'}")
assert len(found) == len(depths)
if not CHECKPOINT:
  print("(no NVIDIA weights here: retrieval is not expected; the 128k run needs a checkpoint)")
