"""ChatSession: every turn's tokens equal `generate` on the re-rendered history, with the shared
history resumed from saved states (reasoning on and off)."""

import jax.numpy as jnp
import pytest
from flax import nnx

import nemojax
from nemojax import NemotronHConfig
from nemojax.demo.bpe import build_tokenizer

CORPUS = ["The quick brown fox jumps over the lazy dog. 12345 + 678 = 13023\n",
          "Think step by step: first add the units, then carry.\n"] * 20


@pytest.fixture(scope="module")
def model_and_tok(tmp_path_factory):
  tok = build_tokenizer(CORPUS, 300, tmp_path_factory.mktemp("tok"), think_as_special=True)
  cfg = NemotronHConfig.tiny(vocab_size=tok.vocab_size)
  return nemojax.NemotronH(cfg, dtype=jnp.float32, rngs=nnx.Rngs(3)), tok


def test_turns_equal_generate_on_the_full_history(model_and_tok):
  model, tok = model_and_tok
  chat = nemojax.ChatSession(model, tokenizer=tok, system="Be brief.", max_new_tokens=12,
                             temperature=0.0, prefill_chunk=32)
  turns = [("What is 2 + 2?", True), ("And 3 + 5?", False), ("Add the units.", True)]
  previous = None
  for message, thinking in turns:
    before = chat.history + [{"role": "user", "content": message}]
    gen = chat.send(message, thinking=thinking)
    ref = nemojax.generate(model, [before], tokenizer=tok, max_new_tokens=12, temperature=0.0,
                           thinking=thinking, prefill_chunk=32)[0]
    assert gen.tokens == ref.tokens and gen.text == ref.text
    assert ref.cached_prompt_tokens == 0
    assert chat.history == before + [{"role": "assistant", "content": gen.text}]
    prompt = tok.apply_chat_template(before, add_generation_prompt=True, thinking=thinking,
                                     tokenize=True)
    if previous is None:
      assert gen.cached_prompt_tokens == 0
    else:  # resumed exactly where this prompt stops sharing the previous one: before the
      # generation prompt's "<think>" part, which the template does not re-render
      shared = next(i for i, (a, b) in enumerate(zip(previous, prompt)) if a != b)
      assert 0 < shared < len(previous) - 1
      assert gen.cached_prompt_tokens == shared
    previous = prompt
  chat.reset()
  assert chat.history == [{"role": "system", "content": "Be brief."}]
  again = chat.send(turns[0][0], thinking=True)  # the first prompt again: resumed at its end
  first = tok.apply_chat_template(chat.history[:2], add_generation_prompt=True, thinking=True,
                                  tokenize=True)
  assert again.cached_prompt_tokens == len(first) - 1


def test_send_rejects_bad_arguments(model_and_tok):
  model, tok = model_and_tok
  chat = nemojax.ChatSession(model, tokenizer=tok)
  with pytest.raises(ValueError, match="message"):
    chat.send(["hi"])
  with pytest.raises(ValueError, match="sampler"):
    chat.send("hi", sampler=None)
  with pytest.raises(ValueError, match="unknown"):
    chat.send("hi", max_tokens=3)
  assert chat.history == []
  with pytest.raises(ValueError, match="tokenizer"):
    nemojax.ChatSession(model, tokenizer=None)


def test_generate_keeps_a_samplers_prefix_cache(model_and_tok):
  model, tok = model_and_tok
  sampler = nemojax.Sampler(model, prefill_chunk=32, prefix_cache=True)
  kw = dict(tokenizer=tok, max_new_tokens=12, temperature=0.0, prefill_chunk=32)
  first = nemojax.generate(model, "What is 2 + 2?", sampler=sampler, **kw)[0]
  again = nemojax.generate(model, "What is 2 + 2?", sampler=sampler, **kw)[0]
  prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}],
                                   add_generation_prompt=True, tokenize=True)
  assert first.cached_prompt_tokens == 0 and again.cached_prompt_tokens == len(prompt) - 1
  assert again.tokens == first.tokens
