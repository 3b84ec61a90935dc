"""nemojax.generate: prompt forms, streaming, stop strings and per-row thinking budgets."""

import jax.numpy as jnp
import pytest
from flax import nnx

import nemojax
from nemojax import NemotronHConfig
from nemojax.demo.bpe import build_tokenizer
from nemojax.tokenizer import BUDGET_CLOSE_TEXT, THINK_CLOSE

CORPUS = ["The quick brown fox jumps over the lazy dog. 12345 + 678 = 13023\n",
          "Think step by step: first add the units, then carry.\n",
          "Nemotron models reason inside <think> tags before answering.\n"] * 20


def _model_and_tokenizer(tmp_path_factory, think_as_special):
  tok = build_tokenizer(CORPUS, 400, tmp_path_factory.mktemp(f"tok{int(think_as_special)}"),
                        think_as_special=think_as_special)
  cfg = NemotronHConfig.tiny(vocab_size=tok.vocab_size)
  model = nemojax.NemotronH(cfg, dtype=jnp.float32, rngs=nnx.Rngs(7))
  return model, tok


@pytest.fixture(scope="module")
def multi(tmp_path_factory):  # `</think>` spelt with several BPE pieces: never written by chance
  return _model_and_tokenizer(tmp_path_factory, think_as_special=False)


@pytest.fixture(scope="module")
def single(tmp_path_factory):  # `</think>` as one special token
  return _model_and_tokenizer(tmp_path_factory, think_as_special=True)


@pytest.mark.parametrize("policy", ["hard", "newline"])
def test_budgets_per_row(multi, policy):
  model, tok = multi
  budgets = [0, 3, 9, None]
  grace = 5
  gens = nemojax.generate(model, ["What is 2 + 2?"] * 4, tokenizer=tok, max_new_tokens=40,
                          thinking=True, thinking_budget=budgets, budget_policy=policy,
                          budget_grace=grace, temperature=1.0, seed=3,
                          stop_tokens=[])  # a random model: let every row run to the end
  for budget, g in zip(budgets, gens):
    if budget is None:  # nothing forced: the random model never closes its thought
      assert BUDGET_CLOSE_TEXT not in g.text and THINK_CLOSE not in g.text
      assert g.num_reasoning_tokens == len(g.tokens) and g.answer == ""
      continue
    if budget == 0:  # like /no_think: the prompt already closed the (empty) thought
      assert g.reasoning is None and g.num_reasoning_tokens == 0
      assert THINK_CLOSE not in g.text and len(g.answer) > 0
      continue
    limit = budget + (grace if policy == "newline" else 0)
    assert budget <= g.num_reasoning_tokens <= limit  # forced tokens are not reasoning
    assert g.text.count(THINK_CLOSE) == 1
    assert g.text.count(BUDGET_CLOSE_TEXT.strip()) >= 1
    assert g.reasoning is not None and len(g.answer) > 0
    assert g.finish_reason == "length"


def test_budget_with_single_token_close(single):
  model, tok = single
  assert len(tok.think_tokens().close) == 1
  g = nemojax.generate(model, "Hi", tokenizer=tok, max_new_tokens=20, thinking_budget=4,
                       temperature=1.0, seed=1, stop_tokens=[])[0]
  assert g.tokens[4:4 + len(tok.budget_close_ids())] == list(tok.budget_close_ids())
  assert g.text.count(THINK_CLOSE) == 1 and g.reasoning is not None


def test_zero_budget_equals_no_think(multi):
  model, tok = multi
  a = nemojax.generate(model, "What is 7 * 8?", tokenizer=tok, max_new_tokens=12,
                       thinking_budget=0)[0]
  b = nemojax.generate(model, "What is 7 * 8? /no_think", tokenizer=tok, max_new_tokens=12)[0]
  assert a.tokens == b.tokens and a.text == b.text and a.reasoning is None


