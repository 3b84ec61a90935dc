"""A tiny Nemotron-H that reasons, shipped with nemojax so `nemojax generate` works out of the box.

The model was trained by nemojax itself (`python -m nemojax.demo.train`) on the last digit of
chains like ``7 × 8 × 3 × 9``, answering in Nemotron's chat format with a step-by-step
``<think>`` trace, directly with ``/no_think``, or with a best guess after a thinking budget cuts
the trace. Its HF-layout directory (config.json, model.safetensors, tokenizer files) is
`demo_model_path()`:

  model = nemojax.load(demo_model_path(), dtype=jnp.float32)
  tok = nemojax.Tokenizer.from_pretrained(demo_model_path())

Modules: `task` (problems and traces), `bpe` (the byte-level BPE trainer), `data` (chat
transcripts, tokenizer, batches), `decode` (greedy decoding with a thinking budget), `train` and
`evaluate` (runnable with ``python -m``).
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

__all__ = ["DEMO_QUESTION", "demo_model_path"]

# What `nemojax generate` asks the demo model when given no prompt.
DEMO_QUESTION = "What is the last digit of 7 × 8 × 3 × 9?"


def demo_model_path() -> Path:
  """The directory of the shipped demo model (config.json, model.safetensors, tokenizer files)."""
  path = Path(str(importlib.resources.files("nemojax") / "demo" / "assets"))
  if not (path / "config.json").is_file():
    raise FileNotFoundError(
        f"{path} holds no demo model (no config.json); build it with "
        "`python -m nemojax.demo.train --out nemojax/demo/assets` in a source checkout.")
  return path
