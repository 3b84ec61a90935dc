# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     name: python3
# ---

# %% [markdown]
# # The Mamba-2 state of Nemotron-H, and reasoning under a budget
#
# A research notebook in `py:percent` form (open it with Jupytext, or run it as a script). It runs
# on whatever JAX finds: CPU, GPU or TPU. `NEMOJAX_MODEL` points it at a converted checkpoint
# (e.g. Nano-9B-v2); by default it uses the built-in demo model, and the tests execute it with
# `NEMOJAX_NOTEBOOK_TINY=1`, which swaps in a random tiny model so that it runs in seconds.
#
# 1. The SSD scan three ways: the `lax.scan` oracle, the chunked XLA algorithm and (on a Hopper
#    GPU) the Pallas kernel; how far the chunked form drifts from the oracle.
# 2. What the decode state holds: per Mamba layer a fixed-size SSM state, independent of the
#    context length, against the KV cache of the 4 attention layers, which grows with it.
# 3. The thinking budget: reasoning length and answers as the budget shrinks.

# %%
import os

import jax
import jax.numpy as jnp
import numpy as np

import nemojax
from nemojax.cache import KVState, MambaState, cache_bytes
from nemojax.kernels.ssd import api as ssd_api
from nemojax.kernels.ssd import reference

TINY = os.environ.get("NEMOJAX_NOTEBOOK_TINY") == "1"
print("backend:", jax.devices()[0].platform, "| tiny:", TINY)

# %% [markdown]
# ## 1. The SSD scan
# Random inputs at an odd length (not a multiple of the chunk), with an initial state.

# %%
rng = np.random.default_rng(0)
b, t, h, p, g, n = (1, 300, 8, 80, 2, 128) if not TINY else (2, 45, 4, 10, 2, 12)
x = rng.standard_normal((b, t, h, p)).astype(np.float32)
dt = np.log1p(np.exp(rng.standard_normal((b, t, h)) - 2)).astype(np.float32)
A = -np.exp(rng.uniform(-1, 1, h)).astype(np.float32)
B = rng.standard_normal((b, t, g, n)).astype(np.float32)
C = rng.standard_normal((b, t, g, n)).astype(np.float32)
D = np.ones(h, np.float32)
s0 = 0.1 * rng.standard_normal((b, h, p, n)).astype(np.float32)

y_ref, s_ref = reference.ssd_naive(x, dt, A, B, C, D, s0)
for q in (8, 16, 64, 128):
  y, s = reference.ssd_chunked(x, dt, A, B, C, D, s0, chunk_size=q)
  err = float(jnp.linalg.norm(y - y_ref) / jnp.linalg.norm(y_ref))
  print(f"chunk {q:4d}: |dy|/|y| = {err:.2e}")
print("dispatcher would use:", ssd_api.resolve_implementation(
    None, head_dim=p, state_size=n, chunk_size=128, dtype=jnp.bfloat16))

# %% [markdown]
# ## 2. The decode state: constant for Mamba, growing for attention

# %%
if TINY:
  config = nemojax.NemotronHConfig.tiny()
  model = nemojax.NemotronH(config, dtype=jnp.float32)
  tok = None
else:
  path = os.environ.get("NEMOJAX_MODEL")
  if path is None:
    from nemojax.demo import demo_model_path
    path = demo_model_path()
  model = nemojax.load(path, dtype=jnp.float32 if jax.devices()[0].platform == "cpu"
                       else jnp.bfloat16)
  tok = nemojax.Tokenizer.from_pretrained(path)
  config = model.config

for ctx in (1024, 8192, 131072):
  shapes = jax.eval_shape(lambda: model.init_cache(1, ctx))
  mamba = sum(x.size * x.dtype.itemsize for layer in shapes.layers
              if isinstance(layer, MambaState) for x in jax.tree.leaves(layer))
  kv = sum(x.size * x.dtype.itemsize for layer in shapes.layers
           if isinstance(layer, KVState) for x in jax.tree.leaves(layer))
  print(f"context {ctx:6d}: Mamba states {mamba / 2**20:8.2f} MiB, KV cache {kv / 2**20:8.2f} MiB")
nano = nemojax.NemotronHConfig.nano_9b_v2()
state_gib = cache_bytes(nano, 1, 131072) / 2**30
print(f"Nano-9B-v2 at 128k, batch 1: {state_gib:.2f} GiB of decode state")

# %% [markdown]
# How much of the SSM state does one new token change? Prefill a prompt, then step once.

# %%
ids = np.random.default_rng(1).integers(3, config.vocab_size, (1, 40))
_, cache = model(ids[:, :-1], cache=model.init_cache(1, 64))
_, cache2 = model(ids[:, -1:], cache=cache)
for i, (a, c2) in enumerate(zip(cache.layers, cache2.layers)):
  if isinstance(a, MambaState):
    change = float(jnp.linalg.norm(c2.ssm - a.ssm) / jnp.linalg.norm(a.ssm))
    print(f"layer {i:2d}: |state change| / |state| = {change:.3f}")

# %% [markdown]
# ## 3. Reasoning under a thinking budget

# %%
if tok is not None:
  question = "What is 4821 + 977?"
  for budget in (None, 64, 16, 4, 0):
    g = nemojax.generate(model, question, tokenizer=tok, max_new_tokens=256,
                         thinking_budget=budget, temperature=0.0)[0]
    print(f"budget {str(budget):>4}: {g.num_reasoning_tokens:3d} reasoning tokens -> "
          f"{g.answer!r}")
else:
  print("(tiny random model: no tokenizer, skipping the reasoning demo)")
