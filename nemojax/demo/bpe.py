"""A small byte-level BPE tokenizer with Nemotron's special tokens, trained here (demo and tests).

The demo model's tokenizer is built with it (`data.build_demo_tokenizer`); tests train tiny ones
to check the chat template and streaming against transformers on the same files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import tokenizers
from tokenizers import decoders as tk_decoders

from nemojax.chat_template import THINK_CLOSE, THINK_OPEN, builtin_chat_template
from nemojax.tokenizer import Tokenizer

__all__ = ["build_tokenizer"]


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
