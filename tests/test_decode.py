"""The decode state: prefill + one-token steps reproduce the full forward pass exactly."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nemojax import NemotronH
from nemojax.cache import KVState, MambaState
from nemojax import testing as T

CONFIGS = T.CONFIGS


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model(request):
  m = NemotronH(CONFIGS[request.param], dtype=jnp.float32, rngs=nnx.Rngs(3))
  _perturb(m)
  return m


def _perturb(m):
  """Random A_log/dt_bias/D and norm scales, so the decode path is exercised off the init."""
  state = nnx.state(m, nnx.Param)
  leaves, tree = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(0), len(leaves))
  leaves = [x + 0.3 * jax.random.normal(k, x.shape, x.dtype) if x.ndim == 1 else x
            for x, k in zip(leaves, keys)]
  nnx.update(m, jax.tree.unflatten(tree, leaves))


def _decode_all(m, ids, prefill_sizes):
  """Prefills `ids` in pieces of the given sizes, then decodes the rest one token at a time."""
  b, t = ids.shape
  cache = m.init_cache(b, 64)
  out, pos = [], 0
  for size in prefill_sizes:
    logits, cache = m(ids[:, pos:pos + size], cache=cache)
    out.append(logits)
    pos += size
  step = jax.jit(lambda ids, cache: m(ids, cache=cache))
  while pos < t:
    logits, cache = step(ids[:, pos:pos + 1], cache)
    out.append(logits)
    pos += 1
  return jnp.concatenate(out, axis=1), cache


# Prompts shorter than the conv's K - 1 = 3 inputs of history (1), that long (3), longer (21).
@pytest.mark.parametrize("prompt_len", [1, 3, 21])
def test_prefill_then_decode_equals_full_forward(model, prompt_len):
  cfg = model.config
  t = prompt_len + 2 * cfg.chunk_size - 5  # the decoded part crosses chunk boundaries too
  ids = np.random.default_rng(prompt_len).integers(0, cfg.vocab_size, (3, t))
  full = np.asarray(model(ids))
  inc, cache = _decode_all(model, ids, [prompt_len])
  chex.assert_shape([full, inc], (3, t, cfg.vocab_size))
  T.assert_close(inc, full, "float32", "same")
  assert int(cache.pos) == t


def test_chunked_prefill_equals_one_shot(model):
  cfg = model.config
  t = 3 * cfg.chunk_size + 2
  ids = np.random.default_rng(7).integers(0, cfg.vocab_size, (2, t))
  one, cache1 = _decode_all(model, ids, [t])
  pieces, cache2 = _decode_all(model, ids, [5, cfg.chunk_size + 1, t - cfg.chunk_size - 6])
  chex.assert_trees_all_equal_shapes_and_dtypes(cache1, cache2)
  T.assert_close(pieces, one, "float32", "same")
  for a, b in zip(cache1.layers, cache2.layers):
    if isinstance(a, MambaState):
      T.assert_close(b.ssm, a.ssm, "float32", "same")
      T.assert_close(b.conv, a.conv, "float32", "same")
    elif isinstance(a, KVState):
      T.assert_close(b.k[:, :, :t], a.k[:, :, :t], "float32", "same")


def test_left_padding_never_reaches_the_state(model):
  """A left-padded row gives exactly what the same prompt gives alone (logits and states)."""
  cfg = model.config
  rng = np.random.default_rng(9)
  lens = [cfg.chunk_size + 3, 2]
  t = max(lens)
  rows = [rng.integers(1, cfg.vocab_size, n) for n in lens]
  ids = np.zeros((2, t), np.int64)
  start = np.array([t - n for n in lens], np.int32)
  for i, r in enumerate(rows):
    ids[i, t - len(r):] = r
    ids[i, :t - len(r)] = rng.integers(1, cfg.vocab_size, t - len(r))  # garbage pads
  cache = model.init_cache(2, 64).replace(start=jnp.asarray(start))
  logits, cache = model(ids, cache=cache)
  for i, r in enumerate(rows):
    alone_logits, alone_cache = model(r[None], cache=model.init_cache(1, 64))
    T.assert_close(logits[i, start[i]:], alone_logits[0], "float32", "same")
    for a, b in zip(alone_cache.layers, cache.layers):
      if isinstance(a, MambaState):
        T.assert_close(b.ssm[i], a.ssm[0], "float32", "same")
  # Without a cache, `start` marks the same padding (pad positions' logits are meaningless).
  no_cache = model(ids, start=start)
  for i in range(2):
    T.assert_close(no_cache[i, start[i]:], logits[i, start[i]:], "float32", "same")


def test_attention_over_many_key_blocks(model):
  """Key-blocked online softmax (block smaller than the context) equals one block."""
  cfg = model.config
  ids = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 45))
  full = np.asarray(model(ids))
  for block in model.backbone.layers:
    if hasattr(block.mixer, "key_block"):
      block.mixer.key_block = 8
  try:
    blocked = np.asarray(model(ids))
    inc, _ = _decode_all(model, ids, [13])
  finally:
    for block in model.backbone.layers:
      if hasattr(block.mixer, "key_block"):
        block.mixer.key_block = 1024
  T.assert_close(blocked, full, "float32", "same")
  T.assert_close(inc, full, "float32", "same")
