"""The package on the running JAX (0.10, 0.11 or 0.12): every module imports, both compiled
kernels trace, a kernel that cannot be built falls back to XLA with one warning, and private JAX
APIs stay in one place (kernels/platform.py, which says why and on which versions).
"""

import functools
import json
import pathlib
import subprocess
import sys
import tomllib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemojax import testing as T
from nemojax.kernels import platform
from nemojax.kernels.attention import api as attention_api
from nemojax.kernels.attention import pallas_mosaic_gpu as fa
from nemojax.kernels.ssd import api as ssd_api
from nemojax.kernels.ssd import pallas_mosaic_gpu_bwd as pmg  # the differentiable entry
from nemojax.kernels.ssd import reference

ROOT = pathlib.Path(__file__).resolve().parents[1]
S = jax.ShapeDtypeStruct
BF16 = jnp.bfloat16

# Run in a fresh interpreter so that nothing a previous test imported hides an import-time error.
_IMPORT_ALL = """
import importlib, json, pkgutil, sys, traceback
found, failed = [], {}
for top in sys.argv[1:]:
  pkg = importlib.import_module(top)
  found.append(top)
  for info in pkgutil.walk_packages(pkg.__path__, top + "."):
    if info.name.rsplit(".", 1)[-1] == "__main__":  # runs a command line when imported
      continue
    found.append(info.name)
    try:
      importlib.import_module(info.name)
    except Exception:
      failed[info.name] = traceback.format_exc(limit=3)
print(json.dumps({"found": found, "failed": failed}))
"""


def declared_packages() -> list[str]:
  return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]


