"""nemojax's checkpoint format: orbax arrays in size-bounded parts, a config and a manifest.

    OUT_DIR/
      nemojax.json        manifest: format version, dtype, source files (size, sha256), and per
                          tensor its HF name, shape, stored dtype, original HF dtype and part
      config.json         the HF config (verbatim from the source checkpoint)
      tokenizer.json ...  tokenizer, chat template, generation config copied from the source
      params/part-00000/  orbax PyTree checkpoints (OCDBT, uncompressed). Each holds a plain nested
      params/part-00001/  dict of NumPy arrays keyed by the module path, layer indices as strings:
      ...                 {"backbone": {"layers": {"3": {"mixer": {"in_proj": {"weight": a}}}}}}.
                          Merged, the parts are the model's parameter dict (`nnx.to_pure_dict`).

Why parts: orbax writes one pytree per call and holds all of it while writing, so one tree would
need the whole model in host memory (twice: by default it deep-copies host arrays first). Parts of
about `PART_BYTES`, written without that copy, keep host memory near max(part, largest tensor)
whatever order the source files list tensors in, and restoring part by part does the same for
export. Any orbax PyTree checkpointer reads a part (`ocp.StandardCheckpointer().restore(part_dir)`);
no NNX class is stored. Arrays are stored in chunks of at most `CHUNK_BYTES`, so reading one back
needs a chunk of scratch memory rather than a second copy of the array.

Compression is off: zstd saved ~20% on bf16 weights but wrote 3-5x slower.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
from typing import Any
from collections.abc import Callable, Iterator

import numpy as np

from nemojax.config import CheckpointError, ConfigError, NemotronHConfig
from nemojax.convert import atomic, hf, integrity
from nemojax.convert.names import TensorSpec, assign, lookup, tensor_specs

FORMAT = "nemojax"
FORMAT_VERSION = 1
MANIFEST = "nemojax.json"
PARAMS = "params"
PART_BYTES = 512 << 20
CHUNK_BYTES = 64 << 20
STORED_DTYPES = ("bfloat16", "float32", "float16", "float64")


@dataclasses.dataclass(frozen=True)
class StoredTensor:
  """One tensor of a nemojax checkpoint."""

  spec: TensorSpec
  part: str  # part directory name under params/
  dtype: np.dtype  # as stored
  hf_dtype: str | None  # the source file's safetensors dtype ("BF16", ...), if known

  @property
  def num_bytes(self) -> int:
    return int(np.prod(self.spec.shape, dtype=np.int64)) * self.dtype.itemsize


@dataclasses.dataclass(frozen=True)
class NemojaxCheckpoint:
  """A validated nemojax checkpoint directory."""

  path: str
  config: NemotronHConfig
  manifest: dict
  tensors: tuple[StoredTensor, ...]  # in model order
  parts: tuple[str, ...]

  @property
  def num_bytes(self) -> int:
    return sum(t.num_bytes for t in self.tensors)

  def part_dir(self, part: str) -> str:
    return os.path.join(self.path, PARAMS, part)


def is_nemojax_checkpoint(path: str | os.PathLike, *, damaged: bool = False) -> bool:
  """Whether `path` looks like a directory written by `nemojax convert` or `save` (with
  `damaged`: or like one that lost its manifest or params/)."""
  path = os.fspath(path)
  has = [os.path.isfile(os.path.join(path, MANIFEST)), os.path.isdir(os.path.join(path, PARAMS))]
  return any(has) if damaged else all(has)


def _key_path(spec: TensorSpec) -> tuple[str, ...]:
  return tuple(str(k) for k in spec.path)


def _nest(items) -> dict:
  """{path tuple: value} -> nested dict."""
  tree: dict = {}
  for path, value in items:
    assign(tree, path, value)
  return tree


def _version() -> str:
  # Not `nemojax.__version__`: the package root imports the loader, which imports this package.
  try:
    return importlib.metadata.version("nemojax")
  except importlib.metadata.PackageNotFoundError:  # running from a source tree, not installed
    return "unknown"


def _map_leaves(fn, tree: dict) -> dict:
  return {k: _map_leaves(fn, v) if isinstance(v, dict) else fn(v) for k, v in tree.items()}


def _orbax():
  import orbax.checkpoint as ocp  # noqa: PLC0415  (slow import, needed only here)
  return ocp


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------
def _part_checkpointer():
  """A synchronous, uncompressed PyTree checkpointer that writes NumPy arrays without copying.

  orbax deep-copies host arrays before writing by default (a guard against callers mutating them
  during an async save), which doubles the memory of each part; this writer is synchronous and the
  arrays are never mutated, so the copy is switched off where orbax allows it.
  """
  import jax  # noqa: PLC0415
  ocp = _orbax()
  th = ocp.type_handlers
  try:
    registry = th.create_type_handler_registry(
        (np.ndarray, th.NumpyHandler(deepcopy_host_arrays=False)),
        (jax.Array, th.ArrayHandler()))
    handler = ocp.PyTreeCheckpointHandler(use_compression=False, type_handler_registry=registry)
  except (TypeError, AttributeError):  # older orbax: no such option; parts cost twice the memory
    handler = ocp.PyTreeCheckpointHandler(use_compression=False)
  return ocp.Checkpointer(handler)


class PartWriter:
  """Collects tensors and writes them as orbax parts of about `part_bytes` each.

  Use as a context manager: leaving the block without an error writes the last part.

  Args:
    params_dir: the `params/` directory to create parts in.
    part_bytes: flush once the pending tensors reach this many bytes (a larger tensor gets a part
      of its own).
  """

  def __init__(self, params_dir: str, part_bytes: int = PART_BYTES):
    self._dir = params_dir
    self._part_bytes = part_bytes
    self._ckptr = _part_checkpointer()
    self._pending: list[tuple[TensorSpec, np.ndarray, str | None]] = []
    self._pending_bytes = 0
    self.parts: list[str] = []
    self.records: dict[str, dict] = {}
    self.written: dict[str, dict] = {}  # relative path -> size, sha256 of every file written
    os.makedirs(params_dir, exist_ok=True)

  def reserve(self, num_bytes: int) -> None:
    """Flushes now if a tensor of `num_bytes` would overfill the part; call it before reading
    the tensor, so the pending part is gone before the new tensor's memory is allocated."""
    if self._pending and self._pending_bytes + num_bytes > self._part_bytes:
      self.flush()

  def add(self, spec: TensorSpec, array: np.ndarray, hf_dtype: str | None = None) -> None:
    atomic.check_interrupted()
    if tuple(array.shape) != spec.shape:
      raise ValueError(f"tensor {spec.hf_name!r} has shape {tuple(array.shape)}, expected "
                       f"{spec.shape}")
    if spec.hf_name in self.records or any(s.hf_name == spec.hf_name for s, _, _ in self._pending):
      raise ValueError(f"tensor {spec.hf_name!r} given twice")
    self.reserve(array.nbytes)
    self._pending.append((spec, array, hf_dtype))
    self._pending_bytes += array.nbytes
    if self._pending_bytes >= self._part_bytes:
      self.flush()

  def flush(self) -> None:
    if not self._pending:
      return
    ocp = _orbax()
    name = f"part-{len(self.parts):05d}"
    tree = _nest((_key_path(spec), arr) for spec, arr, _ in self._pending)
    # Synchronous: returns once the part is on disk and finalised.
    try:
      save_args = _map_leaves(lambda _: ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES), tree)
    except TypeError:  # older orbax: one chunk per array
      save_args = None
    part_dir = os.path.join(self._dir, name)
    self._ckptr.save(part_dir, args=ocp.args.PyTreeSave(tree, save_args=save_args))
    # Hashed now, while the part is still in the page cache.
    self.written.update({f"{PARAMS}/{name}/{rel}": rec
                         for rel, rec in integrity.record_files(part_dir).items()})
    for spec, arr, hf_dtype in self._pending:
      self.records[spec.hf_name] = {"shape": list(spec.shape), "dtype": arr.dtype.name,
                                    "hf_dtype": hf_dtype, "part": name}
    self.parts.append(name)
    self._pending, self._pending_bytes = [], 0
    del tree

  def close(self) -> None:
    """Writes what is pending and releases orbax's resources."""
    try:
      self.flush()
    finally:
      self._ckptr.close()

  def __enter__(self) -> PartWriter:
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      self.close()
    else:  # the caller's error wins; the staging directory is being thrown away anyway
      self._pending = []
      self._ckptr.close()


