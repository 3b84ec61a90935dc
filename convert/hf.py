"""Reading Hugging Face Nemotron-H checkpoints: config, safetensors index, validation, streaming.

A checkpoint directory holds `config.json` and either `model.safetensors` or shards listed by
`model.safetensors.index.json` (`weight_map`: tensor name -> shard file). Everything that can be
checked without reading tensor data is checked first (`inspect`): the config, every shard's
header, every expected tensor present once, nothing unexpected, every shape and dtype as the
config implies. Tensors are then read one at a time (`iter_tensors`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import itertools
import json
import os
import sys
from collections.abc import Callable, Iterator

import ml_dtypes
import numpy as np
from safetensors import safe_open

# CheckpointError lives in the config module (nemojax.CheckpointError); importing it here keeps
# `from nemojax.convert.hf import CheckpointError` working.
from nemojax.config import CheckpointError, ConfigError, NemotronHConfig
from nemojax.convert import integrity
from nemojax.convert.names import TensorSpec, is_ignored, tensor_specs

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_FLOAT_DTYPES = {"F32": np.float32, "BF16": ml_dtypes.bfloat16, "F16": np.float16,
                 "F64": np.float64}
# safetensors dtype string <-> NumPy dtype, for the float dtypes a Nemotron-H checkpoint may hold.
DTYPES: dict[str, np.dtype] = {k: np.dtype(v) for k, v in _FLOAT_DTYPES.items()}
DTYPE_NAMES: dict[np.dtype, str] = {v: k for k, v in DTYPES.items()}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  spec: TensorSpec
  file: str  # absolute path of the shard holding it
  dtype: str  # safetensors dtype string ("BF16", "F32", ...)

  @property
  def num_bytes(self) -> int:
    return int(np.prod(self.spec.shape, dtype=np.int64)) * DTYPES[self.dtype].itemsize


@dataclasses.dataclass(frozen=True)
class HFCheckpoint:
  """A validated HF checkpoint: config, tensor locations and sizes."""

  path: str
  config: NemotronHConfig
  raw_config: dict
  tensors: tuple[TensorInfo, ...]  # in model order
  files: tuple[str, ...]

  @property
  def num_bytes(self) -> int:
    return sum(t.num_bytes for t in self.tensors)


def is_hf_checkpoint(path: str | os.PathLike) -> bool:
  path = os.fspath(path)
  return os.path.isfile(os.path.join(path, "config.json")) and (
      os.path.isfile(os.path.join(path, SINGLE_FILE))
      or os.path.isfile(os.path.join(path, INDEX_FILE)))


def _weight_map(path: str) -> dict[str, str]:
  """tensor name -> shard file name."""
  index_path = os.path.join(path, INDEX_FILE)
  if os.path.isfile(index_path):
    try:
      with open(index_path) as f:
        index = json.load(f)
    except json.JSONDecodeError as e:
      raise CheckpointError(f"{index_path}: not valid JSON ({e})") from None
    wm = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wm, dict) or not wm:
      raise CheckpointError(f"{index_path}: expected a non-empty 'weight_map' object")
    for name, shard in wm.items():
      if not isinstance(shard, str) or os.path.basename(shard) != shard:
        raise CheckpointError(f"{index_path}: tensor {name!r} maps to {shard!r}, "
                              "expected a shard file name in the same directory")
    return dict(wm)
  single = os.path.join(path, SINGLE_FILE)
  if os.path.isfile(single):
    _check_file_size(single)
    with _open(single) as f:
      return {name: SINGLE_FILE for name in f.keys()}
  raise CheckpointError(f"{path}: no {SINGLE_FILE} and no {INDEX_FILE}; "
                        "not a Hugging Face safetensors checkpoint")


def _open(file: str):
  try:
    return safe_open(file, framework="np")
  except FileNotFoundError:
    raise CheckpointError(f"{file}: shard file is missing") from None
  except Exception as e:  # noqa: BLE001  (safetensors raises its own types for bad headers)
    size = os.path.getsize(file) if os.path.exists(file) else "?"
    raise CheckpointError(f"{file}: not a readable safetensors file ({size} bytes): {e}") from None


def inspect(path: str | os.PathLike) -> HFCheckpoint:
  """Validates an HF checkpoint directory without reading tensor data."""
  path = os.path.abspath(os.fspath(path))
  if not os.path.isdir(path):
    raise CheckpointError(f"{path}: not a directory")
  cfg_path = os.path.join(path, "config.json")
  try:
    with open(cfg_path) as f:
      raw = json.load(f)
  except FileNotFoundError:
    raise CheckpointError(f"{cfg_path}: missing (every checkpoint needs config.json)") from None
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None
  try:
    config = NemotronHConfig.from_hf_config(raw, source=cfg_path)
  except ConfigError as e:
    raise CheckpointError(str(e)) from None

  wm = _weight_map(path)
  specs = tensor_specs(config)
  expected = {s.hf_name: s for s in specs}

  # Read each shard's header once: names, shapes, dtypes.
  headers: dict[str, dict[str, tuple[list[int], str]]] = {}
  for shard in sorted(set(wm.values())):
    file = os.path.join(path, shard)
    _check_file_size(file)
    with _open(file) as f:
      headers[shard] = {k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype())
                        for k in f.keys()}

  seen: dict[str, str] = {}
  for shard, names in headers.items():
    for name in names:
      if name in seen:
        raise CheckpointError(f"tensor {name!r} appears in both {seen[name]} and {shard}")
      seen[name] = shard
  for name, shard in wm.items():
    if name not in headers.get(shard, {}):
      raise CheckpointError(f"{os.path.join(path, INDEX_FILE)}: tensor {name!r} is listed in "
                            f"{shard} but that file does not contain it")

  unexpected = sorted(n for n in set(seen) - set(expected) if not is_ignored(n))  # MTP: skipped
  if unexpected:
    shard = seen[unexpected[0]]
    raise CheckpointError(
        f"{os.path.join(path, shard)}: unexpected tensor {unexpected[0]!r}"
        + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
        + f"; the config ({config.hybrid_override_pattern!r}) implies no such tensor")
  missing = [s.hf_name for s in specs if s.hf_name not in seen]
  if missing:
    raise CheckpointError(
        f"{path}: missing tensor {missing[0]!r}"
        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        + f" required by the config ({config.hybrid_override_pattern!r})")

  infos = []
  for spec in specs:
    shard = seen[spec.hf_name]
    shape, dtype = headers[shard][spec.hf_name]
    file = os.path.join(path, shard)
    if tuple(shape) != spec.shape:
      raise CheckpointError(f"{file}: tensor {spec.hf_name!r} has shape {tuple(shape)}, "
                            f"expected {spec.shape} from config.json")
    if dtype not in _FLOAT_DTYPES:
      raise CheckpointError(f"{file}: tensor {spec.hf_name!r} has dtype {dtype}, "
                            f"expected one of {sorted(_FLOAT_DTYPES)}")
    infos.append(TensorInfo(spec=spec, file=file, dtype=dtype))
  return HFCheckpoint(path=path, config=config, raw_config=raw, tensors=tuple(infos),
                      files=tuple(os.path.join(path, s) for s in sorted(headers)))


def _check_file_size(file: str) -> None:
  """Catches truncated shards before any tensor is read: header length + data must fit."""
  if not os.path.isfile(file):
    raise CheckpointError(f"{file}: shard file is missing")
  size = os.path.getsize(file)
  if size < 8:
    raise CheckpointError(f"{file}: truncated ({size} bytes; a safetensors file starts with an "
                          "8-byte header length)")
  with open(file, "rb") as f:
    n = int.from_bytes(f.read(8), "little")
    if n > size - 8:
      raise CheckpointError(f"{file}: corrupted header (declares {n} header bytes, file has "
                            f"{size - 8} after the length field)")
    try:
      header = json.loads(f.read(n))
    except (ValueError, RecursionError) as e:  # JSON and UTF-8 errors are ValueErrors
      raise CheckpointError(f"{file}: corrupted safetensors header ({e})") from None
  if not isinstance(header, dict):
    raise CheckpointError(f"{file}: corrupted safetensors header (not a JSON object)")
  end = 0
  for name, entry in header.items():
    if name == "__metadata__":
      continue
    try:
      end = max(end, int(entry["data_offsets"][1]))
    except (TypeError, KeyError, IndexError, ValueError, OverflowError):
      raise CheckpointError(f"{file}: corrupted header entry for {name!r}") from None
  if 8 + n + end > size:
    raise CheckpointError(f"{file}: truncated: the header needs {8 + n + end} bytes, "
                          f"the file has {size}")


def iter_tensors(ckpt: HFCheckpoint, *, digests: dict[str, str] | None = None,
                 before_read: Callable[[TensorInfo], None] | None = None
                 ) -> Iterator[tuple[TensorInfo, np.ndarray]]:
  """Yields (info, array) one tensor at a time, shard by shard, in each file's storage order.

  Shards are read front to back with plain reads into a fresh buffer per tensor (no memory map:
  a mapped shard's pages would count as resident memory until it is closed, i.e. up to the whole
  shard). Arrays are read-only, in the file's native dtype; a tensor holding NaN or Inf raises
  CheckpointError (a broken checkpoint is refused, not passed on).

  Args:
    ckpt: a checkpoint validated by `inspect` (headers already checked by the safetensors reader).
    digests: if given, the SHA-256 of every whole shard file (header included, so it equals the
      Hub's LFS object id) is computed on a worker thread while reading and stored here under the
      shard's absolute path once the shard is done.
    before_read: called with each tensor's info before its buffer is allocated (a consumer that
      batches tensors can release memory first).
  """
  if sys.byteorder != "little":
    raise CheckpointError("safetensors data is little-endian; big-endian hosts are not supported")
  by_file: dict[str, list[TensorInfo]] = {}
  for info in ckpt.tensors:
    by_file.setdefault(info.file, []).append(info)
  hasher = _BackgroundHash() if digests is not None else None
  try:
    for file, infos in by_file.items():
      yield from _read_shard(file, infos, hasher, before_read)
      if hasher is not None:
        digests[file] = hasher.hexdigest()
  finally:
    if hasher is not None:
      hasher.close()


def _read_shard(file: str, infos: list[TensorInfo], hasher: _BackgroundHash | None,
                before_read: Callable[[TensorInfo], None] | None
                ) -> Iterator[tuple[TensorInfo, np.ndarray]]:
  with open(file, "rb", buffering=0) as f:
    head = _read_exact(f, 8, file, "the header length")
    n = int.from_bytes(head, "little")
    header_bytes = _read_exact(f, n, file, "the header")
    if hasher is not None:
      hasher.start()
      hasher.update(head)
      hasher.update(header_bytes)
    try:
      header = json.loads(header_bytes)
      located = sorted((((int(header[i.spec.hf_name]["data_offsets"][0]),
                          int(header[i.spec.hf_name]["data_offsets"][1])), i) for i in infos),
                       key=lambda x: x[0])
    except (ValueError, KeyError, TypeError, IndexError, RecursionError):
      raise CheckpointError(f"{file}: the safetensors header changed after validation") from None
    pos = 0
    for (begin, end), info in located:
      if begin < pos or end - begin != info.num_bytes:
        raise CheckpointError(f"{file}: tensor {info.spec.hf_name!r} has data offsets "
                              f"[{begin}, {end}], expected {info.num_bytes} bytes after {pos}")
      if begin > pos:  # bytes no tensor claims: skip them, but hash them
        gap = _read_exact(f, begin - pos, file, f"the bytes before {info.spec.hf_name!r}")
        if hasher is not None:
          hasher.update(gap)
      if before_read is not None:
        before_read(info)
      buf = np.empty(end - begin, np.uint8)
      _read_exact(f, buf, file, f"tensor {info.spec.hf_name!r}")
      buf.flags.writeable = False
      if hasher is not None:
        hasher.update(buf)
      pos = end
      arr = buf.view(DTYPES[info.dtype]).reshape(info.spec.shape)
      integrity.check_finite(arr, info.spec.hf_name, file)
      del buf
      yield info, arr
      del arr
    if hasher is not None:  # whatever follows the last tensor belongs to the file's digest too
      while chunk := f.read(1 << 24):
        hasher.update(chunk)


def _read_exact(f, size_or_buf, file: str, what: str):
  """Reads exactly len(buf) (or `size`) bytes; a short read means the file was truncated."""
  buf = np.empty(size_or_buf, np.uint8) if isinstance(size_or_buf, int) else size_or_buf
  view = memoryview(buf).cast("B")
  got = 0
  while got < len(view):
    n = f.readinto(view[got:])
    if not n:
      raise CheckpointError(f"{file}: truncated while reading {what} "
                            f"({got} of {len(view)} bytes available)")
    got += n
  return buf.tobytes() if isinstance(size_or_buf, int) else buf


class _BackgroundHash:
  """SHA-256 on a worker thread (hashlib releases the GIL), at most one buffer behind the reader,
  so hashing overlaps with whatever the consumer does with the previous tensor."""

  def __init__(self):
    self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="nemojax-sha256")
    self._pending: concurrent.futures.Future | None = None
    self._hash = hashlib.sha256()

  def start(self) -> None:
    self._wait()
    self._hash = hashlib.sha256()

  def update(self, data) -> None:
    self._wait()
    self._pending = self._pool.submit(self._hash.update, data)

  def hexdigest(self) -> str:
    self._wait()
    return self._hash.hexdigest()

  def _wait(self) -> None:
    if self._pending is not None:
      self._pending.result()
      self._pending = None

  def close(self) -> None:
    self._pool.shutdown(wait=True, cancel_futures=True)


class SliceReader:
  """Reads rectangular slices of a validated checkpoint's tensors, touching only their bytes.

  For sharded loading (`nemojax.load(..., mesh=)` across processes): each process reads the
  index `jax.make_array_from_callback` asks for. Row-major storage makes a slice a set of runs:
  the dimensions after the last partially selected one are contiguous, so a slice of rows is one
  read and a slice of columns one read per row. `bytes_read` counts the tensor bytes read.
  """

  def __init__(self, ckpt: HFCheckpoint):
    if sys.byteorder != "little":
      raise CheckpointError("safetensors data is little-endian; big-endian hosts are not "
                            "supported")
    self.bytes_read = 0
    self._offsets: dict[str, int] = {}  # tensor name -> absolute file offset of its data
    by_file: dict[str, list[TensorInfo]] = {}
    for info in ckpt.tensors:
      by_file.setdefault(info.file, []).append(info)
    for file, infos in by_file.items():
      with open(file, "rb") as f:
        n = int.from_bytes(_read_exact(f, 8, file, "the header length"), "little")
        header_bytes = _read_exact(f, n, file, "the header")
      try:
        header = json.loads(header_bytes)
        for info in infos:
          begin, end = (int(o) for o in header[info.spec.hf_name]["data_offsets"])
          if end - begin != info.num_bytes:
            raise CheckpointError(f"{file}: tensor {info.spec.hf_name!r} has data offsets "
                                  f"[{begin}, {end}], expected {info.num_bytes} bytes")
          self._offsets[info.spec.hf_name] = 8 + n + begin
      except (ValueError, KeyError, TypeError, IndexError, RecursionError):
        raise CheckpointError(f"{file}: the safetensors header changed after validation") from None

  def read(self, info: TensorInfo, index: tuple[slice, ...] = ()) -> np.ndarray:
    """`tensor[index]` in the file's dtype (steps of 1; missing trailing dims are whole).

    Raises CheckpointError for NaN/Inf in what was read or a file shorter than its header says.
    """
    shape = info.spec.shape
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    bounds = []
    for s, n in zip(index, shape):
      begin, end, step = s.indices(n)
      if step != 1:
        raise ValueError(f"SliceReader.read: tensor {info.spec.hf_name!r} index {s} has step "
                         f"{step}, expected 1")
      bounds.append((begin, max(begin, end)))
    dtype = DTYPES[info.dtype]
    strides = [int(np.prod(shape[i + 1:], dtype=np.int64)) * dtype.itemsize
               for i in range(len(shape))]
    partial = [i for i, (b, e) in enumerate(bounds) if (b, e) != (0, shape[i])]
    last = partial[-1] if partial else -1
    run = (bounds[last][1] - bounds[last][0]) * strides[last] if last >= 0 else info.num_bytes
    out_shape = tuple(e - b for b, e in bounds)
    buf = np.empty(int(np.prod(out_shape, dtype=np.int64)) * dtype.itemsize, np.uint8)
    base = self._offsets[info.spec.hf_name]
    base += bounds[last][0] * strides[last] if last >= 0 else 0
    outer = itertools.product(*(range(b, e) for b, e in bounds[:max(last, 0)]))
    with open(info.file, "rb", buffering=0) as f:
      for k, rows in enumerate(outer if run else ()):
        f.seek(base + sum(r * st for r, st in zip(rows, strides)))
        _read_exact(f, buf[k * run:(k + 1) * run], info.file,
                    f"tensor {info.spec.hf_name!r}")
    self.bytes_read += buf.size
    arr = buf.view(dtype).reshape(out_shape)
    integrity.check_finite(arr, info.spec.hf_name, info.file)
    return arr
