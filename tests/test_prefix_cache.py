"""Prefix cache: resuming from saved decode states gives the tokens of a full prefill, mixed
lengths in a batch, cached_prompt_tokens, and the byte budget."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nemojax
from nemojax import NemotronHConfig
from nemojax.prefix_cache import PrefixCache, snapshot_bytes
from nemojax.sampler import Sampler


@pytest.fixture(scope="module")
def model():
  return nemojax.NemotronH(NemotronHConfig.tiny(), dtype=jnp.float32, rngs=nnx.Rngs(4))


def _prompts(rng, shared, lengths):
  return [shared + rng.integers(0, 256, n).tolist() for n in lengths]


def test_resumed_rows_match_a_full_prefill(model):
  rng = np.random.default_rng(0)
  shared = rng.integers(0, 256, 21).tolist()
  plain = Sampler(model, prefill_chunk=16, min_bucket=8)
  cached = Sampler(model, prefill_chunk=16, min_bucket=8, prefix_cache=PrefixCache(every=8))
  first = _prompts(rng, shared, (3, 9, 2))
  # A fresh cache: nothing to resume from, the same tokens as without a cache.
  got = cached(first, max_new_tokens=6)
  assert [r.cached_prompt_tokens for r in got] == [0, 0, 0]
  assert [r.tokens for r in got] == [r.tokens for r in plain(first, max_new_tokens=6)]
  # New suffixes after the shared prefix resume at its last saved multiple of 8 (16); a row
  # repeated from the first call resumes at its end (all but the last token); a row that shares
  # nothing starts fresh. Mixed lengths, one batch.
  second = _prompts(rng, shared, (5, 14)) + [first[1], rng.integers(0, 256, 12).tolist()]
  got = cached(second, max_new_tokens=6)
  assert [r.cached_prompt_tokens for r in got] == [16, 16, len(first[1]) - 1, 0]
  assert [r.tokens for r in got] == [r.tokens for r in plain(second, max_new_tokens=6)]
  # Asked-for save points: a later prompt that shares 23 tokens resumes there.
  third = shared + [7, 9, 11]
  cached([third], max_new_tokens=2, save_at=[[23]])
  got = cached([third[:23] + [1, 2, 3, 4]], max_new_tokens=6)[0]
  assert got.cached_prompt_tokens == 23
  assert got.tokens == plain([third[:23] + [1, 2, 3, 4]], max_new_tokens=6)[0].tokens


def test_budget_evicts_least_recently_used(model):
  store = PrefixCache(10**9, every=4)
  s = Sampler(model, prefill_chunk=16, min_bucket=8, prefix_cache=store)
  rng = np.random.default_rng(1)
  prompts = [rng.integers(0, 256, 13).tolist() for _ in range(2)]
  s(prompts, max_new_tokens=1)
  assert len(store) == 2 * 3  # after 4, 8 and 12 tokens (12: the prompt's end)
  one = store.lookup(prompts[0], 12)
  assert one.length == 12 and store.nbytes == sum(
      store.lookup(p[:n + 1], n).nbytes for p in prompts for n in (4, 8, 12))
  # A budget of three snapshots keeps the three most recently saved or used.
  small = PrefixCache(3 * one.nbytes, every=4)
  s2 = Sampler(model, prefill_chunk=16, min_bucket=8, prefix_cache=small)
  s2(prompts[:1], max_new_tokens=1)
  assert len(small) == 3
  small.lookup(prompts[0], 4)  # touch the oldest: the next two saves evict the 8 and the 12
  s2([prompts[1][:9]], max_new_tokens=1)  # saves after 4 and 8 tokens
  assert len(small) == 3 and small.nbytes <= small.max_bytes
  assert small.lookup(prompts[0], 12).length == 4 and small.lookup(prompts[1], 12).length == 8
  assert PrefixCache(one.nbytes - 1).fits(one.nbytes) is False


def test_snapshot_bytes_count_state_and_keys(model):
  cache = model.init_cache(2, 256)
  cfg = model.config
  mamba = cfg.layer_types.count(nemojax.LayerType.MAMBA)
  attn = cfg.layer_types.count(nemojax.LayerType.ATTENTION)
  per_mamba = (cfg.conv_kernel - 1) * cfg.conv_dim * 4 + (
      cfg.mamba_num_heads * cfg.mamba_head_dim * cfg.ssm_state_size * 4)
  per_attn = 2 * cfg.num_key_value_heads * 256 * cfg.head_dim * 4  # 10 tokens: ladder 256
  assert snapshot_bytes(cache, 10) == mamba * per_mamba + attn * per_attn


def test_bad_arguments(model):
  with pytest.raises(ValueError, match="max_bytes"):
    PrefixCache(-1)
  with pytest.raises(ValueError, match="every"):
    PrefixCache(every=0)
  with pytest.raises(ValueError, match="prefix_cache"):
    Sampler(model, prefix_cache="yes")
  s = Sampler(model, prefix_cache=True)
  with pytest.raises(ValueError, match="save_at"):
    s([[1, 2, 3]], max_new_tokens=1, save_at=[1])


def test_asked_for_states_outrank_automatic_ones(model):
  # A budget of one snapshot: a chat-like call asks for the state after 23 tokens of a 31-token
  # prompt. The automatic saves (after 8, 16 and the prompt's end, 30) must not evict it, so the
  # next prompt sharing those 23 tokens resumes there (before, the prompt end evicted it: the
  # 9B-shape chat on the H200 reused 0 of 16,875 history tokens).
  rng = np.random.default_rng(5)
  prompt = rng.integers(0, 256, 31).tolist()
  probe = Sampler(model, prefill_chunk=16, min_bucket=8, prefix_cache=PrefixCache(every=8))
  probe([prompt], max_new_tokens=1)
  one = probe.prefix_cache.lookup(prompt, 30).nbytes  # the ladder makes every snapshot this size
  store = PrefixCache(one, every=8)
  s = Sampler(model, prefill_chunk=16, min_bucket=8, prefix_cache=store)
  s([prompt], max_new_tokens=1, save_at=[[23]])
  assert len(store) == 1 and store.lookup(prompt, 30).length == 23
  nxt = prompt[:23] + rng.integers(0, 256, 9).tolist()
  got = s([nxt], max_new_tokens=5)[0]
  assert got.cached_prompt_tokens == 23
  plain = Sampler(model, prefill_chunk=16, min_bucket=8)
  assert got.tokens == plain([nxt], max_new_tokens=5)[0].tokens
  # An automatic snapshot never displaces it; another asked-for one does (least recently used).
  assert store.victims(one) is None and store.victims(one, requested=True) is not None


def test_stops_anywhere_compile_few_prefill_shapes(model, monkeypatch):
  # Save points off the chunk grid (left padding 21, an asked-for point at 151) split prefill
  # into pieces; with power-of-four pieces only chunk, 16, 4 and 1 appear here (power-of-two
  # pieces used 32, 8 and 2 as well: every size a separate program, ~10 s each at 9B widths).
  from nemojax import engine
  seen = set()
  prefill = engine.prefill

  def spy(graph, params, cache, chunk):
    seen.add(chunk.shape[1])
    return prefill(graph, params, cache, chunk)

  monkeypatch.setattr(engine, "prefill", spy)
  prompt = np.random.default_rng(7).integers(0, 256, 300).tolist()
  s = Sampler(model, prefill_chunk=64, min_bucket=8, prefix_cache=PrefixCache(every=64))
  got = s([prompt], max_new_tokens=3, save_at=[[151]])[0]
  assert seen <= {64, 16, 4, 1}, seen
  monkeypatch.setattr(engine, "prefill", prefill)
  assert got.tokens == Sampler(model, prefill_chunk=64, min_bucket=8)([prompt],
                                                                       max_new_tokens=3)[0].tokens
