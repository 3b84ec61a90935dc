"""Trains the demo model and writes it as an HF-layout directory: `python -m nemojax.demo.train`.

The model is a tiny Nemotron-H with all three layer types (Mamba-2, attention, relu² MLP),
trained from scratch with `nemojax.train` on the last-digit task (`nemojax.demo.task`) in
Nemotron's chat format with thinking on, off and cut by budgets (`nemojax.demo.data`). Every
random choice is seeded, so a run is reproducible on one machine (floating-point reductions may
differ across CPUs and backends).

The shipped assets were made with

    python -m nemojax.demo.train --out nemojax/demo/assets

which writes config.json, model.safetensors (HF tensor names, float32), generation_config.json,
the tokenizer files and training_log.json (settings, loss curve, held-out accuracy, wall time).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nemojax.config import NemotronHConfig
from nemojax.demo.data import DEFAULT_MIX, TokenizedTask, build_demo_tokenizer, make_batch
from nemojax.model import NemotronH, count_params
from nemojax.tokenizer import Tokenizer
from nemojax.train import TrainConfig, Trainer, fit

__all__ = ["DemoSettings", "demo_config", "save_hf", "train_demo"]


def demo_config(vocab_size: int) -> NemotronHConfig:
  """The demo architecture: 6 blocks, Mamba-2 / attention / MLP, width 64."""
  return NemotronHConfig(
      vocab_size=vocab_size,
      hidden_size=64,
      intermediate_size=256,
      num_hidden_layers=6,
      hybrid_override_pattern="M*-M*-",
      num_attention_heads=4,
      num_key_value_heads=2,
      head_dim=16,
      mamba_num_heads=8,
      mamba_head_dim=16,
      ssm_state_size=16,
      n_groups=1,
      conv_kernel=4,
      chunk_size=16,
      max_position_embeddings=4096,
      eos_token_id=(2, 12),
  )


@dataclasses.dataclass(frozen=True)
class DemoSettings:
  """Everything that determines a demo training run."""

  steps: int = 3000
  batch_size: int = 16
  learning_rate: float = 3e-3
  warmup_steps: int = 60
  weight_decay: float = 0.05
  seed: int = 0
  mix: tuple[float, float, float] = DEFAULT_MIX  # thinking on / off / cut by a budget
  # Every n-th batch holds second questions of two-turn conversations (for `nemojax chat`); they
  # are longer, so they get their own batch shape instead of padding every batch to their length.
  second_turn_every: int = 6


def save_hf(model: NemotronH, tokenizer_dir: str | os.PathLike | None,
            out_dir: str | os.PathLike) -> None:
  """Writes `model` as an HF checkpoint directory that `nemojax.load` (and transformers) read.

  config.json and model.safetensors (float32) come from the converter
  (`nemojax.convert.export_model`); then generation_config.json, and the tokenizer files copied
  from `tokenizer_dir` (`out_dir` may already hold them: its other files are kept).
  """
  from nemojax.convert import export_model  # noqa: PLC0415
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  copy_from = None
  if tokenizer_dir is not None and Path(tokenizer_dir).resolve() != out.resolve():
    copy_from = tokenizer_dir
  # The converter writes a whole new directory; its files then join what `out` already holds.
  with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
    staged = Path(tmp) / "hf"
    export_model(model, staged, dtype="float32", copy_from=copy_from, progress=False)
    for f in staged.iterdir():
      os.replace(f, out / f.name)
  config = model.config
  generation = {"bos_token_id": config.bos_token_id, "eos_token_id": list(config.eos_token_ids),
                "pad_token_id": config.pad_token_id, "do_sample": False}
  (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n",
                                              encoding="utf-8")


def train_demo(settings: DemoSettings, out_dir: str | os.PathLike, *,
               checkpoint_dir: str | os.PathLike | None = None, progress: bool = True,
               eval_problems: int = 200) -> dict:
  """Trains the demo model, writes it to `out_dir` and returns the training record.

  Args:
    settings: The run's hyper-parameters and seed.
    out_dir: Directory for the HF-layout model and tokenizer.
    checkpoint_dir: Orbax checkpoints of the train state (resumes from the latest one).
    progress: Show the progress bar.
    eval_problems: Held-out problems for the accuracy figures in the record (0: skip).
  """
  from nemojax.demo import evaluate  # noqa: PLC0415
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  tokenizer = build_demo_tokenizer(out)
  task = TokenizedTask(tokenizer)
  seq_lens = {turns: -(-task.max_length(turns) // 8) * 8 for turns in (1, 2)}
  config = demo_config(vocab_size=-(-tokenizer.vocab_size // 8) * 8)
  model = NemotronH(config, dtype=jnp.float32, rngs=nnx.Rngs(settings.seed),
                    ssd_implementation="xla")
  train_config = TrainConfig(learning_rate=settings.learning_rate,
                             warmup_steps=settings.warmup_steps, total_steps=settings.steps,
                             weight_decay=settings.weight_decay, seed=settings.seed)
  trainer = Trainer(model, train_config)

  def batches(step: int):
    rng = np.random.default_rng([settings.seed, step])
    every = settings.second_turn_every
    turns = 2 if every and step % every == every - 1 else 1
    return make_batch(task, rng, settings.batch_size, seq_lens[turns], settings.mix, turns)

  t0 = time.perf_counter()
  state, history = fit(trainer, trainer.init_state(), batches, settings.steps,
                       checkpoint_dir=checkpoint_dir, save_every=200, log_every=20,
                       progress=progress, description="demo")
  train_seconds = time.perf_counter() - t0
  model = trainer.model(state)
  save_hf(model, None, out)
  record = {
      "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
      "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, jax {jax.__version__} "
                 f"({jax.default_backend()})",
      "settings": dataclasses.asdict(settings),
      "seq_len": seq_lens,
      "num_params": count_params(model),
      "train_seconds": round(train_seconds, 1),
      "final_loss": history[-1]["loss"] if history else None,
      "loss_curve": [(h["step"], round(h["loss"], 4)) for h in history],
  }
  if eval_problems:
    t1 = time.perf_counter()
    record["accuracy"] = evaluate.accuracy_table(model, Tokenizer.from_pretrained(out),
                                                 n=eval_problems)
    record["eval_seconds"] = round(time.perf_counter() - t1, 1)
  (out / "training_log.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
  return record


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m nemojax.demo.train", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  defaults = DemoSettings()
  parser.add_argument("--out", default="nemojax-demo-model",
                      help="output directory (nemojax/demo/assets to refresh the shipped model)")
  parser.add_argument("--steps", type=int, default=defaults.steps)
  parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
  parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
  parser.add_argument("--seed", type=int, default=defaults.seed)
  parser.add_argument("--checkpoint-dir", default=None,
                      help="orbax checkpoints of the train state; an existing one is resumed")
  parser.add_argument("--eval-problems", type=int, default=200,
                      help="held-out problems for the accuracy table (0 to skip)")
  parser.add_argument("--no-progress", action="store_true")
  args = parser.parse_args(argv)
  settings = dataclasses.replace(defaults, steps=args.steps, batch_size=args.batch_size,
                                 learning_rate=args.learning_rate, seed=args.seed)
  record = train_demo(settings, args.out, checkpoint_dir=args.checkpoint_dir,
                      progress=not args.no_progress, eval_problems=args.eval_problems)
  print(f"trained {record['num_params']:,} parameters in {record['train_seconds']} s, "
        f"final loss {record['final_loss']:.4f}; wrote {os.path.abspath(args.out)}")
  if "accuracy" in record:
    from nemojax.demo.evaluate import format_table  # noqa: PLC0415
    print(format_table(record["accuracy"]))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
