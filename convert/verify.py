"""`nemojax verify DIR`: a directory nemojax wrote, checked against what was recorded when written.

Kinds of directory: a nemojax checkpoint (`nemojax.json` records every file's size and SHA-256),
one training step (`integrity.SEAL_FILE`), a training checkpoint directory (every numbered step),
or an HF checkpoint (no recorded hashes: headers, sizes and every tensor's values are checked).
"""

from __future__ import annotations

import dataclasses
import os
import time

from nemojax.config import CheckpointError
from nemojax.convert import hf, integrity, orbax_io


@dataclasses.dataclass(frozen=True)
class Verified:
  """What `verify` checked."""

  path: str
  kind: str
  num_files: int
  num_bytes: int
  checked: str  # what was compared
  seconds: float
  notes: tuple[str, ...] = ()

  def summary(self) -> str:
    return (f"ok: {self.path}: {self.kind}, {self.num_files} files, {self.num_bytes / 1e9:.2f} GB "
            f"intact ({self.checked}) in {self.seconds:.1f} s")


def _steps(path: str) -> list[str]:
  return sorted((e for e in os.listdir(path) if e.isdigit() and os.path.isdir(
      os.path.join(path, e))), key=int)


def verify(path: str | os.PathLike, *, hashes: bool = True) -> Verified:
  """Checks a directory nemojax wrote (see the module docstring for the kinds).

  Args:
    path: the directory.
    hashes: compare SHA-256 hashes (reads every byte); False compares sizes only.

  Raises:
    CheckpointError: naming the first damaged, missing or unreadable file (or tensor).
    FileNotFoundError: no such directory.
  """
  t0 = time.perf_counter()
  path = os.path.abspath(os.fspath(path))
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: no such directory")
  checked = "sizes and SHA-256" if hashes else "sizes"
  if orbax_io.is_nemojax_checkpoint(path, damaged=True):
    ckpt = orbax_io.read(path, verify=hashes)
    written = ckpt.manifest.get("written")
    if written is None:
      return Verified(path, "nemojax checkpoint", 0, 0, "structure only", time.perf_counter() - t0,
                      (f"note: {orbax_io.MANIFEST} records no file hashes (written by an earlier "
                       "nemojax); only its structure was checked",))
    n = integrity.check_files(path, written, manifest=os.path.join(path, orbax_io.MANIFEST),
                              hashes=hashes)
    return Verified(path, "nemojax checkpoint", len(written), n, checked,
                    time.perf_counter() - t0)
  if os.path.isfile(os.path.join(path, integrity.SEAL_FILE)):
    n = integrity.verify_sealed(path, hashes=hashes)
    files = len(integrity.read_json(os.path.join(path, integrity.SEAL_FILE))["files"])
    return Verified(path, "training checkpoint step", files, n, checked, time.perf_counter() - t0)
  if hf.is_hf_checkpoint(path):
    ckpt = hf.inspect(path)
    for _ in hf.iter_tensors(ckpt):  # each is checked for NaN/Inf as it is read
      pass
    return Verified(path, "HF checkpoint", len(ckpt.files), ckpt.num_bytes,
                    "headers, sizes, values", time.perf_counter() - t0,
                    ("note: an HF directory records no hashes; compare the shards' SHA-256 with "
                     "the Hub's file pages",))
  steps = _steps(path)
  if not steps:
    raise CheckpointError(f"{path}: not a nemojax checkpoint ({orbax_io.MANIFEST}), training "
                          f"checkpoint (numbered steps with {integrity.SEAL_FILE}) or HF "
                          "checkpoint directory")
  files = total = 0
  for step in steps:
    d = os.path.join(path, step)
    if not os.path.isfile(os.path.join(d, integrity.SEAL_FILE)):
      raise CheckpointError(f"{d}: no {integrity.SEAL_FILE}: the step is incomplete or was "
                            "written before nemojax recorded hashes")
    total += integrity.verify_sealed(d, hashes=hashes)
    files += len(integrity.read_json(os.path.join(d, integrity.SEAL_FILE))["files"])
  return Verified(path, f"training checkpoints (steps {', '.join(steps)})", files, total, checked,
                  time.perf_counter() - t0)
