"""nemojax's own checkpoint format (placeholder until the converter lands: recognises nothing)."""

from __future__ import annotations

import os


def is_nemojax_checkpoint(path: str | os.PathLike) -> bool:
  del path
  return False


def load(path, **kwargs):
  raise NotImplementedError(f"{path}: nemojax-format checkpoints are not supported yet")
