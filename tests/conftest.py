"""Shared test set-up: fast CPU compiles and skipping `gpu` tests off Hopper."""

from __future__ import annotations

import os

# Tests run tiny models whose cost is compilation, not execution: XLA's CPU backend compiles
# ~3x faster without its LLVM optimisation passes. Set before JAX initialises its backend.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_backend_optimization_level=0").strip()

# Eight fake CPU devices, so that tests/test_sharding.py can build meshes. Other tests are not
# affected: arrays still go to the first device unless a test places them on a mesh.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()

# nemojax turns JAX's persistent compilation cache on when imported (a directory in the user's
# home); tests must not write there. A test that needs the cache points it at a tmp directory.
os.environ.setdefault("NEMOJAX_COMPILATION_CACHE", "off")

import pytest


def pytest_collection_modifyitems(config, items):
  # The `slow` tests first (stable order otherwise): pytest-xdist hands tests out in this order,
  # so the long ones start early and the run does not end with one worker on a 70 s test while
  # the other idles.
  items.sort(key=lambda item: "slow" not in item.keywords)
  # `gpu` tests compile the Mosaic GPU kernels, which need Hopper or newer: on a CPU or an older
  # GPU they skip, never fail.
  from nemojax.kernels import platform
  if platform.mosaic_gpu_available():
    return
  skip = pytest.mark.skip(reason="needs an NVIDIA GPU of compute capability >= 9.0 (Hopper)")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(skip)


@pytest.fixture
def pretend_hopper(monkeypatch):
  """The kernel dispatchers believe a Hopper GPU is present; fallback state is reset afterwards."""
  from nemojax.kernels import platform
  platform.reset_fallbacks()
  monkeypatch.setattr(platform, "mosaic_gpu_available", lambda: True)
  yield
  platform.reset_fallbacks()
