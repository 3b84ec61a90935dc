"""Tokenizer, chat template and reasoning control for Nemotron-H checkpoints.

`Tokenizer` reads a Hugging Face fast tokenizer (`tokenizer.json`) with the `tokenizers` library
and renders chat prompts with the checkpoint's Jinja template in a sandbox set up as transformers
sets it up (trim_blocks, lstrip_blocks, loopcontrols, ``{% generation %}``, HF's `tojson`,
`raise_exception`, `strftime_now`, special tokens as variables), so prompts equal
`transformers.AutoTokenizer.apply_chat_template`'s. Checkpoints without a template get the built-in
`templates/nemotron_h.jinja`, which renders what NVIDIA-Nemotron-Nano-9B-v2's template renders.

Reasoning control (SPEC section 5): ``/think`` or ``/no_think`` in a system or user message switches
reasoning on or off, the last such message wins, the default is on. The prompt then ends in
``<SPECIAL_11>Assistant\\n<think>\\n`` or ``<SPECIAL_11>Assistant\\n<think></think>``.

Also: `DecodeStream` (streaming text that never shows half a UTF-8 character), the thinking-budget
token data for the sampler (`think_tokens`, `budget_close_ids`, `newline_token_mask`), and
`build_tokenizer`, which trains a small byte-level BPE with Nemotron's special tokens (tests, demo).
"""

from __future__ import annotations

import datetime
import functools
import importlib.resources
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import numpy as np
import tokenizers
from tokenizers import decoders as tk_decoders

__all__ = [
    "ChatTemplateError", "DecodeStream", "ThinkTokens", "Tokenizer", "build_tokenizer",
    "builtin_chat_template", "reasoning_enabled", "set_reasoning",
]

THINK_ON = "/think"
THINK_OFF = "/no_think"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
# NVIDIA's client closes an unfinished thought with this text when the budget runs out.
BUDGET_CLOSE_TEXT = ".\n</think>\n\n"
# Nemotron's end-of-turn token; generation stops on it as well as on `</s>`.
END_OF_TURN = "<SPECIAL_12>"

# transformers' named special-token attributes; the chat template sees each one as a variable.
_NAMED_SPECIAL_TOKENS = (
    "bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token",
)
_BUILTIN_SOURCE = "nemojax built-in template (nemojax/templates/nemotron_h.jinja)"


class ChatTemplateError(ValueError):
  """A chat template failed to compile, or refused to render the given messages."""


class ThinkTokens(NamedTuple):
  """Token ids of the reasoning delimiters; each is one id or several BPE pieces."""

  open: tuple[int, ...]
  close: tuple[int, ...]


# --------------------------------------------------------------------------------------------------
# Reasoning switch


def reasoning_enabled(messages: Sequence[Mapping[str, Any]], thinking: bool | None = None) -> bool:
  """Whether NVIDIA's template (and the built-in one) will open a reasoning block.

  Args:
    messages: Chat messages (dicts with ``role`` and ``content``).
    thinking: The explicit switch passed to `Tokenizer.apply_chat_template`, if any; it wins.

  Returns:
    True unless the last system or user message that contains ``/think`` or ``/no_think`` contains
    only ``/no_think``.
  """
  if thinking is not None:
    return bool(thinking)
  enabled = True
  for message in messages:
    content = message.get("content")
    if message.get("role") in ("system", "user") and isinstance(content, str):
      if THINK_ON in content:  # tested first, as the template does
        enabled = True
      elif THINK_OFF in content:
        enabled = False
  return enabled


def set_reasoning(messages: Sequence[Mapping[str, Any]], thinking: bool) -> list[dict[str, Any]]:
  """Returns a copy of `messages` whose only reasoning marker is ``/think`` or ``/no_think``.

  The last marker in a system or user message wins, so the existing ones are removed (the template
  drops them from the text anyway) and the new one is appended to the system message, where NVIDIA
  documents it; an empty system message is created if needed (it renders like none at all).

  Args:
    messages: Chat messages; not modified.
    thinking: True for ``/think``, False for ``/no_think``.

  Returns:
    New message dicts.
  """
  marker = THINK_ON if thinking else THINK_OFF
  out = []
  for message in messages:
    message = dict(message)
    if message.get("role") in ("system", "user") and isinstance(message.get("content"), str):
      message["content"] = message["content"].replace(THINK_ON, "").replace(THINK_OFF, "")
    out.append(message)
  if not out or out[0].get("role") != "system":
    out.insert(0, {"role": "system", "content": ""})
  content = out[0].get("content")
  if isinstance(content, list):  # OpenAI-style content parts
    out[0]["content"] = [*content, {"type": "text", "text": marker}]
  else:
    text = (content or "").rstrip()
    out[0]["content"] = f"{text}\n{marker}" if text else marker
  return out


