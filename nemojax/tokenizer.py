"""Tokenizer of Nemotron-H checkpoints, and streaming detokenisation.

`Tokenizer` reads a Hugging Face fast tokenizer (`tokenizer.json`) with the `tokenizers` library
and renders chat prompts with the checkpoint's Jinja template (`chat_template.py`: the sandbox,
the template files and the ``/think`` / ``/no_think`` reasoning switch), so prompts equal
`transformers.AutoTokenizer.apply_chat_template`'s.

Also: `DecodeStream` (streaming text that never shows half a UTF-8 character) and the
thinking-budget token data for the sampler (`think_tokens`, `budget_close_ids`,
`newline_token_mask`). A small BPE trainer for tests and the demo is `nemojax.demo.bpe`.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import tokenizers
from tokenizers import decoders as tk_decoders

from nemojax.chat_template import (
  BUDGET_CLOSE_TEXT,
  BUILTIN_SOURCE,
  END_OF_TURN,
  THINK_CLOSE,
  THINK_OFF,
  THINK_ON,
  THINK_OPEN,
  ChatTemplateError,
  builtin_chat_template,
  compile_template,
  load_chat_templates,
  reasoning_enabled,
  render_chat,
  select_template,
  set_reasoning,
)

# The chat-template names are re-exported: callers import them from here.
__all__ = [
    "BUDGET_CLOSE_TEXT", "END_OF_TURN", "THINK_CLOSE", "THINK_OFF", "THINK_ON", "THINK_OPEN",
    "ChatTemplateError", "DecodeStream", "ThinkTokens", "Tokenizer", "builtin_chat_template",
    "reasoning_enabled", "set_reasoning",
]

# transformers' named special-token attributes; the chat template sees each one as a variable.
_NAMED_SPECIAL_TOKENS = (
    "bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token",
)


class ThinkTokens(NamedTuple):
  """Token ids of the reasoning delimiters; each is one id or several BPE pieces."""

  open: tuple[int, ...]
  close: tuple[int, ...]


# --------------------------------------------------------------------------------------------------
# Checkpoint files


def _read_json(path: Path) -> dict[str, Any]:
  if not path.is_file():
    return {}
  try:
    data = json.loads(path.read_text(encoding="utf-8"))
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from e
  if not isinstance(data, dict):
    raise ValueError(f"{path} should hold a JSON object, found {type(data).__name__}")
  return data


def _token_text(value: Any) -> str | None:
  """Special tokens are stored as strings or as serialised AddedTokens ({"content": ...})."""
  if isinstance(value, dict):
    value = value.get("content")
  return value if isinstance(value, str) else None


# --------------------------------------------------------------------------------------------------
# Tokenizer


class Tokenizer:
  """A Nemotron-H tokenizer: `tokenizers` for ids, Jinja for chat prompts.

  Build one with `Tokenizer.from_pretrained(directory)`.

  Attributes:
    backend: The underlying `tokenizers.Tokenizer`.
    special_tokens: Named special tokens (``bos_token``, ``eos_token``, ...) as strings.
    chat_templates: Named chat templates; ``"default"`` is the one normally used.
    chat_template_source: Where the templates were read from (a path, or the built-in template).
  """

  def __init__(
      self,
      backend: tokenizers.Tokenizer,
      special_tokens: Mapping[str, str] | None = None,
      chat_templates: Mapping[str, str] | None = None,
      chat_template_source: str = "<given>",
      extra_eos_ids: Sequence[int] = (),
      name_or_path: str = "",
  ):
    """Wraps a `tokenizers.Tokenizer` (prefer `from_pretrained`); the attributes above, plus
    `extra_eos_ids` (e.g. generation_config.json's) and `name_or_path` for messages.
    """
    self.backend = backend
    self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
    if chat_templates is None:
      chat_templates, chat_template_source = {"default": builtin_chat_template()}, BUILTIN_SOURCE
    self.chat_templates = dict(chat_templates)
    self.chat_template_source = chat_template_source
    self.name_or_path = name_or_path
    for template in self.chat_templates.values():  # fail at load time, not at the first prompt
      compile_template(template, chat_template_source)
    self._extra_eos_ids = tuple(int(i) for i in extra_eos_ids)

  @classmethod
  def from_pretrained(cls, path: str | os.PathLike) -> Tokenizer:
    """Reads a Hugging Face tokenizer directory.

    Reads ``tokenizer.json`` (required), ``tokenizer_config.json`` (special tokens, chat template),
    ``special_tokens_map.json``, ``chat_template.jinja`` and ``additional_chat_templates/*.jinja``
    (which take priority over the config's template, as in transformers), and the eos ids of
    ``generation_config.json`` when present.

    Args:
      path: The checkpoint or tokenizer directory.

    Returns:
      The tokenizer.

    Raises:
      FileNotFoundError: `path` is not a directory or has no tokenizer.json.
      ValueError: A file is malformed; ChatTemplateError when the template is not valid Jinja.
    """
    directory = Path(path)
    if not directory.is_dir():
      raise FileNotFoundError(f"Tokenizer directory {str(directory)!r} does not exist (expected a "
                              "checkpoint directory holding tokenizer.json).")
    tokenizer_file = directory / "tokenizer.json"
    if not tokenizer_file.is_file():
      present = ", ".join(sorted(p.name for p in directory.iterdir())[:20]) or "nothing"
      raise FileNotFoundError(
          f"No tokenizer.json in {str(directory)!r} (it holds: {present}). nemojax needs the "
          "Hugging Face fast-tokenizer file; a sentencepiece tokenizer.model is not supported.")
    try:
      backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
      raise ValueError(f"Could not read {tokenizer_file}: {e}") from e
    config = _read_json(directory / "tokenizer_config.json")
    special_map = _read_json(directory / "special_tokens_map.json")
    special = {}
    for name in _NAMED_SPECIAL_TOKENS:
      text = _token_text(config.get(name)) or _token_text(special_map.get(name))
      if text is not None:
        special[name] = text
    templates, source = load_chat_templates(directory, config)
    generation = _read_json(directory / "generation_config.json")
    eos = generation.get("eos_token_id")
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return cls(backend, special, templates, source, eos, str(directory))

  def __repr__(self) -> str:
    return (f"Tokenizer({self.name_or_path!r}, vocab_size={self.vocab_size}, "
            f"eos_ids={self.eos_ids}, chat_template={self.chat_template_source!r})")

  # ---------------------------------------------------------------------------- ids and text

  def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
    """Token ids of `text`.

    Args:
      text: The text; special-token strings in it (``<SPECIAL_11>``) become their single ids.
      add_special_tokens: Apply tokenizer.json's post-processor (e.g. prepend ``<s>``). Chat
        prompts never want it: the template writes every control token itself.
    """
    return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

  def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
    """`encode` for many texts (in parallel, in Rust)."""
    return [e.ids for e in self.backend.encode_batch(list(texts),
                                                      add_special_tokens=add_special_tokens)]

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
    """Text of `ids` (a list, tuple or 1-D integer array)."""
    return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def token_to_id(self, token: str) -> int | None:
    """Id of a vocabulary entry (e.g. ``"<SPECIAL_12>"``), or None when absent."""
    return self.backend.token_to_id(token)

  def id_to_token(self, token_id: int) -> str | None:
    """Vocabulary entry of an id (byte-level form, e.g. ``"Ġthe"``), or None when out of range."""
    return self.backend.id_to_token(int(token_id))

  def decode_stream(self, skip_special_tokens: bool = False) -> DecodeStream:
    """A new `DecodeStream` over this tokenizer."""
    return DecodeStream(self, skip_special_tokens=skip_special_tokens)

  @property
  def vocab_size(self) -> int:
    """Entries in the tokenizer, added tokens included (the model's embedding may be larger)."""
    return self.backend.get_vocab_size(with_added_tokens=True)

  def _special_id(self, name: str) -> int | None:
    text = self.special_tokens.get(name)
    return None if text is None else self.token_to_id(text)

  @property
  def bos_id(self) -> int | None:
    """Id of ``bos_token`` (``<s>`` = 1 for Nemotron)."""
    return self._special_id("bos_token")

  @property
  def eos_ids(self) -> tuple[int, ...]:
    """Ids that end generation: ``eos_token``, generation_config's ids, and ``<SPECIAL_12>``.

    ``<SPECIAL_12>`` closes every turn in Nemotron's chat format, so it stops generation whenever
    the vocabulary has it, even if no generation_config.json says so.
    """
    ids = [self._special_id("eos_token"), *self._extra_eos_ids, self.token_to_id(END_OF_TURN)]
    return tuple(dict.fromkeys(i for i in ids if i is not None))

  @property
  def pad_id(self) -> int:
    """Id used to pad batches: ``pad_token``, else ``unk_token``, else the first eos id."""
    for name in ("pad_token", "unk_token"):
      token_id = self._special_id(name)
      if token_id is not None:
        return token_id
    if self.eos_ids:
      return self.eos_ids[0]
    raise ValueError(f"Tokenizer {self.name_or_path!r} defines no pad, unk or eos token; set "
                     "pad_token in its tokenizer_config.json.")

  # ---------------------------------------------------------------------------- chat template

  @property
  def chat_template(self) -> str:
    """The default chat template text."""
    return self.chat_templates.get("default") or next(iter(self.chat_templates.values()))

  def apply_chat_template(
      self,
      messages: Sequence[Mapping[str, Any]],
      add_generation_prompt: bool = True,
      thinking: bool | None = None,
      tokenize: bool = False,
      *,
      tools: Sequence[Mapping[str, Any]] | None = None,
      documents: Sequence[Mapping[str, Any]] | None = None,
      chat_template: str | None = None,
      **kwargs: Any,
  ) -> str | list[int]:
    """Renders a conversation into a prompt, as transformers' `apply_chat_template` does.

    Args:
      messages: Dicts with ``role`` (``system``, ``user``, ``assistant``, ``tool``) and
        ``content``; assistant messages may carry ``tool_calls``.
      add_generation_prompt: End with the assistant header (and the ``<think>`` prefix) so the
        model answers next. Note the default differs from transformers' (False).
      thinking: None keeps the markers in the messages (reasoning on by default). True or False
        overrides them: markers are removed from system and user messages and one ``/think`` or
        ``/no_think`` goes into the system message, created when absent (see `set_reasoning`).
        It is also passed to the template as ``enable_thinking`` for templates that read that.
      tokenize: Return token ids (no post-processor: the template writes every control token).
      tools: Tool JSON schemas, for templates that support tools.
      documents: Retrieval documents, for templates that support them.
      chat_template: A template name (from `chat_templates`) or Jinja text to use instead.
      **kwargs: More template variables; they override the special-token variables.

    Returns:
      The prompt text, or its ids when `tokenize`.

    Raises:
      ValueError: `messages` is empty or not a list of role/content dicts.
      ChatTemplateError: The template failed (e.g. its ``raise_exception`` rejected the messages).
    """
    template = select_template(self.chat_templates, self.chat_template_source, chat_template,
                               tools)
    source = self.chat_template_source if chat_template is None else "the chat_template argument"
    variables = {**self.special_tokens, **kwargs, "tools": tools, "documents": documents}
    text = render_chat(template, source, messages, add_generation_prompt=add_generation_prompt,
                       thinking=thinking, variables=variables)
    return self.encode(text) if tokenize else text

  def reasoning_enabled(self, messages: Sequence[Mapping[str, Any]],
                        thinking: bool | None = None) -> bool:
    """Whether the prompt for `messages` opens a reasoning block (`chat_template`'s function)."""
    return reasoning_enabled(messages, thinking)

  # ---------------------------------------------------------------------------- thinking budget

  @functools.cached_property
  def _think_tokens(self) -> ThinkTokens:
    return ThinkTokens(tuple(self.encode(THINK_OPEN)), tuple(self.encode(THINK_CLOSE)))

  def think_tokens(self) -> ThinkTokens:
    """Ids of ``<think>`` and ``</think>``: one id each when they are vocabulary entries.

    Otherwise the pieces each string encodes to alone. After a newline (as the model writes them)
    byte-level BPE gives the same pieces, but a preceding space or letter may merge into the first,
    so a multi-id match is a hint to confirm on the decoded text.
    """
    return self._think_tokens

  def budget_close_ids(self) -> tuple[int, ...]:
    """Ids of ``".\\n</think>\\n\\n"``, forced when the thinking budget runs out (SPEC 5)."""
    return tuple(self.encode(BUDGET_CLOSE_TEXT))

  @functools.cached_property
  def _newline_mask(self) -> np.ndarray:
    ids = [[i] for i in range(self.vocab_size)]
    texts = self.backend.decode_batch(ids, skip_special_tokens=False)
    mask = np.fromiter(("\n" in t for t in texts), dtype=bool, count=len(texts))
    mask.flags.writeable = False
    return mask

  def newline_token_mask(self, size: int | None = None) -> np.ndarray:
    """Read-only ``bool[size]`` mask of tokens whose text has a newline ("newline" budget policy).

    Args:
      size: Mask length, e.g. the model's padded vocabulary; ids past the tokenizer's are False.
        Defaults to `vocab_size`.
    """
    mask = self._newline_mask
    if size is None or size == mask.shape[0]:
      return mask
    if size < mask.shape[0]:
      raise ValueError(f"newline_token_mask(size={size}) is smaller than the tokenizer's "
                       f"vocabulary ({mask.shape[0]} entries); pass the model's vocab_size.")
    out = np.zeros(size, dtype=bool)
    out[:mask.shape[0]] = mask
    return out


# --------------------------------------------------------------------------------------------------
# Streaming detokenisation


class DecodeStream:
  """Turns a stream of token ids into text deltas without splitting UTF-8 characters.

  Byte-level BPE spreads one character (emoji, most CJK) over several tokens; decoding each token
  alone would print U+FFFD halves. `step` returns only text later tokens cannot change (via
  `tokenizers.decoders.DecodeStream`), `finish` what is held back: all deltas joined equal
  ``decode(all ids)`` exactly.

  Example:
    stream = tok.decode_stream()
    for token_id in generated:
      print(stream.step(token_id), end="", flush=True)
    print(stream.finish())
  """

  def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
    """Starts an empty stream over `tokenizer`'s decoder."""
    self._tokenizer = tokenizer
    self._skip = skip_special_tokens
    self._stream = tk_decoders.DecodeStream(skip_special_tokens=skip_special_tokens)
    self._ids: list[int] = []
    self._emitted: list[str] = []

  def step(self, token_ids: int | Iterable[int]) -> str:
    """Adds one id (or several) and returns the newly stable text ("" while a character is open)."""
    if isinstance(token_ids, (int, np.integer)):
      token_ids = (token_ids,)
    pieces = []
    for token_id in map(int, token_ids):
      self._ids.append(token_id)
      pieces.append(self._stream.step(self._tokenizer.backend, token_id) or "")
    delta = "".join(pieces)
    if delta:
      self._emitted.append(delta)
    return delta

  def finish(self) -> str:
    """Returns the text held back; an unfinished character becomes U+FFFD, as in `decode`."""
    full = self._tokenizer.decode(self._ids, skip_special_tokens=self._skip)
    done = self.text
    tail = full[len(done):] if full.startswith(done) else ""
    if tail:
      self._emitted.append(tail)
    return tail

  @property
  def text(self) -> str:
    """All text returned so far."""
    return "".join(self._emitted)

  @property
  def ids(self) -> tuple[int, ...]:
    """All ids fed so far."""
    return tuple(self._ids)
