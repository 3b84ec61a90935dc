# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3
#     name: python3
# ---

# %% [markdown]
# # 3. Inside the SSD
#
# The Mamba-2 layers of Nemotron-H run the state-space duality (SSD) scan. This notebook checks
# that its three forms agree (the token-by-token recurrence, the chunked algorithm, the Pallas
# kernel), shows what the learnt per-head decays and the states look like, and times the kernel
# against its references.
#
# **Modes.** `NEMOJAX_NOTEBOOK_TINY=1`: the built-in demo model and small shapes, offline, seconds
# on a CPU (the tests). `NEMOJAX_MODEL=DIR`: a converted checkpoint. `NEMOJAX_DOWNLOAD=1`:
# download NVIDIA's checkpoint and convert it. Neither: the 9B shape with random weights.
#
# **TPU** was not available to run this here; the last section says what changes there.

# %% [markdown]
# ## Set-up
# On a fresh Colab GPU or TPU runtime: put a copy of this repository on the runtime (clone it or
# upload it as `nemojax/`) and run `!pip install -q -e "nemojax[notebooks]"` in a cell first.
# Colab ships jax; on a GPU runtime install `jax[cuda12]` if `jax.devices()` shows only a CPU.

# %%
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import nemojax
from nemojax.testing import notebook_model
from nemojax import testing as T
from nemojax.demo import task as demo_task
from nemojax.kernels.ssd import api as ssd_api
from nemojax.kernels.ssd import reference as ssd_reference

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
# ## 1. The scan's forms agree
# With per-head decay a_t = exp(Δt_t · A) the SSD recurrence is
# S_t = a_t S_{t-1} + Δt_t x_t B_tᵀ and y_t = S_t C_t + D x_t. `ssd_naive` runs it token by
# token (`lax.scan`, the oracle); `ssd_chunked` computes it in chunks of Q tokens (quadratic
# inside a chunk, the recurrence between chunks); `ssd` is the dispatcher the model calls, which
# picks the Pallas kernel on a Hopper GPU and the chunked XLA form everywhere else.
# Random inputs at an odd length (not a multiple of the chunk), with an initial state. The float32
# comparisons ask for full-precision matmuls: a GPU's default for float32 is TF32 (~1e-3).

# %%
rng = np.random.default_rng(0)
b, t, h, p, g, n = (2, 45, 4, 16, 2, 16) if TINY else (1, 1000, 128, 80, 8, 128)
x = rng.standard_normal((b, t, h, p)).astype(np.float32)
dt = np.log1p(np.exp(rng.standard_normal((b, t, h)) - 2)).astype(np.float32)
A = -np.exp(rng.uniform(-1, 1, h)).astype(np.float32)
B = rng.standard_normal((b, t, g, n)).astype(np.float32)
C = rng.standard_normal((b, t, g, n)).astype(np.float32)
D = np.ones(h, np.float32)
s0 = 0.1 * rng.standard_normal((b, h, p, n)).astype(np.float32)

with jax.default_matmul_precision("highest"):
  y_ref, s_ref = ssd_reference.ssd_naive(x, dt, A, B, C, D, s0)
  errors = {}
  for q in (8, 16, 64, 128):
    y, s = ssd_reference.ssd_chunked(x, dt, A, B, C, D, s0, chunk_size=q)
    errors[f"chunked Q={q}"] = (T.rel_err(y, y_ref), T.rel_err(s, s_ref))
  y, s = ssd_api.ssd(x, dt, A, B, C, D, initial_state=s0, chunk_size=16)
  errors["dispatcher, float32"] = (T.rel_err(y, y_ref), T.rel_err(s, s_ref))
for name, (ey, es) in errors.items():
  print(f"{name:22s} |dy|/|y| = {ey:.1e}   |dS|/|S| = {es:.1e}")
  assert ey < T.tolerance("float32", "independent") and es < T.tolerance("float32", "independent")

# bf16 inputs: what the model feeds the scan. On a Hopper GPU this is the Pallas kernel.
bf = lambda v: jnp.asarray(v, jnp.bfloat16)
impl = ssd_api.resolve_implementation(None, head_dim=p, state_size=n, chunk_size=128,
                                      dtype=jnp.bfloat16)
