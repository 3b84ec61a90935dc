"""Checkpoint conversion: HF safetensors <-> nemojax, streaming and validated.

    from nemojax.convert import convert, export, save
    convert("NVIDIA-Nemotron-Nano-9B-v2", "nano9b-nemojax")   # HF dir -> nemojax dir
    export("nano9b-nemojax", "nano9b-hf")                      # nemojax dir -> HF dir
    save(model, "finetuned-nemojax", copy_from="nano9b-nemojax")
    export_model(model, "finetuned-hf", copy_from="nano9b-nemojax")  # model -> HF dir

The functions load lazily (orbax is imported only when one is used), because `nemojax.load` imports
this package for its HF reader.
"""

from __future__ import annotations

_API = ("convert", "export", "export_model", "save", "Report")


def __getattr__(name: str):
  if name in _API:
    from nemojax.convert import api  # noqa: PLC0415
    return getattr(api, name)
  raise AttributeError(f"module 'nemojax.convert' has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + list(_API))
