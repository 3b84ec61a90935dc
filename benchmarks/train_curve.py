"""A loss curve: a small hybrid Nemotron-H trained from scratch on real text (issue #14).

Text: `benchmarks/data/tinyshakespeare_excerpt.txt`, the first 999,985 bytes (cut at a speech
boundary) of `data/tinyshakespeare/input.txt` in Andrej Karpathy's char-rnn repository
(github.com/karpathy/char-rnn, blob 7dcb3a2d, 1,115,394 bytes, SHA-256 86c4e6aa…): about 40,000
lines of speeches from Shakespeare's plays. The plays are in the public domain (Shakespeare died
in 1616); the excerpt carries nothing of char-rnn's code. See `benchmarks/data/README.md`.

Tokens are the text's bytes (a 256-entry vocabulary: no tokenizer, nothing downloaded). The last
5% of the bytes are held out; every `--eval-every` steps the loss on a fixed batch of held-out
windows is recorded too. Training batches are random windows of the first 95%, drawn from a
seeded generator, so a run is reproducible.

Model (`--smoke` aside): 90M parameters, hidden 1024, 12 blocks `M-M*M-M-M*M-` (6 Mamba-2 with 32
heads of 64 channels, state 128, 8 groups; 4 relu² MLPs of width 4096; 2 GQA attention with 16
query and 4 KV heads of 64), bf16 compute with float32 master weights and moments (TrainConfig
defaults), AdamW peak learning rate 1e-3, 30 warm-up steps, cosine decay to 1e-4 at the last step,
batch 8 x 1024 bytes. 300 steps see 2.5M bytes, about 2.6 passes over the training text. On one
H200 the whole run, compile included, is meant to take well under 120 s.

Outputs in --out: `train_curve.json` (per-step training loss in nats per byte, held-out losses,
timings, the settings) and `train_curve.png` (matplotlib; where matplotlib is missing, as on the
GPU machine's bare image, `train_curve.svg` with the same axes instead; `--plot JSON` redraws the
PNG later from the JSON on a machine that has matplotlib).

`--smoke` trains a tiny model for a few steps on the CPU in seconds, to check the script.
`--precision` trains a second time on the same batches with bf16 weights and float32 moments
(`TrainConfig(master_weights=False)`) and adds that curve (the JSON's "bf16_weights").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import nemojax
from nemojax.model import NemotronH, count_params
from nemojax.train import TrainConfig, Trainer

TEXT = Path(__file__).resolve().parent / "data" / "tinyshakespeare_excerpt.txt"
HELD_OUT = 0.05


def model_config(smoke: bool) -> nemojax.NemotronHConfig:
  if smoke:
    return nemojax.NemotronHConfig.tiny(vocab_size=256, hybrid_override_pattern="M-M*")
  return nemojax.NemotronHConfig(
      vocab_size=256, hidden_size=1024, intermediate_size=4096, num_hidden_layers=12,
      hybrid_override_pattern="M-M*M-M-M*M-", num_attention_heads=16, num_key_value_heads=4,
      head_dim=64, mamba_num_heads=32, mamba_head_dim=64, ssm_state_size=128, n_groups=8,
      conv_kernel=4, chunk_size=128, max_position_embeddings=4096)


def load_text() -> tuple[np.ndarray, np.ndarray]:
  """The text's bytes as int32 tokens, split into (train, held out)."""
  data = np.frombuffer(TEXT.read_bytes(), np.uint8).astype(np.int32)
  split = int(len(data) * (1 - HELD_OUT))
  return data[:split], data[split:]


def windows(data: np.ndarray, rng: np.random.Generator, batch: int, length: int) -> np.ndarray:
  """`batch` random windows of `length` + 1 tokens (inputs and their next tokens)."""
  starts = rng.integers(0, len(data) - length - 1, batch)
  return np.stack([data[s:s + length + 1] for s in starts])


