"""The fused Pallas (Mosaic GPU) SSD kernels (forward and backward) against the XLA references.

On CPU the kernel runs on Mosaic GPU's interpreter (same kernel body, products as jnp.dot; see the
kernel's module docstring). Shapes are small and odd: head dims 64 and 80, lengths that are not
multiples of the block, an initial state, batch > 1, heads sharing a group. The interpreter costs
~8 s per (batch, head) program on two CPU cores, so each forward case keeps batch × heads ≤ 2 and
the backward cases (forward + backward kernels) are marked slow.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src import mesh as mesh_lib  # AbstractDevice: see lower_for_cuda

from nemojax import testing as T
from nemojax.kernels import layout, platform
from nemojax.kernels.ssd import api, reference
from nemojax.kernels.ssd import pallas_mosaic_gpu as fwd  # the forward kernel alone
from nemojax.kernels.ssd import pallas_mosaic_gpu_bwd as pmg  # the differentiable entry

N = 128  # the kernel's state size (two warpgroups × 64 rows)
KERNEL = ("bfloat16", "kernel")  # bf16 operands, fp32 accumulation, against an fp32 reference


def close(actual, expected, what=""):
  actual = np.asarray(jnp.asarray(actual, jnp.float32))
  assert np.isfinite(actual).all(), f"{what}: NaN or inf in the kernel's output"
  T.assert_close(actual, np.asarray(jnp.asarray(expected, jnp.float32)), *KERNEL, what=what)


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
  assert y.shape == y_naive.shape and y.dtype == args[0].dtype
  assert s.shape == s_naive.shape and s.dtype == jnp.float32
  close(y, y_naive, "y vs naive")
  close(s, s_naive, "state vs naive")
  close(y, y_chunk, "y vs chunked")
  close(s, s_chunk, "state vs chunked")


def lower_for_cuda(fn, *args) -> str:
  """StableHLO text of `fn` lowered for CUDA on this (GPU-less) machine.

  The wrappers' Triton transposes (`kernels/layout.py`) ask the device for its compute
  capability while lowering; JAX 0.12 takes it from an abstract device when there is no GPU
  (jax._src API: JAX 0.10 and 0.11 lower without it and may not accept the argument).
  """
  lower = lambda: jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  try:
    device = mesh_lib.AbstractDevice(device_kind="NVIDIA H200", num_cores=None, platform="cuda")
    mesh = mesh_lib.AbstractMesh((1,), ("x",), abstract_device=device)
  except (AttributeError, TypeError):
    return lower()
  with jax.sharding.use_abstract_mesh(mesh):
    return lower()


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


def grads(fn, args, seed=9, argnums=tuple(range(7))):
  """Gradients of sum(y·wy) + sum(final·ws) for random weights (both cotangents non-zero)."""
  rng = np.random.default_rng(seed)
  x = args[0]
  b, _, h, p = x.shape
  wy = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
  ws = jnp.asarray(rng.standard_normal((b, h, p, N)), jnp.float32)

  def loss(*a):
    y, s = fn(*a)
    return jnp.sum(y.astype(jnp.float32) * wy) + jnp.sum(s * ws)
  return jax.grad(loss, argnums)(*args)


def ref32_vjp(args, chunk=128):
  """The XLA reference's VJP in fp32 on the same (bf16-rounded) inputs."""
  up = lambda a: a.astype(jnp.float32)

  def f(x, dt, A, B, C, D, s0):
    with jax.default_matmul_precision("highest"):
      return reference.ssd_chunked(up(x), dt, A, up(B), up(C), D, s0, chunk_size=chunk)
  return f


def check_grads(g_kern, g_ref, args):
  names = ("x", "dt", "A", "B", "C", "D", "initial_state")
  for name, gk, gr, a in zip(names, g_kern, g_ref, args):
    if a is None:
      assert gk is None and gr is None
      continue
    assert gk.shape == a.shape and gk.dtype == a.dtype, name
    close(gk, gr, f"d{name}")


