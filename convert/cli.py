"""`nemojax convert` and `nemojax export` (also `python -m nemojax.convert`).

Errors a user can act on (bad checkpoint, existing output, no disk space) print one line on
stderr and exit with status 1; usage errors exit with 2 (argparse).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys

_CONVERT_HELP = """\
Convert a Hugging Face Nemotron-H checkpoint (config.json + safetensors, single file or sharded)
to a nemojax checkpoint directory (orbax arrays + config.json + tokenizer files + nemojax.json
manifest), for `nemojax.load`. Everything is validated before anything is written; tensors are
streamed one at a time; the output appears only when complete."""

_EXPORT_HELP = """\
Write a nemojax checkpoint back as a Hugging Face checkpoint (sharded safetensors + index +
config.json + tokenizer files) that transformers and vLLM load. Tensors get their original dtypes
from the manifest unless --dtype says otherwise."""


def _add_convert_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("hf_dir", metavar="HF_DIR",
                 help="Hugging Face checkpoint directory: config.json and model.safetensors, or "
                      "model-*-of-*.safetensors shards with model.safetensors.index.json")
  p.add_argument("out_dir", metavar="OUT_DIR", nargs="?",
                 help="nemojax checkpoint directory to create (optional with --validate-only)")
  p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                 help="storage dtype of the matmul weights (default: %(default)s); norm scales, "
                      "A_log, D and dt_bias are always float32. Converting float32 weights to "
                      "bfloat16 rounds them (reported)")
  p.add_argument("--validate-only", action="store_true",
                 help="check config, index, shard headers, tensor names, shapes and dtypes (and "
                      "that OUT_DIR may be written, if given), report, and write nothing")
  p.add_argument("--overwrite", action="store_true",
                 help="replace an existing OUT_DIR (only a nemojax checkpoint or an empty "
                      "directory); the old one is removed only after the new one is complete")
  p.add_argument("--no-sha256", dest="sha256", action="store_false",
                 help="do not record the SHA-256 of each source file in the manifest (saves "
                      "CPU time; by default it is computed while streaming)")
  _add_progress_args(p)


def _add_export_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("nemojax_dir", metavar="NEMOJAX_DIR",
                 help="nemojax checkpoint directory (written by `nemojax convert` or "
                      "nemojax.convert.save)")
  p.add_argument("hf_dir", metavar="HF_DIR", help="Hugging Face checkpoint directory to create")
  p.add_argument("--dtype", choices=("auto", "bfloat16", "float32", "float16"), default="auto",
                 help="dtype of every written tensor; 'auto' (default) restores each tensor's "
                      "original dtype recorded by convert, else keeps its stored dtype")
  p.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                 help="largest shard file, in bytes or like '5GB' (10^9 bytes, as transformers "
                      "counts) or '4GiB' (default: %(default)s); one shard is written as "
                      "model.safetensors without an index")
  p.add_argument("--overwrite", action="store_true",
                 help="replace an existing HF_DIR (only an HF checkpoint or an empty directory); "
                      "the old one is removed only after the new one is complete")
  _add_progress_args(p)


_VERIFY_HELP = """\
Check a directory nemojax wrote against the sizes and SHA-256 hashes recorded when it was
written: a converted or saved checkpoint (nemojax.json), a training checkpoint directory (every
step) or one step. An HF directory has no recorded hashes: its headers are checked and every
tensor is read and checked for NaN/Inf. Prints one line; exits 1 naming the first damaged or
missing file."""


def _add_verify_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("directory", metavar="DIR",
                 help="a nemojax checkpoint, a training checkpoint directory or step, or an HF "
                      "checkpoint directory")
  p.add_argument("--sizes-only", action="store_true",
                 help="check only that every recorded file is present with its recorded size "
                      "(fast; no hashing)")


def _add_progress_args(p: argparse.ArgumentParser) -> None:
  g = p.add_mutually_exclusive_group()
  g.add_argument("--progress", dest="progress", action="store_true", default=None,
                 help="always show the progress bar (default: only when stderr is a terminal)")
  g.add_argument("--no-progress", dest="progress", action="store_false",
                 help="never show the progress bar")


def register(subparsers) -> None:
  """Adds the `convert` and `export` subcommands to the `nemojax` command."""
  p = subparsers.add_parser("convert", help="HF safetensors checkpoint -> nemojax checkpoint",
                            description=_CONVERT_HELP)
  _add_convert_args(p)
  p.set_defaults(func=run_convert, prog=p.prog)
  p = subparsers.add_parser("export", help="nemojax checkpoint -> HF safetensors checkpoint",
                            description=_EXPORT_HELP)
  _add_export_args(p)
  p.set_defaults(func=run_export, prog=p.prog)
  p = subparsers.add_parser("verify", help="check a checkpoint against its recorded hashes",
                            description=_VERIFY_HELP)
  _add_verify_args(p)
  p.set_defaults(func=run_verify, prog=p.prog)


def _cpu_only() -> None:
  """Conversion needs no accelerator; do not let JAX grab (most of) a GPU's memory for it.

  `jax_platforms` is read once, when JAX first initializes its backends (jax 0.10, 0.11, 0.12),
  so an in-process caller whose backends already exist keeps them: no private "are backends
  initialized" check is needed.
  """
  if "JAX_PLATFORMS" in os.environ:
    return
  try:
    import jax  # noqa: PLC0415
    jax.config.update("jax_platforms", "cpu")
  except Exception:  # noqa: BLE001  (an optimisation only)
    pass


def _terminate(signum, frame):
  raise KeyboardInterrupt  # unwinds through the cleanup of the temporary directory


def _run(prog: str, fn) -> int:
  from nemojax.config import CheckpointError, ConfigError  # noqa: PLC0415
  previous = None
  with contextlib.suppress(ValueError):  # not the main thread: no handler to install
    previous = signal.signal(signal.SIGTERM, _terminate)
  try:
    report = fn()
  except (CheckpointError, ConfigError, ValueError, OSError) as e:
    msg = " ".join(str(e).split())  # one line, whatever the message holds
    print(f"{prog}: error: {msg}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print(f"{prog}: interrupted; nothing was written (no partial output or staging directory "
          "is left)", file=sys.stderr)
    return 130
  finally:
    if previous is not None:
      signal.signal(signal.SIGTERM, previous)
  for note in report.notes:
    print(f"{prog}: {note}", file=sys.stderr)
  print(report.summary())
  return 0


def run_convert(args: argparse.Namespace) -> int:
  from nemojax.convert import api  # noqa: PLC0415
  prog = getattr(args, "prog", "nemojax convert")
  if args.out_dir is None and not args.validate_only:
    print(f"{prog}: error: OUT_DIR is required (unless --validate-only)", file=sys.stderr)
    return 2
  _cpu_only()
  return _run(prog, lambda: api.convert(
      args.hf_dir, args.out_dir, dtype=args.dtype, overwrite=args.overwrite,
      validate_only=args.validate_only, sha256=args.sha256, progress=args.progress))


def run_export(args: argparse.Namespace) -> int:
  from nemojax.convert import api  # noqa: PLC0415
  prog = getattr(args, "prog", "nemojax export")
  _cpu_only()
  return _run(prog, lambda: api.export(
      args.nemojax_dir, args.hf_dir, dtype=args.dtype, max_shard_size=args.max_shard_size,
      overwrite=args.overwrite, progress=args.progress))


def run_verify(args: argparse.Namespace) -> int:
  from nemojax.convert import verify  # noqa: PLC0415
  prog = getattr(args, "prog", "nemojax verify")
  _cpu_only()
  return _run(prog, lambda: verify.verify(args.directory, hashes=not args.sizes_only))


def build_parser(prog: str = "python -m nemojax.convert") -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog=prog, description=_CONVERT_HELP)
  _add_convert_args(p)
  p.set_defaults(func=run_convert, prog=prog)
  return p


def main(argv: list[str] | None = None) -> int:
  """`python -m nemojax.convert HF_DIR OUT_DIR ...`: the same as `nemojax convert`."""
  args = build_parser().parse_args(argv)
  return args.func(args)
