"""Compilation: a bounded number of programs over a max_new_tokens sweep, first-compile notices,
and JAX's persistent cache (directory choice, reuse by a second process)."""

import os
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import pytest
from flax import nnx

import nemojax
from nemojax import NemotronHConfig, compilation
from nemojax.sampler import Sampler


@pytest.fixture(scope="module")
def model():
  return nemojax.NemotronH(NemotronHConfig.tiny(), dtype=jnp.float32, rngs=nnx.Rngs(5))


def test_max_new_tokens_sweep_meets_few_cache_lengths(model):
  s = Sampler(model)
  bucket = s.prefill_bucket(10)
  lengths = {s.cache_len(bucket, m) for m in range(1, 32769)}
  assert len(lengths) == 16 and min(lengths) == 256 and max(lengths) == 49152
  for m in (1, 300, 5000, 32768):  # enough room, at most a third unused
    n = s.cache_len(bucket, m)
    assert bucket + m <= n and (n <= 256 or 3 * (n - bucket - m) < n)


def test_sweep_compiles_one_prefill_and_one_decode_per_cache_length(model):
  s = Sampler(model, prefill_chunk=16, min_bucket=8)
  prompt = [[5, 6, 7, 8, 9]]
  s(prompt, max_new_tokens=1)  # bucket 8, cache 256
  start = s.compiled_shapes()
  for m in (2, 17, 100, 248):  # all within cache length 256: nothing new
    s(prompt, max_new_tokens=m)
  assert s.compiled_shapes() == start
  for m in (249, 300, 376):  # 384 positions: one new decode loop, prefill unchanged
    s(prompt, max_new_tokens=m)
  assert s.compiled_shapes() == {"prefill": start["prefill"], "decode": start["decode"] + 1}


def test_progress_says_once_per_new_program(model):
  lines = []
  s = Sampler(model, prefill_chunk=16, min_bucket=8, progress=lines.append)
  # A batch of 5 (shapes no other test uses): bucket 48, three chunks of 16 of one shape.
  s([list(range(1, 40))] * 5, max_new_tokens=300)
  assert [ln.startswith("nemojax: compiling") for ln in lines] == [True, True]
  assert "prefill for 5 x 16 tokens" in lines[0] and "decode loop for batch 5" in lines[1]
  s([list(range(2, 41))] * 5, max_new_tokens=290)
  assert len(lines) == 2
  with pytest.raises(ValueError, match="progress"):
    Sampler(model, progress="yes")


def test_cache_directory_choice(monkeypatch, tmp_path):
  before = compilation.cache_dir()
  try:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compilation.default_cache_dir() == tmp_path / "nemojax" / "jax"
    monkeypatch.setenv(compilation.ENV_VAR, "off")
    assert compilation.enable_persistent_cache() is None
    monkeypatch.setenv(compilation.ENV_VAR, str(tmp_path / "c"))
    assert compilation.enable_persistent_cache() == str(tmp_path / "c")
    assert compilation.cache_dir() == str(tmp_path / "c")
    monkeypatch.delenv(compilation.ENV_VAR)
    assert compilation.enable_persistent_cache() == str(tmp_path / "nemojax" / "jax")
    with pytest.raises(ValueError, match="compilation cache path"):
      compilation.enable_persistent_cache(3)
  finally:
    compilation.enable_persistent_cache(before or False)


_CHILD = textwrap.dedent("""
    import time, jax, jax.numpy as jnp
    from flax import nnx
    import nemojax
    hits = []
    jax.monitoring.register_event_listener(
        lambda name, **kw: hits.append(name) if name.endswith("cache_hits") else None)
    model = nemojax.NemotronH(nemojax.NemotronHConfig.tiny(), dtype=jnp.float32,
                              rngs=nnx.Rngs(0))
    t = time.perf_counter()
    out = nemojax.Sampler(model)([[3, 4, 5]], max_new_tokens=4)[0].tokens
    print(len(hits), round(time.perf_counter() - t, 2), out)
""")


@pytest.mark.slow
def test_second_process_loads_programs_from_disk(tmp_path):
  env = {**os.environ, compilation.ENV_VAR: str(tmp_path / "jax")}
  run = lambda: subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True,
                               text=True, check=True).stdout.split(maxsplit=2)
  hits1, _, out1 = run()
  assert any((tmp_path / "jax").iterdir())  # programs written
  hits2, _, out2 = run()
  assert int(hits1) == 0 and int(hits2) >= 2 and out1 == out2  # prefill and decode loaded