def write_manifest(out_dir: str, *, config: NemotronHConfig, dtype: str, source: dict,
                   writer: PartWriter, files: list[str], lossless: bool) -> dict:
  """Writes nemojax.json after checking that the writer holds exactly the config's tensors."""
  specs = tensor_specs(config)
  names = [s.hf_name for s in specs]
  if set(writer.records) != set(names):
    missing = sorted(set(names) - set(writer.records))
    raise ValueError(f"{out_dir}: internal error: tensors not written: {missing[:3]}")
  manifest = {
      "format": FORMAT,
      "format_version": FORMAT_VERSION,
      "nemojax_version": _version(),
      "dtype": dtype,
      "lossless": lossless,
      "source": source,
      "files": sorted(files),
      "parts": list(writer.parts),
      "tensors": [{"name": n, **writer.records[n]} for n in names],
  }
  others = [rel for rel in integrity.walk(out_dir) if rel not in writer.written and rel != MANIFEST]
  manifest["written"] = dict(sorted({**writer.written,
                                     **integrity.record_files(out_dir, others)}.items()))
  manifest = integrity.seal(manifest)
  with open(os.path.join(out_dir, MANIFEST), "w") as f:
    f.write(_pretty(manifest) + "\n")
  return manifest


def _pretty(obj, indent: str = "") -> str:
  """JSON with one line per flat record (a tensor, a file) instead of one line per number."""
  flat = lambda v: not isinstance(v, (dict, list)) or (
      isinstance(v, list) and all(not isinstance(x, (dict, list)) for x in v))
  if isinstance(obj, dict) and not all(flat(v) for v in obj.values()):
    inner = indent + " "
    items = [f"{inner}{json.dumps(k)}: {_pretty(v, inner)}" for k, v in obj.items()]
    return "{\n" + ",\n".join(items) + "\n" + indent + "}"
  if isinstance(obj, list) and not flat(obj):
    inner = indent + " "
    return "[\n" + ",\n".join(inner + _pretty(v, inner) for v in obj) + "\n" + indent + "]"
  return json.dumps(obj)


