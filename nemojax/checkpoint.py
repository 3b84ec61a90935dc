"""`nemojax.load`: a model from an HF checkpoint directory or a converted nemojax directory.

The model is built abstractly (`nnx.eval_shape`), so no random weights are ever allocated, and
tensors are read one at a time straight into their place: peak host memory is the model plus one
tensor, never the model twice.
"""

from __future__ import annotations

import os
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nemojax.config import NemotronHConfig
from nemojax.convert import hf
from nemojax.convert.names import TensorSpec, is_stacked
from nemojax.convert.stacked import StackedParams
from nemojax.model import NemotronH

ShardingFn = Callable[[TensorSpec], "jax.sharding.Sharding | None"]


def abstract_model(config: NemotronHConfig, dtype=jnp.bfloat16,
                   ssd_implementation: str | None = None) -> NemotronH:
  """The model with `ShapeDtypeStruct` leaves: structure without memory."""
  return nnx.eval_shape(lambda: NemotronH(config, dtype=dtype, rngs=nnx.Rngs(0),
                                          ssd_implementation=ssd_implementation))


def param_dtype(spec: TensorSpec, dtype) -> np.dtype:
  """Storage dtype of one tensor under the model's dtype policy."""
  return np.dtype(np.float32) if spec.float32 else np.dtype(dtype)


def model_from_tensors(config: NemotronHConfig, tensors: Iterable[tuple[TensorSpec, np.ndarray]],
                       *, dtype=jnp.bfloat16, sharding: ShardingFn | None = None,
                       ssd_implementation: str | None = None) -> NemotronH:
  """Assembles a model from (spec, array) pairs, placing each on device as it arrives."""
  abstract = abstract_model(config, dtype, ssd_implementation)
  graphdef, state = nnx.split(abstract)
  pure = nnx.to_pure_dict(state)
  filled = set()
  stacks = StackedParams(pure, lambda spec: param_dtype(spec, dtype), sharding)
  for spec, arr in tensors:
    if is_stacked(spec):
      stacks.add(spec, arr)
      del arr
      continue
    node = pure
    for key in spec.path[:-1]:
      node = node[key]
    target = node[spec.path[-1]]
    if tuple(arr.shape) != tuple(target.shape):
      raise ValueError(f"tensor {spec.hf_name!r} has shape {tuple(arr.shape)}, "
                       f"the model expects {tuple(target.shape)}")
    host = np.asarray(arr).astype(param_dtype(spec, dtype), copy=False)
    shard = sharding(spec) if sharding is not None else None
    node[spec.path[-1]] = jax.device_put(host, shard) if shard is not None else jnp.asarray(host)
    filled.add(spec.path)
    del host, arr
  stacks.finish()
  missing = [p for p, leaf in _flatten(pure) if isinstance(leaf, jax.ShapeDtypeStruct)]
  if missing:
    raise ValueError("model parameters left unfilled: "
                     + ", ".join(".".join(map(str, p)) for p in missing[:5]))
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state)


def _flatten(tree, prefix=()):
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _flatten(v, prefix + (k,))
  else:
    yield prefix, tree


def load_hf(path: str | os.PathLike, *, dtype=jnp.bfloat16, sharding: ShardingFn | None = None,
            ssd_implementation: str | None = None) -> NemotronH:
  """Loads an HF safetensors checkpoint directory (validated before any tensor is read)."""
  ckpt = hf.inspect(path)
  tensors = ((info.spec, arr) for info, arr in hf.iter_tensors(ckpt))
  return model_from_tensors(ckpt.config, tensors, dtype=dtype, sharding=sharding,
                            ssd_implementation=ssd_implementation)


def load(path: str | os.PathLike, dtype=jnp.bfloat16, *, sharding: ShardingFn | None = None,
         ssd_implementation: str | None = None) -> NemotronH:
  """Loads a Nemotron-H model.

  Args:
    path: an HF checkpoint directory (config.json + model.safetensors or sharded with
      model.safetensors.index.json) or a directory written by `nemojax convert`.
    dtype: storage dtype for matmul weights and activations (jnp.bfloat16 or jnp.float32).
    sharding: optional function from a tensor's spec to the `jax.sharding.Sharding` to place it
      with (default: the default device).
    ssd_implementation: SSD scan choice for the Mamba layers (None = auto).
  """
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: no such model directory")
  from nemojax.convert import orbax_io  # noqa: PLC0415  (optional format, imported on use)
  if orbax_io.is_nemojax_checkpoint(path):
    return orbax_io.load(path, dtype=dtype, sharding=sharding,
                         ssd_implementation=ssd_implementation)
  if hf.is_hf_checkpoint(path):
    return load_hf(path, dtype=dtype, sharding=sharding, ssd_implementation=ssd_implementation)
  raise hf.CheckpointError(
      f"{path}: not a model directory (expected config.json with model.safetensors or "
      f"{hf.INDEX_FILE}, or a directory written by `nemojax convert`)")


def save(model: NemotronH, path: str | os.PathLike, *, overwrite: bool = False,
         copy_from: str | os.PathLike | None = None):
  """Saves a model in nemojax's format (readable by `load`, exportable to HF).

  `copy_from` (an HF or nemojax directory) supplies the tokenizer files and the original
  per-tensor dtypes, so a fine-tuned model exports back bit-compatibly. Returns a `Report`.
  """
  from nemojax.convert import api  # noqa: PLC0415  (orbax is imported only when saving)
  return api.save(model, path, overwrite=overwrite, copy_from=copy_from)
