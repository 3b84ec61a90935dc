"""Tests for nemojax.tokenizer and nemojax.chat_template: chat template, reasoning switch,
streaming, thinking-budget data, and the demo's BPE trainer.

Chat prompts are checked twice: against the strings of SPEC section 5 written out by hand, and
against transformers' `AutoTokenizer.apply_chat_template` run on the same directory (same template,
same tiny tokenizer trained here), text and ids. transformers is a test-only dependency.
"""

import json
import shutil

import numpy as np
import pytest

from nemojax import chat_template as ct
from nemojax import tokenizer as tkz
from nemojax.demo.bpe import build_tokenizer

SYS, USR, AST = "<SPECIAL_10>System\n", "<SPECIAL_11>User\n", "<SPECIAL_11>Assistant\n"
EOT = "<SPECIAL_12>"
ON, OFF = "<think>\n", "<think></think>"

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! How are you today?\nI am fine, thanks.",
    "Mamba layers keep a state; attention layers keep a cache.",
    "日本語のテキストと中文文本，还有한국어.",
    "Emoji: 😀 🎉 👍🏽 🇫🇷 and the family 👨‍👩‍👧.",
    "<think>\nLet me reason about it.\n</think>\n\nThe answer is 42.",
    "def f(x):\n    return x * 2\n",
] * 30


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  """A tokenizer whose <think> and </think> are single special tokens."""
  out = tmp_path_factory.mktemp("tok_special")
  build_tokenizer(CORPUS, 700, out, think_as_special=True)
  return out


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory):
  """A tokenizer that spells <think> and </think> with several BPE tokens."""
  out = tmp_path_factory.mktemp("tok_plain")
  build_tokenizer(CORPUS, 700, out, think_as_special=False)
  return out


@pytest.fixture(scope="module")
def tok(tok_dir):
  return tkz.Tokenizer.from_pretrained(tok_dir)


@pytest.fixture(scope="module")
def hf_tok(tok_dir):
  transformers = pytest.importorskip("transformers")
  return transformers.AutoTokenizer.from_pretrained(str(tok_dir))


def _render_both(tok, hf_tok, messages, **kwargs):
  """Our prompt (text and ids) after checking transformers gives the same for the same call."""
  text = tok.apply_chat_template(messages, **kwargs)
  ids = tok.apply_chat_template(messages, tokenize=True, **kwargs)
  add = kwargs.pop("add_generation_prompt", True)
  thinking = kwargs.pop("thinking", None)
  if thinking is not None:  # transformers has no switch: give it the messages ours renders
    messages = ct.set_reasoning(messages, thinking)
  hf_text = hf_tok.apply_chat_template(messages, add_generation_prompt=add, tokenize=False,
                                       **kwargs)
  hf_ids = hf_tok.apply_chat_template(messages, add_generation_prompt=add, tokenize=True,
                                      return_dict=False, **kwargs)
  assert text == hf_text
  assert ids == list(hf_ids)
  assert tok.decode(ids) == text
  return text


# ------------------------------------------------------------------------------------ chat format

SPEC_CASES = {
    "system_user": (
        [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hi"}],
        f"{SYS}You are helpful.\n{USR}Hi\n{AST}{ON}"),
    "no_system": (
        [{"role": "user", "content": "Hi"}],
        f"{SYS}\n{USR}Hi\n{AST}{ON}"),
    "no_think_in_system": (
        [{"role": "system", "content": "You are helpful. /no_think"},
         {"role": "user", "content": "Hi"}],
        f"{SYS}You are helpful.\n{USR}Hi\n{AST}{OFF}"),
    "no_think_alone": (
        [{"role": "system", "content": "/no_think"}, {"role": "user", "content": "Hi"}],
        f"{SYS}\n{USR}Hi\n{AST}{OFF}"),
    "think_in_user_wins": (
        [{"role": "system", "content": "/no_think"}, {"role": "user", "content": "Hi /think"}],
        f"{SYS}\n{USR}Hi\n{AST}{ON}"),
    "last_user_no_think_wins": (
        [{"role": "system", "content": "S /think"}, {"role": "user", "content": "Q1"},
         {"role": "assistant", "content": "A1"}, {"role": "user", "content": "/no_think Q2"}],
        f"{SYS}S\n{USR}Q1\n{AST}A1\n{EOT}\n{USR}Q2\n{AST}{OFF}"),
    "multi_turn_drops_reasoning": (
        [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
         {"role": "assistant", "content": "<think>\nsecret steps\n</think>\n\nA1"},
         {"role": "user", "content": "Q2"}],
        f"{SYS}S\n{USR}Q1\n{AST}A1\n{EOT}\n{USR}Q2\n{AST}{ON}"),
    "prefill_final_assistant": (
        [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "The answer is"}],
        f"{SYS}\n{USR}Q\n{AST}{ON}The answer is"),
}


