"""Stacked parameters (MoE experts [E, ...]) assembled from their per-expert checkpoint tensors.

A spec whose path ends in an index j (`names.is_stacked`) fills slice j of the parameter at
`path[:-1]`; both loaders (HF safetensors and nemojax parts) feed such tensors here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from nemojax.convert.names import TensorSpec, assign, lookup


class StackedParams:
  """Assembles stacked parameters (MoE experts [E, ...]) from their per-expert tensors.

  Each stacked parameter gets one host buffer, filled slice by slice as the tensors stream in and
  placed on device (with `sharding` of the whole parameter) as soon as its last slice arrives. A
  checkpoint stores a layer's experts together, so the host holds about one layer's experts
  (up_proj and down_proj) beside the model, never a layer twice.
  """

  def __init__(self, pure: dict, dtype_of: Callable[[TensorSpec], np.dtype],
               sharding: Callable[[TensorSpec], Any] | None = None):
    """`pure`: the model's nested parameter dict (abstract leaves are replaced as filled);
    `dtype_of`: storage dtype of a tensor; `sharding`: spec of the whole stacked parameter ->
    `jax.sharding.Sharding` or None (the default device)."""
    self._pure, self._dtype_of, self._sharding = pure, dtype_of, sharding
    self._open: dict[tuple, tuple[np.ndarray, set[int], TensorSpec]] = {}

  def add(self, spec: TensorSpec, arr) -> None:
    path, j = spec.path[:-1], spec.path[-1]
    if path not in self._open:
      target = lookup(self._pure, path)
      # Named as transformers names the stacked tensor in memory: backbone...experts.up_proj
      whole = TensorSpec(".".join(map(str, path)), path, tuple(target.shape), spec.float32)
      self._open[path] = (np.empty(target.shape, self._dtype_of(spec)), set(), whole)
    buf, done, whole = self._open[path]
    if tuple(arr.shape) != whole.shape[1:] or not 0 <= j < whole.shape[0]:
      raise ValueError(f"tensor {spec.hf_name!r} has shape {tuple(arr.shape)}, the model expects "
                       f"{whole.shape[1:]} for slice {j} of {whole.hf_name} {whole.shape}")
    buf[j] = np.asarray(arr)
    done.add(j)
    if len(done) == whole.shape[0]:
      del self._open[path]
      import jax  # noqa: PLC0415  (convert/ imports jax only when it places arrays)
      shard = self._sharding(whole) if self._sharding is not None else None
      assign(self._pure, path, jax.device_put(buf, shard))

  def finish(self) -> None:
    """Raises if a stacked parameter is still missing slices."""
    for _, done, whole in self._open.values():
      missing = sorted(set(range(whole.shape[0])) - done)
      raise ValueError(f"{whole.hf_name}: {len(missing)} of {whole.shape[0]} slices never "
                       f"arrived (first: {missing[0]})")
