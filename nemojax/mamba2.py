"""The Mamba-2 mixer of Nemotron-H: full sequence (chunked SSD) and one-token step.

With u [b, t, D] the normalised input, I = h·p, conv_dim = I + 2·g·n:

    z, xBC, dt_raw = split(u @ in_projᵀ, [I, conv_dim, h])
    xBC  = silu(causal_depthwise_conv(xBC) + conv_bias)          # K taps, zero left padding
    x, B, C = split(xBC, [I, g·n, g·n])
    dt   = softplus(dt_raw + dt_bias)                             # no lower clamp (SPEC §2)
    A    = −exp(A_log)
    y    = SSD(x, dt, A, B, C, D)                                 # kernels/ssd
    out  = out_proj(rmsnorm_per_group(y · silu(z)) · norm.weight)

Packed sequences (`segment_ids` [b, t], a full forward): the conv reads no tap from an earlier
document (those taps count as zero padding, as at the start of a row) and the SSD restarts its
state at each document's first token (kernels/ssd; the XLA path).

Decode state: the last K−1 raw xBC columns (conv) and the SSM state [b, h, p, n] (float32).
Left padding must not reach either: xBC is zeroed at pad positions before and after the conv and
dt is zero there, so a pad step neither decays nor feeds the state.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from nemojax import sharding
from nemojax.cache import MambaState
from nemojax.config import NemotronHConfig, keeps_float32
from nemojax.kernels.segments import document_index
from nemojax.kernels.ssd import api as ssd_api
from nemojax.layers import GatedRMSNorm, Linear, scaled_out_std

f32 = jnp.float32


class DepthwiseConv1d(nnx.Module):
  """Causal depthwise conv with HF's `conv1d.weight` [channels, 1, K] and `conv1d.bias` layout."""

  def __init__(self, channels: int, kernel: int, *, use_bias: bool, dtype, rngs: nnx.Rngs):
    bound = 1.0 / math.sqrt(kernel)  # PyTorch's default Conv1d init (fan_in = K)
    self.kernel = kernel
    self.weight = nnx.Param(jax.random.uniform(
        rngs.params(), (channels, 1, kernel), f32, -bound, bound).astype(dtype))
    self.bias = (nnx.Param(jax.random.uniform(rngs.params(), (channels,), f32, -bound, bound)
                           .astype(dtype)) if use_bias else None)

  def __call__(self, xbc: jax.Array, history: jax.Array,
               segment_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """xbc [b, t, c] raw inputs; history [b, K−1, c] the previous raw inputs (zeros at start);
    segment_ids [b, t] or None: taps from an earlier document read zero (history counts as the
    first document's).

    Returns the conv output [b, t, c] in float32 (before the activation) and the new history.
    """
    k = self.kernel
    t = xbc.shape[1]
    full = jnp.concatenate([history.astype(xbc.dtype), xbc], axis=1)  # [b, t+K-1, c]
    w = self.weight[...][:, 0, :].astype(f32)  # [c, K]
    taps = [full[:, i:i + t].astype(f32) for i in range(k)]
    if segment_ids is not None:
      doc = document_index(segment_ids)
      doc_full = jnp.pad(doc, [(0, 0), (k - 1, 0)])  # [b, t+K-1], history in document 0
      taps = [jnp.where((doc_full[:, i:i + t] == doc)[..., None], tap, 0.0)
              for i, tap in enumerate(taps)]
    # Tap K−1 multiplies the current token, tap 0 the token K−1 steps back.
    out = sum(taps[i] * w[:, i] for i in range(k))
    if self.bias is not None:
      out = out + self.bias[...].astype(f32)
    new_history = full[:, full.shape[1] - (k - 1):] if k > 1 else history
    return out, new_history


def _inverse_softplus(x):
  return x + jnp.log(-jnp.expm1(-x))


class Mamba2Mixer(nnx.Module):
  """Mamba-2 mixer; attribute names follow the HF checkpoint (`mixer.in_proj.weight`, ...)."""

  def __init__(self, config: NemotronHConfig, *, dtype, rngs: nnx.Rngs,
               ssd_implementation: str | None = None):
    c = config
    self.num_heads = c.mamba_num_heads
    self.head_dim = c.mamba_head_dim
    self.n_groups = c.n_groups
    self.state_size = c.ssm_state_size
    self.d_inner = c.d_inner
    self.conv_dim = c.conv_dim
    self.chunk_size = c.chunk_size
    self.time_step_limit = tuple(c.time_step_limit)
    self.ssd_implementation = ssd_implementation

    self.in_proj = Linear(c.hidden_size, c.in_proj_dim, dtype=dtype, rngs=rngs,
                          init_std=c.initializer_range)
    self.conv1d = DepthwiseConv1d(c.conv_dim, c.conv_kernel, use_bias=c.use_conv_bias,
                                  dtype=dtype, rngs=rngs)
    dt = jnp.exp(jax.random.uniform(rngs.params(), (c.mamba_num_heads,), f32)
                 * (math.log(c.time_step_max) - math.log(c.time_step_min))
                 + math.log(c.time_step_min))
    dt = jnp.maximum(dt, c.time_step_floor)
    # Storage dtypes from the one policy (config.keeps_float32): these three stay float32.
    keep = lambda name: f32 if keeps_float32(name) else dtype
    self.dt_bias = nnx.Param(_inverse_softplus(dt).astype(keep("dt_bias")))
    self.A_log = nnx.Param(jnp.log(jnp.arange(1, c.mamba_num_heads + 1, dtype=f32))
                           .astype(keep("A_log")))
    self.D = nnx.Param(jnp.ones((c.mamba_num_heads,), keep("D")))
    self.norm = GatedRMSNorm(c.d_inner, c.n_groups, c.layer_norm_epsilon)
    self.out_proj = Linear(c.d_inner, c.hidden_size, dtype=dtype, rngs=rngs,
                           init_std=scaled_out_std(c.initializer_range, c.num_hidden_layers))

  def _dt(self, dt_raw: jax.Array) -> jax.Array:
    dt = jax.nn.softplus(dt_raw.astype(f32) + self.dt_bias[...].astype(f32))
    lo, hi = self.time_step_limit
    if lo > 0.0 or hi != float("inf"):
      dt = jnp.clip(dt, lo, hi)
    return dt

  def __call__(self, u: jax.Array, *, state: MambaState | None = None,
               valid: jax.Array | None = None,
               segment_ids: jax.Array | None = None) -> tuple[jax.Array, MambaState | None]:
    """u [b, t, D]; state: the decode state to continue from (None: start fresh, return None);
    valid [b, t] bool: False at left-pad positions; segment_ids [b, t]: packed documents (no
    state; the SSD then runs on XLA). Returns (out [b, t, D], new state)."""
    b, t, _ = u.shape
    h, g, n = self.num_heads, self.n_groups, self.state_size
    dtype = u.dtype
    # [b, t, I + conv_dim + h]; named for TrainConfig(remat="mlp_mamba"), which keeps it.
    zxbcdt = checkpoint_name(self.in_proj(u, out_dtype=f32), "mamba_in_proj")
    z = zxbcdt[..., :self.d_inner]
    xbc = zxbcdt[..., self.d_inner:self.d_inner + self.conv_dim].astype(dtype)
    dt_raw = zxbcdt[..., self.d_inner + self.conv_dim:]

    if valid is not None:
      xbc = jnp.where(valid[..., None], xbc, jnp.zeros((), dtype))
    history = (state.conv if state is not None
               else jnp.zeros((b, self.conv1d.kernel - 1, self.conv_dim), dtype))
    conv_out, new_history = self.conv1d(xbc, history, segment_ids)
    xbc = jax.nn.silu(conv_out).astype(dtype)
    dt = self._dt(dt_raw)  # [b, t, h] float32
    if valid is not None:
      xbc = jnp.where(valid[..., None], xbc, jnp.zeros((), dtype))
      dt = jnp.where(valid[..., None], dt, 0.0)

    x = rearrange(xbc[..., :self.d_inner], "b t (h p) -> b t h p", h=h)
    B = rearrange(xbc[..., self.d_inner:self.d_inner + g * n], "b t (g n) -> b t g n", g=g)
    C = rearrange(xbc[..., self.d_inner + g * n:], "b t (g n) -> b t g n", g=g)
    # On a mesh: the SSD runs per head shard (in_proj's fused output is split evenly, not by
    # heads, so XLA moves the misaligned slices here; see nemojax/sharding.py).
    x = sharding.constrain(self, x, "mamba_x")
    dt = sharding.constrain(self, dt, "mamba_dt")
    A = -jnp.exp(self.A_log[...].astype(f32))
    D = self.D[...].astype(f32)

    impl = sharding.kernel_choice(self, self.ssd_implementation)
    if state is not None and t == 1:
      y, ssm = ssd_api.ssd_step(state.ssm, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D,
                                implementation=impl)
      y = y[:, None]
    else:
      scan = lambda *a: ssd_api.ssd(*a[:6], initial_state=a[6], chunk_size=self.chunk_size,
                                    implementation=impl, segment_ids=segment_ids)
      # A custom call: run it per shard on a mesh (no-op without one). Packed rows run as one
      # call (ssd_per_shard takes no segment_ids; on a mesh the automatic choice is XLA).
      if impl == "pallas" and segment_ids is None:
        y, ssm = sharding.ssd_per_shard(self, scan, x, dt, A, B, C, D,
                                        None if state is None else state.ssm)
      else:
        y, ssm = scan(x, dt, A, B, C, D, None if state is None else state.ssm)
    y = self.norm(rearrange(y, "b t h p -> b t (h p)"), z, out_dtype=dtype)
    out = self.out_proj(y)
    new_state = None if state is None else MambaState(
        conv=sharding.constrain(self, new_history.astype(state.conv.dtype), "mamba_conv_state"),
        ssm=sharding.constrain(self, ssm, "ssm_state"))
    return out, new_state
