"""Output directories that appear whole or not at all.

Everything is written into a temporary directory beside the destination (same file system, so the
final step is a rename). An existing destination is replaced only when asked, only if it is the
kind of directory being written (or empty), and never when it contains or is contained in the
source. On any error the temporary directory is removed; if the final swap fails, the old
destination is put back.

Signals: while a staged block runs (in the main thread), SIGINT and SIGTERM are recorded rather
than raised wherever they land, and honoured as `Interrupted` at the next safe point
(`check_interrupted`, called between tensors and before the swap). So an interruption never lands
inside orbax's write, whose background threads would otherwise keep filling the directory while it
is being removed. A second signal before a safe point is raised at once.

Staging names carry the owner's pid (`.OUT.tmp-PID-xxxxxxxx`, `.OUT.old-PID-xxxxxxxx`): a process
killed outright (SIGKILL, power loss) leaves its directory behind, and the next run for the same
destination removes it (or, for an `.old-` one whose replacement never arrived, puts it back),
saying so on stderr.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator


class Interrupted(KeyboardInterrupt):
  """SIGINT or SIGTERM arrived while an output directory was being written."""

  def __init__(self, signum: int):
    super().__init__(f"interrupted by {signal.Signals(signum).name}")
    self.signum = signum


_signals = {"pending": None, "cleaning": False}  # main-thread state of the running staged block


def check_interrupted() -> None:
  """A safe point: raises `Interrupted` if a signal arrived since the staged block began."""
  if _signals["pending"] is not None:
    raise Interrupted(_signals["pending"])


def _on_signal(signum, frame) -> None:
  del frame
  if _signals["pending"] is not None and not _signals["cleaning"]:
    raise Interrupted(signum)  # asked twice: stop now
  _signals["pending"] = signum


@contextlib.contextmanager
def _deferred_signals() -> Iterator[None]:
  if threading.current_thread() is not threading.main_thread():
    yield  # handlers can only be set in the main thread; exceptions still clean up
    return
  previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
  _signals.update(pending=None, cleaning=False)
  try:
    yield
  finally:
    for s, h in previous.items():
      signal.signal(s, h)
    _signals.update(pending=None, cleaning=False)


def remove_tree(path: str) -> None:
  """Removes a directory, retrying briefly in case a writer thread has not quite stopped."""
  for _ in range(50):
    shutil.rmtree(path, ignore_errors=True)
    if not os.path.lexists(path):
      return
    time.sleep(0.05)


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
  check_writable(out)
  return out


def check_writable(out: str) -> None:
  """Proves that `out` can be created: its nearest existing ancestor is a directory in which a
  directory can be made (made and removed here; read-only mounts, permissions and pseudo file
  systems such as /proc fail)."""
  parent = os.path.dirname(out)
  while not os.path.lexists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise NotADirectoryError(errno.ENOTDIR, f"{out}: cannot be created: {parent} is not a "
                             "directory")
  probe = os.path.join(parent, f".{os.path.basename(out)}.probe-{os.getpid()}-"
                               f"{uuid.uuid4().hex[:8]}")
  try:
    os.mkdir(probe)
    os.rmdir(probe)
  except OSError as e:
    raise OSError(e.errno, f"{out}: cannot be written: making a directory in {parent} fails "
                  f"({e.strerror or e})") from None


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
  On any exception, SIGINT or SIGTERM the temporary directory is removed.
  """
  out = os.path.abspath(os.fspath(out_dir))
  parent, name = os.path.split(out)
  os.makedirs(parent, exist_ok=True)
  remove_stale(out)
  with _deferred_signals():
    tmp = os.path.join(parent, f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.mkdir(tmp)  # not mkdtemp: its 0700 mode would stick to the result
    try:
      yield tmp
      check_interrupted()
      _signals["cleaning"] = True  # the swap is not interrupted half way
      _swap_in(tmp, out, overwrite=overwrite)
    except BaseException:
      _signals["cleaning"] = True
      remove_tree(tmp)
      raise


_STALE = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old|probe)-(?P<pid>\d+)-[0-9a-f]{8}")
_LEGACY = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old)-[0-9a-f]{8}")


def _alive(pid: int) -> bool:
  if pid == os.getpid():
    return True
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except OSError:  # exists, owned by someone else
    return True
  return True


def remove_stale(out: str, say: Callable[[str], None] | None = None) -> list[str]:
  """Cleans up after killed runs writing `out`: staging directories whose owner process is gone.

  A `.tmp-` directory is removed. An `.old-` one is the previous output moved aside for the swap:
  it is put back if `out` is missing (the swap never finished), else removed. Staging directories
  of nemojax versions that did not record a pid are only reported. Returns what was done.
  """
  say = say or (lambda msg: print(f"nemojax: {msg}", file=sys.stderr, flush=True))
  parent, name = os.path.split(os.path.abspath(out))
  done = []
  for entry in sorted(os.listdir(parent)) if os.path.isdir(parent) else ():
    path = os.path.join(parent, entry)
    m = _STALE.fullmatch(entry)
    if m and m["name"] == name and not _alive(int(m["pid"])):
      if m["kind"] == "old" and not os.path.lexists(out):
        os.rename(path, out)
        msg = (f"restored {out} from {entry}, left by process {m['pid']} (no longer running) "
               "mid-swap")
      else:
        remove_tree(path)
        msg = (f"removed {path}, a staging directory left by process {m['pid']} "
               "(no longer running)")
      say(msg)
      done.append(msg)
    elif (m := _LEGACY.fullmatch(entry)) and m["name"] == name:
      msg = (f"found {path}, a staging directory of an earlier nemojax run; remove it if no "
             "conversion is writing it")
      say(msg)
      done.append(msg)
  return done


def _swap_in(tmp: str, out: str, *, overwrite: bool) -> None:
  parent, name = os.path.split(out)
  old = None
  if os.path.lexists(out):
    if not overwrite:  # appeared while we were writing
      raise FileExistsError(f"{out}: already exists; pass --overwrite (overwrite=True) to "
                            "replace it")
    old = os.path.join(parent, f".{name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
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
      remove_tree(old)