y16, _ = ssd_api.ssd(bf(x), dt, A, bf(B), bf(C), D, initial_state=s0, chunk_size=128)
with jax.default_matmul_precision("highest"):
  y16_ref, _ = ssd_reference.ssd_naive(np.asarray(bf(x), np.float32), dt, A,
                                       np.asarray(bf(B), np.float32),
                                       np.asarray(bf(C), np.float32), D, s0)
err16 = T.rel_err(y16, y16_ref)
print(f"dispatcher, bfloat16 ({impl}): |dy|/|y| = {err16:.1e} against the float32 oracle")
assert err16 < T.tolerance("bfloat16", "kernel")

# %% [markdown]
# ## 2. Per-head decay: how far back each head remembers
# A head's state shrinks by exp(Δt·A) per token, so it remembers ~1/(Δt·|A|) tokens. Δt depends on
# the input (softplus of a projection plus `dt_bias`); at the bias alone, Δt = softplus(dt_bias).
# In TINY mode the demo model's learnt values; with random weights, the random initialisation.

# %%
mamba_layers = [i for i, blk in enumerate(model.backbone.layers)
                if blk.layer_type is nemojax.LayerType.MAMBA]
horizon = []
for i in mamba_layers:
  mixer = model.backbone.layers[i].mixer
  A_layer = -np.exp(np.asarray(mixer.A_log[...], np.float32))
  dt_layer = np.log1p(np.exp(np.asarray(mixer.dt_bias[...], np.float32)))
  horizon.append(1.0 / (dt_layer * -A_layer))
horizon = np.array(horizon)  # [mamba layers, heads]
print(f"{len(mamba_layers)} Mamba layers x {horizon.shape[1]} heads; memory horizon in tokens: "
      f"median {np.median(horizon):.1f}, min {horizon.min():.2f}, max {horizon.max():.0f}")
assert horizon.shape == (len(mamba_layers), model.config.mamba_num_heads)
assert np.all(np.isfinite(horizon) & (horizon > 0))
if plt is not None:
  fig, ax = plt.subplots(figsize=(8, 2.2 + 0.08 * len(mamba_layers)))
  im = ax.imshow(np.log10(horizon), aspect="auto", cmap="viridis")
  ax.set(xlabel="head", ylabel="layer", title="log10 memory horizon 1/(Δt·|A|), tokens",
         yticks=range(len(mamba_layers)), yticklabels=mamba_layers)
  fig.colorbar(im, ax=ax)
  plt.show()

# %% [markdown]
# ## 3. The state along a reasoning trace
# Prefill a question, then feed its step-by-step trace one token at a time and watch each Mamba
# layer's state: its norm, and how much of it each token rewrites (|S_t − S_{t−1}| / |S_{t−1}|).
# One jitted decode step measures both on the device (a single compiled program: the prompt is fed
# through it too, token by token, and nothing but the norms comes back to the host).

# %%
problem = demo_task.heldout_problems(1)[0]
prompt = tok.apply_chat_template([{"role": "user", "content": problem.question}],
                                 add_generation_prompt=True, tokenize=True)
trace = tok.encode(problem.reasoning)


@nnx.jit
def step(m, token, cache):
  """One decode step; per Mamba layer |S_t| and |S_t − S_t−1| / |S_t−1| (float32)."""
  _, new = m(token, cache=cache)
  f32 = lambda s: s.astype(jnp.float32)
  norm = jnp.stack([jnp.linalg.norm(f32(new.layers[i].ssm)) for i in mamba_layers])
  change = jnp.stack([jnp.linalg.norm(f32(new.layers[i].ssm) - f32(cache.layers[i].ssm))
                      / jnp.linalg.norm(f32(cache.layers[i].ssm)) for i in mamba_layers])
  return new, norm, change


cache = model.init_cache(1, len(prompt) + len(trace))
for token in prompt:
  cache, _, _ = step(model, np.array([[token]]), cache)
norms, changes = [], []
for token in trace:
  cache, norm, change = step(model, np.array([[token]]), cache)
  norms.append(norm)
  changes.append(change)
norms, changes = np.array(norms), np.array(changes)  # [trace tokens, Mamba layers]
assert norms.shape == changes.shape == (len(trace), len(mamba_layers))
assert np.all(np.isfinite(norms)) and np.all(changes > 0)
per_head = np.array([np.linalg.norm(np.asarray(cache.layers[i].ssm[0]), axis=(1, 2))
                     for i in mamba_layers])  # [Mamba layers, heads]