# --------------------------------------------------------------------------------------------------
# Reading and validation
# --------------------------------------------------------------------------------------------------
def read(path: str | os.PathLike, *, check_parts: bool = True,
         verify: bool = True) -> NemojaxCheckpoint:
  """Validates a nemojax checkpoint directory without reading tensor data.

  Checks the manifest's own hash and that every file it records is present with its recorded
  size (and, with `verify`, its SHA-256), the manifest against config.json (every tensor present
  once, nothing unexpected, shapes and dtypes as the config implies) and, with `check_parts`,
  every part's orbax metadata against the manifest.

  Raises:
    CheckpointError: naming the file, the tensor and what was expected.
  """
  path = os.path.abspath(os.fspath(path))
  man_path = os.path.join(path, MANIFEST)
  manifest = _read_manifest(path, man_path)
  written = manifest.get("written")
  if written is not None or integrity.SELF_KEY in manifest:
    integrity.check_files(path, written, manifest=man_path, hashes=False)  # cheap: stat only
    if verify:  # before orbax reads anything: it reads damaged files with baffling errors
      integrity.check_files(path, written, manifest=man_path)
  cfg_path = os.path.join(path, "config.json")
  try:
    config = NemotronHConfig.from_json_file(cfg_path)
  except ConfigError as e:
    raise CheckpointError(str(e)) from None

  parts = manifest.get("parts")
  entries = manifest.get("tensors")
  if not isinstance(parts, list) or not isinstance(entries, list):
    raise CheckpointError(f"{man_path}: expected lists 'parts' and 'tensors'")
  by_name: dict[str, dict] = {}
  for e in entries:
    if not isinstance(e, dict) or not isinstance(e.get("name"), str):
      raise CheckpointError(f"{man_path}: malformed tensor entry {e!r}")
    if e["name"] in by_name:
      raise CheckpointError(f"{man_path}: tensor {e['name']!r} listed twice")
    by_name[e["name"]] = e
  specs = tensor_specs(config)
  expected = {s.hf_name for s in specs}
  unexpected = sorted(set(by_name) - expected)
  if unexpected:
    raise CheckpointError(f"{man_path}: unexpected tensor {unexpected[0]!r}; the config "
                          f"({config.hybrid_override_pattern!r}) implies no such tensor")
  tensors = []
  for spec in specs:
    e = by_name.get(spec.hf_name)
    if e is None:
      raise CheckpointError(f"{man_path}: missing tensor {spec.hf_name!r} required by the config "
                            f"({config.hybrid_override_pattern!r})")
    shape = tuple(e.get("shape") or ())
    if shape != spec.shape:
      raise CheckpointError(f"{man_path}: tensor {spec.hf_name!r} has shape {shape}, expected "
                            f"{spec.shape} from config.json")
    if e.get("dtype") not in STORED_DTYPES:
      raise CheckpointError(f"{man_path}: tensor {spec.hf_name!r} has dtype {e.get('dtype')!r}, "
                            f"expected one of {list(STORED_DTYPES)}")
    hf_dtype = e.get("hf_dtype")
    if hf_dtype is not None and hf_dtype not in hf.DTYPES:
      raise CheckpointError(f"{man_path}: tensor {spec.hf_name!r} has hf_dtype {hf_dtype!r}, "
                            f"expected one of {sorted(hf.DTYPES)} or null")
    if e.get("part") not in parts:
      raise CheckpointError(f"{man_path}: tensor {spec.hf_name!r} is in part {e.get('part')!r}, "
                            f"which 'parts' does not list")
    tensors.append(StoredTensor(spec=spec, part=e["part"], dtype=np_dtype(e["dtype"]),
                                hf_dtype=hf_dtype))
  ckpt = NemojaxCheckpoint(path=path, config=config, manifest=manifest, tensors=tuple(tensors),
                           parts=tuple(parts))
  if check_parts:
    ckptr = _orbax().PyTreeCheckpointer()
    try:
      for part in ckpt.parts:
        _check_part(ckptr, ckpt, part)
    finally:
      ckptr.close()
  return ckpt