def test_prompt_forms_agree(multi):
  model, tok = multi
  text = nemojax.generate(model, "Add 12 and 30.", tokenizer=tok, max_new_tokens=10,
                          temperature=0.0)[0]
  chat = nemojax.generate(model, [{"role": "user", "content": "Add 12 and 30."}], tokenizer=tok,
                          max_new_tokens=10, temperature=0.0)[0]
  ids = tok.apply_chat_template([{"role": "user", "content": "Add 12 and 30."}], tokenize=True)
  raw = nemojax.generate(model, ids, tokenizer=tok, max_new_tokens=10, temperature=0.0)[0]
  assert text.tokens == chat.tokens == raw.tokens
  assert text.text == raw.text and raw.reasoning is not None  # the ids end in "<think>\n"
  batch = nemojax.generate(model, ["Add 12 and 30.", [{"role": "user", "content": "Hi"}]],
                           tokenizer=tok, max_new_tokens=10, temperature=0.0)
  assert batch[0].tokens == text.tokens and len(batch) == 2


def test_stream_deltas_concatenate_to_text(multi):
  model, tok = multi
  deltas = {0: [], 1: []}
  gens = nemojax.generate(model, ["Think about foxes.", "Count to five. /no_think"],
                          tokenizer=tok, max_new_tokens=37, thinking_budget=[5, None],
                          temperature=1.0, seed=4, stop_tokens=[],
                          stream=lambda row, d: deltas[row].append(d))
  for i, g in enumerate(gens):
    assert "".join(deltas[i]) == g.text
    assert len(deltas[i]) > 1
  assert g.text == tok.decode(g.tokens)


def test_stop_strings_cut_the_text(multi):
  model, tok = multi
  free = nemojax.generate(model, "Tell me about dogs.", tokenizer=tok, max_new_tokens=30,
                          temperature=1.0, seed=8, stop_tokens=[])[0]
  stop = free.text[10:13]
  assert len(stop) == 3
  cut = nemojax.generate(model, "Tell me about dogs.", tokenizer=tok, max_new_tokens=30,
                         temperature=1.0, seed=8, stop=[stop], stop_tokens=[])[0]
  assert cut.finish_reason == "stop"
  assert cut.text == free.text[:free.text.find(stop)]


def test_errors(multi):
  model, tok = multi
  with pytest.raises(ValueError, match="tokenizer="):
    nemojax.generate(model, "hello")
  with pytest.raises(ValueError, match="thinking_budget"):
    nemojax.generate(model, "hello", tokenizer=tok, thinking_budget=-2)
  with pytest.raises(ValueError, match="max_new_tokens"):
    nemojax.generate(model, "hello", tokenizer=tok, max_new_tokens=0)
  with pytest.raises(ValueError, match="top_p"):
    nemojax.generate(model, "hello", tokenizer=tok, top_p=1.5)


def test_reasoning_tokens_are_counted_without_a_budget():
  from nemojax.demo import DEMO_QUESTION, demo_model_path
  path = demo_model_path()
  model = nemojax.load(path, dtype=jnp.float32)
  tok = nemojax.Tokenizer.from_pretrained(path)
  g = nemojax.generate(model, DEMO_QUESTION, tokenizer=tok, temperature=0.0,
                       max_new_tokens=96)[0]
  close = tok.think_tokens().close
  assert len(close) == 1
  assert g.num_reasoning_tokens == g.tokens.index(close[0]) > 0
  assert g.answer == "The last digit is 2." and g.finish_reason == "stop"


