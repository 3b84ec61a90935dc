"""Checkpoint conversion: HF safetensors <-> nemojax, streaming and validated."""
