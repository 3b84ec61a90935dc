"""`nemojax generate` and `nemojax chat`: the model from the terminal.

Without `--model`, both use the built-in demo model (a tiny Nemotron-H trained by nemojax on
arithmetic with step-by-step reasoning), so they work offline on a fresh install.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TextIO

from nemojax.engine import DEFAULT_BUDGET_GRACE
from nemojax.tokenizer import THINK_CLOSE

_THINK_HEADER = "[thinking]"
_ANSWER_HEADER = "[answer]"


def _add_generation_flags(p: argparse.ArgumentParser) -> None:
  p.add_argument("--model", metavar="PATH",
                 help="HF checkpoint directory or a directory written by `nemojax convert` "
                      "(default: the built-in demo model)")
  p.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto",
                 help="weights and activations (auto: float32 on CPU, bfloat16 on accelerators)")
  p.add_argument("--max-new-tokens", type=int, default=512, metavar="N",
                 help="bound on generated tokens (reasoning + answer) (default: 512)")
  p.add_argument("--temperature", type=float, default=None,
                 help="sampling temperature, 0 = greedy (default: 0.6 with reasoning, greedy "
                      "without, as NVIDIA recommends)")
  p.add_argument("--top-p", type=float, default=None, help="nucleus sampling (default: 0.95 "
                 "with reasoning)")
  p.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens")
  p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
  think = p.add_mutually_exclusive_group()
  think.add_argument("--think", dest="thinking", action="store_const", const=True, default=None,
                     help="reasoning on (adds /think)")
  think.add_argument("--no-think", dest="thinking", action="store_const", const=False,
                     help="reasoning off (adds /no_think)")
  p.add_argument("--thinking-budget", type=int, default=None, metavar="N",
                 help="at most N reasoning tokens, then the thought is closed (0 = reasoning off)")
  p.add_argument("--budget-policy", choices=["hard", "newline"], default="hard",
                 help="close at the budget (hard) or at the end of the line (newline)")
  p.add_argument("--budget-grace", type=int, default=DEFAULT_BUDGET_GRACE, metavar="N",
                 help="with --budget-policy newline: at most N tokens past the budget "
                      f"(default: {DEFAULT_BUDGET_GRACE})")
  p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                 help="stop string (repeatable)")
  p.add_argument("--system", default=None, help="system message")
  p.add_argument("--show-reasoning", action=argparse.BooleanOptionalAction, default=True,
                 help="print the reasoning before the answer (default: yes)")
  p.add_argument("--cache-size", type=int, default=None, metavar="N",
                 help="fixed cache positions (default: sized per request)")
  p.add_argument("--prefill-chunk", type=int, default=1024, metavar="N",
                 help="prompt tokens per prefill step (power of two; bounds memory)")


def register(subparsers) -> None:
  g = subparsers.add_parser(
      "generate", help="generate a reply to one or more prompts",
      description="Generate replies with a Nemotron-H model, streaming to the terminal. Without "
                  "--model it runs the built-in demo model, which answers one kind of question: "
                  "'What is the last digit of 7 × 8 × 3 × 9?' (× or +, 3 to 7 single digits).")
  g.add_argument("prompt", nargs="*",
                 help="prompt text (several: one batch; none: the demo question, demo model only)")
  _add_generation_flags(g)
  g.set_defaults(func=run_generate)
  c = subparsers.add_parser(
      "chat", help="interactive multi-turn chat",
      description="Chat with a Nemotron-H model. /think or /no_think inside a message switches "
                  "reasoning for that turn; alone on a line, for the turns that follow; /reset "
                  "clears the history; /exit or end of input quits.")
  _add_generation_flags(c)
  c.set_defaults(func=run_chat)


def _load(args, err: TextIO):
  """(model, tokenizer) or raises SystemExit with a one-line error."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  import nemojax  # noqa: PLC0415
  from nemojax.config import CheckpointError, ConfigError  # noqa: PLC0415
  path = args.model
  if path is None:
    from nemojax.demo import demo_model_path  # noqa: PLC0415
    path = demo_model_path()
    print(f"Using the built-in demo model ({path}): a tiny Nemotron-H trained by nemojax on "
          "arithmetic. Pass --model PATH for a real checkpoint.", file=err)
  dtype = args.dtype
  if dtype == "auto":
    dtype = "float32" if jax.devices()[0].platform == "cpu" else "bfloat16"
  try:
    if not os.path.isdir(path):
      raise FileNotFoundError(f"{path}: no such model directory")
    model = nemojax.load(path, dtype=getattr(jnp, dtype))
    tok = nemojax.Tokenizer.from_pretrained(path)
  except (FileNotFoundError, CheckpointError, ConfigError, ValueError) as e:
    print(f"nemojax: error: {e}", file=err)
    raise SystemExit(1) from None
  return model, tok


def _gen_kwargs(args, sizes: bool = True) -> dict:
  kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
            top_k=args.top_k, seed=args.seed, thinking=args.thinking,
            thinking_budget=args.thinking_budget, budget_policy=args.budget_policy,
            budget_grace=args.budget_grace, stop=args.stop, progress=True)
  if sizes:  # a ChatSession fixes these once, in its sampler
    kw.update(cache_size=args.cache_size, prefill_chunk=args.prefill_chunk)
  return kw