def test_every_module_imports_on_this_jax():
  tops = ["nemojax", "nemojax.kernels", "nemojax.convert"]  # kernels/, convert/ live beside
  proc = subprocess.run([sys.executable, "-c", _IMPORT_ALL, *tops], capture_output=True,
                        text=True, timeout=300, cwd=ROOT, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert not result["failed"], f"jax {jax.__version__}: " + "\n".join(
      f"{name}:\n{tb}" for name, tb in result["failed"].items())
  assert set(declared_packages()) <= set(result["found"])  # the walk saw every package
  assert {"nemojax.kernels.platform", "nemojax.kernels.ssd.pallas_mosaic_gpu",
          "nemojax.kernels.attention.pallas_mosaic_gpu", "nemojax.convert.cli"} <= set(
              result["found"])


def test_compiled_kernels_trace_on_this_jax():
  """The compiled (not interpreted) kernel bodies trace without a GPU: a moved Pallas API fails
  here on CPU rather than on the first Hopper run."""
  t, p, n = 128, 80, 128
  y, state = jax.eval_shape(functools.partial(pmg.ssd, chunk_size=t, interpret=False),
                            S((1, t, 1, p), BF16), S((1, t, 1), jnp.float32),
                            S((1,), jnp.float32), S((1, t, 1, n), BF16), S((1, t, 1, n), BF16))
  assert (y.shape, y.dtype, state.shape, state.dtype) == ((1, t, 1, p), BF16, (1, 1, p, n),
                                                          jnp.float32)
  q, kv = S((1, 100, 2, 128), BF16), S((1, 1, 256, 128), BF16)
  i = S((), jnp.int32)
  o = jax.eval_shape(functools.partial(fa.attention, interpret=False), q, kv, kv, i,
                     S((1,), jnp.int32), i)
  assert (o.shape, o.dtype) == ((1, 100, 2, 128), BF16)



def _broken(*args, **kwargs):
  raise KeyError("idx")  # what jax 0.12's plgpu.load signature did to the old check (issue #20)


def _ssd_inputs():
  rng = np.random.default_rng(0)
  b, t, h, p, n = 1, 40, 2, 64, 128
  x = jnp.asarray(rng.standard_normal((b, t, h, p)), BF16)
  dt = jnp.asarray(np.abs(rng.standard_normal((b, t, h))) * 0.1, jnp.float32)
  A = -jnp.ones((h,), jnp.float32)
  B = jnp.asarray(rng.standard_normal((b, t, 1, n)) / np.sqrt(n), BF16)
  return x, dt, A, B, B


def test_ssd_kernel_that_cannot_build_falls_back_to_xla_with_one_warning(pretend_hopper,
                                                                        monkeypatch):
  shapes = {"head_dim": 64, "state_size": 128, "chunk_size": 128, "dtype": BF16}
  assert ssd_api.resolve_implementation(None, **shapes) == "pallas"  # it traces here
  platform.reset_fallbacks()
  monkeypatch.setattr(pmg, "ssd", _broken)
  with pytest.warns(RuntimeWarning, match="ssd.pallas_mosaic_gpu.*KeyError.*XLA"):
    assert ssd_api.resolve_implementation(None, **shapes) == "xla"
  args = _ssd_inputs()
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # said once: the model's layers stay quiet
    y, s = jax.jit(ssd_api.ssd)(*args)
  y_ref, s_ref = jax.jit(functools.partial(reference.ssd_chunked, chunk_size=128))(*args)
  T.assert_close(y, y_ref, "float32", "same", "y (the XLA path itself)")
  T.assert_close(s, s_ref, "float32", "same", "final state")
  with pytest.raises(KeyError):  # asked for by name: the error is the caller's to see
    ssd_api.ssd(*args, implementation="pallas")


def test_attention_kernel_that_cannot_build_falls_back_to_xla_with_one_warning(pretend_hopper,
                                                                              monkeypatch):
  shapes = {"num_queries": 256, "head_dim": 128, "cache_len": 1024, "dtype": BF16}
  assert attention_api.resolve_implementation(None, **shapes) == "pallas"
  platform.reset_fallbacks()
  monkeypatch.setattr(fa, "attention", _broken)
  with pytest.warns(RuntimeWarning, match="attention.pallas_mosaic_gpu.*KeyError.*XLA"):
    assert attention_api.resolve_implementation(None, **shapes) == "xla"
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert attention_api.resolve_implementation(None, num_queries=256, head_dim=64,
                                                cache_len=256, dtype=BF16) == "xla"


def test_kernel_module_that_fails_to_import_falls_back(pretend_hopper, monkeypatch):
  def failing_import(name, *args, **kwargs):
    raise AttributeError(f"module has no attribute 'load' (importing {name})")
  with monkeypatch.context() as m:
    m.setattr(platform.importlib, "import_module", failing_import)
    with pytest.warns(RuntimeWarning, match="AttributeError"):
      assert attention_api.resolve_implementation(None, num_queries=256, head_dim=128,
                                                  cache_len=1024, dtype=BF16) == "xla"
  assert platform.disabled("attention.pallas_mosaic_gpu").startswith("AttributeError")


def test_private_jax_apis_only_in_platform():
  """Every `jax._src` use is in kernels/platform.py, whose docstring lists it."""
  uses = {}
  for folder in ("nemojax", "kernels", "convert"):
    for path in (ROOT / folder).rglob("*.py"):
      hits = [line.strip() for line in path.read_text().splitlines()
              if "jax._src" in line and not line.strip().startswith(("#", "`", "\""))]
      if hits:
        uses[str(path.relative_to(ROOT))] = hits
  assert set(uses) <= {"kernels/platform.py"}, uses
  doc = platform.__doc__
  for line in uses.get("kernels/platform.py", []):
    module = line.split("from ")[-1].split(" import")[0]
    assert module in doc, f"{module} is used but not listed in kernels/platform.py's docstring"


def test_a_library_refusing_one_shape_keeps_the_others():
  # cuDNN's flash attention refuses some shapes; that must not switch it off for every shape
  # (per_shape), while a kernel whose API moved is still disabled once for all (the default).
  platform.reset_fallbacks()
  S = jax.ShapeDtypeStruct

  def picky(x):
    if x.shape[-1] == 96:
      raise ValueError("head dim 96 is not supported")
    return x

  with pytest.warns(RuntimeWarning, match="lib.picky does not take.*96.*not supported.*XLA"):
    assert not platform.traces("lib.picky", picky, S((2, 96), BF16), per_shape=True)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # said once per shape
    assert not platform.traces("lib.picky", picky, S((2, 96), BF16), per_shape=True)
    assert platform.traces("lib.picky", picky, S((2, 128), BF16), per_shape=True)
  assert platform.disabled("lib.picky") is None
  with pytest.warns(RuntimeWarning, match="lib.strict cannot be built"):
    assert not platform.traces("lib.strict", picky, S((2, 96), BF16))
  assert not platform.traces("lib.strict", picky, S((2, 128), BF16))
  platform.reset_fallbacks()
