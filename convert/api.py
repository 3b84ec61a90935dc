"""Converting checkpoints: HF safetensors -> nemojax (`convert`), back (`export`), and `save`.

Every operation validates all it can before writing a byte (config against tensor names, shapes
and dtypes; output directory; free disk space), streams tensors one at a time so host memory stays
near the largest tensor (or part) rather than the model, and writes into a temporary directory
beside the destination that is renamed into place only when complete (see `atomic`).

Precision: `convert` stores matmul weights in `dtype` and norm scales, A_log, D and dt_bias in
float32 (the model's policy), and records each tensor's original safetensors dtype so `export`
restores it. bf16/fp16 -> float32 is exact, so a bf16 checkpoint converted with either dtype
exports bit-identically; converting float32 weights to bfloat16 rounds them (reported, and recorded
as `"lossless": false` in the manifest).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import shutil
import sys
import time
from typing import Any
from collections.abc import Iterable

import numpy as np

from nemojax.config import CheckpointError
from nemojax.convert import atomic, hf, integrity, orbax_io, safetensors_out
from nemojax.convert.names import model_tensors, tensor_specs

# Files carried along with the weights (tokenizer, chat template, generation defaults, license).
EXTRA_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
    "generation_config.json", "LICENSE*", "NOTICE*",
)
EXTRA_DIRS = ("additional_chat_templates",)  # transformers v5 keeps named templates here
_LOSSLESS = {("BF16", "float32"), ("F16", "float32"), ("BF16", "bfloat16"), ("F16", "float16"),
             ("F32", "float32"), ("F64", "float64")}


@dataclasses.dataclass(frozen=True)
class Report:
  """What a conversion did (or, for validation, would do)."""

  action: str  # "convert", "export", "save" or "validate"
  source: str | None
  path: str | None  # the directory written (None when validating only)
  num_tensors: int
  num_bytes: int  # bytes written (validate: bytes that would be written)
  seconds: float
  dtype: str
  notes: tuple[str, ...] = ()

  def summary(self) -> str:
    size = _human(self.num_bytes)
    if self.action == "validate":
      return (f"ok: {self.source}: {self.num_tensors} tensors valid; would write {size} "
              f"({self.dtype}); nothing written ({self.seconds:.1f} s)")
    src = f" from {self.source}" if self.source else ""
    return (f"{self.action}: {self.num_tensors} tensors, {size} ({self.dtype}){src} in "
            f"{self.seconds:.1f} s -> {self.path}")


def _human(n: int) -> str:
  for unit in ("B", "KB", "MB", "GB", "TB"):
    if n < 1000 or unit == "TB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
    n /= 1000
  return ""


def _dtype_name(dtype, allowed: Iterable[str]) -> str:
  name = "bfloat16" if str(dtype).endswith("bfloat16") else np.dtype(dtype).name
  if name not in allowed:
    raise ValueError(f"dtype {dtype!r}: expected one of {sorted(allowed)}")
  return name


def _progress(total: int, desc: str, enabled: bool | None):
  from tqdm.auto import tqdm  # noqa: PLC0415
  return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
              disable=None if enabled is None else not enabled, file=sys.stderr,
              dynamic_ncols=True, leave=False)


def _copy_extra_files(src_dir: str, dst_dir: str, exclude: Iterable[str] = ()) -> list[str]:
  copied = []
  exclude = set(exclude)
  for name in sorted(os.listdir(src_dir)):
    src = os.path.join(src_dir, name)
    if name in exclude:
      continue
    if name in EXTRA_DIRS and os.path.isdir(src):
      shutil.copytree(src, os.path.join(dst_dir, name))  # symlinks into an HF cache: followed
      copied.append(name + "/")
    elif any(fnmatch.fnmatch(name, p) for p in EXTRA_FILES) and os.path.isfile(src):
      shutil.copy2(src, os.path.join(dst_dir, name))
      copied.append(name)
  return copied


def _write_json(path: str, obj: Any) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=2)
    f.write("\n")


# --------------------------------------------------------------------------------------------------
# HF -> nemojax
# --------------------------------------------------------------------------------------------------
def convert(hf_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None, *,
            dtype="bfloat16", overwrite: bool = False, validate_only: bool = False,
            sha256: bool = True, progress: bool | None = None,
            part_bytes: int = orbax_io.PART_BYTES) -> Report:
  """Converts a Hugging Face Nemotron-H checkpoint directory to a nemojax checkpoint.

  Args:
    hf_dir: config.json plus model.safetensors, or shards with model.safetensors.index.json.
    out_dir: the nemojax checkpoint directory to create (optional with `validate_only`).
    dtype: storage dtype of the matmul weights, "bfloat16" or "float32" (norm scales, A_log, D,
      dt_bias are always float32).
    overwrite: replace an existing `out_dir` (only a nemojax checkpoint or an empty directory).
    validate_only: check the input (and `out_dir`, if given) and stop; nothing is written.
    sha256: record each source file's SHA-256 (the Hub's LFS object id) in the manifest, computed
      while streaming.
    progress: show a progress bar on stderr (None: only when stderr is a terminal).
    part_bytes: target size of each orbax part (bounds host memory).

  Returns:
    A `Report`; `report.summary()` is a one-line description.

  Raises:
    CheckpointError: the input is not a valid checkpoint (names the file, tensor, expectation).
    FileExistsError: `out_dir` exists and may not be replaced.
    ValueError: bad arguments. OSError: not enough disk space, I/O errors.
  """
  t0 = time.perf_counter()
  dtype = _dtype_name(dtype, ("bfloat16", "float32"))
  if out_dir is None and not validate_only:
    raise ValueError("convert: out_dir is required unless validate_only=True")
  if out_dir is not None and not validate_only:
    out_dir = atomic.check_target(out_dir, overwrite=overwrite, kind="nemojax checkpoint",
                                  replaceable=orbax_io.is_nemojax_checkpoint, sources=[hf_dir])
  if orbax_io.is_nemojax_checkpoint(hf_dir):
    raise CheckpointError(f"{os.path.abspath(hf_dir)}: already a nemojax checkpoint "
                             f"({orbax_io.MANIFEST}); `nemojax export` writes an HF one")
  ckpt = hf.inspect(hf_dir)
  stored = {i.spec.hf_name: i.spec.storage_dtype(orbax_io.np_dtype(dtype)) for i in ckpt.tensors}
  out_bytes = sum(i.num_bytes // hf.DTYPES[i.dtype].itemsize * stored[i.spec.hf_name].itemsize
                  for i in ckpt.tensors)
  rounded = [i for i in ckpt.tensors if (i.dtype, stored[i.spec.hf_name].name) not in _LOSSLESS]
  notes = []
  if rounded:
    src = sorted({i.dtype for i in rounded})
    notes.append(f"note: {len(rounded)} of {len(ckpt.tensors)} tensors are stored as "
                 f"{'/'.join(src)} in the source and are rounded to {dtype}; export cannot "
                 "restore them bit-identically (--dtype float32 keeps them)")
  if validate_only:
    if out_dir is not None:
      atomic.check_target(out_dir, overwrite=overwrite, kind="nemojax checkpoint",
                          replaceable=orbax_io.is_nemojax_checkpoint, sources=[hf_dir])
    return Report("validate", ckpt.path, None, len(ckpt.tensors), out_bytes,
                  time.perf_counter() - t0, dtype, tuple(notes))
  atomic.check_free_space(out_dir, out_bytes)

  digests: dict[str, str] | None = {} if sha256 else None
  with atomic.staged(out_dir, overwrite=overwrite) as tmp:
    with (orbax_io.PartWriter(os.path.join(tmp, orbax_io.PARAMS), part_bytes) as writer,
          _progress(ckpt.num_bytes, "convert", progress) as bar):
      def reserve(info):
        writer.reserve(info.num_bytes // hf.DTYPES[info.dtype].itemsize
                       * stored[info.spec.hf_name].itemsize)

      tensors = hf.iter_tensors(ckpt, digests=digests, before_read=reserve)
      for k, (info, arr) in enumerate(tensors):
        writer.add(info.spec, arr.astype(stored[info.spec.hf_name], copy=False), info.dtype)
        del arr
        bar.set_postfix_str(f"{k + 1}/{len(ckpt.tensors)} tensors", refresh=False)
        bar.update(info.num_bytes)
    shutil.copy2(os.path.join(ckpt.path, "config.json"), os.path.join(tmp, "config.json"))
    files = ["config.json"] + _copy_extra_files(ckpt.path, tmp, exclude={"config.json"})
    source = {"kind": "huggingface", "dir": os.path.basename(ckpt.path), "files": [
        {"name": os.path.basename(f), "size": os.path.getsize(f),
         **({"sha256": digests[f]} if digests is not None else {})} for f in ckpt.files]}
    orbax_io.write_manifest(tmp, config=ckpt.config, dtype=dtype, source=source, writer=writer,
                            files=files, lossless=not rounded)
  return Report("convert", ckpt.path, out_dir, len(ckpt.tensors), out_bytes,
                time.perf_counter() - t0, dtype, tuple(notes))


# --------------------------------------------------------------------------------------------------
# model in memory -> nemojax
# --------------------------------------------------------------------------------------------------
def save(model, out_dir: str | os.PathLike, *, overwrite: bool = False,
         copy_from: str | os.PathLike | None = None, progress: bool | None = None,
         part_bytes: int = orbax_io.PART_BYTES) -> Report:
  """Saves a `NemotronH` model (e.g. fine-tuned) as a nemojax checkpoint, tensor by tensor.

  Arrays are copied to the host one at a time (a sharded array is gathered), so host memory stays
  near one part, not the model.

  Args:
    model: the model; its parameters are saved in their current dtypes.
    out_dir: the nemojax checkpoint directory to create.
    overwrite: replace an existing `out_dir` (only a nemojax checkpoint or an empty directory).
    copy_from: optional HF or nemojax directory the model came from: its tokenizer, chat template
      and generation config are copied, and its per-tensor original HF dtypes recorded so `export`
      writes the same dtypes.
    progress: show a progress bar on stderr (None: only when stderr is a terminal).
    part_bytes: target size of each orbax part.
  """
  from flax import nnx  # noqa: PLC0415
  t0 = time.perf_counter()
  config = model.config
  out_dir = atomic.check_target(out_dir, overwrite=overwrite, kind="nemojax checkpoint",
                                replaceable=orbax_io.is_nemojax_checkpoint,
                                sources=[copy_from] if copy_from is not None else [])
  hf_dtypes: dict[str, str] = {}
  if copy_from is not None:
    copy_from = os.fspath(copy_from)
    if orbax_io.is_nemojax_checkpoint(copy_from):
      hf_dtypes = {t.spec.hf_name: t.hf_dtype
                   for t in orbax_io.read(copy_from, check_parts=False).tensors if t.hf_dtype}
    elif hf.is_hf_checkpoint(copy_from):
      hf_dtypes = {i.spec.hf_name: i.dtype for i in hf.inspect(copy_from).tensors}
    else:
      raise CheckpointError(f"{copy_from}: copy_from is neither a nemojax nor an HF checkpoint")
  leaves = list(model_tensors(nnx.to_pure_dict(nnx.state(model)), config))
  num_bytes = sum(int(np.prod(s.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
                  for s, x in leaves)
  atomic.check_free_space(out_dir, num_bytes)
  dtype = np.dtype(leaves[0][1].dtype).name  # the embeddings: the model's dtype
  with atomic.staged(out_dir, overwrite=overwrite) as tmp:
    with (orbax_io.PartWriter(os.path.join(tmp, orbax_io.PARAMS), part_bytes) as writer,
          _progress(num_bytes, "save", progress) as bar):
      for spec, leaf in leaves:
        writer.reserve(int(np.prod(spec.shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize)
        arr = np.asarray(leaf)
        integrity.check_finite(arr, spec.hf_name, "model")
        writer.add(spec, arr, hf_dtypes.get(spec.hf_name))
        bar.update(arr.nbytes)
        del arr
    _write_json(os.path.join(tmp, "config.json"), config.to_hf_config())
    files = ["config.json"]
    if copy_from is not None:
      files += _copy_extra_files(copy_from, tmp, exclude={"config.json"})
    lossless = all((hf_dtypes[s.hf_name], np.dtype(x.dtype).name) in _LOSSLESS
                   for s, x in leaves if s.hf_name in hf_dtypes)
    source = {"kind": "model",
              "copy_from": os.path.basename(os.path.abspath(copy_from)) if copy_from else None}
    orbax_io.write_manifest(tmp, config=config, dtype=dtype, source=source, writer=writer,
                            files=files, lossless=lossless)
  return Report("save", None, out_dir, len(leaves), num_bytes, time.perf_counter() - t0, dtype)


# --------------------------------------------------------------------------------------------------
# nemojax -> HF, model in memory -> HF
# --------------------------------------------------------------------------------------------------
def _forced_hf_dtype(dtype) -> str | None:
  """The safetensors dtype every tensor is written in, or None for "each its own"."""
  if dtype is None or str(dtype) == "auto":
    return None
  name = _dtype_name(dtype, ("bfloat16", "float32", "float16"))
  return hf.DTYPE_NAMES[np.dtype(orbax_io.np_dtype(name))]


def export(nemojax_dir: str | os.PathLike, hf_dir: str | os.PathLike, *, dtype=None,
           max_shard_size: int | str = "5GB", overwrite: bool = False,
           progress: bool | None = None) -> Report:
  """Writes a nemojax checkpoint back as an HF safetensors checkpoint directory.

  The result (sharded safetensors + index, config.json from `NemotronHConfig.to_hf_config()`,
  tokenizer files) loads with `transformers.AutoModelForCausalLM.from_pretrained` and vLLM.

  Args:
    nemojax_dir: a directory written by `convert` or `save`.
    hf_dir: the HF checkpoint directory to create.
    dtype: None to write each tensor in its original HF dtype when the manifest records one (else
      its stored dtype); or "bfloat16"/"float32"/"float16" for every tensor.
    max_shard_size: bytes or a string like "5GB" (10**9) or "4GiB".
    overwrite: replace an existing `hf_dir` (only an HF checkpoint or an empty directory).
    progress: show a progress bar on stderr (None: only when stderr is a terminal).
  """
  t0 = time.perf_counter()
  src = orbax_io.read(nemojax_dir)
  forced = _forced_hf_dtype(dtype)
  out_dtype = {t.spec.hf_name: forced or t.hf_dtype or hf.DTYPE_NAMES[t.dtype]
               for t in src.tensors}
  arrays = lambda: ((t.spec, arr) for t, arr in orbax_io.iter_arrays(src))
  return _write_hf(hf_dir, src.config, out_dtype, arrays, extra_from=src.path,
                   max_shard_size=max_shard_size, overwrite=overwrite, progress=progress,
                   report=("export", src.path, t0))


def export_model(model, hf_dir: str | os.PathLike, *, dtype=None,
                 max_shard_size: int | str = "5GB", overwrite: bool = False,
                 copy_from: str | os.PathLike | None = None,
                 progress: bool | None = None) -> Report:
  """Writes a `NemotronH` model (e.g. just trained) as an HF safetensors checkpoint directory.

  Arrays are copied to the host one at a time (a sharded array is gathered).

  Args:
    model: the model.
    hf_dir: the HF checkpoint directory to create.
    dtype: None to write each tensor in its current dtype, or "bfloat16"/"float32"/"float16".
    max_shard_size: bytes or a string like "5GB" (10**9) or "4GiB".
    overwrite: replace an existing `hf_dir` (only an HF checkpoint or an empty directory).
    copy_from: optional directory whose tokenizer, chat template and generation config files are
      copied along.
    progress: show a progress bar on stderr (None: only when stderr is a terminal).
  """
  from flax import nnx  # noqa: PLC0415
  t0 = time.perf_counter()
  config = model.config
  pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  forced = _forced_hf_dtype(dtype)
  out_dtype = {spec.hf_name: forced or hf.DTYPE_NAMES[np.dtype(leaf.dtype)]
               for spec, leaf in model_tensors(pure, config)}

  def arrays():
    for spec, leaf in model_tensors(pure, config):
      arr = np.asarray(leaf)
      integrity.check_finite(arr, spec.hf_name, "model")
      yield spec, arr
      del arr

  return _write_hf(hf_dir, config, out_dtype, arrays, extra_from=copy_from,
                   max_shard_size=max_shard_size, overwrite=overwrite, progress=progress,
                   report=("export", None, t0))


def _write_hf(hf_dir, config, out_dtype: dict[str, str], arrays, *, extra_from, max_shard_size,
              overwrite: bool, progress, report: tuple) -> Report:
  """Plans the shards, checks the target and the disk, then streams `arrays()` into place."""
  specs = tensor_specs(config)
  sources = [extra_from] if extra_from is not None else []
  hf_dir = atomic.check_target(hf_dir, overwrite=overwrite, kind="Hugging Face checkpoint",
                               replaceable=hf.is_hf_checkpoint, sources=sources)
  layout = safetensors_out.plan([(s.hf_name, s.shape, out_dtype[s.hf_name]) for s in specs],
                                max_shard_size)
  atomic.check_free_space(hf_dir, layout.num_bytes)
  by_bytes: dict[str, int] = {}
  for slot in layout.slots.values():
    by_bytes[slot.dtype] = by_bytes.get(slot.dtype, 0) + slot.num_bytes
  main_dtype = hf.DTYPES[max(by_bytes, key=by_bytes.get)]
  main_name = "bfloat16" if main_dtype == hf.DTYPES["BF16"] else main_dtype.name
  with atomic.staged(hf_dir, overwrite=overwrite) as tmp:
    writer = safetensors_out.ShardWriter(tmp, layout)
    with _progress(layout.num_bytes, "export", progress) as bar:
      for spec, arr in arrays():
        out = arr.astype(hf.DTYPES[out_dtype[spec.hf_name]], copy=False)
        writer.write(spec.hf_name, out)
        bar.update(out.nbytes)
        del arr, out  # before the next array is read
    writer.finish()
    cfg = config.to_hf_config()
    cfg["dtype"] = main_name
    _write_json(os.path.join(tmp, "config.json"), cfg)
    if extra_from is not None:
      _copy_extra_files(os.fspath(extra_from), tmp, exclude={"config.json", orbax_io.MANIFEST})
    hf.inspect(tmp)  # what we wrote must read back as the config says
  action, source, t0 = report
  return Report(action, source, hf_dir, len(specs), layout.num_bytes, time.perf_counter() - t0,
                main_name)
