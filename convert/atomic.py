"""Output directories that appear whole or not at all.

Everything is written into a temporary directory beside the destination (same file system, so the
final step is a rename). An existing destination is replaced only when asked, only if it is the
kind of directory being written (or empty), and never when it contains or is contained in the
source. On any error, including Ctrl-C, the temporary directory is removed; if the final swap
fails, the old destination is put back.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from typing import Callable, Iterable, Iterator


def _is_empty_dir(path: str) -> bool:
  return os.path.isdir(path) and not os.path.islink(path) and not os.listdir(path)


def _inside(child: str, parent: str) -> bool:
  return os.path.commonpath([child, parent]) == parent


def check_target(out_dir: str | os.PathLike, *, overwrite: bool,
                 replaceable: Callable[[str], bool], kind: str,
                 sources: Iterable[str | os.PathLike] = ()) -> str:
  """Checks that `out_dir` may be written; returns its absolute path.

  Args:
    out_dir: the destination directory.
    overwrite: whether an existing destination may be replaced.
    replaceable: tells whether an existing directory is of the kind being written (only such a
      directory, or an empty one, is ever replaced).
    kind: what is being written, for messages ("nemojax checkpoint").
    sources: directories being read, which the destination must neither be, contain nor be in.

  Raises:
    FileExistsError: the destination exists and may not be replaced.
    ValueError: the destination overlaps a source.
  """
  out = os.path.abspath(os.fspath(out_dir))
  real = os.path.realpath(out)
  for src in sources:
    src_real = os.path.realpath(os.fspath(src))
    if _inside(real, src_real) or _inside(src_real, real):
      raise ValueError(f"{out}: the output directory must not be, contain or lie inside the "
                       f"source directory {src_real}")
  if os.path.lexists(out):
    if not overwrite:
      raise FileExistsError(f"{out}: already exists; pass --overwrite (overwrite=True) to "
                            "replace it")
    if not (os.path.isdir(out) and (replaceable(out) or _is_empty_dir(out))):
      raise FileExistsError(f"{out}: refusing to replace it: it is not a {kind} (nor an empty "
                            "directory); remove it yourself if it should go")
  return out


def check_free_space(out_dir: str, num_bytes: int) -> None:
  """Fails early when the output cannot fit, rather than after writing most of it."""
  parent = os.path.dirname(os.path.abspath(out_dir))
  while not os.path.isdir(parent):
    parent = os.path.dirname(parent)
  free = shutil.disk_usage(parent).free
  need = int(num_bytes * 1.01) + (16 << 20)  # format overhead: metadata, manifests
  if free < need:
    raise OSError(f"{parent}: not enough free disk space for {out_dir}: need about "
                  f"{need / 1e9:.2f} GB, {free / 1e9:.2f} GB free")


@contextlib.contextmanager
def staged(out_dir: str | os.PathLike, *, overwrite: bool) -> Iterator[str]:
  """Yields an empty temporary directory that becomes `out_dir` when the block succeeds.

  Call `check_target` first; this only re-checks that nothing appeared at `out_dir` meanwhile.
  """
  out = os.path.abspath(os.fspath(out_dir))
  parent, name = os.path.split(out)
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f".{name}.tmp-{uuid.uuid4().hex[:8]}")
  os.mkdir(tmp)  # not mkdtemp: its 0700 mode would stick to the result
  try:
    yield tmp
    _swap_in(tmp, out, overwrite=overwrite)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _swap_in(tmp: str, out: str, *, overwrite: bool) -> None:
  parent, name = os.path.split(out)
  old = None
  if os.path.lexists(out):
    if not overwrite:  # appeared while we were writing
      raise FileExistsError(f"{out}: already exists; pass --overwrite (overwrite=True) to "
                            "replace it")
    old = os.path.join(parent, f".{name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(out, old)
  try:
    os.rename(tmp, out)
  except BaseException:
    if old is not None:
      os.rename(old, out)
    raise
  if old is not None:
    if os.path.islink(old):  # OUT_DIR was a link: drop the link, not what it points to
      os.unlink(old)
    else:
      shutil.rmtree(old, ignore_errors=True)