def _read_manifest(path: str, man_path: str) -> dict:
  if not os.path.isfile(man_path):
    raise CheckpointError(f"{man_path}: missing; not a nemojax checkpoint directory")
  manifest = integrity.read_json(man_path)
  if manifest.get("format") != FORMAT:
    raise CheckpointError(f"{man_path}: expected an object with \"format\": \"{FORMAT}\"")
  version = manifest.get("format_version")
  if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
    raise CheckpointError(f"{man_path}: format_version {version!r}; this nemojax reads versions "
                          f"1..{FORMAT_VERSION} (a newer nemojax wrote it?)")
  if "written" in manifest or integrity.SELF_KEY in manifest:  # absent: before integrity records
    integrity.check_seal(manifest, man_path)
  return manifest


def np_dtype(name: str) -> np.dtype:
  import ml_dtypes  # noqa: PLC0415  (registers bfloat16 with NumPy)
  return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def _part_tensors(ckpt: NemojaxCheckpoint, part: str) -> list[StoredTensor]:
  return [t for t in ckpt.tensors if t.part == part]


def _check_part(ckptr, ckpt: NemojaxCheckpoint, part: str) -> None:
  """The part's orbax metadata must list exactly its manifest tensors, shapes and dtypes."""
  d = ckpt.part_dir(part)
  if not os.path.isdir(d):
    raise CheckpointError(f"{d}: missing part directory (listed in {MANIFEST})")
  try:
    md = ckptr.metadata(d)
  except Exception as e:  # noqa: BLE001  (orbax raises assorted types for bad metadata)
    raise CheckpointError(f"{d}: unreadable orbax metadata ({type(e).__name__}: "
                          f"{_first_line(e)})") from None
  md = getattr(md, "item_metadata", md)  # StepMetadata in newer orbax, the tree in older
  tree = getattr(md, "tree", md)
  wanted = _part_tensors(ckpt, part)
  for t in wanted:
    leaf = lookup(tree, _key_path(t.spec))
    if leaf is None or not hasattr(leaf, "shape"):
      raise CheckpointError(f"{d}: tensor {t.spec.hf_name!r} is missing from the part")
    if tuple(leaf.shape) != t.spec.shape or np.dtype(leaf.dtype) != t.dtype:
      raise CheckpointError(f"{d}: tensor {t.spec.hf_name!r} is stored as {tuple(leaf.shape)} "
                            f"{np.dtype(leaf.dtype).name}, expected {t.spec.shape} {t.dtype.name}")
  n_leaves = sum(1 for _ in _leaves(tree))
  if n_leaves != len(wanted):
    raise CheckpointError(f"{d}: holds {n_leaves} arrays, {MANIFEST} lists {len(wanted)}")


