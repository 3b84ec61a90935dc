"""Chat prompts of Nemotron-H: the Jinja sandbox, the chat template files and the reasoning switch.

Templates render in a sandbox set up as transformers sets it up (trim_blocks, lstrip_blocks,
loopcontrols, ``{% generation %}``, HF's `tojson`, `raise_exception`, `strftime_now`, special
tokens as variables), so prompts equal `transformers.AutoTokenizer.apply_chat_template`'s.
Checkpoints without a template get the built-in `templates/nemotron_h.jinja`, which renders what
NVIDIA-Nemotron-Nano-9B-v2's template renders.

Reasoning control (SPEC section 5): ``/think`` or ``/no_think`` in a system or user message switches
reasoning on or off, the last such message wins, the default is on. The prompt then ends in
``<SPECIAL_11>Assistant\\n<think>\\n`` or ``<SPECIAL_11>Assistant\\n<think></think>``.
"""

from __future__ import annotations

import datetime
import functools
import importlib.resources
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox

__all__ = [
    "BUDGET_CLOSE_TEXT", "BUILTIN_SOURCE", "END_OF_TURN", "THINK_CLOSE", "THINK_OFF", "THINK_ON",
    "THINK_OPEN", "ChatTemplateError", "builtin_chat_template", "compile_template",
    "load_chat_templates", "reasoning_enabled", "render_chat", "select_template", "set_reasoning",
]

THINK_ON = "/think"
THINK_OFF = "/no_think"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
# NVIDIA's client closes an unfinished thought with this text when the budget runs out.
BUDGET_CLOSE_TEXT = ".\n</think>\n\n"
# Nemotron's end-of-turn token; generation stops on it as well as on `</s>`.
END_OF_TURN = "<SPECIAL_12>"
BUILTIN_SOURCE = "nemojax built-in template (nemojax/templates/nemotron_h.jinja)"


class ChatTemplateError(ValueError):
  """A chat template failed to compile, or refused to render the given messages."""


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
# The Jinja sandbox


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
def compile_template(template: str, source: str) -> jinja2.Template:
  """`template` compiled in the sandbox (cached); `source` names it in errors.

  Raises:
    ChatTemplateError: The template is not valid Jinja.
  """
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
# Templates of a checkpoint, and rendering


def load_chat_templates(directory: Path, config: Mapping[str, Any]) -> tuple[dict[str, str], str]:
  """Named chat templates of a tokenizer directory and where they came from.

  ``chat_template.jinja`` and ``additional_chat_templates/*.jinja`` win over tokenizer_config.json's
  ``chat_template`` (`config`), as in transformers; the built-in template when there is none.
  """
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
  return {"default": builtin_chat_template()}, BUILTIN_SOURCE


def select_template(templates: Mapping[str, str], source: str, chat_template: str | None,
                    tools: Any) -> str:
  """The template text to render: transformers' `get_chat_template` choice.

  Args:
    templates: Named templates (`load_chat_templates`).
    source: Where they came from, for errors.
    chat_template: A name in `templates` or Jinja text; None for the default (or ``tool_use``
      when `tools` are given and such a template exists).
    tools: The tools argument of the call.
  """
  if chat_template is not None:
    return templates.get(chat_template, chat_template)
  if tools is not None and "tool_use" in templates:
    return templates["tool_use"]
  if "default" in templates:
    return templates["default"]
  raise ChatTemplateError(
      f"{source} has several chat templates and none named 'default'; pass "
      f"chat_template= one of {sorted(templates)}.")


def _switched_by_variable(template: str) -> bool:
  """Whether `template` switches reasoning with ``enable_thinking`` alone (no /think markers;
  the closing tag ``</think>`` is not a marker)."""
  return "enable_thinking" in template and not re.search(r"(?<!<)/think\b|/no_think", template)


def render_chat(template: str, source: str, messages: Sequence[Mapping[str, Any]], *,
                add_generation_prompt: bool, thinking: bool | None,
                variables: Mapping[str, Any]) -> str:
  """Renders `messages` with `template` after checking them and applying `thinking`.

  Args:
    template: Jinja text; `source` names it in errors.
    messages: Dicts with ``role`` and ``content``.
    add_generation_prompt: End with the assistant header so the model answers next.
    thinking: None keeps the messages' markers; True or False is passed to the template as
      ``enable_thinking`` unless `variables` sets it, and rewrites the messages' markers
      (`set_reasoning`) unless the template reads ``enable_thinking`` and never mentions the
      markers (Nemotron 3's Qwen-style templates), where a marker would only be text to the model.
    variables: Further template variables (special tokens, ``tools``, ``documents``, ...).

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
  variables = dict(variables)
  if thinking is not None:
    if not _switched_by_variable(template):
      messages = set_reasoning(messages, thinking)
    variables.setdefault("enable_thinking", bool(thinking))
  compiled = compile_template(template, source)
  try:
    return compiled.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                           **variables)
  except jinja2.TemplateError as e:
    raise ChatTemplateError(f"The chat template from {source} failed on these messages: "
                            f"{e}") from e
