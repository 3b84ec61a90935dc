"""Small building blocks: linear maps, embeddings, RMS norms and the relu² MLP.

dtype policy (written once, here): matmul weights are stored in the model dtype (bf16 or fp32)
and multiplied with float32 accumulation (`preferred_element_type`); norm scales are float32 and
norms are computed in float32, then cast back to the activation dtype. The backward pass of a
matmul multiplies in the weight's dtype too: the incoming gradient is rounded to it (bf16 for a
bf16 model) and both products accumulate in float32. Left to autodiff, a float32-accumulated
product would take its transposes in float32 (float32 cotangents against upcast weights: TF32
GEMMs on a GPU, measured at 45% of a 3.25B training step's time on the H200). It is a custom JVP
(not a VJP), so forward-mode differentiation (`jax.jvp`, `jax.linearize`) works as well.

Weights keep the Hugging Face layout and names (`weight` [out, in]) so that a checkpoint maps onto
the modules by name alone.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from einops import rearrange
from jax.ad_checkpoint import checkpoint_name
from jax.custom_derivatives import SymbolicZero
from flax import nnx

f32 = jnp.float32


PROJECTION = "projection"  # checkpoint name of every matmul's float32 output


def _product(x: jax.Array, w: jax.Array, out_dtype=f32) -> jax.Array:
  return jnp.einsum("...i,oi->...o", x, w, preferred_element_type=out_dtype)


@jax.custom_jvp
def _matmul_acc32(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [..., in] @ w [out, in]ᵀ, both of one dtype, accumulated and returned in float32."""
  return _product(x, w)


@functools.partial(_matmul_acc32.defjvp, symbolic_zeros=True)
def _matmul_acc32_jvp(primals, tangents):
  # The tangent products take the operands' dtype (bf16 for a bf16 model, float32 accumulation
  # inside the GEMM) and are cast to float32 after: their transposes, the backward pass, then
  # round the incoming gradient to that dtype once and multiply in it. A tangent that is not
  # perturbed (a frozen weight) costs no product. Forward mode (jax.jvp) works as well.
  x, w = primals
  dx, dw = tangents
  terms = []
  if not isinstance(dx, SymbolicZero):
    terms.append(_product(dx.astype(w.dtype), w, w.dtype))
  if not isinstance(dw, SymbolicZero):
    terms.append(_product(x, dw.astype(w.dtype), w.dtype))
  return _product(x, w), sum(t.astype(f32) for t in terms)


def matmul(x: jax.Array, w: jax.Array, out_dtype=None) -> jax.Array:
  """x [..., in] @ w[out, in]ᵀ with float32 accumulation, cast to `out_dtype` (x.dtype).

  Differentiable in both; the gradients are products in w's dtype (see the module docstring).
  """
  # Named: TrainConfig(remat="dots" / "offload") select the products by this name.
  y = checkpoint_name(_matmul_acc32(x.astype(w.dtype), w), PROJECTION)
  return y.astype(out_dtype or x.dtype)


class Linear(nnx.Module):
  """A bias-free linear map with an HF-layout weight [out_features, in_features]."""

  def __init__(self, in_features: int, out_features: int, *, dtype, rngs: nnx.Rngs,
               init_std: float = 0.02):
    self.weight = nnx.Param(
        (init_std * jax.random.normal(rngs.params(), (out_features, in_features), f32)
         ).astype(dtype))

  def __call__(self, x: jax.Array, out_dtype=None) -> jax.Array:
    return matmul(x, self.weight[...], out_dtype)


class Embedding(nnx.Module):
  """Token embeddings [vocab, d]; no scaling (Nemotron-H has none)."""

  def __init__(self, vocab_size: int, dim: int, *, dtype, rngs: nnx.Rngs, init_std: float = 0.02):
    self.weight = nnx.Param(
        (init_std * jax.random.normal(rngs.params(), (vocab_size, dim), f32)).astype(dtype))

  def __call__(self, ids: jax.Array) -> jax.Array:
    return jnp.take(self.weight[...], ids, axis=0)


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
  x = x.astype(f32)
  return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


class RMSNorm(nnx.Module):
  """y = x / rms(x) * weight, in float32."""

  def __init__(self, dim: int, eps: float):
    self.eps = eps
    self.weight = nnx.Param(jnp.ones((dim,), f32))

  def __call__(self, x: jax.Array) -> jax.Array:
    return (rms_normalize(x, self.eps) * self.weight[...]).astype(x.dtype)


class GatedRMSNorm(nnx.Module):
  """Mamba-2's output norm, gate first: g = y·silu(z), RMS-normalised per group of channels.

  Groups are `dim / n_groups` contiguous channels (1280 for Nano-9B-v2), matching the B/C groups.
  """

  def __init__(self, dim: int, n_groups: int, eps: float):
    self.eps = eps
    self.n_groups = n_groups
    self.weight = nnx.Param(jnp.ones((dim,), f32))

  def __call__(self, y: jax.Array, z: jax.Array, out_dtype) -> jax.Array:
    g = y.astype(f32) * jax.nn.silu(z.astype(f32))
    g = rearrange(g, "... (g c) -> ... g c", g=self.n_groups)  # c: channels per group
    g = rearrange(rms_normalize(g, self.eps), "... g c -> ... (g c)")
    return (g * self.weight[...]).astype(out_dtype)


class MLP(nnx.Module):
  """down_proj(relu(up_proj(x))²): no gate, no bias."""

  def __init__(self, dim: int, hidden: int, *, dtype, rngs: nnx.Rngs, out_std: float = 0.02):
    self.up_proj = Linear(dim, hidden, dtype=dtype, rngs=rngs)
    self.down_proj = Linear(hidden, dim, dtype=dtype, rngs=rngs, init_std=out_std)

  def __call__(self, x: jax.Array) -> jax.Array:
    # Named for rematerialisation: TrainConfig(remat="mlp") keeps it instead of recomputing.
    h = checkpoint_name(self.up_proj(x, out_dtype=f32), "mlp_up")
    h = jnp.square(jax.nn.relu(h)).astype(x.dtype)
    return self.down_proj(h)


def scaled_out_std(init_std: float, num_layers: int) -> float:
  """GPT-2 style scaling of residual-branch output projections by 1/sqrt(layers)."""
  return init_std / math.sqrt(max(num_layers, 1))
