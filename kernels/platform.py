"""Which kernels the default JAX backend can compile, what the Pallas kernels share, and every
difference between the JAX versions nemojax supports (0.10, 0.11, 0.12).

Version shims live here and nowhere else. Each one tests for the capability (a name, a
parameter) rather than comparing version numbers, cannot raise while it tests, and falls back
to the other spelling; a kernel module that cannot be imported or built on the running JAX makes
the dispatchers fall back to XLA with one warning (`kernel_module`, `disable`).

Private JAX APIs still used (see also the checks in tests/test_imports.py):
  `jax._src.pallas.mosaic_gpu.interpret.params.InterpretGPUParams`, only on jax 0.10, where the
  Mosaic GPU interpreter has no public name (0.11 and 0.12 export it as
  `plgpu.InterpretGPUParams`, used first). Without it interpret mode (the CPU kernel tests)
  does not exist: `interpret=True` would pick Pallas' generic interpreter, which has no rules
  for Mosaic GPU's barriers and copies.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import warnings

import jax
import jax.numpy as jnp


def _cuda_major() -> int:
  """The default device's CUDA compute capability major version; 0 if it is no NVIDIA GPU."""
  try:
    dev = jax.devices()[0]
  except RuntimeError:
    return 0
  if dev.platform != "gpu":
    return 0
  cc = getattr(dev, "compute_capability", None)  # absent on ROCm devices
  try:
    return int(str(cc).split(".")[0])
  except (TypeError, ValueError):
    return 0


@functools.cache
def mosaic_gpu_available() -> bool:
  """True on an NVIDIA GPU of compute capability 9.0 or newer (Hopper, Blackwell)."""
  return _cuda_major() >= 9


@functools.cache
def cuda_gpu_available() -> bool:
  """True on an NVIDIA GPU of compute capability 8.0 or newer (cuDNN's flash attention)."""
  return _cuda_major() >= 8


# --------------------------------------------------------------------------------------------
# Dispatch: a kernel that cannot be imported or built on this JAX means XLA, said once.

_DISABLED: dict[str, str] = {}  # kernel -> why it cannot be used here
_TRACED: set[tuple] = set()  # (kernel, signature) that traced
_REFUSED: dict[tuple, str] = {}  # (kernel, signature) -> why, for shape-dependent kernels


def disable(name: str, error: BaseException) -> None:
  """Marks kernel `name` unusable on this JAX and warns once; the dispatchers then use XLA."""
  if name in _DISABLED:
    return
  _DISABLED[name] = f"{type(error).__name__}: {error}"
  warnings.warn(
      f"nemojax: the kernel {name} cannot be built with jax {jax.__version__} "
      f"({_DISABLED[name]}); using the XLA implementation instead", RuntimeWarning, stacklevel=3)


def disabled(name: str) -> str | None:
  """Why kernel `name` was disabled in this process (`disable`), or None if it was not."""
  return _DISABLED.get(name)


def reset_fallbacks() -> None:
  """Forgets every `disable` and `traces` result (tests; a process that changed its JAX setup)."""
  _DISABLED.clear()
  _TRACED.clear()
  _REFUSED.clear()


def kernel_module(name: str):
  """`nemojax.kernels.<name>` (e.g. "ssd.pallas_mosaic_gpu"), or None if it cannot be imported.

  Any exception counts, not only ImportError: a JAX whose Pallas API moved fails in the module
  body (a missing attribute, a changed signature). The first failure warns (`disable`).
  """
  if disabled(name):
    return None
  try:
    return importlib.import_module(f"nemojax.kernels.{name}")
  except Exception as e:  # noqa: BLE001  (any failure means "no kernel here", said once)
    disable(name, e)
    return None


def traces(name: str, fn, *args, per_shape: bool = False) -> bool:
  """Whether `fn(*args)` traces on this JAX; if not, kernel `name` is disabled (one warning).

  `args` are `jax.ShapeDtypeStruct`s: `jax.eval_shape` traces the kernel body without compiling
  or running it and needs no GPU, so a Pallas API that moved is caught here, outside the model.
  Checked once per (name, argument shapes and dtypes).

  `per_shape`: for a library whose limits depend on the shapes (cuDNN's flash attention refuses
  some head dims and lengths), a failure refuses only these shapes (one warning for them) and
  other shapes are still tried.
  """
  key = (name, tuple((a.shape, jnp.dtype(a.dtype).name) for a in args))
  if disabled(name) or key in _REFUSED:
    return False
  if key in _TRACED:
    return True
  try:
    jax.eval_shape(fn, *args)
  except Exception as e:  # noqa: BLE001  (any failure means "no kernel here", said once)
    if not per_shape:
      disable(name, e)
      return False
    _REFUSED[key] = f"{type(e).__name__}: {e}"
    shapes = ", ".join(f"{a.shape} {jnp.dtype(a.dtype).name}" for a in args)
    warnings.warn(f"nemojax: {name} does not take {shapes} with jax {jax.__version__} "
                  f"({_REFUSED[key]:.300}); using the XLA implementation for these shapes",
                  RuntimeWarning, stacklevel=3)
    return False
  _TRACED.add(key)
  return True


# --------------------------------------------------------------------------------------------
# Mosaic GPU API differences between JAX versions.


@functools.cache
def _load_takes_index() -> bool:
  # jax 0.10: plgpu.load(ref, idx, *, layout) with idx required; 0.11 gives idx a default and
  # deprecates it (index through `ref.at[...]`); 0.12 removes it.
  try:
    import jax.experimental.pallas.mosaic_gpu as plgpu  # noqa: PLC0415
    param = inspect.signature(plgpu.load).parameters.get("idx")
  except Exception:  # noqa: BLE001  (no signature to read: assume the newest API)
    return False
  return param is not None and param.default is inspect.Parameter.empty


def load(ref, *, layout):
  """`plgpu.load` of the whole ref into registers with `layout`, on every supported JAX."""
  import jax.experimental.pallas.mosaic_gpu as plgpu  # noqa: PLC0415
  if _load_takes_index():
    return plgpu.load(ref, (), layout=layout)
  return plgpu.load(ref, layout=layout)


def _interpret_params():
  import jax.experimental.pallas.mosaic_gpu as plgpu  # noqa: PLC0415
  cls = getattr(plgpu, "InterpretGPUParams", None)  # public from jax 0.11
  if cls is None:  # jax 0.10: only the private module has it (see the module docstring)
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams as cls  # noqa: PLC0415
  return cls()


def mosaic_params(*, interpret: bool, approx_math: bool):
  """(interpret params, compiler params) for `plgpu.kernel`: the CPU interpreter or the compiler."""
  if interpret:
    return _interpret_params(), None
  import jax.experimental.pallas.mosaic_gpu as plgpu  # noqa: PLC0415
  return None, plgpu.CompilerParams(approx_math=approx_math)


# --------------------------------------------------------------------------------------------
# One jitted kernel per signature.


@functools.lru_cache(maxsize=128)
def _jitted(build, items):
  return jax.jit(build(**dict(items)))


def shared_kernel(build, **signature):
  """`jax.jit(build(**signature))`, made once per signature and shared by every call site.

  A model calls a kernel once per layer; through one jitted function JAX lowers the kernel once
  per program and every layer's call carries the same kernel module, so it is compiled once
  rather than once per layer (27 Mamba layers: 98 s -> 14 s for the 9B prefill).
  """
  return _jitted(build, tuple(sorted(signature.items())))