@pytest.mark.parametrize("case", sorted(SPEC_CASES))
def test_prompt_matches_spec_and_transformers(tok, hf_tok, case):
  messages, expected = SPEC_CASES[case]
  assert _render_both(tok, hf_tok, messages) == expected


def test_prompt_without_generation_prompt(tok, hf_tok):
  messages = [{"role": "user", "content": "Q"},
              {"role": "assistant", "content": "<think>r</think>A"}]
  # A final assistant turn is written whole, reasoning included (it is a prefill), then closed.
  expected = f"{SYS}\n{USR}Q\n{AST}{ON}<think>r</think>A\n{EOT}\n"
  assert _render_both(tok, hf_tok, messages, add_generation_prompt=False) == expected


def test_tools_and_tool_calls(tok, hf_tok):
  tools = [{"type": "function", "function": {"name": "weather", "description": "Météo <now>",
                                             "parameters": {"type": "object"}}}]
  messages = [
      {"role": "user", "content": "Weather in Paris?"},
      {"role": "assistant", "content": "", "tool_calls": [
          {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}]},
      {"role": "tool", "content": "20C"}, {"role": "tool", "content": "sunny"},
  ]
  text = _render_both(tok, hf_tok, messages, tools=tools)
  # tojson as transformers does it: no HTML escaping, no ASCII escaping.
  assert '<AVAILABLE_TOOLS>[{"name": "weather", "description": "Météo <now>", ' in text
  assert (f'{AST}<TOOLCALL>[{{"name": "weather", "arguments": {{"city": "Paris"}}}}]</TOOLCALL>\n'
          f'{EOT}\n{USR}<TOOL_RESPONSE>[20C, sunny]</TOOL_RESPONSE>\n{AST}{ON}') in text


@pytest.mark.parametrize("thinking", [True, False])
@pytest.mark.parametrize("case", ["system_user", "no_system", "think_in_user_wins",
                                  "last_user_no_think_wins"])
def test_thinking_argument_overrides_markers(tok, hf_tok, case, thinking):
  messages, expected = SPEC_CASES[case]
  original = json.dumps(messages)
  text = _render_both(tok, hf_tok, messages, thinking=thinking)
  assert json.dumps(messages) == original  # the caller's messages are not modified
  head = expected.rsplit(AST, 1)[0]
  assert text == head + AST + (ON if thinking else OFF)  # same text, only the switch differs
  assert ct.reasoning_enabled(messages, thinking) is thinking


@pytest.mark.parametrize("case", sorted(SPEC_CASES))
def test_reasoning_enabled_agrees_with_template(tok, case):
  messages, _ = SPEC_CASES[case]
  text = tok.apply_chat_template(messages)
  assert tok.reasoning_enabled(messages) == (OFF not in text.rsplit(AST, 1)[1])


def test_set_reasoning_creates_or_extends_system():
  assert ct.set_reasoning([{"role": "user", "content": "a /think"}], False) == [
      {"role": "system", "content": "/no_think"}, {"role": "user", "content": "a "}]
  assert ct.set_reasoning([{"role": "system", "content": "Be brief.\n"}], True) == [
      {"role": "system", "content": "Be brief.\n/think"}]


# ------------------------------------------------------------------------------------ templates


def test_builtin_template_when_checkpoint_has_none(tok_dir, tmp_path):
  shutil.copy(tok_dir / "tokenizer.json", tmp_path / "tokenizer.json")
  tok = tkz.Tokenizer.from_pretrained(tmp_path)
  assert "built-in" in tok.chat_template_source
  assert tok.chat_template == ct.builtin_chat_template()
  hi = [{"role": "user", "content": "Hi"}]
  assert tok.apply_chat_template(hi) == f"{SYS}\n{USR}Hi\n{AST}{ON}"
  assert tok.bos_id is None and tok.eos_ids == (12,)  # no config: only the end-of-turn token


def test_chat_template_jinja_file_wins(tok_dir, tmp_path):
  for name in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(tok_dir / name, tmp_path / name)
  (tmp_path / "chat_template.jinja").write_text(
      "{% for m in messages %}[{{ m.role }}|{{ m.content }}]{% endfor %}"
      "{% generation %}{{ bos_token }}{% endgeneration %}{{ strftime_now('%Y')|length }}")
  tok = tkz.Tokenizer.from_pretrained(tmp_path)
  assert tok.chat_template_source.endswith("chat_template.jinja")
  assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "[user|x]<s>4"