def _leaves(tree) -> Iterator[Any]:
  if isinstance(tree, dict):
    for v in tree.values():
      yield from _leaves(v)
  else:
    yield tree


def _restore(ckptr, d: str, target: dict) -> dict:
  try:
    return ckptr.restore(d, target)
  except Exception as e:  # noqa: BLE001  (TensorStore's errors: cut to one line that names d)
    raise CheckpointError(f"{d}: cannot restore ({type(e).__name__}: {_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
  """The gist of a library error, whose message may run to dozens of lines of TensorStore spec."""
  lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
  text = lines[0] if lines else ""
  return text if len(text) <= 200 else text[:200] + "..."


def _check_restored(ckpt, t: StoredTensor, shape, dtype, want_dtype) -> None:
  if tuple(shape) != t.spec.shape or np.dtype(dtype) != np.dtype(want_dtype):
    raise CheckpointError(f"{ckpt.part_dir(t.part)}: tensor {t.spec.hf_name!r} restored as "
                          f"{tuple(shape)} {np.dtype(dtype).name}, expected {t.spec.shape} "
                          f"{np.dtype(want_dtype).name}")


def iter_arrays(ckpt: NemojaxCheckpoint,
                target: Callable[[StoredTensor], Any] | None = None
                ) -> Iterator[tuple[StoredTensor, Any]]:
  """Yields (tensor, array) for every tensor, restored one part at a time.

  Nothing of a part stays referenced here once its arrays are handed out, so host memory holds at
  most one part (plus what the consumer keeps).

  Args:
    ckpt: a checkpoint validated by `read`.
    target: the `jax.ShapeDtypeStruct` to restore a tensor as: its dtype (stored tensors are cast
      on restore) and sharding (the array is restored straight into it). Default: a NumPy array
      on the host in the stored dtype.

  Raises:
    CheckpointError: a part cannot be restored or a tensor holds NaN/Inf (names the part
      directory and the tensor). Damaged files are `read`'s to find, before orbax reads them.
  """
  import jax  # noqa: PLC0415
  if target is None:
    target = lambda t: jax.ShapeDtypeStruct(t.spec.shape, t.dtype)
  ckptr = _orbax().StandardCheckpointer()
  try:
    for part in ckpt.parts:
      tensors = _part_tensors(ckpt, part)
      want = {t.spec.hf_name: target(t) for t in tensors}
      restored = _restore(ckptr, ckpt.part_dir(part),
                          _nest((_key_path(t.spec), want[t.spec.hf_name]) for t in tensors))
      for t in tensors:
        arr = lookup(restored, _key_path(t.spec))
        _check_restored(ckpt, t, arr.shape, arr.dtype, want[t.spec.hf_name].dtype)
        integrity.check_finite(arr, t.spec.hf_name, ckpt.part_dir(part))
        assign(restored, _key_path(t.spec), None)  # the consumer holds the only reference
        yield t, arr
        del arr
      del restored
  finally:
    ckptr.close()
