"""The flash-attention kernel (Pallas Mosaic GPU) against the XLA path, in interpret mode on CPU.

On a Hopper GPU the `gpu`-marked test runs the compiled kernel at the 9B model's head shapes.
"""

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nemojax
from nemojax import testing as T
from nemojax.kernels import attention as A
from nemojax.kernels import platform
from nemojax.kernels.attention import pallas_mosaic_gpu as fa


def kernel_error(b, t, h, kv, s, d, pos, start, *, interpret, block_k=64, seed=0):
  """‖kernel − XLA‖ / ‖XLA‖ over real rows; bf16 kernel inputs, the XLA path in fp32."""
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.bfloat16)
  k = jnp.asarray(rng.standard_normal((b, kv, s, d)), jnp.bfloat16)
  v = jnp.asarray(rng.standard_normal((b, kv, s, d)), jnp.bfloat16)
  start = jnp.asarray(start, jnp.int32)
  f32 = lambda x: x.astype(jnp.float32)
  ref = A.attention(f32(q), f32(k), f32(v), jnp.int32(pos), start, jnp.int32(pos + t),
                    implementation="xla", key_block=64)
  got = fa.attention(q, k, v, jnp.int32(pos), start, jnp.int32(pos + t),
                     config=fa.Config(block_k=block_k), interpret=interpret)
  chex.assert_shape(got, q.shape)
  got, ref = np.asarray(got, np.float32), np.asarray(ref)
  real = (pos + np.arange(t))[None, :] >= np.asarray(start)[:, None]
  assert np.isfinite(got).all()
  return T.rel_err(got[real], ref[real])


@pytest.mark.parametrize("b,t,h,kv,s,pos,start", [
    (1, 64, 2, 1, 128, 0, [0]),            # one tile, from the start of the cache
    (2, 100, 4, 2, 320, 150, [0, 37]),     # odd chunk at an offset, left padding, GQA, batch 2
])
def test_kernel_matches_xla_in_interpret_mode(b, t, h, kv, s, pos, start):
  err = kernel_error(b, t, h, kv, s, 64, pos, start, interpret=True)
  assert err <= T.tolerance("bfloat16", "kernel")


def test_unsupported_shapes_are_refused_with_a_reason():
  q = jnp.zeros((1, 8, 2, 48), jnp.bfloat16)
  kv = jnp.zeros((1, 1, 128, 48), jnp.bfloat16)
  with pytest.raises(ValueError, match="head_dim=48"):
    fa.attention(q, kv, kv, 0, jnp.zeros((1,), jnp.int32), 8, interpret=True)


def test_model_prefill_with_the_kernel_equals_xla():
  """A bf16 model prefilled through the kernel gives the XLA path's cache and next logits."""
  cfg = nemojax.NemotronHConfig.tiny(hybrid_override_pattern="M*-", num_attention_heads=2,
                                     num_key_value_heads=1, head_dim=64)
  model = nemojax.NemotronH(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  ids = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 40)), jnp.int32)
  out = {}
  for impl in ("xla", "pallas"):
    model.set_attention_implementation(impl)
    cache = model.init_cache(2, 128).replace(start=jnp.asarray([0, 5], jnp.int32))
    _, cache = model(ids[:, :32], cache=cache)  # 32 queries: a prefill chunk, the kernel's case
    logits, _ = model(ids[:, 32:33], cache=cache)
    out[impl] = np.asarray(logits, np.float32)
  assert T.rel_err(out["pallas"], out["xla"]) <= T.tolerance("bfloat16", "model")


@pytest.mark.gpu
def test_compiled_kernel_at_9b_head_shapes():
  if not platform.mosaic_gpu_available():
    pytest.skip("needs a Hopper-or-newer GPU")
  err = kernel_error(2, 300, 40, 8, 1024, 128, 500, [0, 37], interpret=False, block_k=128)
  assert err <= T.tolerance("bfloat16", "kernel")