# --------------------------------------------------------------------------------------------------
# Chat template rendering


class _GenerationTag(jinja2.ext.Extension):
  """Accepts transformers' ``{% generation %}...{% endgeneration %}`` blocks and renders the body.

  transformers uses the tag to mark assistant tokens for training masks; rendering only needs the
  text, but a template that uses it must still compile.
  """

  tags = {"generation"}

  def parse(self, parser):
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
    return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

  def _render(self, caller):
    return caller()


def _raise_exception(message):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  # Jinja's own tojson escapes HTML characters and sorts keys; HF templates expect plain json.dumps.
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                    sort_keys=sort_keys)


def _strftime_now(fmt):
  return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=32)
def _compile(template: str, source: str) -> jinja2.Template:
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols])
  env.filters["tojson"] = _tojson
  env.globals["raise_exception"] = _raise_exception
  env.globals["strftime_now"] = _strftime_now
  try:
    return env.from_string(template)
  except jinja2.TemplateSyntaxError as e:
    raise ChatTemplateError(
        f"The chat template from {source} is not valid Jinja: {e.message} (template line "
        f"{e.lineno}). Fix the template there, or pass a valid one with chat_template=...") from e


def builtin_chat_template() -> str:
  """The text of nemojax's built-in Nemotron-H chat template (`templates/nemotron_h.jinja`)."""
  return (importlib.resources.files("nemojax") / "templates" / "nemotron_h.jinja").read_text(
      encoding="utf-8")


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


