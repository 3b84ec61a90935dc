"""Integrity of what nemojax writes: each file's size and SHA-256, recorded as it is written.

A directory nemojax writes (a converted or saved checkpoint, a training step) lists every file
under it with its size and SHA-256 in its manifest: `nemojax.json` for checkpoints, `SEAL_FILE`
for a training step. The manifest also records the SHA-256 of its own content (`"manifest_sha256"`,
over the canonical JSON of everything else), so an edit to the manifest is caught too. Reading
checks sizes (a `stat` per file) always and hashes by default; the first file that is missing,
of another size or of another hash is named in a one-line `CheckpointError`.

Tensor values are checked at the door too: `check_finite` refuses NaN/Inf, scanning the raw bits
(exponent all ones) in chunks so the check needs no second copy of a large tensor.
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import json
import os
import sys
import time
from typing import Any
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from nemojax.config import CheckpointError

SEAL_FILE = "nemojax-files.json"
SELF_KEY = "manifest_sha256"
_CHUNK = 16 << 20
# Exponent-field masks of the float formats: NaN or Inf iff all exponent bits are set.
_EXP_MASKS = {"float16": np.uint16(0x7C00), "bfloat16": np.uint16(0x7F80),
              "float32": np.uint32(0x7F800000), "float64": np.uint64(0x7FF0000000000000)}


def sha256_file(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb", buffering=0) as f:
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    while n := f.readinto(buf):
      h.update(view[:n])
  return h.hexdigest()


def walk(root: str) -> Iterator[str]:
  """Relative paths of the regular files under `root`, sorted, '/'-separated."""
  for d, dirs, files in os.walk(root):
    dirs.sort()
    for name in sorted(files):
      full = os.path.join(d, name)
      if os.path.isfile(full) and not os.path.islink(full):
        yield os.path.relpath(full, root).replace(os.sep, "/")


def record_files(root: str, names: Iterable[str] | None = None, *,
                 exclude: Iterable[str] = ()) -> dict[str, dict]:
  """{relative path: {"size", "sha256"}} of `names` (default: every file under `root`)."""
  exclude = set(exclude)
  names = walk(root) if names is None else names
  out = {}
  for rel in names:
    if rel in exclude:
      continue
    full = os.path.join(root, rel)
    out[rel] = {"size": os.path.getsize(full), "sha256": sha256_file(full)}
  return out


def seal(manifest: dict) -> dict:
  """`manifest` with its own SHA-256 added (over everything but that key)."""
  body = {k: v for k, v in manifest.items() if k != SELF_KEY}
  return {**body, SELF_KEY: _canonical_sha256(body)}


def _canonical_sha256(obj: Any) -> str:
  text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
  return hashlib.sha256(text.encode()).hexdigest()


def check_seal(manifest: dict, path: str) -> None:
  """Raises if the manifest's recorded own hash is absent or differs (it was edited or damaged)."""
  want = manifest.get(SELF_KEY)
  body = {k: v for k, v in manifest.items() if k != SELF_KEY}
  if not isinstance(want, str) or _canonical_sha256(body) != want:
    raise CheckpointError(f"{path}: damaged (its content no longer matches the {SELF_KEY} "
                          "recorded when it was written)")


def check_files(root: str, records: Any, *, manifest: str, hashes: bool = True,
                only: Callable[[str], bool] | None = None) -> int:
  """Checks the files under `root` against `records`; returns the bytes checked.

  Args:
    root: the directory the relative paths are under.
    records: {relative path: {"size", "sha256"}} as `record_files` made it.
    manifest: the manifest's path, for messages.
    hashes: also compare SHA-256 (reads every byte), not only sizes.
    only: check just the paths it accepts (default: all).

  Raises:
    CheckpointError: naming the first missing, resized or altered file.
  """
  if not isinstance(records, dict):
    raise CheckpointError(f"{manifest}: malformed file records (expected an object)")
  todo = []
  for rel, rec in records.items():
    if only is not None and not only(rel):
      continue
    full = os.path.join(root, rel)
    if not isinstance(rec, dict) or not isinstance(rec.get("size"), int):
      raise CheckpointError(f"{manifest}: malformed record for {rel!r}")
    try:
      size = os.stat(full).st_size
    except FileNotFoundError:
      raise CheckpointError(f"{full}: missing (listed in {manifest})") from None
    if size != rec["size"]:
      raise CheckpointError(f"{full}: {size} bytes, {manifest} records {rec['size']}: the file "
                            "was truncated, extended or replaced")
    todo.append((full, rec.get("sha256"), size))
  if hashes:
    # hashlib releases the GIL: files are hashed in parallel, which a fast disk can keep fed.
    workers = max(1, min(8, os.cpu_count() or 1, len(todo)))
    with concurrent.futures.ThreadPoolExecutor(workers, "nemojax-verify") as pool:
      for (full, want, _), got in zip(todo, pool.map(lambda t: sha256_file(t[0]), todo)):
        if got != want:
          raise CheckpointError(f"{full}: damaged: its SHA-256 differs from the one {manifest} "
                                "recorded when it was written (verify=False skips this check)")
  return sum(size for _, _, size in todo)


