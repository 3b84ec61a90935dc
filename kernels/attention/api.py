"""Dispatch for causal GQA attention: every rule that picks XLA, the Pallas kernel or cuDNN.

`implementation`:
  None      over a cache (a prefill chunk): "pallas" on a Hopper-or-newer NVIDIA GPU when the
            kernel takes the shapes, else "xla"; a full forward (training): "cudnn" where it
            applies (rule 2), else "xla".
  "xla"     `reference.attention` (blocked online softmax or split-K), runs everywhere.
  "pallas"  the Mosaic GPU kernel (`pallas_mosaic_gpu.py`); without a Hopper-or-newer GPU it runs
            on Mosaic GPU's CPU interpreter (slow: for tests).
  "cudnn"   cuDNN's fused flash attention, forward and backward, through JAX's own
            `jax.nn.dot_product_attention(..., implementation="cudnn")`: a full forward only.

Rules, in order (`resolve_implementation`):
  1. Over a cache, at most `MAX_SPLIT_QUERIES` queries (a decode step): XLA's loop-free split-K
     schedule; the kernel's 128-query tiles would be mostly padding.
  2. No `num_keys` (a full forward over the call's own keys, the training path; the Pallas
     kernel is inference only, no gradient): cuDNN when the implementation is None or "cudnn",
     the rows have no left padding (`start` None) and no packed documents (`segment_ids` None),
     the queries are bf16 or fp16, and cuDNN's attention traces for these shapes on this backend
     (an NVIDIA GPU); else XLA. On the H200 the XLA path of one 8 x 4096 attention layer took
     ~7% of a 15-block training step (its transposed products run in float32 and it visits every
     key block for every query).
  3. An explicit `implementation`; else the kernel on a GPU that compiles it for these shapes.
  4. If the kernel module cannot be imported on this JAX, or (rule 3 without an implementation)
     its compiled body does not trace, XLA with one warning: the model never fails for it.

Packed sequences (`segment_ids`, a full forward only) are XLA; an explicit "pallas" or "cudnn"
with them is an error (neither takes segment_ids), as is an explicit "cudnn" that rule 2 cannot
honour.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from nemojax.kernels import platform
from nemojax.kernels.attention import reference

IMPLEMENTATIONS = ("xla", "pallas", "cudnn")
_KERNEL = "attention.pallas_mosaic_gpu"
_CUDNN = "attention.cudnn"


def _pallas_module():
  """The kernel module, or None where this JAX cannot import it (the one place that decides).

  Any exception counts (a moved Pallas API fails in the module body), said once in a warning.
  """
  return platform.kernel_module(_KERNEL)


def _kernel_traces(head_dim: int, dtype) -> bool:
  """Whether the compiled kernel traces for this head size on this JAX (one tile, one block)."""
  S = jax.ShapeDtypeStruct
  mod = _pallas_module()
  q, kv = S((1, 64, 1, head_dim), dtype), S((1, 1, mod.DEFAULT_CONFIG.block_k, head_dim), dtype)
  i, start = S((), jnp.int32), S((1,), jnp.int32)
  kernel = functools.partial(mod.attention, interpret=False)
  return platform.traces(_KERNEL, kernel, q, kv, kv, i, start, i)


def _cudnn_attention(q, k, v):
  """Causal attention of a full forward by cuDNN; q [b, t, h, d], k/v [b, kv, t, d] -> q's shape.

  `jax.nn.dot_product_attention` takes keys [b, t, kv, d] and maps query head n to key head
  n // (h / kv), as `reference` does; its scale is 1/sqrt(d), as here.
  """
  k, v = (jnp.swapaxes(x, 1, 2) for x in (k, v))
  return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")


def cudnn_usable(q_shape, kv_shape, dtype) -> bool:
  """Whether cuDNN's flash attention takes a full forward of these shapes on this backend."""
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return False
  if not platform.cuda_gpu_available():
    return False
  S = jax.ShapeDtypeStruct
  return platform.traces(_CUDNN, _cudnn_attention, S(q_shape, dtype), S(kv_shape, dtype),
                         S(kv_shape, dtype), per_shape=True)  # cuDNN's limits are per shape


