# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3
#     name: python3
# ---

# %% [markdown]
# # 5. Looking inside: logit lens, state probes, attention maps
#
# Three views into a hybrid Mamba-2/attention model: a logit lens across the layers, linear
# probes of the Mamba-2 layers' SSM states, and the attention layers' maps on a long prompt.
#
# **Modes.** `NEMOJAX_NOTEBOOK_TINY=1`: the built-in demo model, offline, seconds on a CPU (the
# tests). `NEMOJAX_MODEL=DIR`: a converted checkpoint. `NEMOJAX_DOWNLOAD=1`: download NVIDIA's
# checkpoint and convert it. Neither: the 9B shape with random weights and the demo tokenizer
# (shapes and costs are real; what the views show is not).
#
# **TPU** was not available to run this here. Nothing here calls a kernel directly: the model's
# SSD scan goes through the dispatcher, which picks its XLA path on a TPU, and the attention maps
# are recomputed in plain JAX, so the notebook runs unchanged; the bf16 comparisons keep their
# model tolerance there.

# %% [markdown]
# ## Set-up
# On a fresh Colab GPU or TPU runtime: put a copy of this repository on the runtime (clone it or
# upload it as `nemojax/`) and run `!pip install -q -e "nemojax[notebooks]"` in a cell first.
# Colab ships jax; on a GPU runtime install `jax[cuda12]` if `jax.devices()` shows only a CPU.

# %%

import jax
import jax.numpy as jnp
import numpy as np

import nemojax
from nemojax.testing import notebook_model
from nemojax import testing as T
from nemojax.demo import data as demo_data
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
# ## The residual stream, layer by layer
# One pass that keeps the residual stream after every block (the model's own blocks, called in
# order, exactly as `NemotronH.hidden_states` does); its last entry, normed and projected, must be
# the model's logits. It runs eagerly (op by op): each prompt shape here is used once, and
# compiling the whole 56-block program for each would cost more than it saves.


# %%
def residual_stream(m, ids):
  """[layers + 1] residuals [b, t, D]: the embeddings, then the output of every block."""
  x = m.backbone.embeddings(ids).astype(m.dtype)
  start, pos = jnp.zeros((ids.shape[0],), jnp.int32), jnp.zeros((), jnp.int32)
  xs = [x]
  for block in m.backbone.layers:
    x, _ = block(x, state=None, start=start, pos=pos, valid=None)
    xs.append(x)
  return xs


task = demo_data.TokenizedTask(tok)  # renders transcripts exactly as the demo was trained on
problem = demo_task.heldout_problems(1)[0]
prompt = task.prompt_ids(problem, thinking=True)
completion = task.trace_ids(problem) + task.close_after_trace + task.answer_ids(problem)
ids = np.array([prompt + completion])
xs = residual_stream(model, ids)
final = np.asarray(model.logits(model.backbone.norm_f(xs[-1])))
T.assert_close(final, np.asarray(model(ids)), "float32" if TINY else "bfloat16", "same"
               if TINY else "model", "logits from the residual stream")
print(f"{len(xs) - 1} blocks, {ids.shape[1]} tokens ({len(prompt)} prompt + {len(completion)} "
      "completion): the rebuilt logits equal the model's")

# %% [markdown]
# ## A logit lens
# Read every layer's residual through the final norm and the LM head: how probable is the token
# that actually comes next, at each layer and position of the assistant's reply? Bright cells
# are where the model already "knows" the next token; the trace's results and the final digit
# show when the computation happens.

# %%
targets = ids[0, len(prompt):]
lens = []  # [layers + 1, completion tokens]: log p(next token) read at each layer
for x in xs:
  logp = jax.nn.log_softmax(model.logits(model.backbone.norm_f(x[:, len(prompt) - 1:-1])), -1)
  lens.append(np.asarray(jnp.take_along_axis(logp[0], targets[:, None], -1)[:, 0]))
lens = np.array(lens)
assert lens.shape == (len(xs), len(completion)) and np.all(np.isfinite(lens))
print("mean log p(next token) by layer:", np.round(lens.mean(1), 2))
kinds = model.config.hybrid_override_pattern
if plt is not None:
  fig, ax = plt.subplots(figsize=(12, 2 + 0.06 * len(xs)))
  im = ax.imshow(np.exp(lens), aspect="auto", cmap="viridis", vmin=0, vmax=1)
  labels = [tok.decode([int(t)]) for t in targets]
  ax.set_xticks(range(len(labels)), [repr(s)[1:-1] for s in labels], rotation=90, fontsize=6)
  ax.set(xlabel="next token of the reply", ylabel="layer (0 = embeddings)",
         title="logit lens: p(actual next token)")
  fig.colorbar(im, ax=ax)
  plt.show()

# %% [markdown]
# ## SSM state probes: is the answer in the state?
# For many held-out problems, prefill (i) the question alone with reasoning off, and (ii) the
# question and its trace up to the last "=" (the answer is then one table fact away, but not yet
# written: with the full trace the last token would be the answer itself); then fit a linear
# (ridge) probe from each Mamba layer's final SSM state (averaged over the state dimension n, so
# [h·p] features) to the answer digit, and score it on problems it was not fitted on. Chance is
# about 10%, but the last digits of the question already hint at the answer (a 5 times an even
# digit ends in 0): the same probe on random weights (run without a checkpoint) is the control.


