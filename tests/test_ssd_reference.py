"""The chunked SSD (XLA) against the lax.scan oracle, at odd shapes, with and without a state."""

import jax
import numpy as np
import pytest

from nemojax.kernels import platform
from nemojax.kernels.ssd import api, reference
from nemojax import testing as T
from nemojax.testing import rel_err

F32 = T.tolerance("float32", "same")  # same math in fp32, different summation order
BF16 = T.tolerance("bfloat16", "kernel")


def random_ssd_inputs(rng, b, t, h, p, g, n, with_state, dtype=np.float32):
  x = rng.standard_normal((b, t, h, p)).astype(dtype)
  dt = np.log1p(np.exp(rng.standard_normal((b, t, h)) - 1.0)).astype(np.float32)
  A = -np.exp(rng.uniform(-1.0, 1.5, h)).astype(np.float32)
  B = rng.standard_normal((b, t, g, n)).astype(dtype)
  C = rng.standard_normal((b, t, g, n)).astype(dtype)
  D = rng.standard_normal(h).astype(np.float32)
  s0 = rng.standard_normal((b, h, p, n)).astype(np.float32) if with_state else None
  return x, dt, A, B, C, D, s0


@pytest.mark.parametrize("t,chunk", [(5, 8), (8, 8), (37, 8), (100, 16), (130, 64)])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_equals_naive(t, chunk, with_state):
  rng = np.random.default_rng(t * 7 + chunk + with_state)
  b, h, p, g, n = 2, 6, 10, 3, 12  # head dim and state not powers of two; 3 groups of 2 heads
  args = random_ssd_inputs(rng, b, t, h, p, g, n, with_state)
  y_ref, s_ref = reference.ssd_naive(*args)
  y, s = reference.ssd_chunked(*args, chunk_size=chunk)
  assert y.shape == (b, t, h, p) and s.shape == (b, h, p, n)
  assert rel_err(y, y_ref) <= F32
  assert rel_err(s, s_ref) <= F32
  assert np.isfinite(np.asarray(y)).all()


def test_chunked_is_consistent_across_splits():
  """Running two halves with the state passed equals one run (the prefill-chunking contract)."""
  rng = np.random.default_rng(3)
  x, dt, A, B, C, D, _ = random_ssd_inputs(rng, 3, 45, 4, 6, 2, 5, False)
  y, s = reference.ssd_chunked(x, dt, A, B, C, D, chunk_size=8)
  k = 19
  y1, s1 = reference.ssd_chunked(x[:, :k], dt[:, :k], A, B[:, :k], C[:, :k], D, chunk_size=8)
  y2, s2 = reference.ssd_chunked(x[:, k:], dt[:, k:], A, B[:, k:], C[:, k:], D, s1, chunk_size=8)
  assert rel_err(np.concatenate([y1, y2], 1), y) <= F32
  assert rel_err(s2, s) <= F32


def test_update_equals_one_step_of_scan():
  rng = np.random.default_rng(4)
  x, dt, A, B, C, D, s0 = random_ssd_inputs(rng, 3, 1, 6, 10, 2, 12, True)
  y_ref, s_ref = reference.ssd_naive(x, dt, A, B, C, D, s0)
  y, s = reference.ssd_update(s0, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D)
  assert rel_err(y, y_ref[:, 0]) <= F32 and rel_err(s, s_ref) <= F32


def test_bf16_inputs_stay_close_to_fp32():
  rng = np.random.default_rng(5)
  x, dt, A, B, C, D, s0 = random_ssd_inputs(rng, 2, 50, 4, 8, 2, 8, True)
  y32, s32 = reference.ssd_naive(x, dt, A, B, C, D, s0)
  bf = lambda a: jax.numpy.asarray(a, jax.numpy.bfloat16)
  y16, s16 = reference.ssd_chunked(bf(x), dt, A, bf(B), bf(C), D, s0, chunk_size=16)
  assert y16.dtype == jax.numpy.bfloat16 and s16.dtype == np.float32
  assert rel_err(y16, y32) <= BF16 and rel_err(s16, s32) <= BF16


def test_api_dispatch_and_errors():
  # The Pallas kernels take bf16 only, so fp32 goes to XLA on every backend; bf16 goes to the
  # kernels exactly where Mosaic GPU runs.
  assert api.resolve_implementation(None, head_dim=80, state_size=128, chunk_size=128,
                                    dtype=np.float32) == "xla"
  expected = "pallas" if platform.mosaic_gpu_available() else "xla"
  assert api.resolve_implementation(None, head_dim=80, state_size=128, chunk_size=128,
                                    dtype=jax.numpy.bfloat16) == expected
  assert api.resolve_implementation("naive") == "naive"
  with pytest.raises(ValueError, match="implementation"):
    api.resolve_implementation("cuda")
  rng = np.random.default_rng(6)
  x, dt, A, B, C, D, _ = random_ssd_inputs(rng, 1, 9, 4, 4, 2, 4, False)
  y_naive, _ = api.ssd(x, dt, A, B, C, D, implementation="naive")
  y_xla, _ = api.ssd(x, dt, A, B, C, D, chunk_size=4, implementation="xla")
  assert rel_err(y_xla, y_naive) <= F32
  with pytest.raises(ValueError, match="dt must be"):
    api.ssd(x, dt[:, :3], A, B, C, D)
  with pytest.raises(ValueError, match="multiple of groups"):
    api.ssd(x, dt, A, B[:, :, :1].repeat(3, 2), C[:, :, :1].repeat(3, 2), D)