def supports(*, head_dim: int, cache_len: int, dtype) -> bool:
  """Whether the Pallas kernel can be used for these shapes on this JAX (any device)."""
  mod = _pallas_module()
  return mod is not None and mod.supports(head_dim=head_dim, cache_len=cache_len, dtype=dtype)


def resolve_implementation(implementation: str | None, *, num_queries: int, head_dim: int,
                           cache_len: int, dtype, over_cache: bool = True) -> str:
  """The implementation `attention` will use for these shapes on the default backend.

  Args:
    implementation: None, "xla" or "pallas" (see the module docstring; a full forward's cuDNN
      choice, rule 2, is `attention`'s, which sees the padding and the documents).
    num_queries: t, the queries of the call.
    head_dim: d.
    cache_len: s, the keys of the cache.
    dtype: the queries' dtype.
    over_cache: whether the queries attend a cache (`num_keys` given); False for a full forward.
  """
  if implementation is not None and implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention: implementation must be one of {IMPLEMENTATIONS} or None, "
                     f"got {implementation!r}")
  if num_queries <= reference.MAX_SPLIT_QUERIES or not over_cache:
    return "xla"
  if implementation == "pallas":
    return "pallas" if _pallas_module() is not None else "xla"
  if implementation is None and platform.mosaic_gpu_available() and supports(
      head_dim=head_dim, cache_len=cache_len, dtype=dtype) and _kernel_traces(
          head_dim, jnp.dtype(dtype)):  # a kernel that fails to trace here: XLA, said once
    return "pallas"
  return "xla"


def attention(q, k, v, pos, start, num_keys=None, *, implementation: str | None = None,
              key_block: int = reference.DEFAULT_KEY_BLOCK, segment_ids=None):
  """Causal GQA attention of t queries at cache indices pos .. pos+t−1 over a heads-major cache.

  Args:
    q: [b, t, h, d] queries.
    k, v: [b, kv, s, d] keys and values, already holding this call's keys.
    pos: int32 scalar, cache index of the first query.
    start: [b] int32, each row's first real key (left padding before it is never attended), or
      None: no padding (a full forward may then run cuDNN, rule 2).
    num_keys: None for a full forward (s = t keys, differentiable) or an int32 scalar count of
      keys written so far (a cache).
    implementation: None, "xla", "pallas" or "cudnn"; see the module docstring.
    key_block: keys per online-softmax block of the XLA path.
    segment_ids: None or [b, s] document ids of a full forward's packed rows (XLA only).

  Returns:
    [b, t, h, d] in q.dtype.
  """
  if segment_ids is not None and (num_keys is not None or implementation in ("pallas", "cudnn")):
    raise ValueError("attention: segment_ids (packed sequences) need a full forward on the XLA "
                     f"path, got num_keys={num_keys!r}, implementation={implementation!r}")
  if num_keys is None and implementation in (None, "cudnn"):  # rule 2: a full forward
    if start is None and segment_ids is None and cudnn_usable(q.shape, k.shape, q.dtype):
      return _cudnn_attention(q, k, v)
    if implementation == "cudnn":
      raise ValueError(
          f"attention: implementation='cudnn' needs a full forward of bf16/fp16 rows without "
          f"padding (start=None) or segment_ids on an NVIDIA GPU whose cuDNN takes q "
          f"{tuple(q.shape)} {jnp.dtype(q.dtype).name} (backend: {jax.default_backend()})")
  if implementation == "cudnn":
    raise ValueError("attention: implementation='cudnn' is for a full forward (num_keys=None); "
                     "over a cache use None, 'xla' or 'pallas'")
  if start is None:
    start = jnp.zeros((q.shape[0],), jnp.int32)
  impl = resolve_implementation(implementation, num_queries=q.shape[1], head_dim=q.shape[-1],
                                cache_len=k.shape[2], dtype=q.dtype,
                                over_cache=num_keys is not None)
  if impl == "pallas":
    return _pallas_module().attention(q, k, v, pos, start, num_keys,
                                      interpret=not platform.mosaic_gpu_available())
  return reference.attention(q, k, v, pos, start, num_keys, key_block=key_block,
                             segment_ids=segment_ids)
