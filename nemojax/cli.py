"""The `nemojax` command: `convert`, `export`, `verify`, `generate`, `chat`.

Each subcommand lives with its code and registers itself here through a `register(subparsers)`
function, so this file stays a table of contents.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module defining `register(subparsers)`; imported lazily so `--help` stays fast.
_SUBCOMMANDS = {
    "convert": "nemojax.convert.cli",
    "export": "nemojax.convert.cli",
    "verify": "nemojax.convert.cli",
    "generate": "nemojax.generate_cli",
    "chat": "nemojax.generate_cli",
}


class _Parser(argparse.ArgumentParser):
  """argparse with user errors as one line and exit status 1 (subcommand parsers inherit it)."""

  def error(self, message: str):
    self.exit(1, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _version() -> str:
  try:
    from importlib.metadata import version  # noqa: PLC0415
    return version("nemojax")
  except Exception:  # noqa: BLE001  (not installed as a distribution: the source tree's version)
    import nemojax  # noqa: PLC0415
    return nemojax.__version__


def build_parser() -> argparse.ArgumentParser:
  parser = _Parser(
      prog="nemojax",
      description="Nemotron-H language models in JAX: convert checkpoints, generate, chat.")
  parser.add_argument("--version", action="version", version=f"nemojax {_version()}")
  subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
  registered = set()
  for module_name in dict.fromkeys(_SUBCOMMANDS.values()):
    try:
      module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
      if e.name != module_name:
        raise
      continue
    module.register(subparsers)
    registered.add(module_name)
  return parser


def main(argv: list[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  if not getattr(args, "func", None):
    parser.print_help()
    return 2
  return int(args.func(args) or 0)


if __name__ == "__main__":
  sys.exit(main())