class _Printer:
  """Streams one row's text, splitting the reasoning from the answer at `</think>`."""

  def __init__(self, out: TextIO, reasoning_open: bool, show_reasoning: bool):
    self.out = out
    self.show = show_reasoning
    self.in_answer = not reasoning_open
    self.text = ""
    self.done = 0  # characters of `text` already handled
    self.answer_started = False
    # Written with the first output, so that an error before any output prints no header.
    self.header = None if not show_reasoning else (
        _THINK_HEADER if reasoning_open else _ANSWER_HEADER) + "\n"

  def _write(self, s: str) -> None:
    if self.header is not None:
      self.out.write(self.header)
      self.header = None
    self.out.write(s)
    self.out.flush()

  def _answer(self, s: str) -> None:
    if not self.answer_started:
      s = s.lstrip()
      if not s:
        return
      self.answer_started = True
    self._write(s)

  def __call__(self, row: int, delta: str) -> None:
    del row
    self.text += delta
    self._flush(final=False)

  def _flush(self, final: bool) -> None:
    if not self.in_answer:
      i = self.text.find(THINK_CLOSE, max(0, self.done - len(THINK_CLOSE)))
      if i < 0:  # hold back what could be the start of `</think>`
        safe = len(self.text) if final else max(self.done, len(self.text) - len(THINK_CLOSE) + 1)
        if self.show:
          self._write(self.text[self.done:safe])
        self.done = safe
        return
      if self.show:
        self._write(self.text[self.done:i].rstrip() + "\n" + _ANSWER_HEADER + "\n")
      self.in_answer = True
      self.done = i + len(THINK_CLOSE)
    self._answer(self.text[self.done:])
    self.done = len(self.text)

  def finish(self) -> None:
    self._flush(final=True)
    self._write("\n")


def _messages(prompt: str, system: str | None) -> list[dict]:
  msgs = [{"role": "system", "content": system}] if system else []
  return msgs + [{"role": "user", "content": prompt}]


def run_generate(args, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
  import nemojax  # noqa: PLC0415
  if not args.prompt:
    if args.model is not None:
      print("nemojax generate: error: give a prompt", file=err)
      return 2
    from nemojax.demo import DEMO_QUESTION  # noqa: PLC0415
    args.prompt = [DEMO_QUESTION]
  model, tok = _load(args, err)
  chats = [_messages(p, args.system) for p in args.prompt]
  try:
    if len(chats) == 1:
      printer = _Printer(out, tok.reasoning_enabled(chats[0], args.thinking) and
                         args.thinking_budget != 0, args.show_reasoning)
      gen = nemojax.generate(model, chats, tokenizer=tok, stream=printer, **_gen_kwargs(args))[0]
      printer.finish()
      print(f"({gen.num_reasoning_tokens} reasoning tokens, {len(gen.tokens)} tokens, "
            f"finish: {gen.finish_reason})", file=err)
      return 0
    gens = nemojax.generate(model, chats, tokenizer=tok, **_gen_kwargs(args))
  except ValueError as e:
    print(f"nemojax generate: error: {e}", file=err)
    return 1
  for prompt, gen in zip(args.prompt, gens):
    out.write(f"### {prompt}\n")
    if gen.reasoning is not None and args.show_reasoning:
      out.write(f"{_THINK_HEADER}\n{gen.reasoning}\n")
    out.write(f"{_ANSWER_HEADER}\n{gen.answer}\n\n")
  return 0


def run_chat(args, inp: TextIO = sys.stdin, out: TextIO = sys.stdout,
             err: TextIO = sys.stderr) -> int:
  import nemojax  # noqa: PLC0415
  model, tok = _load(args, err)
  try:
    chat = nemojax.ChatSession(model, tokenizer=tok, system=args.system,
                               cache_size=args.cache_size, prefill_chunk=args.prefill_chunk)
  except ValueError as e:
    print(f"nemojax chat: error: {e}", file=err)
    return 1
  interactive = inp.isatty()
  print("Chat: /think or /no_think in a message switches reasoning for that turn, alone on a "
        "line for the next turns; /reset clears the history; /exit quits.", file=err)
  while True:
    if interactive:
      err.write("you> ")
      err.flush()
    line = inp.readline()
    if not line:
      break
    line = line.strip()
    if not line:
      continue
    if line in ("/exit", "/quit"):
      break
    if line == "/reset":
      chat.reset()
      print("(history cleared)", file=err)
      continue
    if line in ("/think", "/no_think"):  # a switch, not a message: it holds for later turns
      args.thinking = line == "/think"
      print(f"(reasoning {'on' if args.thinking else 'off'} for the next turns)", file=err)
      continue
    turn = chat.history + [{"role": "user", "content": line}]
    printer = _Printer(out, tok.reasoning_enabled(turn, args.thinking)
                       and args.thinking_budget != 0, args.show_reasoning)
    printer.header = "assistant> " + (printer.header or "")
    try:
      chat.send(line, stream=printer, **_gen_kwargs(args, sizes=False))
    except ValueError as e:  # the session keeps its history as it was
      print(f"nemojax chat: error: {e}", file=err)
      continue
    printer.finish()
  return 0