# ---- input validation (issue #12): one ValueError per bad argument, naming it, before compiling
@pytest.mark.parametrize("kwargs,name", [
    (dict(seed="abc"), "seed"), (dict(seed=1.5), "seed"), (dict(seed=None), "seed"),
    (dict(seed=2**70), "seed"), (dict(seed=[1, 2]), "seed"), (dict(seed=True), "seed"),
    (dict(prompts=[{"role": "wizard", "content": "hi"}]), "role"),
    (dict(prompts=[{"role": "user", "content": None}]), "content"),
    (dict(prompts=[[1, 2, -5]]), r"prompts\[0\]"), (dict(prompts=[[1, 10**6]]), r"prompts\[0\]"),
    (dict(prompts=[]), "prompts"), (dict(prompts=[3.5]), r"prompts\[0\]"),
    (dict(temperature=float("inf")), "temperature"), (dict(temperature="hot"), "temperature"),
    (dict(top_p=float("nan")), "top_p"), (dict(top_k=1.5), "top_k"), (dict(top_k=2**70), "top_k"),
    (dict(budget_grace=-1), "budget_grace"), (dict(budget_policy="soft"), "budget_policy"),
    (dict(thinking_budget=-2), "thinking_budget"),
    (dict(thinking_budget=[1, 2]), "thinking_budget"),
    (dict(thinking_budget=2.5), "thinking_budget"), (dict(thinking="yes"), "thinking"),
    (dict(cache_size=-5), "cache_size"), (dict(prefill_chunk=3), "prefill_chunk"),
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(max_new_tokens="5"), "max_new_tokens"),
    (dict(stop=[""]), "stop"), (dict(stop=5), "stop"), (dict(stop_tokens=[-1]), "stop_tokens"),
    (dict(stream=5), "stream"), (dict(tokenizer="tok"), "tokenizer"), (dict(model="m"), "model"),
    (dict(sampler="s"), "sampler"),
])
def test_bad_arguments_are_one_line_value_errors(multi, kwargs, name):
  model, tok = multi
  args = dict(model=model, prompts="hello", tokenizer=tok, max_new_tokens=4)
  args.update(kwargs)
  before = nemojax.Sampler.compiled_shapes()
  with pytest.raises(ValueError, match=name) as e:
    nemojax.generate(args.pop("model"), args.pop("prompts"), **args)
  assert "\n" not in str(e.value)
  assert nemojax.Sampler.compiled_shapes() == before


def test_a_request_that_cannot_fit_is_refused_before_compiling(multi):
  from nemojax import memory
  if memory.free_bytes() is None:
    pytest.skip("free memory unknown on this platform: no check is made (see memory.py)")
  model, tok = multi
  before = nemojax.Sampler.compiled_shapes()
  with pytest.raises(ValueError, match=r"max_new_tokens=1000000000 .* bytes") as e:
    nemojax.generate(model, "hello", tokenizer=tok, max_new_tokens=10**9)
  assert "\n" not in str(e.value) and "free" in str(e.value)
  assert nemojax.Sampler.compiled_shapes() == before


def test_same_seed_same_prompt_same_samples_at_any_row(multi):
  model, tok = multi
  kw = dict(tokenizer=tok, max_new_tokens=12, temperature=1.0, stop_tokens=[])
  ab = nemojax.generate(model, ["Tell me about dogs.", "Count to five."], seed=5, **kw)
  ba = nemojax.generate(model, ["Count to five.", "Tell me about dogs."], seed=5, **kw)
  assert ab[0].tokens == ba[1].tokens and ab[1].tokens == ba[0].tokens
  # one seed per prompt: a row follows its own seed whatever its companions
  mixed = nemojax.generate(model, ["Tell me about dogs."] * 3, seed=[5, 6, 5], **kw)
  alone = nemojax.generate(model, "Tell me about dogs.", seed=6, **kw)[0]
  assert mixed[0].tokens == mixed[2].tokens == ab[0].tokens
  assert mixed[1].tokens == alone.tokens != mixed[0].tokens


def test_stop_strings_cut_tokens_and_reasoning_count_exactly(multi):
  model, tok = multi
  kw = dict(tokenizer=tok, max_new_tokens=40, temperature=1.0, seed=8, stop_tokens=[])
  free = nemojax.generate(model, "Tell me about dogs.", **kw)[0]
  stop = free.text[6:9]
  cut = nemojax.generate(model, "Tell me about dogs.", stop=stop, **kw)[0]
  k = len(cut.tokens)
  assert cut.finish_reason == "stop" and cut.tokens == free.tokens[:k]
  assert stop in tok.decode(cut.tokens) and stop not in tok.decode(cut.tokens[:-1])
  # the whole row is reasoning (a random model never closes its thought)
  assert cut.num_reasoning_tokens == k < free.num_reasoning_tokens
