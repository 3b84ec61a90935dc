"""The jitted sampler: parity with transformers' generate, mixed lengths, no recompilation,
sampling rules, stop tokens, streaming, thinking budgets and input errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nemojax
from nemojax import NemotronHConfig, sampling
from nemojax import testing as T
from nemojax.sampler import Sampler, ThinkingControl

ODD = T.CONFIGS["odd"]


@pytest.fixture(scope="module")
def tiny_model():
  return nemojax.NemotronH(NemotronHConfig.tiny(), dtype=jnp.float32, rngs=nnx.Rngs(4))


@pytest.fixture(scope="module")
def sampler(tiny_model):
  return Sampler(tiny_model, prefill_chunk=16, min_bucket=8)


@pytest.mark.parametrize("config", [NemotronHConfig.tiny(), ODD], ids=["tiny", "odd"])
def test_greedy_matches_transformers_generate(config, tmp_path):
  torch = pytest.importorskip("torch")  # test-only reference; absent on the newest-JAX CI leg
  pytest.importorskip("transformers")
  hf = T.make_hf_model(config, seed=21)
  model = nemojax.load(T.save_hf(hf, tmp_path), dtype=jnp.float32)
  prompts = np.random.default_rng(1).integers(3, config.vocab_size, (2, 11))
  with torch.no_grad():
    ref = hf.generate(torch.as_tensor(prompts), max_new_tokens=33, do_sample=False,
                      eos_token_id=None, pad_token_id=0)[:, prompts.shape[1]:].numpy()
  out = Sampler(model, prefill_chunk=16)(prompts.tolist(), max_new_tokens=33)
  for row, res in zip(ref, out):
    assert res.tokens == row.tolist()
    assert res.finish_reason == "length"


def test_batch_of_mixed_lengths_equals_each_alone(sampler, tiny_model):
  rng = np.random.default_rng(2)
  prompts = [rng.integers(0, 256, n).tolist() for n in (1, 4, 13, 9)]
  together = sampler(prompts, max_new_tokens=10)
  for p, res in zip(prompts, together):
    alone = sampler([p], max_new_tokens=10)[0]
    assert res.tokens == alone.tokens
  # and greedy: the full forward pass over prompt + output predicts each output token
  p = prompts[2]
  seq = jnp.asarray([p + together[2].tokens])
  pred = np.asarray(jnp.argmax(tiny_model(seq)[0], -1))
  assert pred[len(p) - 1:-1].tolist() == together[2].tokens


def test_new_length_in_a_compiled_bucket_does_not_recompile(tiny_model):
  s = Sampler(tiny_model, prefill_chunk=16, min_bucket=8, cache_size=72)
  rng = np.random.default_rng(3)
  start = s.compiled_shapes()
  s([rng.integers(0, 256, 6).tolist(), rng.integers(0, 256, 3).tolist()], max_new_tokens=5)
  before = s.compiled_shapes()
  assert before == {"prefill": start["prefill"] + 1, "decode": start["decode"] + 1}
  # Another length in the same bucket, other max_new_tokens and seed, a new Sampler.
  s2 = Sampler(tiny_model, prefill_chunk=16, min_bucket=8, cache_size=72)
  s2([rng.integers(0, 256, 8).tolist(), rng.integers(0, 256, 2).tolist()], max_new_tokens=7,
     seed=5)
  assert s.compiled_shapes() == before
  # Sampling with top-p is another loop body (compiled once); new knob values reuse it.
  hot = sampling.SamplingParams(temperature=0.7, top_p=0.9)
  s2([rng.integers(0, 256, 7).tolist()] * 2, max_new_tokens=5, sampling_params=hot)
  before = {"prefill": before["prefill"], "decode": before["decode"] + 1}
  assert s.compiled_shapes() == before
  s2([rng.integers(0, 256, 4).tolist()] * 2, max_new_tokens=6, seed=8, sampling_params=[
      sampling.SamplingParams(temperature=1.3, top_k=3), sampling.SamplingParams(0.2, top_p=0.5)])
  assert s.compiled_shapes() == before
  # A longer prompt crosses into the next bucket: one new prefill shape, same decode.
  s([rng.integers(0, 256, 30).tolist()] * 2, max_new_tokens=5)
  assert s.compiled_shapes() == {"prefill": before["prefill"] + 1, "decode": before["decode"]}


def _random_logits(seed, b=64, v=50):
  return jax.random.normal(jax.random.key(seed), (b, v)) * 3.0


def test_top_k_never_leaves_the_k_best():
  logits = _random_logits(0)
  b, v = logits.shape
  k = np.array([1, 2, 5, 10] * (b // 4), np.int32)
  allowed = np.argsort(-np.asarray(logits), axis=-1)
  for step in range(20):
    tok = np.asarray(sampling.sample(logits, jax.random.key_data(jax.random.key(1)), step,
                                     jnp.ones(b), jnp.asarray(k), jnp.ones(b)))
    for i in range(b):
      assert tok[i] in allowed[i, :k[i]]


def test_top_p_never_leaves_the_nucleus():
  logits = _random_logits(1)
  b, v = logits.shape
  p = np.array([0.1, 0.5, 0.9, 0.99] * (b // 4), np.float32)
  probs = np.asarray(jax.nn.softmax(logits, -1), np.float64)
  order = np.argsort(-probs, -1)
  hits = set()
  for step in range(20):
    tok = np.asarray(sampling.sample(logits, jax.random.key_data(jax.random.key(2)), step,
                                     jnp.ones(b), jnp.zeros(b, jnp.int32), jnp.asarray(p)))
    for i in range(b):
      sorted_p = probs[i, order[i]]
      n = int(np.searchsorted(np.cumsum(sorted_p), p[i] - 1e-6)) + 1  # smallest set reaching p
      assert tok[i] in order[i, :n]
      hits.add((i, tok[i]))
  assert len(hits) > b  # it does sample, not only argmax


def test_temperature_zero_is_greedy_and_seed_reproducible(sampler):
  rng = np.random.default_rng(4)
  prompts = [rng.integers(0, 256, 7).tolist(), rng.integers(0, 256, 3).tolist()]
  greedy = sampler(prompts, max_new_tokens=8)
  zero = sampler(prompts, max_new_tokens=8,
                 sampling_params=sampling.SamplingParams(temperature=0.0, top_k=5), seed=9)
  assert [r.tokens for r in zero] == [r.tokens for r in greedy]
  hot = sampling.SamplingParams(temperature=1.5)
  a = sampler(prompts, max_new_tokens=8, sampling_params=hot, seed=3)
  b = sampler(prompts, max_new_tokens=8, sampling_params=hot, seed=3)
  c = sampler(prompts, max_new_tokens=8, sampling_params=hot, seed=4)
  assert [r.tokens for r in a] == [r.tokens for r in b]
  assert [r.tokens for r in a] != [r.tokens for r in c]
  # a row's draws do not depend on its batch neighbours
  alone = sampler(prompts[:1], max_new_tokens=8, sampling_params=hot, seed=3)
  assert alone[0].tokens == a[0].tokens


def test_stop_tokens_and_finish_reasons(sampler):
  prompt = np.random.default_rng(5).integers(0, 256, 6).tolist()
  free = sampler([prompt], max_new_tokens=12)[0].tokens
  stop_at = free[4]
  first = free.index(stop_at)
  res = sampler([prompt, prompt], max_new_tokens=12, stop_tokens=[255, stop_at])
  assert res[0].tokens == free[:first + 1] and res[0].finish_reason == "stop"
  res = sampler([prompt], max_new_tokens=3, stop_tokens=[])
  assert res[0].finish_reason == "length" and len(res[0].tokens) == 3


def test_streaming_deltas_concatenate_to_the_result(sampler):
  rng = np.random.default_rng(6)
  prompts = [rng.integers(0, 256, 5).tolist(), rng.integers(0, 256, 9).tolist()]
  whole = sampler(prompts, max_new_tokens=11)
  pieces = [[], []]
  events = 0
  for new, _ in sampler.stream(prompts, max_new_tokens=11, segment=3):
    events += 1
    for i, toks in enumerate(new):
      pieces[i] += toks
  assert events >= 4
  assert pieces == [r.tokens for r in whole] == [r.tokens for r in results]


def test_should_stop_ends_a_row_between_segments(sampler):
  prompt = np.random.default_rng(7).integers(0, 256, 5).tolist()
  res = sampler([prompt, prompt], max_new_tokens=20, segment=4,
                should_stop=lambda row, toks: row == 0 and len(toks) >= 6)
  assert res[0].finish_reason == "stop" and 6 <= len(res[0].tokens) <= 8
  assert res[1].finish_reason == "length" and len(res[1].tokens) == 20


def test_thinking_budget_forces_the_closing_text(sampler):
  """Rows that start inside a thought: the close is forced after exactly `budget` tokens."""
  close_marker = (250, 251)
  close_text = (7, 250, 251, 9)
  ctl = ThinkingControl(close_marker=close_marker, close_text=close_text)
  prompt = np.random.default_rng(8).integers(0, 200, 6).tolist()
  budgets = [0, 3, 6, None]
  res = sampler([prompt] * 4, max_new_tokens=16, reasoning_open=True, thinking_budget=budgets,
                thinking_control=ctl,
                sampling_params=sampling.SamplingParams(temperature=1.0, top_k=200), seed=1)
  for budget, r in zip(budgets, res):
    if budget is None:
      assert r.num_reasoning_tokens == 16
      continue
    assert r.tokens[budget:budget + 4] == list(close_text)
    assert r.num_reasoning_tokens == budget
    assert len(r.tokens) == 16  # the answer goes on after the close


def test_thinking_budget_newline_policy_waits_for_a_line_end(sampler):
  ctl_mask = np.zeros(256, bool)
  ctl_mask[np.arange(0, 256, 3)] = True  # every third id "ends a line"
  ctl = ThinkingControl(close_marker=(250, 251), close_text=(250, 251), newline_mask=ctl_mask)
  prompt = np.random.default_rng(9).integers(0, 200, 6).tolist()
  res = sampler([prompt] * 3, max_new_tokens=24, reasoning_open=True, thinking_budget=[2, 4, 5],
                budget_policy="newline", budget_grace=6, thinking_control=ctl,
                sampling_params=sampling.SamplingParams(temperature=1.0), seed=2)
  for budget, r in zip([2, 4, 5], res):
    n = r.num_reasoning_tokens
    assert budget <= n <= budget + 6
    assert r.tokens[n:n + 2] == [250, 251]
    assert n == budget + 6 or ctl_mask[r.tokens[n - 1]]


def test_model_written_close_ends_the_thought(sampler):
  prompt = np.random.default_rng(10).integers(0, 200, 6).tolist()
  free = sampler([prompt], max_new_tokens=10)[0].tokens
  marker = (free[2],)  # pretend the model's third token is `</think>`
  ctl = ThinkingControl(close_marker=marker, close_text=(1, 2))
  r = sampler([prompt], max_new_tokens=10, reasoning_open=True, thinking_budget=8,
              thinking_control=ctl)[0]
  assert r.tokens == free  # nothing forced
  assert r.num_reasoning_tokens == free.index(free[2])  # the thought, `</think>` excluded


@pytest.mark.parametrize("kwargs,match", [
    (dict(prompts=[[]]), r"prompts\[0\] is empty"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(prompts=[[1] * 60]), "cache"),
    (dict(prompts=[[1, 999]]), "outside"),
    (dict(reasoning_open=True, thinking_budget=-1), "thinking_budget"),
])
def test_bad_input_errors_before_compiling(tiny_model, kwargs, match):
  s = Sampler(tiny_model, prefill_chunk=16, cache_size=48)
  before = s.compiled_shapes()
  args = dict(prompts=[[1, 2, 3]], max_new_tokens=4)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    s(args.pop("prompts"), **args)
  assert s.compiled_shapes() == before


@pytest.mark.parametrize("kwargs,match", [
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(temperature=-0.1), "temperature"), (dict(top_k=0), "top_k"),
])
def test_bad_sampling_rules(kwargs, match):
  with pytest.raises(ValueError, match=match):
    sampling.SamplingParams(**kwargs)


def test_fixed_modes_equal_auto():
  """The static modes the decode loop uses draw exactly what the device-side choice draws."""
  logits = _random_logits(5, b=8)
  key = jax.random.key_data(jax.random.key(3))
  temp = np.array([0, 0.7, 1.0, 1.3, 0, 2.0, 0.5, 1.0], np.float32)
  top_k = np.array([0, 0, 3, 0, 5, 0, 0, 7], np.int32)
  top_p = np.array([1, 1, 1, 0.8, 1, 0.95, 1, 1], np.float32)
  cases = [(np.zeros(8, np.float32), top_k, top_p, "greedy"),
           (temp, np.zeros(8, np.int32), np.ones(8, np.float32), "sample"),
           (temp, top_k, top_p, "filter")]
  for t, k, p, want in cases:
    assert sampling.mode_for(t, k, p) == want
    for step in range(3):
      args = (logits, key, step, jnp.asarray(t), jnp.asarray(k), jnp.asarray(p))
      np.testing.assert_array_equal(sampling.sample(*args, mode=want), sampling.sample(*args))
  with pytest.raises(ValueError, match="mode"):
    sampling.sample(logits, key, 0, jnp.asarray(temp), jnp.asarray(top_k), jnp.asarray(top_p),
                    mode="beam")


@pytest.mark.parametrize("kwargs,name", [
    (dict(cache_size=-5), "cache_size"), (dict(cache_size=2.5), "cache_size"),
    (dict(prefill_chunk=24), "prefill_chunk"), (dict(min_bucket=0), "min_bucket"),
    (dict(model="m"), "model"),
])
def test_bad_sampler_arguments(tiny_model, kwargs, name):
  args = dict(model=tiny_model)
  args.update(kwargs)
  with pytest.raises(ValueError, match=name) as e:
    Sampler(args.pop("model"), **args)
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("kwargs,name", [
    (dict(seed="abc"), "seed"), (dict(seed=1.5), "seed"), (dict(seed=None), "seed"),
    (dict(seed=2**70), "seed"), (dict(seed=[1, 2, 3]), "seed"),
    (dict(prompts=[[1, -5]]), r"prompts\[0\]"), (dict(prompts=[[1, 2.0]]), r"prompts\[0\]"),
    (dict(prompts="abc"), "prompts"), (dict(max_new_tokens=True), "max_new_tokens"),
    (dict(stop_tokens=[-1]), "stop_tokens"), (dict(stop_tokens=[2**40]), "stop_tokens"),
    (dict(segment=0), "segment"), (dict(should_stop=3), "should_stop"),
    (dict(reasoning_open=[True]), "reasoning_open"), (dict(reasoning_open="yes"), "reasoning_open"),
    (dict(sampling_params="greedy"), "sampling_params"),
    (dict(sampling_params=[sampling.SamplingParams()]), "sampling_params"),
    (dict(thinking_budget=3, budget_grace=-1), "budget_grace"),
    (dict(thinking_budget=3, budget_policy="soft"), "budget_policy"),
    (dict(thinking_control="x"), "thinking_control"),
])
def test_bad_stream_arguments_before_compiling(sampler, kwargs, name):
  args = dict(prompts=[[1, 2, 3], [4, 5]], max_new_tokens=4)
  args.update(kwargs)
  before = sampler.compiled_shapes()
  with pytest.raises(ValueError, match=name) as e:
    sampler(args.pop("prompts"), **args)
  assert "\n" not in str(e.value)
  assert sampler.compiled_shapes() == before


def test_memory_check_names_the_knob_and_the_bytes(tiny_model, monkeypatch):
  from nemojax import memory
  monkeypatch.setattr(memory, "free_bytes", lambda: 10_000)
  with pytest.raises(ValueError, match=r"cache_size=64 .*bytes"):
    Sampler(tiny_model, cache_size=64)([[1, 2, 3]], max_new_tokens=4)
  with pytest.raises(ValueError, match=r"max_new_tokens=4 .*bytes"):
    Sampler(tiny_model)([[1, 2, 3]], max_new_tokens=4)
  monkeypatch.setattr(memory, "free_bytes", lambda: None)  # unknown: no check
  assert len(Sampler(tiny_model, prefill_chunk=16, min_bucket=8)(
      [[1, 2, 3]], max_new_tokens=2)[0].tokens) == 2
  parts = memory.need_bytes(tiny_model.config, tiny_model.dtype, batch=2, cache_len=256,
                            buffer_len=16, chunk=16)
  assert parts["cache"] == nemojax.cache.cache_bytes(tiny_model.config, 2, 256, tiny_model.dtype)


def test_a_rows_draws_depend_only_on_its_seed_and_prompt(sampler):
  rng = np.random.default_rng(11)
  p, q = rng.integers(0, 256, 5).tolist(), rng.integers(0, 256, 8).tolist()
  hot = dict(max_new_tokens=8, sampling_params=sampling.SamplingParams(temperature=1.5))
  pq = sampler([p, q], seed=3, **hot)
  qp = sampler([q, p], seed=3, **hot)
  assert pq[0].tokens == qp[1].tokens and pq[1].tokens == qp[0].tokens
  same = sampler([p, p, p], seed=[3, 4, 3], **hot)
  assert same[0].tokens == same[2].tokens == pq[0].tokens
  assert same[1].tokens == sampler([p], seed=4, **hot)[0].tokens != same[0].tokens
