"""`nemojax.load`: a model from an HF checkpoint directory or a converted nemojax directory.

The model is built abstractly (`nnx.eval_shape`), so no random weights are ever allocated, and
tensors are read one at a time straight into their place: peak host memory is the model plus one
tensor, never the model twice. Readers (`convert.hf`, `convert.orbax_io`) stream (spec, array)
pairs, checked for damage and NaN/Inf; this module is the only one that assembles a model.
"""

from __future__ import annotations

import os
from typing import Any
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nemojax.config import CheckpointError, NemotronHConfig
from nemojax.convert import hf
from nemojax.convert.names import TensorSpec, assign, is_stacked, lookup
from nemojax.convert.stacked import StackedParams
from nemojax.model import NemotronH

ShardingFn = Callable[[TensorSpec], "jax.sharding.Sharding | None"]


def abstract_model(config: NemotronHConfig, dtype=jnp.bfloat16,
                   ssd_implementation: str | None = None) -> NemotronH:
  """The model with `ShapeDtypeStruct` leaves: structure without memory."""
  return nnx.eval_shape(lambda: NemotronH(config, dtype=dtype, rngs=nnx.Rngs(0),
                                          ssd_implementation=ssd_implementation))


def model_from_tensors(config: NemotronHConfig, tensors: Iterable[tuple[TensorSpec, Any]],
                       *, dtype=jnp.bfloat16, sharding: ShardingFn | None = None,
                       ssd_implementation: str | None = None) -> NemotronH:
  """Assembles a model from (spec, array) pairs, placing each on device as it arrives.

  An array may be NumPy (host; cast to the tensor's dtype, then placed with `sharding(spec)`) or
  a `jax.Array` already placed by its reader (cast on its device if its dtype differs).
  """
  abstract = abstract_model(config, dtype, ssd_implementation)
  graphdef, state = nnx.split(abstract)
  pure = nnx.to_pure_dict(state)
  stacks = StackedParams(pure, lambda spec: spec.storage_dtype(dtype), sharding)
  for spec, arr in tensors:
    if is_stacked(spec):  # one expert's slice of a stacked MoE parameter
      stacks.add(spec, arr)
      del arr
      continue
    target = lookup(pure, spec.path)
    if tuple(arr.shape) != tuple(target.shape):
      raise ValueError(f"tensor {spec.hf_name!r} has shape {tuple(arr.shape)}, "
                       f"the model expects {tuple(target.shape)}")
    want = spec.storage_dtype(dtype)
    if isinstance(arr, jax.Array):
      placed = arr if arr.dtype == want else arr.astype(want)
    else:
      host = np.asarray(arr).astype(want, copy=False)
      shard = sharding(spec) if sharding is not None else None
      placed = _place(host, shard)
      del host
    assign(pure, spec.path, placed)
    del arr, placed
  stacks.finish()
  missing = [".".join(str(getattr(k, "key", k)) for k in p)
             for p, leaf in jax.tree.leaves_with_path(pure)
             if isinstance(leaf, jax.ShapeDtypeStruct)]
  if missing:
    raise ValueError("model parameters left unfilled: " + ", ".join(missing[:5]))
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state)


def _place(host: np.ndarray, shard) -> jax.Array:
  # Each process builds only its addressable shards (multi-host: no process holds the others').
  if shard is None:
    return jnp.asarray(host)
  return jax.make_array_from_callback(host.shape, shard, lambda index: host[index])


def _read_per_shard(ckpt: hf.HFCheckpoint, dtype, sharding: ShardingFn):
  """(spec, array) pairs, each array built from the slices this process's devices hold.

  A slice several local devices share (a replicated or partly replicated tensor) is read once.
  Stacked MoE experts are read whole and stacked on the host, as on the whole-tensor path.
  """
  reader = hf.SliceReader(ckpt)
  for info in ckpt.tensors:
    spec = info.spec
    shard = None if is_stacked(spec) else sharding(spec)
    if shard is None:
      yield spec, reader.read(info)
      continue
    want, pieces = spec.storage_dtype(dtype), {}

    def piece(index, info=info, want=want, pieces=pieces):
      key = tuple(s.indices(n)[:2] for s, n in zip(index, info.spec.shape))
      if key not in pieces:
        pieces[key] = reader.read(info, index).astype(want, copy=False)
      return pieces[key]

    yield spec, jax.make_array_from_callback(spec.shape, shard, piece)
    pieces.clear()


def _with_mesh(config: NemotronHConfig, mesh, rules, sharding: ShardingFn | None):
  """(the layout for `mesh`, the sharding function to load with)."""
  if mesh is None:
    return None, sharding
  if sharding is not None:
    raise ValueError("load: give either mesh= or sharding=, not both")
  from nemojax import sharding as sharding_lib  # noqa: PLC0415
  layout = (mesh if isinstance(mesh, sharding_lib.Layout)
            else sharding_lib.make_layout(mesh, config, rules=rules))
  return layout, layout.tensor_sharding


def _attach(model: NemotronH, layout) -> NemotronH:
  if layout is None:
    return model
  from nemojax import sharding as sharding_lib  # noqa: PLC0415
  return sharding_lib.attach(model, layout)