@pytest.mark.slow
@pytest.mark.parametrize("b,t,h,p,g", [(2, 150, 2, 80, 1)])
def test_backward_kernel_matches_reference_vjp(b, t, h, p, g):
  # A length not a multiple of the 128-step block, batch 2, a group of 2 heads, an initial
  # state and a final-state cotangent: every input's gradient from the Pallas backward kernel
  # (interpreted) against the fp32 XLA reference VJP. Head dim 64 without D or an initial state:
  # test_backward_kernel_without_d_or_state; both head dims compiled: test_compiled_backward.
  args = inputs(10 * t + h, b=b, t=t, h=h, p=p, g=g, with_state=True)
  g_kern = grads(lambda *a: pmg.ssd(*a, chunk_size=128, interpret=True), args)
  check_grads(g_kern, grads(ref32_vjp(args), args), args)


@pytest.mark.parametrize("backward", ["blocks", "xla"])
def test_backward_kernel_without_d_or_state(backward):
  # D and the initial state absent: their cotangents are None, the others still match (both
  # backward paths: the block-parallel kernels, the default, and the XLA reference's VJP).
  args = inputs(5, b=1, t=64, h=1, p=64, g=1, with_state=False, with_d=False)
  config = pmg.Config(backward=backward)
  g_kern = grads(lambda *a: pmg.ssd(*a, chunk_size=128, config=config, interpret=True), args)
  check_grads(g_kern, grads(ref32_vjp(args), args), args)


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


def entering_states(args, nc, block=128):
  """Sᵀ entering each block [b, h, c, n, p] (fp32 naive reference on the prefixes)."""
  x, dt, A, B, C, D, s0 = args
  out = []
  for c in range(nc):
    if c == 0:
      s = s0
    else:
      cut = slice(0, c * block)
      _, s = reference.ssd_naive(x[:, cut], dt[:, cut], A, B[:, cut], C[:, cut], D, s0)
    out.append(jnp.swapaxes(s, -1, -2))
  return jnp.stack(out, axis=2)


def test_emitted_states_are_the_states_entering_each_block():
  # The forward's emit_states (what the block-parallel backward reads): head dim 80, batch 2,
  # 150 steps (2 blocks, the second padded), an initial state, A scaled down so that the state
  # carries across the block boundary.
  x, dt, A, *rest = inputs(2, b=2, t=150, h=1, p=80, g=1, with_state=True)
  args = (x, dt, A / 16, *rest)
  kern = functools.partial(fwd.forward, config=pmg.Config(), interpret=True, emit_states=True)
  y, s, states = jax.jit(kern)(*args)
  check_against_references(args, y, s, 128)
  assert states.shape == (2, 1, 2, N, 80) and states.dtype == jnp.bfloat16
  close(states, entering_states(args, 2), "emitted states")


@pytest.mark.parametrize("p", [64, 80])
@pytest.mark.parametrize("config", [pmg.Config(), pmg.Config(fuse_waits=True)])
def test_forward_lowers_for_cuda(p, config):
  # Pallas -> Mosaic GPU lowering (wgmma operands, TMA slices, layouts) runs on the CPU when
  # lowering for "cuda": a trace or layout error fails here rather than on the GPU.
  b, t, h, g = 2, 300, 4, 2
  S = jax.ShapeDtypeStruct
  bf16, f32 = jnp.bfloat16, jnp.float32
  args = (S((b, t, h, p), bf16), S((b, t, h), f32), S((h,), f32), S((b, t, g, N), bf16),
          S((b, t, g, N), bf16), S((h,), f32), S((b, h, p, N), f32))
  for emit in (False, True):
    fn = functools.partial(fwd.forward, config=config, interpret=False, emit_states=emit)
    text = lower_for_cuda(fn, *args)
    assert "mosaic_gpu" in text


@pytest.mark.parametrize("b,m,k", [(3, 384, 640), (2, 8, 256), (1, 256, 2), (2, 96, 128)])
def test_swap_minor_is_an_exact_transpose(b, m, k):
  # The layout-pinning transpose (interpreted Pallas kernel; 96 is neither a multiple of 128 nor
  # a power of two, so that case is jnp.transpose): every element moved, none changed.
  v = jnp.asarray(np.random.default_rng(b * m + k).standard_normal((b, m, k)), jnp.bfloat16)
  fn = functools.partial(layout.swap_minor, interpret=True)
  assert ("pallas_call" in str(jax.make_jaxpr(fn)(v))) == (m != 96)
  np.testing.assert_array_equal(np.asarray(jax.jit(fn)(v)), np.asarray(jnp.transpose(v, (0, 2, 1))))


