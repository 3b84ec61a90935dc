"""The `nemojax` command end to end (subprocesses) on a tiny converted model."""

import os
import subprocess
import sys

import pytest

from nemojax import NemotronHConfig
from nemojax import testing as T
from nemojax.demo.bpe import build_tokenizer

CORPUS = ["What is 12 + 30? Let me add the units first, then the tens.\n",
          "The answer is 42. Think step by step.\n"] * 30


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """A tiny HF checkpoint with a tokenizer, converted with `nemojax convert`."""
  hf_dir = tmp_path_factory.mktemp("hf")
  tok = build_tokenizer(CORPUS, 320, hf_dir)
  model = T.make_hf_model(NemotronHConfig.tiny(vocab_size=tok.vocab_size), seed=5)
  T.save_hf(model, hf_dir)
  out = tmp_path_factory.mktemp("conv") / "model"
  r = _run(["convert", str(hf_dir), str(out)])
  assert r.returncode == 0, r.stderr
  return out


def _run(args, stdin=None, timeout=300):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "nemojax", *args], input=stdin, text=True,
                        capture_output=True, timeout=timeout, env=env)


def test_help_lists_every_command_and_option():
  r = _run(["--help"])
  assert r.returncode == 0
  for cmd in ("convert", "export", "generate", "chat"):
    assert cmd in r.stdout
  r = _run(["generate", "--help"])
  assert r.returncode == 0
  for flag in ("--model", "--max-new-tokens", "--temperature", "--top-p", "--top-k", "--seed",
               "--think", "--no-think", "--thinking-budget", "--budget-policy", "--stop",
               "--show-reasoning", "--system", "--dtype"):
    assert flag in r.stdout


def test_generate_streams_reasoning_and_answer(converted):
  r = _run(["generate", "--model", str(converted), "What is 12 + 30?", "--max-new-tokens", "12",
            "--thinking-budget", "4", "--temperature", "0"])
  assert r.returncode == 0, r.stderr
  assert r.stdout.startswith("[thinking]\n")
  assert "[answer]" in r.stdout
  assert "reasoning tokens" in r.stderr


def test_generate_batch_and_no_think(converted):
  r = _run(["generate", "--model", str(converted), "one", "two", "--no-think",
            "--max-new-tokens", "6", "--no-show-reasoning"])
  assert r.returncode == 0, r.stderr
  assert r.stdout.count("[answer]") == 2 and "[thinking]" not in r.stdout


def test_chat_from_stdin(converted):
  r = _run(["chat", "--model", str(converted), "--max-new-tokens", "6", "--temperature", "0"],
           stdin="hello there\n/no_think and now?\n/reset\nagain\n/exit\nignored\n")
  assert r.returncode == 0, r.stderr
  assert r.stdout.count("assistant> ") == 3
  assert "(history cleared)" in r.stderr


def test_missing_model_is_a_one_line_error(tmp_path):
  r = _run(["generate", "--model", str(tmp_path / "nope"), "hi"])
  assert r.returncode == 1
  assert r.stderr.strip().splitlines()[-1].startswith("nemojax: error:")
  assert "no such model directory" in r.stderr
  (tmp_path / "empty").mkdir()
  r = _run(["generate", "--model", str(tmp_path / "empty"), "hi"])
  assert r.returncode == 1 and "not a model directory" in r.stderr


def test_default_demo_model_runs_offline():
  """The README's main job: no --model, the built-in demo model reasons, then answers."""
  r = _run(["generate", "What is the last digit of 7 × 8 × 3 × 9?"])
  assert r.returncode == 0, r.stderr
  assert "built-in demo model" in r.stderr
  assert r.stdout.startswith("[thinking]\n") and "\n[answer]\nThe last digit is" in r.stdout
  r = _run(["generate", "--temperature", "0"])  # no prompt: the demo question
  assert "7 × 8 = 56\n6 × 3 = 18\n8 × 9 = 72" in r.stdout
  assert "The last digit is 2." in r.stdout


def test_version_and_bad_flag_are_one_line():
  r = _run(["--version"])
  assert r.returncode == 0 and r.stdout.startswith("nemojax ")
  r = _run(["generate", "--seed", "abc", "hi"])
  assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
  assert "--seed" in r.stderr and "Traceback" not in r.stderr


def _in_process(argv, stdin=""):
  """Runs a generate/chat command in this process: (status, stdout, stderr)."""
  import io

  from nemojax.cli import build_parser
  from nemojax.generate_cli import run_chat, run_generate
  args = build_parser().parse_args(argv)
  out, err = io.StringIO(), io.StringIO()
  if args.func is run_chat:
    status = run_chat(args, inp=io.StringIO(stdin), out=out, err=err)
  else:
    status = run_generate(args, out=out, err=err)
  return status, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("flags,name", [
    (["--max-new-tokens", "0"], "max_new_tokens"),
    (["--max-new-tokens", "1000000000"], "max_new_tokens"),
    (["--temperature", "inf"], "temperature"), (["--top-p", "2"], "top_p"),
    (["--top-k", "0"], "top_k"), (["--thinking-budget", "-1"], "thinking_budget"),
    (["--budget-grace", "-1"], "budget_grace"), (["--cache-size", "-5"], "cache_size"),
    (["--prefill-chunk", "3"], "prefill_chunk"), (["--seed", str(2**70)], "seed"),
])
def test_user_errors_are_one_line_exit_1_without_output(converted, flags, name):
  from nemojax import memory
  if "1000000000" in flags and memory.free_bytes() is None:
    pytest.skip("free memory unknown on this platform: no check is made")
  status, out, err = _in_process(["generate", "--model", str(converted), "hi", *flags])
  assert status == 1 and out == ""  # no [thinking] header before the error
  last = err.strip().splitlines()[-1]
  assert last.startswith("nemojax generate: error:") and name in last
  assert "Traceback" not in err


def test_chat_bare_think_switch_is_not_a_message(converted):
  status, out, err = _in_process(
      ["chat", "--model", str(converted), "--max-new-tokens", "4", "--temperature", "0"],
      stdin="/no_think\nhello\n/think\nagain\n")
  assert status == 0
  assert "(reasoning off for the next turns)" in err and "(reasoning on" in err
  turns = out.split("assistant> ")[1:]
  assert len(turns) == 2  # two messages, the switches are not turns
  assert turns[0].startswith("[answer]") and turns[1].startswith("[thinking]")