def _load_templates(directory: Path, config: dict[str, Any]) -> tuple[dict[str, str], str]:
  """Named chat templates and where they came from; chat_template.jinja wins, as in transformers."""
  templates: dict[str, str] = {}
  jinja_file = directory / "chat_template.jinja"
  extra_dir = directory / "additional_chat_templates"
  if jinja_file.is_file():
    templates["default"] = jinja_file.read_text(encoding="utf-8")
    source = str(jinja_file)
  if extra_dir.is_dir():
    for f in sorted(extra_dir.glob("*.jinja")):
      templates[f.name.removesuffix(".jinja")] = f.read_text(encoding="utf-8")
  if templates:
    return templates, (source if "default" in templates else str(extra_dir))
  source = str(directory / "tokenizer_config.json")
  value = config.get("chat_template")
  if isinstance(value, str):
    return {"default": value}, source
  if isinstance(value, list):  # [{"name": ..., "template": ...}, ...]
    try:
      return {t["name"]: t["template"] for t in value}, source
    except (KeyError, TypeError) as e:
      raise ValueError(
          f"{source}: chat_template is a list, so each entry needs 'name' and 'template' keys; "
          f"got {value!r:.200}") from e
  if value is not None:
    raise ValueError(f"{source}: chat_template should be a string or a list of "
                     f"{{name, template}} objects, got {type(value).__name__}")
  return {"default": builtin_chat_template()}, _BUILTIN_SOURCE


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
      chat_templates, chat_template_source = {"default": builtin_chat_template()}, _BUILTIN_SOURCE
    self.chat_templates = dict(chat_templates)
    self.chat_template_source = chat_template_source
    self.name_or_path = name_or_path
    for template in self.chat_templates.values():  # fail at load time, not at the first prompt
      _compile(template, chat_template_source)
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
    templates, source = _load_templates(directory, config)
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

  def _select_template(self, chat_template: str | None, tools: Any) -> str:
    # Same choice as transformers' get_chat_template.
    if chat_template is not None:
      return self.chat_templates.get(chat_template, chat_template)
    if tools is not None and "tool_use" in self.chat_templates:
      return self.chat_templates["tool_use"]
    if "default" in self.chat_templates:
      return self.chat_templates["default"]
    raise ChatTemplateError(
        f"{self.chat_template_source} has several chat templates and none named 'default'; pass "
        f"chat_template= one of {sorted(self.chat_templates)}.")

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
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
      raise ValueError(f"messages should be a non-empty list of {{'role', 'content'}} dicts, got "
                       f"{messages!r:.200}")
    for i, message in enumerate(messages):
      if not isinstance(message, Mapping) or "role" not in message:
        raise ValueError(f"messages[{i}] should be a dict with a 'role' key (and 'content'), got "
                         f"{message!r:.200}")
    if thinking is not None:
      messages = set_reasoning(messages, thinking)
      kwargs.setdefault("enable_thinking", bool(thinking))
    template = self._select_template(chat_template, tools)
    source = self.chat_template_source if chat_template is None else "the chat_template argument"
    compiled = _compile(template, source)
    variables = {**self.special_tokens, **kwargs}
    try:
      text = compiled.render(messages=list(messages), tools=tools, documents=documents,
                             add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.TemplateError as e:
      raise ChatTemplateError(f"The chat template from {source} failed on these messages: "
                              f"{e}") from e
    return self.encode(text) if tokenize else text

  def reasoning_enabled(self, messages: Sequence[Mapping[str, Any]],
                        thinking: bool | None = None) -> bool:
    """Whether the prompt for `messages` opens a reasoning block; see module `reasoning_enabled`."""
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


# --------------------------------------------------------------------------------------------------
# Building a small tokenizer


def build_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    out_dir: str | os.PathLike,
    think_as_special: bool = True,
    chat_template: str | None = None,
    num_reserved: int = 16,
    add_bos: bool = True,
) -> Tokenizer:
  """Trains a small byte-level BPE tokenizer with Nemotron's special tokens and saves it.

  Ids: ``<unk>``=0, ``<s>``=1, ``</s>``=2, ``<SPECIAL_3>`` ... ``<SPECIAL_{num_reserved-1}>``
  (``<SPECIAL_10>`` system header, ``<SPECIAL_11>`` turn header, ``<SPECIAL_12>`` end of turn), then
  ``<think>`` and ``</think>`` when `think_as_special`, then the learned entries. Writes
  tokenizer.json, tokenizer_config.json (with the chat template) and special_tokens_map.json,
  readable by `Tokenizer.from_pretrained` and by transformers' `AutoTokenizer`.

  Args:
    texts: Training text; a few hundred sentences are plenty for tests.
    vocab_size: Total entries, special tokens and the 256 byte symbols included.
    out_dir: Directory to write (created if missing; files in it are overwritten).
    think_as_special: Make ``<think>``/``</think>`` single special tokens (skipped by
      ``decode(skip_special_tokens=True)``); otherwise they are spelt with several BPE tokens.
    chat_template: Jinja template stored in tokenizer_config.json; the built-in one when None.
    num_reserved: Size of the control-token block; at least 13 so that ``<SPECIAL_12>`` exists.
    add_bos: Whether ``encode(..., add_special_tokens=True)`` prepends ``<s>``.

  Returns:
    The tokenizer, read back from `out_dir`.
  """
  if num_reserved < 13:
    raise ValueError(f"num_reserved={num_reserved}: Nemotron's chat format needs the control "
                     "tokens up to <SPECIAL_12>, so num_reserved must be at least 13.")
  # Nemotron's (Tekken's) control-token block: <unk>=0, <s>=1, </s>=2, then <SPECIAL_3>, ...
  specials = ["<unk>", "<s>", "</s>"] + [f"<SPECIAL_{i}>" for i in range(3, num_reserved)]
  if think_as_special:
    specials += [THINK_OPEN, THINK_CLOSE]
  minimum = len(specials) + 256
  if vocab_size < minimum:
    raise ValueError(f"vocab_size={vocab_size} leaves no room for merges: {len(specials)} special "
                     f"tokens and 256 byte symbols need at least {minimum}.")
  backend = tokenizers.Tokenizer(tokenizers.models.BPE())
  backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  backend.decoder = tk_decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=specials, show_progress=False,
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  backend.train_from_iterator(texts, trainer=trainer)
  if add_bos:
    backend.post_processor = tokenizers.processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
  for i, token in enumerate(specials):  # the trainer puts special tokens first, in order
    if backend.token_to_id(token) != i:
      raise RuntimeError(f"tokenizers placed {token!r} at id {backend.token_to_id(token)}, not {i}")

  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  backend.save(str(out / "tokenizer.json"))
  named = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
  config = {
      "tokenizer_class": "PreTrainedTokenizerFast", **named, "add_bos_token": add_bos,
      "add_eos_token": False, "clean_up_tokenization_spaces": False, "model_max_length": 1_000_000,
      "added_tokens_decoder": {
          str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                   "single_word": False, "special": True} for i, t in enumerate(specials)},
      "chat_template": builtin_chat_template() if chat_template is None else chat_template,
  }
  config_text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
  (out / "tokenizer_config.json").write_text(config_text, encoding="utf-8")
  (out / "special_tokens_map.json").write_text(json.dumps(named, indent=2) + "\n", encoding="utf-8")
  return Tokenizer.from_pretrained(out)