def test_named_templates_in_config(tok_dir, tmp_path):
  shutil.copy(tok_dir / "tokenizer.json", tmp_path / "tokenizer.json")
  config = {"chat_template": [{"name": "default", "template": "D"},
                              {"name": "tool_use", "template": "T{{ tools|length }}"}]}
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
  tok = tkz.Tokenizer.from_pretrained(tmp_path)
  messages = [{"role": "user", "content": "x"}]
  assert tok.apply_chat_template(messages) == "D"
  assert tok.apply_chat_template(messages, tools=[{"name": "f"}]) == "T1"
  assert tok.apply_chat_template(messages, chat_template="tool_use", tools=[]) == "T0"


def test_malformed_template_names_the_file(tok_dir, tmp_path):
  shutil.copy(tok_dir / "tokenizer.json", tmp_path / "tokenizer.json")
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% if x %}oops"}))
  with pytest.raises(ct.ChatTemplateError, match=r"tokenizer_config\.json.*not valid Jinja"):
    tkz.Tokenizer.from_pretrained(tmp_path)


def test_raise_exception_in_template(tok):
  template = "{{ raise_exception('roles must alternate') }}"
  with pytest.raises(ct.ChatTemplateError, match="roles must alternate"):
    tok.apply_chat_template([{"role": "user", "content": "x"}], chat_template=template)


@pytest.mark.parametrize("messages", [[], "Hi", [{"content": "no role"}]])
def test_bad_messages(tok, messages):
  with pytest.raises(ValueError, match="messages"):
    tok.apply_chat_template(messages)


def test_missing_tokenizer_json_names_the_path(tmp_path):
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match=rf"No tokenizer\.json in '{tmp_path}'.*config\.json"):
    tkz.Tokenizer.from_pretrained(tmp_path)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    tkz.Tokenizer.from_pretrained(tmp_path / "nope")


def test_malformed_config_json_names_the_file(tok_dir, tmp_path):
  shutil.copy(tok_dir / "tokenizer.json", tmp_path / "tokenizer.json")
  (tmp_path / "tokenizer_config.json").write_text("{not json")
  with pytest.raises(ValueError, match=r"tokenizer_config\.json is not valid JSON"):
    tkz.Tokenizer.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------------ ids and text


def test_special_ids(tok, tok_dir, tmp_path):
  assert (tok.bos_id, tok.eos_ids, tok.pad_id) == (1, (2, 12), 0)
  assert [tok.token_to_id(t) for t in ("<unk>", "<s>", "</s>", "<SPECIAL_10>", "<SPECIAL_11>",
                                       "<SPECIAL_12>", "<think>", "</think>")] == [
                                           0, 1, 2, 10, 11, 12, 16, 17]
  assert tok.id_to_token(11) == "<SPECIAL_11>" and tok.token_to_id("<nope>") is None
  assert 300 < tok.vocab_size <= 700
  for name in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(tok_dir / name, tmp_path / name)
  (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
  assert tkz.Tokenizer.from_pretrained(tmp_path).eos_ids == (2, 5, 12)


@pytest.mark.parametrize("text", [
    "Hello, world!", "  leading and trailing spaces  ", "日本語 😀👍🏽 mixed\n\ttabs",
    f"{AST}<think>\nx</think>\n\nanswer{EOT}", "",
])
def test_encode_decode_round_trip(tok, hf_tok, text):
  ids = tok.encode(text)
  assert tok.decode(ids) == text
  assert ids == hf_tok.encode(text, add_special_tokens=False)
  assert tok.encode(text, add_special_tokens=True) == [1, *ids]
  assert tok.encode_batch([text, text]) == [ids, ids]


def test_special_tokens_are_single_ids_and_skippable(tok):
  ids = tok.encode(f"{USR}Hi\n{AST}")
  assert ids[0] == 11 and ids.count(11) == 2
  assert tok.decode(ids, skip_special_tokens=True) == "User\nHi\nAssistant\n"
  assert tok.decode(np.array(ids)) == f"{USR}Hi\n{AST}"


# ------------------------------------------------------------------------------------ streaming

STREAM_TEXT = "Emoji: 😀 🎉 👍🏽 🇫🇷, 👨‍👩‍👧; 日本語のテキスト, 中文文本, 한국어.\n<think>ok</think>"


@pytest.mark.parametrize("skip", [False, True])
def test_decode_stream_never_splits_characters(tok, skip):
  ids = tok.encode(STREAM_TEXT)
  stream = tok.decode_stream(skip_special_tokens=skip)
  deltas = [stream.step(i) for i in ids]
  deltas.append(stream.finish())
  assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)
  assert not any("\ufffd" in d for d in deltas)
  assert deltas.count("") > 3  # the tiny vocabulary really does split these characters
  for k in range(len(ids) + 1):
    shown, full = "".join(deltas[:k]), tok.decode(ids[:k], skip_special_tokens=skip)
    assert full.startswith(shown)
    if not full.endswith("\ufffd"):  # nothing is held back once the last character is complete
      assert shown == full