def train(args, master_weights: bool = True) -> dict:
  """One run; the batches depend only on the seed, so runs with other settings see the same."""
  cfg = model_config(args.smoke)
  train_data, held_out = load_text()
  model = NemotronH(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(args.seed))
  config = TrainConfig(learning_rate=args.lr, warmup_steps=max(args.steps // 10, 1),
                       total_steps=args.steps, weight_decay=0.1, seed=args.seed,
                       master_weights=master_weights)
  trainer = Trainer(model, config)
  params = count_params(model)
  del model
  rng = np.random.default_rng(args.seed)
  eval_batch = {"tokens": jnp.asarray(windows(held_out, np.random.default_rng(1), args.batch,
                                              args.seq))}
  state = trainer.init_state()
  t0 = time.perf_counter()
  losses, evals, first_step_s = [], [], None
  for step in range(args.steps):
    state, metrics = trainer.step(state, {"tokens": jnp.asarray(
        windows(train_data, rng, args.batch, args.seq))})
    losses.append(metrics["loss"])  # read back at the end: no wait per step
    if step == 0:
      jax.block_until_ready(metrics["loss"])
      first_step_s = time.perf_counter() - t0
    if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
      evals.append((step + 1, trainer.evaluate(state.params, eval_batch)))
  losses = [float(x) for x in jax.device_get(losses)]
  evals = [(s, float(v)) for s, v in jax.device_get(evals)]
  total_s = time.perf_counter() - t0
  return {
      "device": jax.devices()[0].device_kind, "jax": jax.__version__,
      "date": time.strftime("%Y-%m-%d"), "text": TEXT.name, "text_bytes": int(TEXT.stat().st_size),
      "model": {"params": int(params), "hidden": cfg.hidden_size,
                "pattern": cfg.hybrid_override_pattern, "vocab": cfg.vocab_size},
      "batch": args.batch, "seq": args.seq, "steps": args.steps, "learning_rate": args.lr,
      "master_weights": master_weights, "loss_unit": "nats per byte", "train_loss": losses,
      "eval": [{"step": s, "loss": v} for s, v in evals],
      "first_step_s": first_step_s, "total_s": total_s,
      "steady_tokens_per_s": args.batch * args.seq * (args.steps - 1)
                             / max(total_s - first_step_s, 1e-9),
  }


def plot(result: dict, out: Path) -> Path:
  """train_curve.png with matplotlib, or train_curve.svg without it."""
  steps = np.arange(1, len(result["train_loss"]) + 1)
  ev = result["eval"]
  title = (f"{result['model']['params'] / 1e6:.1f}M-param hybrid {result['model']['pattern']}, "
           f"{result['batch']}x{result['seq']} bytes/step, {result['device']}")
  try:
    import matplotlib  # optional: the GPU machine may lack it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return _plot_svg(steps, result["train_loss"], ev, title, out / "train_curve.svg")
  fig, ax = plt.subplots(figsize=(8, 5))
  other = result.get("bf16_weights")  # --precision: the same run with bf16 weights
  which = ", float32 master weights" if other else ""
  ax.plot(steps, result["train_loss"], lw=1, label="training batch" + which)
  if ev:
    ax.plot([e["step"] for e in ev], [e["loss"] for e in ev], "o-", label="held-out 5%" + which)
  if other:
    ax.plot(steps, other["train_loss"], lw=1, alpha=0.7,
            label="training batch, bf16 weights + float32 moments")
    ax.plot([e["step"] for e in other["eval"]], [e["loss"] for e in other["eval"]], "s--",
            label="held-out, bf16 weights + float32 moments")
  ax.axhline(math.log(256), color="gray", ls=":", lw=1, label="uniform over 256 bytes")
  ax.set_xlabel("optimizer step")
  ax.set_ylabel("cross-entropy (nats per byte)")
  ax.set_title(title, fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend()
  path = out / "train_curve.png"
  fig.savefig(path, dpi=120, bbox_inches="tight")
  plt.close(fig)
  return path


def _plot_svg(steps, losses, ev, title, path: Path) -> Path:
  w, h, m = 720, 450, 60
  top = max(max(losses), math.log(256)) * 1.05
  x = lambda s: m + (w - 2 * m) * (s - 1) / max(len(steps) - 1, 1)
  y = lambda v: h - m - (h - 2 * m) * v / top
  line = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in zip(steps, losses))
  dots = "".join(f'<circle cx="{x(e["step"]):.1f}" cy="{y(e["loss"]):.1f}" r="3" fill="red"/>'
                 for e in ev)
  ticks = "".join(f'<text x="{m - 8}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.0f}</text>'
                  for v in range(int(top) + 1))
  path.write_text(
      f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-size="12">'
      f'<rect width="{w}" height="{h}" fill="white"/>'
      f'<polyline points="{line}" fill="none" stroke="steelblue"/>{dots}{ticks}'
      f'<line x1="{m}" y1="{h - m}" x2="{w - m}" y2="{h - m}" stroke="black"/>'
      f'<line x1="{m}" y1="{m}" x2="{m}" y2="{h - m}" stroke="black"/>'
      f'<text x="{w / 2}" y="{h - 20}" text-anchor="middle">optimizer step (1 to {len(steps)})'
      f'</text><text x="15" y="{h / 2}" transform="rotate(-90 15 {h / 2})" '
      f'text-anchor="middle">cross-entropy (nats per byte); red: held-out</text>'
      f'<text x="{w / 2}" y="25" text-anchor="middle">{title}</text></svg>')
  return path


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default="benchmarks/out", help="directory for the JSON and the plot")
  p.add_argument("--steps", type=int, default=None, help="optimizer steps (300; smoke: 8)")
  p.add_argument("--batch", type=int, default=None, help="rows per step (8; smoke: 2)")
  p.add_argument("--seq", type=int, default=None, help="bytes per row (1024; smoke: 32)")
  p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
  p.add_argument("--eval-every", type=int, default=None, help="steps between held-out losses")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--smoke", action="store_true", help="a tiny model for a few steps (CPU)")
  p.add_argument("--precision", action="store_true",
                 help="also train with bf16 weights + float32 moments on the same batches")
  p.add_argument("--plot", metavar="JSON", help="only redraw the plot from a saved JSON")
  args = p.parse_args()
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  if args.plot:
    print(plot(json.loads(Path(args.plot).read_text()), out))
    return
  defaults = (8, 2, 32, 4) if args.smoke else (300, 8, 1024, 50)
  for name, value in zip(("steps", "batch", "seq", "eval_every"), defaults):
    if getattr(args, name) is None:
      setattr(args, name, value)
  result = train(args)
  if args.precision:  # the same batches with bf16 weights (float32 moments, no master copy)
    other = train(args, master_weights=False)
    result["bf16_weights"] = {k: other[k] for k in ("train_loss", "eval", "total_s")}
    gap = np.mean(other["train_loss"][-10:]) - np.mean(result["train_loss"][-10:])
    print(f"bf16 weights: training loss {other['train_loss'][0]:.3f} -> "
          f"{np.mean(other['train_loss'][-10:]):.3f} ({gap:+.3f} against mixed), held-out "
          f"{other['eval'][-1]['loss']:.3f}", flush=True)
  (out / "train_curve.json").write_text(json.dumps(result, indent=1))
  path = plot(result, out)
  ev = result["eval"]
  print(f"{result['model']['params'] / 1e6:.1f}M params, {args.steps} steps: training loss "
        f"{result['train_loss'][0]:.3f} -> {np.mean(result['train_loss'][-10:]):.3f}, held-out "
        f"{ev[0]['loss']:.3f} (step {ev[0]['step']}) -> {ev[-1]['loss']:.3f} nats/byte; first "
        f"step {result['first_step_s']:.1f} s, total {result['total_s']:.1f} s, "
        f"{result['steady_tokens_per_s']:.0f} bytes/s; wrote {path}", flush=True)


if __name__ == "__main__":
  main()