def test_no_xla_transpose_of_activations():
  # Neither the forward nor the backward wrapper leaves XLA a transpose of a [b, t, ...]
  # activation (t = 300 → 384 padded): XLA would answer it by storing the whole in_proj output
  # time-minor (kernels/layout.py). Only state-sized [b, h, n, p] transposes remain.
  b, t, h, g, p = 2, 300, 4, 2, 80
  S = jax.ShapeDtypeStruct
  args = (S((b, t, h, p), jnp.bfloat16), S((b, t, h), jnp.float32), S((h,), jnp.float32),
          S((b, t, g, N), jnp.bfloat16), S((b, t, g, N), jnp.bfloat16), S((h,), jnp.float32),
          S((b, h, p, N), jnp.float32))

  def loss(*a):
    y, s = pmg.ssd(*a, chunk_size=128)
    return jnp.sum(y.astype(jnp.float32)) + jnp.sum(s)
  text = lower_for_cuda(jax.grad(loss, range(7)), *args)
  transposes = [ln for ln in text.splitlines() if "stablehlo.transpose" in ln]
  assert transposes  # the state transposes, so the check below looks at real lines
  for ln in transposes:
    assert "300" not in ln and "384" not in ln, ln


def test_config_rejects_unknown_backward():
  # "pallas" (the v2 backward kernel, removed 2026-12-01) is no longer a backward.
  with pytest.raises(ValueError, match="Config.backward"):
    pmg.Config(backward="pallas")


# ---- GPU machine only -------------------------------------------------------------------------


def _ref32(args, chunk):
  with jax.default_matmul_precision("highest"):
    return ref32_vjp(args, chunk)(*args)


@pytest.mark.gpu
@pytest.mark.parametrize("p", [64, 80])
@pytest.mark.parametrize("b,t,h,g,with_state", [(2, 1000, 16, 2, True), (1, 4096, 128, 8, False),
                                                (3, 129, 8, 8, True)])
def test_compiled_kernel(p, b, t, h, g, with_state):
  args = inputs(b * t + p, b=b, t=t, h=h, p=p, g=g, with_state=with_state)
  y, s = jax.jit(lambda *a: pmg.ssd(*a, chunk_size=128))(*args)
  y_ref, s_ref = _ref32(args, 128)
  close(y, y_ref, "y")
  close(s, s_ref, "state")


@pytest.mark.gpu
@pytest.mark.parametrize("p", [64, 80])
@pytest.mark.parametrize("b,t,h,g", [(2, 1000, 16, 2), (1, 4096, 32, 8), (3, 129, 8, 8)])
def test_compiled_backward(p, b, t, h, g):
  args = inputs(b * t + p + 1, b=b, t=t, h=h, p=p, g=g, with_state=True)
  g_kern = jax.jit(lambda *a: grads(lambda *c: pmg.ssd(*c, chunk_size=128), a))(*args)
  check_grads(g_kern, jax.jit(lambda *a: grads(ref32_vjp(a), a))(*args), args)


@pytest.mark.gpu
def test_compiled_dispatch_uses_the_kernels():
  args = inputs(7, b=2, t=300, h=8, p=80, g=2, with_state=True)
  assert api.resolve_implementation(None, head_dim=80, state_size=N, chunk_size=128,
                                    dtype=jnp.bfloat16) == "pallas"
  y, s = api.ssd(*args[:6], initial_state=args[6])  # default: pallas on Hopper
  y_ref, s_ref = _ref32(args, 128)
  close(y, y_ref, "y")
  close(s, s_ref, "state")
  g_k = grads(lambda *a: api.ssd(*a[:6], initial_state=a[6]), args)
  check_grads(g_k, grads(ref32_vjp(args), args), args)


# Packed rows (batch 2): documents that start mid-block, at a block's first step (128), a one-step
# document, an id reused by a later document, and a document crossing the block end.
PACKED_LENGTHS = ([37, 91, 1, 21, 50], [5, 56, 138, 1])
PACKED_IDS = ([4, 1, 9, 2, 4], [3, 4, 3, 0])