def test_decode_stream_flushes_an_unfinished_character(tok):
  emoji = tok.encode("😀")
  assert len(emoji) > 1
  ids = tok.encode("ab") + emoji[:-1]
  stream = tok.decode_stream()
  shown = stream.step(ids)  # several ids at once
  tail = stream.finish()
  assert shown == "ab" and tail == tok.decode(ids)[2:] and "\ufffd" in tail
  assert stream.ids == tuple(ids)


# ------------------------------------------------------------------------------------ budget data


def test_budget_ids_single_think_tokens(tok):
  assert tok.think_tokens() == tkz.ThinkTokens(open=(16,), close=(17,))
  close = tok.budget_close_ids()
  assert tok.decode(close) == ".\n</think>\n\n" and 17 in close
  prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=True)
  assert tuple(prompt[-2:]) == (16, tok.encode("\n")[0])


def test_budget_ids_multi_token_think(plain_dir):
  tok = tkz.Tokenizer.from_pretrained(plain_dir)
  assert tok.token_to_id("<think>") is None
  think = tok.think_tokens()
  assert len(think.open) > 1 and len(think.close) > 1
  assert tok.decode(think.open) == "<think>" and tok.decode(think.close) == "</think>"
  close = tok.budget_close_ids()
  assert tok.decode(close) == ".\n</think>\n\n"

  def contains(seq, sub):
    return any(tuple(seq[i:i + len(sub)]) == sub for i in range(len(seq) - len(sub) + 1))

  # After a newline, as the model writes them, the tags encode to the same pieces.
  assert contains(close, think.close)
  prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=True)
  assert contains(prompt, think.open)


def test_newline_token_mask(tok):
  mask = tok.newline_token_mask()
  assert mask.shape == (tok.vocab_size,) and mask.dtype == np.bool_
  expected = ["\n" in tok.decode([i]) for i in range(tok.vocab_size)]
  assert mask.tolist() == expected
  assert mask[tok.encode("\n")[0]] and not mask[tok.token_to_id("<SPECIAL_12>")]
  assert not mask[tok.encode("a")[0]]
  padded = tok.newline_token_mask(size=1024)
  assert padded.shape == (1024,) and padded[:tok.vocab_size].tolist() == expected
  assert not padded[tok.vocab_size:].any()
  with pytest.raises(ValueError, match="smaller than the tokenizer's vocabulary"):
    tok.newline_token_mask(size=10)


def test_build_tokenizer_rejects_bad_sizes(tmp_path):
  with pytest.raises(ValueError, match="vocab_size=100"):
    build_tokenizer(CORPUS, 100, tmp_path)
  with pytest.raises(ValueError, match="num_reserved=8"):
    build_tokenizer(CORPUS, 500, tmp_path, num_reserved=8)


# A template switched by the `enable_thinking` variable alone, as public descriptions give
# Nemotron 3's (Qwen-style turns; reasoning off appends an empty think block). Written for this
# test, not NVIDIA's file.
VARIABLE_SWITCHED = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think></think>"
    "{% else %}<think>\n{% endif %}{% endif %}")


@pytest.mark.parametrize("thinking", [True, False])
def test_variable_switched_template_gets_no_marker_text(thinking):
  messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
  text = ct.render_chat(VARIABLE_SWITCHED, "test", messages, add_generation_prompt=True,
                        thinking=thinking, variables={})
  assert "/think" not in text.replace("</think>", "") and "/no_think" not in text
  assert text.endswith("<think>\n" if thinking else "<think></think>")
  assert "Be brief.<|im_end|>" in text  # the system message is left as written


@pytest.mark.parametrize("thinking", [True, False])
def test_marker_templates_still_get_markers(tok, thinking):
  """NVIDIA's Nano-9B-v2 template reads /think and /no_think: the switch writes the marker, so
  `thinking=` renders exactly what the marker written by hand does."""
  marker = "/think" if thinking else "/no_think"
  by_argument = tok.apply_chat_template([{"role": "user", "content": "Hi"}], thinking=thinking)
  by_hand = tok.apply_chat_template([{"role": "system", "content": marker},
                                     {"role": "user", "content": "Hi"}])
  assert by_argument == by_hand