# --------------------------------------------------------------------------------------------------
# Sealed directories (training steps): every file listed in SEAL_FILE
# --------------------------------------------------------------------------------------------------
def seal_dir(directory: str | os.PathLike) -> dict:
  """Records every file under `directory` in its SEAL_FILE (written last, atomically)."""
  directory = os.fspath(directory)
  manifest = seal({"format": "nemojax-files", "format_version": 1,
                   "files": record_files(directory, exclude={SEAL_FILE})})
  tmp = os.path.join(directory, f".{SEAL_FILE}.tmp-{os.getpid()}")
  with open(tmp, "w") as f:
    json.dump(manifest, f, indent=1, sort_keys=True)
    f.write("\n")
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, os.path.join(directory, SEAL_FILE))
  return manifest


def read_json(path: str) -> dict:
  try:
    with open(path, "rb") as f:
      obj = json.loads(f.read())
  except FileNotFoundError:
    raise CheckpointError(f"{path}: missing") from None
  except (ValueError, RecursionError) as e:  # JSON and UTF-8 errors
    raise CheckpointError(f"{path}: damaged: not valid JSON ({e})") from None
  if not isinstance(obj, dict):
    raise CheckpointError(f"{path}: damaged: expected a JSON object")
  return obj


def verify_sealed(directory: str | os.PathLike, *, hashes: bool = True) -> int:
  """Checks a directory written with `seal_dir`: every listed file intact, none missing.

  Returns:
    The bytes checked.

  Raises:
    CheckpointError: naming the first damaged or missing file (or the seal itself).
  """
  directory = os.fspath(directory)
  path = os.path.join(directory, SEAL_FILE)
  if not os.path.isdir(directory):
    raise CheckpointError(f"{directory}: no such directory")
  manifest = read_json(path)
  check_seal(manifest, path)
  return check_files(directory, manifest.get("files"), manifest=path, hashes=hashes)


# --------------------------------------------------------------------------------------------------
# Training resume: the newest intact step
# --------------------------------------------------------------------------------------------------
_ORBAX_DONE = "_CHECKPOINT_METADATA"  # orbax writes it when it finalises a step


def restore_newest(directory: str | os.PathLike, steps: Iterable[int],
                   restore: Callable[[int], Any], *,
                   warn: Callable[[str], None] | None = None) -> tuple[int, Any] | None:
  """Restores the newest step that verifies and restores, moving damaged ones aside.

  Steps are tried newest first. A step with a SEAL_FILE must match it; one without is restored
  unverified if orbax finished it (a step written before nemojax sealed steps, or one whose
  process stopped between orbax's finish and the seal), and is incomplete otherwise. A step that
  is damaged, incomplete or fails to restore is renamed `<step>.damaged-<time>` (kept for
  inspection, out of the checkpoint manager's sight) with a warning naming it and why, and the
  next older step is tried.

  Args:
    directory: the checkpoint directory holding one subdirectory per step (named by the number).
    steps: the step numbers present.
    restore: restores one step (may raise anything: the step is then skipped).
    warn: where warnings go (default: one line on stderr).

  Returns:
    (step, what `restore` returned), or None when no step is intact.
  """
  directory = os.fspath(directory)
  warn = warn or (lambda msg: print(f"nemojax: warning: {msg}", file=sys.stderr, flush=True))
  for step in sorted(steps, reverse=True):
    d = os.path.join(directory, str(step))
    try:
      if os.path.isfile(os.path.join(d, SEAL_FILE)):
        verify_sealed(d)
      elif not os.path.isfile(os.path.join(d, _ORBAX_DONE)):
        raise CheckpointError(f"{d}: incomplete (no {SEAL_FILE}, no {_ORBAX_DONE}: its writer "
                              "stopped before finishing it)")
      else:
        warn(f"{d}: no {SEAL_FILE} (written before nemojax recorded hashes); restoring it "
             "unverified")
      return step, restore(step)
    except Exception as e:  # noqa: BLE001  (any failure: fall back to the previous step)
      reason = " ".join(str(e).split())[:300]
      aside = f"{d}.damaged-{time.strftime('%Y%m%d-%H%M%S')}"
      try:
        os.rename(d, aside)
        where = f"moved to {aside}"
      except OSError:
        where = "left in place"
      warn(f"skipping training checkpoint step {step} ({where}): {reason}")
  return None


# --------------------------------------------------------------------------------------------------
# Tensor values
# --------------------------------------------------------------------------------------------------
def nonfinite_count(arr) -> int:
  """How many NaN/Inf values an array holds (NumPy: its raw bits scanned in chunks, so no
  float copy of a large tensor is made; a `jax.Array`: reduced on its device)."""
  if not isinstance(arr, np.ndarray):
    return int(_device_nonfinite(arr))
  mask = _EXP_MASKS.get(arr.dtype.name)
  if mask is None:
    return 0
  flat = np.ascontiguousarray(arr).reshape(-1).view(mask.dtype)
  step = _CHUNK // arr.dtype.itemsize
  return sum(int(np.count_nonzero((flat[i:i + step] & mask) == mask))
             for i in range(0, flat.size, step))


@functools.cache
def _device_counter():
  import jax  # noqa: PLC0415  (only for arrays that are already on a device)
  import jax.numpy as jnp  # noqa: PLC0415
  return jax.jit(lambda x: jnp.sum(~jnp.isfinite(x), dtype=jnp.int32))


def _device_nonfinite(arr):
  return _device_counter()(arr)


def check_finite(arr, name: str, where: str) -> None:
  """Raises CheckpointError if `arr` (tensor `name` read from `where`) holds NaN or Inf."""
  bad = nonfinite_count(arr)
  if bad:
    raise CheckpointError(f"{where}: tensor {name!r} holds {bad} NaN/Inf value"
                          f"{'s' if bad > 1 else ''} of {arr.size}; refusing a broken checkpoint")