def packed_segments():
  return np.stack([np.repeat(ids, lens) for ids, lens in zip(PACKED_IDS, PACKED_LENGTHS)])


def _doc_grads(doc, wy, ws, first, last):
  """Gradients, y and final state of one document's part of the packed loss (fp32 naive)."""
  def loss(x, dt, A, B, C, D, s0):
    y, s = reference.ssd_naive(x, dt, A, B, C, D, s0 if first else None)
    return jnp.sum(y * wy) + (jnp.sum(s * ws) if last else 0.0), (y, s)
  return jax.grad(loss, range(7), has_aux=True)(*doc)


def documents_alone(args, wy, ws):
  """y, final state and gradients of the packed loss, each document run alone."""
  x, dt, A, B, C, D, s0 = (jnp.asarray(a, jnp.float32) for a in args)
  y = np.zeros(x.shape, np.float32)
  fin = np.zeros(s0.shape, np.float32)
  g = [np.zeros(a.shape, np.float32) for a in (x, dt, A, B, C, D, s0)]
  for row, lens in enumerate(PACKED_LENGTHS):
    ends = np.cumsum(lens)
    for i, (lo, hi) in enumerate(zip(ends - np.array(lens), ends)):
      span = (slice(row, row + 1), slice(lo, hi))
      doc = (x[span], dt[span], A, B[span], C[span], D, s0[row:row + 1])
      gd, (yd, sd) = _doc_grads(doc, wy[span], ws[row:row + 1], i == 0, i == len(lens) - 1)
      y[row, lo:hi] = yd[0]
      fin[row] = sd[0]  # the last document's stays
      for k in (0, 1, 3, 4):
        g[k][row, lo:hi] = gd[k][0]
      g[2] += gd[2]
      g[5] += gd[5]
      if i == 0:
        g[6][row] = gd[6][0]
  return y, fin, g


@pytest.mark.slow
def test_packed_rows_equal_documents_alone():
  # Forward and every gradient of packed rows through the Pallas kernels (interpreted) against
  # each document run alone; the initial state is the first document's, the final the last's.
  args = inputs(21, b=2, t=200, h=1, p=64, g=1, with_state=True)  # groups: the VJP test
  seg = jnp.asarray(packed_segments())
  rng = np.random.default_rng(3)
  # y is bf16, so its cotangent is too: give the references the same (bf16-exact) one, else dA,
  # a sum with cancellation, differs by ~1% from that rounding alone.
  wy = jnp.asarray(rng.standard_normal(args[0].shape), jnp.bfloat16).astype(jnp.float32)
  ws = jnp.asarray(rng.standard_normal(args[6].shape), jnp.float32)

  def loss(*a):
    y, s = api.ssd(*a[:6], initial_state=a[6], chunk_size=128, implementation="pallas",
                   segment_ids=seg)
    return jnp.sum(y.astype(jnp.float32) * wy) + jnp.sum(s * ws), (y, s)
  # One jitted program: eager dispatches interleaved with the interpreter's callback threads
  # have deadlocked the CPU client on two cores.
  g_kern, (y, s) = jax.jit(jax.grad(loss, range(7), has_aux=True))(*args)
  y_ref, s_ref, g_ref = documents_alone(args, wy, ws)
  close(y, y_ref, "y")
  close(s, s_ref, "final state")
  check_grads(g_kern, g_ref, args)


@pytest.mark.gpu
@pytest.mark.parametrize("p", [64, 80])
def test_compiled_packed_rows(p):
  args = inputs(p, b=2, t=200, h=4, p=p, g=2, with_state=True)
  seg = jnp.asarray(packed_segments())
  kern = lambda *a: pmg.ssd(*a, chunk_size=128, segment_ids=seg)
  y, s = jax.jit(kern)(*args)
  y_ref, s_ref = reference.ssd_naive(*args, seg)
  close(y, y_ref, "y")
  close(s, s_ref, "state")
  up = lambda a: a.astype(jnp.float32)
  ref = lambda x, dt, A, B, C, D, s0: reference.ssd_naive(up(x), dt, A, up(B), up(C), D, s0, seg)
  check_grads(jax.jit(lambda *a: grads(kern, a))(*args), grads(ref, args), args)
