"""Compilation: JAX's persistent compilation cache (on by default) and first-compile notices.

Compiling the prefill and decode programs dominates a user's first minutes (seconds per program
for the 9B model). JAX can keep compiled programs on disk and load them in a later process; nemojax
switches that on when it is imported, in a per-user directory:

    $NEMOJAX_COMPILATION_CACHE    a directory, or "off" (also "0", "false", "none") to disable
    default                       $XDG_CACHE_HOME/nemojax/jax (~/.cache/nemojax/jax)

A cache directory the user gave JAX (`JAX_COMPILATION_CACHE_DIR` or `jax.config`) wins.
`enable_persistent_cache(path)` changes it from Python (None: the default; False: off).

Notices. `Notifier` remembers the argument shapes each jitted engine function has been called
with in this process; a call with new shapes compiles (or loads from the disk cache), so it
prints one line first (the CLI and `generate(progress=True)` turn this on).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from collections.abc import Callable

import jax

ENV_VAR = "NEMOJAX_COMPILATION_CACHE"
_OFF = ("", "0", "off", "false", "none", "no")
# Programs faster to compile than this are not written (JAX's own default is 1 s, which would
# skip most programs of small models on a CPU, where the demo spends seconds compiling).
MIN_COMPILE_SECS = 0.2

__all__ = ["ENV_VAR", "Notifier", "cache_dir", "default_cache_dir", "enable_persistent_cache"]


def default_cache_dir() -> Path:
  """The per-user cache directory: $XDG_CACHE_HOME/nemojax/jax or ~/.cache/nemojax/jax."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return Path(base) / "nemojax" / "jax"


def cache_dir() -> str | None:
  """The directory JAX's persistent cache uses now (None: off)."""
  return jax.config.jax_compilation_cache_dir or None


def enable_persistent_cache(path: str | os.PathLike | bool | None = None) -> str | None:
  """Points JAX's persistent compilation cache at `path`; returns the directory used (None: off).

  Args:
    path: a directory; None for $NEMOJAX_COMPILATION_CACHE or else the per-user default; False
      to switch the cache off.
  """
  if path is None:
    env = os.environ.get(ENV_VAR)
    if env is not None:
      path = False if env.strip().lower() in _OFF else env
    else:
      path = default_cache_dir()
  if path is False:
    jax.config.update("jax_enable_compilation_cache", False)
    return None
  if not isinstance(path, (str, os.PathLike)):
    raise ValueError(f"compilation cache path must be a directory, None or False, got {path!r:.60}")
  path = str(Path(path).expanduser())
  jax.config.update("jax_enable_compilation_cache", True)
  if jax.config.jax_compilation_cache_dir != path:
    jax.config.update("jax_compilation_cache_dir", path)
    _reset_if_initialised()
  jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECS)
  return path


def _reset_if_initialised() -> None:
  # A cache opened earlier in this process keeps its old directory until reset.
  try:
    from jax.experimental.compilation_cache import compilation_cache  # noqa: PLC0415
    compilation_cache.reset_cache()
  except Exception:  # noqa: BLE001  (best effort: a new process uses the new directory anyway)
    pass


def enable_default() -> None:
  """What `import nemojax` does: the default cache, unless the user configured JAX's own."""
  if jax.config.jax_compilation_cache_dir and ENV_VAR not in os.environ:
    return  # the user's JAX cache directory wins
  try:
    enable_persistent_cache()
  except (OSError, ValueError) as e:  # an unusable directory must not break `import nemojax`
    print(f"nemojax: persistent compilation cache off ({e})", file=sys.stderr)


class Notifier:
  """Says once per new program, before it compiles, what is being compiled.

  Args:
    progress: True (one line on stderr), a function taking the line, or None / False (silent).
  """

  _seen: set = set()  # (name, signature) pairs called in this process, shared by all notifiers

  def __init__(self, progress: bool | Callable[[str], object] | None):
    if progress is not None and not isinstance(progress, bool) and not callable(progress):
      raise ValueError(f"progress must be True, False, None or a function (line), got "
                       f"{progress!r:.40}")
    self.progress = progress

  @staticmethod
  def signature(*args) -> tuple:
    """The shapes and dtypes (and static values) that pick a compiled program."""
    return tuple((tuple(x.shape), str(x.dtype)) if hasattr(x, "shape") else x
                 for x in jax.tree.leaves(args))

  def before(self, name: str, what: str, *args) -> None:
    """Announces `what` when `name` has not yet been called with `args`' shapes."""
    key = (name, self.signature(*args))
    if key in Notifier._seen:
      return
    Notifier._seen.add(key)
    if not self.progress:
      return
    line = f"nemojax: compiling {what} (first call with this shape)"
    if callable(self.progress) and not isinstance(self.progress, bool):
      self.progress(line)
    else:
      print(line, file=sys.stderr, flush=True)