def load_hf(path: str | os.PathLike, *, dtype=jnp.bfloat16, sharding: ShardingFn | None = None,
            ssd_implementation: str | None = None, mesh=None, rules=None,
            per_shard_reads: bool | None = None) -> NemotronH:
  """Loads an HF safetensors checkpoint directory (validated before any tensor is read).

  `per_shard_reads` (with `mesh` or `sharding`): each process reads from the files only the
  slices its own devices hold (`hf.SliceReader`) instead of every tensor whole. None (default):
  only when the mesh spans several processes (`jax.process_count() > 1`).
  """
  ckpt = hf.inspect(path)
  layout, sharding = _with_mesh(ckpt.config, mesh, rules, sharding)
  if per_shard_reads is None:
    per_shard_reads = jax.process_count() > 1
  if per_shard_reads and sharding is not None:
    tensors = _read_per_shard(ckpt, dtype, sharding)
  else:
    tensors = ((info.spec, arr) for info, arr in hf.iter_tensors(ckpt))
  return _attach(model_from_tensors(ckpt.config, tensors, dtype=dtype, sharding=sharding,
                                    ssd_implementation=ssd_implementation), layout)


def load_nemojax(path: str | os.PathLike, *, dtype=jnp.bfloat16,
                 sharding: ShardingFn | None = None, ssd_implementation: str | None = None,
                 verify: bool = True, mesh=None, rules=None) -> NemotronH:
  """Loads a nemojax checkpoint directory, each array restored straight into its sharding.

  Every file's size is checked against the manifest; with `verify`, its SHA-256 too.
  """
  from nemojax.convert import orbax_io  # noqa: PLC0415  (orbax: a slow import, only when used)
  ckpt = orbax_io.read(path, verify=verify)
  layout, sharding = _with_mesh(ckpt.config, mesh, rules, sharding)
  default = jax.sharding.SingleDeviceSharding(jax.devices()[0])

  def target(t) -> jax.ShapeDtypeStruct:
    if is_stacked(t.spec):  # expert slices restore to the host and are stacked there
      return jax.ShapeDtypeStruct(t.spec.shape, t.spec.storage_dtype(dtype))
    shard = sharding(t.spec) if sharding is not None else None
    return jax.ShapeDtypeStruct(t.spec.shape, t.spec.storage_dtype(dtype),
                                sharding=shard or default)

  tensors = ((t.spec, arr) for t, arr in orbax_io.iter_arrays(ckpt, target))
  # `sharding` also places stacked MoE experts, which are assembled on the host.
  return _attach(model_from_tensors(ckpt.config, tensors, dtype=dtype, sharding=sharding,
                                    ssd_implementation=ssd_implementation), layout)


def load(path: str | os.PathLike, dtype=jnp.bfloat16, *, mesh=None, rules=None,
         sharding: ShardingFn | None = None, ssd_implementation: str | None = None,
         verify: bool = True) -> NemotronH:
  """Loads a Nemotron-H model.

  Args:
    path: an HF checkpoint directory (config.json + model.safetensors or sharded with
      model.safetensors.index.json) or a directory written by `nemojax convert`.
    dtype: storage dtype for matmul weights and activations (jnp.bfloat16 or jnp.float32).
    mesh: optional `jax.sharding.Mesh` over any of the axes data, fsdp, tensor, expert (Auto or
      Explicit): every tensor is placed straight into its shards (nemojax directories are
      restored shard by shard; each process builds only its addressable shards) and the model
      runs SPMD over the mesh; see `nemojax.sharding`. A `nemojax.sharding.Layout` (mesh +
      rules, e.g. `make_layout(mesh, config, on_indivisible="error")`) is accepted too.
    rules: with `mesh`, overrides of `nemojax.sharding.DEFAULT_RULES` (logical axis -> mesh axes).
    sharding: optional function from a tensor's spec to the `jax.sharding.Sharding` to place it
      with (default: the default device).
    ssd_implementation: SSD scan choice for the Mamba layers (None = auto).
    verify: for a nemojax directory, check every file's SHA-256 against the one recorded when it
      was written (sizes are always checked); False skips the hashing. HF directories carry no
      hashes (their headers and sizes are checked).

  Raises:
    CheckpointError: a missing, truncated or damaged file, a tensor the config does not expect or
      of the wrong shape, or a tensor holding NaN/Inf; the one-line message names the file or
      tensor.
  """
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: no such model directory")
  from nemojax.convert import orbax_io  # noqa: PLC0415  (optional format, imported on use)
  if orbax_io.is_nemojax_checkpoint(path, damaged=not hf.is_hf_checkpoint(path)):
    return load_nemojax(path, dtype=dtype, sharding=sharding,
                        ssd_implementation=ssd_implementation, verify=verify, mesh=mesh,
                        rules=rules)
  if hf.is_hf_checkpoint(path):
    return load_hf(path, dtype=dtype, sharding=sharding, ssd_implementation=ssd_implementation,
                   mesh=mesh, rules=rules)
  raise CheckpointError(
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