print(problem.question, f"({len(prompt)} prompt + {len(trace)} trace tokens)")
print("mean share of the state rewritten per token, by Mamba layer:",
      np.round(changes.mean(0), 3))

# %%
if plt is not None:
  fig, ax = plt.subplots(1, 3, figsize=(13, 3.2))
  ax[0].plot(norms, label=[f"layer {i}" for i in mamba_layers])
  ax[0].set(xlabel="trace token", ylabel="|S|", title="state norm per Mamba layer")
  if len(mamba_layers) <= 8:
    ax[0].legend(fontsize=7)
  ax[1].plot(changes)
  ax[1].set(xlabel="trace token", ylabel="|S_t − S_t−1| / |S_t−1|",
            title="state rewritten per token")
  im = ax[2].imshow(per_head, aspect="auto", cmap="magma")
  ax[2].set(xlabel="head", ylabel="layer", title="per-head |S| after the trace",
            yticks=range(len(mamba_layers)), yticklabels=mamba_layers)
  fig.colorbar(im, ax=ax[2])
  fig.tight_layout()
  plt.show()

# %% [markdown]
# ## 4. Timings: the kernel against its references
# One layer's scan at Nano-9B-v2's shape (128 heads of 80, 8 groups, state 128, bf16), each
# implementation jitted and timed after a warm-up. On a Hopper GPU `None` resolves to the Pallas
# kernel; elsewhere (CPU, TPU, older GPUs) to the chunked XLA form, which is what a TPU runs.


# %%
def time_ssd(impl: str, t: int, shape) -> float:
  b, h, p, g, n = shape
  r = np.random.default_rng(1)
  args = (jnp.asarray(r.standard_normal((b, t, h, p)), jnp.bfloat16),
          jnp.asarray(np.log1p(np.exp(r.standard_normal((b, t, h)) - 2)), jnp.float32),
          -jnp.exp(jnp.asarray(r.uniform(-1, 1, h), jnp.float32)),
          jnp.asarray(r.standard_normal((b, t, g, n)), jnp.bfloat16),
          jnp.asarray(r.standard_normal((b, t, g, n)), jnp.bfloat16))
  fn = jax.jit(functools.partial(ssd_api.ssd, chunk_size=128, implementation=impl))
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(3):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


shape = (1, 8, 16, 1, 16) if TINY else (1, 128, 80, 8, 128)
lengths = (256, 1024) if TINY else (4096, 16384, 65536)
impls = ["naive", "xla"] + (["pallas"] if ssd_api.resolve_implementation(
    None, head_dim=shape[2], state_size=shape[4], chunk_size=128,
    dtype=jnp.bfloat16) == "pallas" else [])
results = {impl: [time_ssd(impl, t, shape) for t in lengths] for impl in impls}
print("| tokens | " + " | ".join(impls) + " |")
print("|---" * (len(impls) + 1) + "|")
for j, t in enumerate(lengths):
  print(f"| {t} | " + " | ".join(f"{1e3 * results[i][j]:.2f} ms" for i in impls) + " |")
assert all(np.isfinite(v).all() for v in results.values())
if plt is not None:
  fig, ax = plt.subplots(figsize=(6, 3.2))
  for impl in impls:
    ax.loglog(lengths, 1e3 * np.array(results[impl]), "o-", label=impl)
  ax.set(xlabel="sequence length (tokens)", ylabel="time per call (ms)",
         title=f"SSD scan, one layer, bf16, {jax.default_backend()}")
  ax.set_xticks(lengths, [f"{t:,}" for t in lengths])  # the measured lengths only
  ax.tick_params(axis="x", which="minor", bottom=False, labelbottom=False)
  ax.legend()
  plt.show()

# %% [markdown]
# ## What runs on TPU
# TPU was not available to run this notebook here. On a TPU the dispatcher resolves `None` to
# `"xla"` (the kernels are Mosaic GPU only), so sections 1-3 run unchanged, and section 4 times
# the naive and chunked XLA forms only: expect the chunked form far ahead of the `lax.scan`
# oracle, since its work is batched matmuls that suit the MXU, with the per-chunk recurrence the
# only sequential part. No TPU timings are claimed here.

# %%
print("on this backend the model's SSD uses:",
      ssd_api.resolve_implementation(None, head_dim=model.config.mamba_head_dim,
                                     state_size=model.config.ssm_state_size,
                                     chunk_size=model.config.chunk_size, dtype=DTYPE))
