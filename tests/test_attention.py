"""Attention's XLA schedules (blocked online softmax, loop-free split-K) against a dense softmax,
and the dispatcher's rules."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nemojax import NemotronH, NemotronHConfig, mamba2
from nemojax import attention as attention_module
from nemojax import testing as T
from nemojax.kernels import attention as A
from nemojax.kernels import platform


def dense_reference(q, k, v, q_pos, start):
  """Masked softmax attention in float64. q [b,t,h,d]; k/v [b,kv,s,d]."""
  b, t, nh, d = q.shape
  kv, s = k.shape[1], k.shape[2]
  kk = np.repeat(k, nh // kv, axis=1).astype(np.float64)  # [b, h, s, d]
  vv = np.repeat(v, nh // kv, axis=1).astype(np.float64)
  scores = np.einsum("bthd,bhsd->bhts", q.astype(np.float64), kk) / np.sqrt(d)
  j = np.arange(s)
  allowed = (j[None, None, None, :] <= q_pos[None, None, :, None]) & (
      j[None, None, None, :] >= start[:, None, None, None])
  scores = np.where(allowed, scores, -np.inf)
  with np.errstate(invalid="ignore"):  # pad queries see no key: NaN rows, skipped by the tests
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
  return np.einsum("bhts,bhsd->bthd", p, vv)


@pytest.mark.parametrize("t,s,pos,key_block", [
    (1, 37, 36, 8),      # decode step, odd cache
    (1, 1000, 611, 64),  # decode step, split-K over many blocks
    (5, 257, 100, 16),   # a few queries (split schedule), prime cache length
    (40, 131, 77, 16),   # prefill chunk: blocked schedule, last block shifted back
    (24, 24, 0, 1024),   # full forward: one block
])
@pytest.mark.parametrize("schedule", ["auto", "split", "blocked"])
def test_schedules_match_dense(t, s, pos, key_block, schedule):
  rng = np.random.default_rng(t * 1000 + s)
  b, kv, r, d = 3, 2, 3, 8
  q = rng.standard_normal((b, t, kv * r, d)).astype(np.float32)
  k = rng.standard_normal((b, kv, s, d)).astype(np.float32)
  v = rng.standard_normal((b, kv, s, d)).astype(np.float32)
  q_pos = (pos + np.arange(t)).astype(np.int32)
  start = np.array([0, 3, min(pos, 11)], np.int32)
  want = dense_reference(q, k, v, q_pos, start)
  num_keys = None if pos == 0 and t == s else jnp.int32(pos + t)
  args = (jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.int32(pos), jnp.asarray(start),
          num_keys)
  if schedule == "auto":
    got = A.attention(*args, implementation="xla", key_block=key_block)
  elif schedule == "split":
    got = A.attention_split(*args)
  else:
    got = A.attention_blocked(*args, key_block=key_block)
  chex.assert_shape(got, q.shape)
  real = q_pos[None, :] >= start[:, None]  # queries at pad positions attend nothing: skip them
  assert np.all(np.isfinite(np.asarray(got)))
  T.assert_close(np.asarray(got)[real], want[real], "float32", "independent", schedule)


def test_keys_beyond_num_keys_are_not_attended():
  """Garbage after the written keys (a stale cache) changes nothing, in either schedule."""
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((1, 20, 2, 8)), jnp.float32)
  k, v = (jnp.asarray(rng.standard_normal((1, 1, 64, 8)), jnp.float32) for _ in range(2))
  start, pos, nk = jnp.zeros((1,), jnp.int32), 10, 30
  clean = A.attention_blocked(q, k, v, pos, start, nk, key_block=16)
  k2, v2 = k.at[:, :, nk:].set(1e4), v.at[:, :, nk:].set(1e4)
  for fn in (A.attention_split, lambda *a: A.attention_blocked(*a, key_block=16)):
    T.assert_close(fn(q, k2, v2, pos, start, nk), clean, "float32", "same")


def test_split_block_size_divides_and_bounds_the_block():
  for s in (1, 100, 4096, 131168, 262144 + 256):
    blk = A.split_block_size(s)
    assert s % blk == 0 and (blk >= 64 or blk == s)
  assert A.split_block_size(4099 * 2) == 4099 * 2  # no useful divisor: one block


def test_dispatch_rules():
  shapes = dict(head_dim=128, cache_len=1024, dtype=jnp.bfloat16)
  auto = A.resolve_implementation(None, num_queries=512, **shapes)
  assert auto == ("pallas" if platform.mosaic_gpu_available() else "xla")
  assert A.resolve_implementation("pallas", num_queries=512, **shapes) == "pallas"
  # A decode step and a full forward (the differentiable path) always run in XLA.
  assert A.resolve_implementation("pallas", num_queries=A.MAX_SPLIT_QUERIES, **shapes) == "xla"
  assert A.resolve_implementation("pallas", num_queries=512, over_cache=False, **shapes) == "xla"
  assert A.resolve_implementation("xla", num_queries=512, **shapes) == "xla"
  assert not A.supports(head_dim=48, cache_len=1024, dtype=jnp.bfloat16)
  with pytest.raises(ValueError, match="implementation"):
    A.resolve_implementation("triton", num_queries=512, **shapes)


def test_mismatched_kv_heads_are_refused():
  q = jnp.zeros((1, 4, 3, 8))
  kv = jnp.zeros((1, 2, 16, 8))
  with pytest.raises(ValueError, match="multiple of kv"):
    A.attention(q, kv, kv, 0, jnp.zeros((1,), jnp.int32))


def test_full_forward_without_padding_and_cudnn_errors():
  # start=None (no padding) on the XLA path is the same attention as start=0 (None alone may run
  # cuDNN on a GPU: its closeness is the gpu test below); an explicit "cudnn" it cannot honour is
  # refused by name.
  rng = np.random.default_rng(3)
  q = jnp.asarray(rng.standard_normal((2, 19, 4, 16)), jnp.bfloat16)
  k, v = (jnp.asarray(rng.standard_normal((2, 2, 19, 16)), jnp.bfloat16) for _ in range(2))
  zero = jnp.zeros((2,), jnp.int32)
  chex.assert_trees_all_equal(A.attention(q, k, v, 0, None, implementation="xla"),
                              A.attention(q, k, v, 0, zero))
  if not platform.cuda_gpu_available():
    with pytest.raises(ValueError, match="implementation='cudnn' needs a full forward"):
      A.attention(q, k, v, 0, None, implementation="cudnn")
  with pytest.raises(ValueError, match="implementation='cudnn' needs a full forward"):
    A.attention(q, k, v, 0, zero, implementation="cudnn")  # padding given: not cuDNN's
  with pytest.raises(ValueError, match="implementation='cudnn' is for a full forward"):
    A.attention(q, k, v, 0, zero, 19, implementation="cudnn")


@pytest.mark.gpu
@pytest.mark.parametrize("b,t,h,kv,d", [(2, 300, 8, 2, 128), (1, 1000, 6, 1, 64)])
def test_cudnn_full_forward_and_gradients_match_reference(b, t, h, kv, d):
  # The training path on a GPU (rule 2): cuDNN's flash attention, forward and the gradients of
  # q, k and v, against the XLA reference in float32, at lengths that are no multiple of a tile.
  assert A.cudnn_usable((b, t, h, d), (b, kv, t, d), jnp.bfloat16)
  rng = np.random.default_rng(t)
  q = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.bfloat16)
  k, v = (jnp.asarray(rng.standard_normal((b, kv, t, d)), jnp.bfloat16) for _ in range(2))
  w = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32)
  zero = jnp.zeros((b,), jnp.int32)

  def loss(q, k, v, impl):
    if impl == "xla":
      q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
      o = A.attention(q, k, v, 0, zero, implementation="xla")
    else:
      o = A.attention(q, k, v, 0, None)  # the dispatcher's choice: cuDNN here
    return jnp.sum(o.astype(jnp.float32) * w), o

  (_, o), g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True),
                      static_argnums=3)(q, k, v, "auto")
  (_, o_ref), g_ref = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True),
                              static_argnums=3)(q, k, v, "xla")
  rel = lambda a, r: float(jnp.linalg.norm((a.astype(jnp.float32) - r).ravel())
                           / jnp.linalg.norm(r.ravel()))
  assert rel(o, o_ref) < 1e-2
  for name, a, r in zip("qkv", g, g_ref):
    assert np.isfinite(np.asarray(a, np.float32)).all(), name
    assert rel(a, r) < 2e-2, name
  # It really is cuDNN: its custom call is in the program.
  hlo = jax.jit(lambda q, k, v: A.attention(q, k, v, 0, None)).lower(q, k, v).as_text()
  assert "cudnn" in hlo.lower()


def test_model_tells_attention_and_mamba_when_no_row_is_padded(monkeypatch):
  # Without a cache or `start`, hidden_states passes start=None to attention (which may then run
  # cuDNN, rule 2) and valid=None to the Mamba blocks (no masks); with `start`, both get them.
  seen = {"start": [], "valid": []}
  real_attention = attention_module.attention_kernels.attention
  real_mamba = mamba2.Mamba2Mixer.__call__

  def attention(q, k, v, pos, start, *a, **kw):
    seen["start"].append(start)
    return real_attention(q, k, v, pos, start, *a, **kw)

  def mamba(self, u, *, valid=None, **kw):
    seen["valid"].append(valid)
    return real_mamba(self, u, valid=valid, **kw)

  monkeypatch.setattr(attention_module.attention_kernels, "attention", attention)
  monkeypatch.setattr(mamba2.Mamba2Mixer, "__call__", mamba)
  model = NemotronH(NemotronHConfig.tiny(hybrid_override_pattern="M*"), dtype=jnp.float32,
                    rngs=nnx.Rngs(0))
  ids = jnp.ones((2, 7), jnp.int32)
  jax.eval_shape(lambda: model.hidden_states(ids))
  assert seen == {"start": [None], "valid": [None]}
  jax.eval_shape(lambda: model.hidden_states(ids, start=jnp.array([0, 2])))
  assert seen["start"][1] is not None and seen["valid"][1] is not None
