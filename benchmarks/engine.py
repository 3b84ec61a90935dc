"""What a user waits for, through the public API only (issue #18): compiles and chat turns.

Parts (comma-separated `--parts`), each timed with wall clock on the host:
  compile  `nemojax.generate` on token-id prompts in fresh processes sharing one empty
           persistent compilation cache directory: process 1 makes its first call (compiles),
           the same call again, then `max_new_tokens` 16 -> 272 and a new prompt-length bucket;
           process 2 (same cache directory) makes the first call again: what a user's second
           session pays.
  chat     `nemojax.ChatSession`: turn 1 sends a long message (`--history` tokens), turn 2 a
           short one; turn 2's time to first token (max_new_tokens=1) against `generate` on the
           same re-rendered history without saved state. Both shapes are compiled by a warm-up
           session first, so the rows are prefill work, not compiles.

Model: `--config nano_9b_v2` is the 9B-v2 shape with random bf16 weights; for `chat` its
vocabulary is the demo tokenizer's (a chat needs a tokenizer whose ids the model emits), every
other width the 9B's. `--config tiny` runs on the CPU in seconds to check the script. JSON goes to
OUT/engine.json and a table is printed last.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

ROWS: list[dict] = []


def log(*a):
  print(*a, flush=True)


def model_config(name: str, vocab_size: int | None = None):
  import nemojax  # the parent process of `compile` must not initialise JAX
  if name == "tiny":
    cfg = nemojax.NemotronHConfig.tiny(vocab_size=256, hybrid_override_pattern="M-M*")
  elif name == "nano_9b_v2":
    cfg = nemojax.NemotronHConfig.nano_9b_v2()
  else:
    raise SystemExit(f"--config: got {name!r}, expected 'nano_9b_v2' or 'tiny'")
  return dataclasses.replace(cfg, vocab_size=vocab_size) if vocab_size else cfg


def timed(fn):
  t = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - t


# ------------------------------------------------------------------------------------------------
def compile_child(args) -> None:
  """One user process: the calls of the `compile` part, printed as one RESULT line."""
  import numpy as np

  import nemojax
  from nemojax import testing as T
  model = T.random_model(model_config(args.config))
  rng = np.random.default_rng(0)
  prompt = [int(v) for v in rng.integers(0, model.config.vocab_size, args.prompt)]
  longer = [int(v) for v in rng.integers(0, model.config.vocab_size, 3 * args.prompt)]
  gen = lambda p, n: nemojax.generate(model, [p], max_new_tokens=n, thinking=False, progress=True)
  out = {}
  _, out["first_call_s"] = timed(lambda: gen(prompt, 16))
  if args.child == "first":
    _, out["same_call_s"] = timed(lambda: gen(prompt, 16))
    _, out["max_new_272_s"] = timed(lambda: gen(prompt, 272))
    _, out["max_new_272_again_s"] = timed(lambda: gen(prompt, 272))
    _, out["new_prompt_bucket_s"] = timed(lambda: gen(longer, 16))
  print("RESULT " + json.dumps(out), flush=True)


def part_compile(args) -> None:
  cache = tempfile.mkdtemp(prefix="nemojax-jax-cache-")
  env = {**os.environ, "NEMOJAX_COMPILATION_CACHE": cache}
  for which in ("first", "second"):
    cmd = [sys.executable, __file__, "--child", which, "--config", args.config, "--prompt",
           str(args.prompt)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    wall = time.perf_counter() - t
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if not lines:
      tail = (proc.stdout + proc.stderr)[-3000:]
      log(f"compile/{which}: failed (exit {proc.returncode})\n{tail}")
      continue
    res = json.loads(lines[-1][len("RESULT "):])
    notices = [ln for ln in proc.stderr.splitlines() if "compil" in ln.lower()]
    log(f"compile/{which}: {res}; process wall {wall:.1f}s; stderr notices: {notices[:6]}")
    for key, value in res.items():
      ROWS.append({"part": "compile", "process": which, "what": key, "s": value})
    ROWS.append({"part": "compile", "process": which, "what": "process_wall_s", "s": wall})


# ------------------------------------------------------------------------------------------------
def long_message(tok, num_tokens: int, seed: int) -> str:
  """Plain words until the message is about `num_tokens` tokens long."""
  import numpy as np
  words = ["state", "space", "model", "token", "layer", "chunk", "decay", "prefix", "cache",
           "number", "seven", "eight", "three", "nine", "digit", "answer", "the", "of", "and"]
  rng = np.random.default_rng(seed)
  text = ""
  while len(tok.encode(text)) < num_tokens:
    text += " ".join(rng.choice(words, 512)) + ".\n"
  return text


def part_chat(args) -> None:
  import jax

  import nemojax
  from nemojax import testing as T
  from nemojax.demo import demo_model_path
  tok = nemojax.Tokenizer.from_pretrained(demo_model_path())
  model = T.random_model(model_config(args.config, vocab_size=tok.vocab_size))
  first = long_message(tok, args.history, seed=1)
  second = "What is the last digit of 7 x 8 x 3 x 9? Answer briefly."
  kw = dict(max_new_tokens=1, thinking=False)
  rows = {}
  for rep in ("warmup", "measured"):  # the warm-up compiles every shape the measured rep runs
    session = nemojax.ChatSession(model, tokenizer=tok, **kw)
    _, t1 = timed(lambda: session.send(first))
    reply, t2 = timed(lambda: session.send(second))
    history = session.history[:-1]  # what turn 2 generated on
    fresh = nemojax.Sampler(model, prefix_cache=False)
    base, t3 = timed(lambda: nemojax.generate(model, history, tokenizer=tok, sampler=fresh, **kw))
    jax.effects_barrier()
    rows = {"turn1_s": t1, "turn2_session_s": t2, "turn2_full_reprefill_s": t3,
            "history_tokens": len(tok.apply_chat_template(history, add_generation_prompt=True,
                                                          tokenize=True)),
            "cached_prompt_tokens": reply.cached_prompt_tokens,
            "same_token": reply.tokens == base[0].tokens}
    log(f"chat/{rep}: {rows}")
  for key, value in rows.items():
    ROWS.append({"part": "chat", "process": "one", "what": key, "s": value})


# ------------------------------------------------------------------------------------------------
def table() -> str:
  lines = ["| part | process | what | value |", "|---|---|---|---|"]
  for r in ROWS:
    v = r["s"]
    v = f"{v:.3f}" if isinstance(v, float) else str(v)
    lines.append(f"| {r['part']} | {r['process']} | {r['what']} | {v} |")
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="nano_9b_v2")
  p.add_argument("--parts", default="compile,chat")
  p.add_argument("--prompt", type=int, default=1000, help="prompt tokens of the compile part")
  p.add_argument("--history", type=int, default=16384, help="turn-1 tokens of the chat part")
  p.add_argument("--timeout", type=int, default=400, help="seconds per child process")
  p.add_argument("--out", default=os.environ.get("OUT", "."))
  p.add_argument("--child", help=argparse.SUPPRESS)  # internal: one process of `compile`
  args = p.parse_args()
  if args.child:
    compile_child(args)
    return
  parts = [x for x in args.parts.split(",") if x]
  for part in parts:
    if part not in ("compile", "chat"):
      raise SystemExit(f"--parts: unknown {part!r}; expected compile, chat")
  for part in parts:
    try:
      {"compile": part_compile, "chat": part_chat}[part](args)
    except Exception as e:  # one part's failure must not lose the others)
      log(f"{part}: failed: {type(e).__name__}: {e}")
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "engine.json"), "w") as f:
    json.dump({"date": time.strftime("%Y-%m-%d"), "config": args.config, "rows": ROWS}, f,
              indent=1)
  log(table())


if __name__ == "__main__":
  main()
