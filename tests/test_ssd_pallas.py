"""The fused Pallas (Mosaic GPU) SSD kernel against the lax.scan oracle and the XLA chunked scan.

On CPU the kernel runs on Mosaic GPU's interpreter (same kernel body, products as jnp.dot; see the
kernel's module docstring). Shapes are small and odd: head dims 64 and 80, lengths that are not
multiples of the block, an initial state, batch > 1, heads sharing a group. The interpreter costs
~8 s per (batch, head) program on two CPU cores, so each case keeps batch × heads ≤ 2.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemojax.kernels import platform
from nemojax.kernels.ssd import api, reference
from nemojax.kernels.ssd import pallas_mosaic_gpu as pmg

# ‖Δ‖/‖ref‖ bounds, one per input dtype (reference: fp32 oracle on the same rounded inputs).
TOL = {"bfloat16": 1e-2}
N = 128  # the kernel's state size (two warpgroups × 64 rows)


def rel_err(a, b) -> float:
  a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
  b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
  assert np.isfinite(a).all(), "NaN or inf in the kernel's output"
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def inputs(seed, b, t, h, p, g, with_state, with_d=True, dtype=jnp.bfloat16):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((b, t, h, p)), dtype)
  dt = jnp.asarray(np.log1p(np.exp(rng.standard_normal((b, t, h)) - 1.0)), jnp.float32)
  A = jnp.asarray(-np.exp(rng.uniform(-1.0, 1.5, h)), jnp.float32)
  B = jnp.asarray(rng.standard_normal((b, t, g, N)) / np.sqrt(N) * 2, dtype)
  C = jnp.asarray(rng.standard_normal((b, t, g, N)) / np.sqrt(N) * 2, dtype)
  D = jnp.asarray(rng.standard_normal(h), jnp.float32) if with_d else None
  s0 = jnp.asarray(rng.standard_normal((b, h, p, N)), jnp.float32) if with_state else None
  return x, dt, A, B, C, D, s0


def check_against_references(args, y, s, chunk):
  y_naive, s_naive = reference.ssd_naive(*args)
  y_chunk, s_chunk = reference.ssd_chunked(*args, chunk_size=chunk)
  tol = TOL[jnp.dtype(args[0].dtype).name]
  assert y.shape == y_naive.shape and y.dtype == args[0].dtype
  assert s.shape == s_naive.shape and s.dtype == jnp.float32
  assert rel_err(y, y_naive) <= tol and rel_err(s, s_naive) <= tol
  assert rel_err(y, y_chunk) <= tol and rel_err(s, s_chunk) <= tol


def test_head_dim_80_batch_state_odd_length():
  # 150 steps = one full block + 22 (padded with dt = 0); batch 2; initial state.
  args = inputs(0, b=2, t=150, h=1, p=80, g=1, with_state=True)
  y, s = pmg.ssd(*args, chunk_size=128, interpret=True)
  check_against_references(args, y, s, 128)


def test_head_dim_64_through_dispatcher():
  # Two heads sharing one group, no D, no state; chunk 256 is longer than the sequence.
  args = inputs(1, b=1, t=100, h=2, p=64, g=1, with_state=False, with_d=False)
  y, s = api.ssd(*args[:6], initial_state=args[6], chunk_size=256, implementation="pallas")
  check_against_references(args, y, s, 256)


def test_gradients_match_reference_path():
  x, dt, A, B, C, D, s0 = inputs(2, b=1, t=70, h=1, p=64, g=1, with_state=True)
  rng = np.random.default_rng(9)
  wy = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
  ws = jnp.asarray(rng.standard_normal(s0.shape), jnp.float32)

  def loss(fn):
    def f(x, dt, A, B, C, D, s0):
      y, s = fn(x, dt, A, B, C, D, s0)
      return jnp.sum(y.astype(jnp.float32) * wy) + jnp.sum(s * ws)
    return f

  kern = lambda *a: pmg.ssd(*a, chunk_size=128, interpret=True)
  ref = lambda *a: reference.ssd_chunked(*a, chunk_size=128)
  argnums = tuple(range(7))
  g_kern = jax.grad(loss(kern), argnums)(x, dt, A, B, C, D, s0)
  g_ref = jax.grad(loss(ref), argnums)(x, dt, A, B, C, D, s0)
  for gk, gr in zip(g_kern, g_ref):
    assert gk.shape == gr.shape and gk.dtype == gr.dtype
    assert rel_err(gk, gr) <= 1e-6


def test_supports_and_dispatch():
  bf16 = jnp.bfloat16
  for p in (64, 80):
    for q in (128, 256):
      assert pmg.supports(head_dim=p, state_size=128, chunk_size=q, dtype=bf16)
  assert not pmg.supports(head_dim=80, state_size=128, chunk_size=128, dtype=jnp.float16)
  assert not pmg.supports(head_dim=80, state_size=128, chunk_size=128, dtype=jnp.float32)
  assert not pmg.supports(head_dim=80, state_size=64, chunk_size=128, dtype=bf16)
  assert not pmg.supports(head_dim=72, state_size=128, chunk_size=128, dtype=bf16)
  assert not pmg.supports(head_dim=256, state_size=128, chunk_size=128, dtype=bf16)  # SMEM
  on_gpu = platform.mosaic_gpu_available()
  impl = api.resolve_implementation(None, head_dim=80, state_size=128, chunk_size=128, dtype=bf16)
  assert impl == ("pallas" if on_gpu else "xla")
  impl = api.resolve_implementation(None, head_dim=80, state_size=128, chunk_size=128,
                                    dtype=jnp.float32)
  assert impl == "xla"
  with pytest.raises(ValueError):
    pmg.Config(block_t=64)


# ---- GPU machine only -------------------------------------------------------------------------


def _ref32(args, chunk):
  x, dt, A, B, C, D, s0 = args
  up = lambda a: a.astype(jnp.float32)
  with jax.default_matmul_precision("highest"):
    return reference.ssd_chunked(up(x), dt, A, up(B), up(C), D, s0, chunk_size=chunk)


@pytest.mark.gpu
@pytest.mark.parametrize("p", [64, 80])
@pytest.mark.parametrize("b,t,h,g,with_state", [(2, 1000, 16, 2, True), (1, 4096, 128, 8, False),
                                                (3, 129, 8, 8, True)])
def test_compiled_kernel(p, b, t, h, g, with_state):
  args = inputs(b * t + p, b=b, t=t, h=h, p=p, g=g, with_state=with_state)
  y, s = jax.jit(lambda *a: pmg.ssd(*a, chunk_size=128))(*args)
  y_ref, s_ref = _ref32(args, 128)
  assert rel_err(y, y_ref) <= TOL["bfloat16"]
  assert rel_err(s, s_ref) <= TOL["bfloat16"]


@pytest.mark.gpu
def test_compiled_gradients_and_dispatch():
  args = inputs(7, b=2, t=300, h=8, p=80, g=2, with_state=True)
  y, s = api.ssd(*args[:6], initial_state=args[6])  # default: pallas on Hopper
  y_ref, s_ref = _ref32(args, 128)
  assert rel_err(y, y_ref) <= TOL["bfloat16"] and rel_err(s, s_ref) <= TOL["bfloat16"]
  f = lambda fn: (lambda *a: jnp.sum(fn(*a)[0].astype(jnp.float32) ** 2) + jnp.sum(fn(*a)[1]))
  g_k = jax.grad(f(lambda *a: pmg.ssd(*a)), (0, 1, 3))(*args)
  g_r = jax.grad(f(lambda *a: reference.ssd_chunked(*a)), (0, 1, 3))(*args)
  for a, r in zip(g_k, g_r):
    assert rel_err(a, r) <= 2e-2  # the kernel's y differs from XLA's by bf16 rounding