# %%
def final_states(sequences):
  """Per Mamba layer, the SSM state averaged over n, [N, h, p], after each left-padded sequence.

  Averaged on the device: the full states of N rows of Nano-9B-v2 are N x 139 MiB.
  """
  width = max(map(len, sequences))
  padded = np.array([[tok.pad_id] * (width - len(s)) + s for s in sequences], np.int32)
  cache = model.init_cache(len(sequences), width)
  cache = cache.replace(start=jnp.asarray([width - len(s) for s in sequences], jnp.int32))
  _, cache = model(padded, cache=cache)
  return [np.asarray(layer.ssm.mean(-1)) for layer in cache.layers
          if isinstance(layer, nemojax.MambaState)]


def probe_accuracy(features, labels, n_train, ridge=1.0) -> float:
  """Test accuracy of a one-vs-all ridge regression on the first `n_train` examples."""
  f = (features - features[:n_train].mean(0)) / (features[:n_train].std(0) + 1e-6)
  y = np.eye(10)[labels]
  ftr = f[:n_train]
  alpha = np.linalg.solve(ftr @ ftr.T + ridge * len(ftr) * np.eye(len(ftr)), y[:n_train])
  return float(np.mean((f[n_train:] @ (ftr.T @ alpha)).argmax(1) == labels[n_train:]))


probe_problems = demo_task.heldout_problems(160, seed=99)
labels = np.array([q.answer for q in probe_problems])
n_train = len(probe_problems) * 3 // 4
variants = {
    "question only": [task.prompt_ids(q, thinking=False) for q in probe_problems],
    "trace, last result cut": [task.prompt_ids(q, thinking=True) + tok.encode(
        q.reasoning[:q.reasoning.rstrip("\n").rfind("=") + 1]) for q in probe_problems],
}
probe = {}
for name, seqs in variants.items():
  states = final_states(seqs)
  probe[name] = [probe_accuracy(s.reshape(len(s), -1), labels, n_train) for s in states]
  print(f"{name:22s} probe accuracy by Mamba layer:", [f"{100 * a:.0f}%" for a in probe[name]])
assert all(0 <= a <= 1 for accs in probe.values() for a in accs)
if plt is not None:
  fig, ax = plt.subplots(figsize=(6, 3))
  for name, accs in probe.items():
    ax.plot(range(len(accs)), [100 * a for a in accs], "o-", label=name)
  ax.axhline(10, color="gray", ls=":", label="chance")
  ax.set(xlabel="Mamba layer #", ylabel="probe accuracy (%)", ylim=(0, 100),
         title="answer digit, linearly decoded from the SSM state")
  ax.legend()
  plt.show()

# %% [markdown]
# ## The attention layers' maps on a long prompt
# Nemotron-Nano-9B-v2 has 4 attention layers among 56 (the demo model 2 among 6), without
# positional encoding. Their maps, recomputed from each layer's input (the recomputed output must
# match the layer's), over a conversation of many problems; averaged over heads.

# %%
turns = demo_task.heldout_problems(4 if TINY else 32, seed=5)
chat = []
for q in turns:
  chat += [{"role": "user", "content": q.question},
           {"role": "assistant", "content": q.answer_text}]
long_ids = np.array([tok.apply_chat_template(chat[:-1], add_generation_prompt=True,
                                             tokenize=True)])
xs_long = residual_stream(model, long_ids)
att_layers = [i for i, blk in enumerate(model.backbone.layers)
              if blk.layer_type is nemojax.LayerType.ATTENTION]
maps = []
for i in att_layers:
  mixer = model.backbone.layers[i].mixer
  u = model.backbone.layers[i].norm(xs_long[i])
  t = u.shape[1]
  q = mixer.q_proj(u, out_dtype=jnp.float32).reshape(1, t, mixer.num_heads, mixer.head_dim)
  k = mixer.k_proj(u, out_dtype=jnp.float32).reshape(1, t, mixer.num_kv_heads, mixer.head_dim)
  v = mixer.v_proj(u, out_dtype=jnp.float32).reshape(1, t, mixer.num_kv_heads, mixer.head_dim)
  rep = mixer.num_heads // mixer.num_kv_heads  # query heads per KV head (GQA)
  k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(mixer.head_dim)
  scores = jnp.where(np.tril(np.ones((t, t), bool)), scores, -jnp.inf)
  weights = jax.nn.softmax(scores, axis=-1)  # [b, h, q, k]
  o = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(1, t, -1).astype(u.dtype)
  ours = mixer.o_proj(o, out_dtype=jnp.float32)
  theirs, _ = mixer(u, start=jnp.zeros((1,), jnp.int32), pos=0)
  T.assert_close(ours, theirs.astype(jnp.float32), "float32" if TINY else "bfloat16",
                 "independent" if TINY else "model", f"attention layer {i}")
  maps.append(np.asarray(weights[0].mean(0)))
  dist = float((np.asarray(weights[0]) * (np.arange(t)[:, None] - np.arange(t))).sum(-1).mean())
  print(f"layer {i}: {t} tokens, mean attention distance {dist:.1f} tokens")


def pooled(w, cells: int = 200):
  """Means over k x k blocks (k = ceil(t / cells)), so a long map draws as <= cells² cells."""
  k = -(-len(w) // cells)
  n = len(w) // k * k
  return w[:n, :n].reshape(n // k, k, n // k, k).mean((1, 3)), n


if plt is not None:
  fig, axes = plt.subplots(1, len(maps), figsize=(3.4 * len(maps), 3.2), squeeze=False)
  for ax, i, w in zip(axes[0], att_layers, maps):
    w, n = pooled(w)
    im = ax.imshow(np.log10(w + 1e-6), cmap="magma", vmin=-4, vmax=0, extent=(0, n, n, 0))
    fig.colorbar(im, ax=ax, shrink=0.8)
    ax.set(title=f"layer {i}", xlabel="key position (token)", ylabel="query position (token)")
  fig.suptitle("attention weight (log10, mean over heads)")
  fig.tight_layout()
  plt.show()
