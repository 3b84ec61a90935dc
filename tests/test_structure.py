"""The house rules of DESIGN.md, read from the source: import direction, sizes, public names.

Imports are parsed (nothing is executed), including imports inside functions: a lazy import
that points back up is still a back-arrow.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Source folder -> the package name it installs as (pyproject's [tool.setuptools.package-dir]).
PACKAGES = {"nemojax": "nemojax", "kernels": "nemojax.kernels", "convert": "nemojax.convert"}
MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 80
# A function longer than MAX_FUNCTION_LINES passes only if its body carries this comment,
# followed by why (a Pallas kernel body whose length is the kernel, say).
KERNEL_BODY_MARK = "# kernel body:"

# Modules of the model proper: they must not import the engine, the front door or checkpoints.
MODEL_MODULES = {"nemojax.config", "nemojax.layers", "nemojax.mamba2", "nemojax.attention",
                 "nemojax.moe", "nemojax.cache", "nemojax.model", "nemojax.jit"}
ABOVE_MODEL = ("nemojax.sampler", "nemojax.engine", "nemojax.generate", "nemojax.checkpoint",
               "nemojax.train", "nemojax.cli", "nemojax.generate_cli", "nemojax.tokenizer",
               "nemojax.chat_template", "nemojax.demo")
# What convert/ may import from the project: the config, the shared errors and itself.
CONVERT_ALLOWED = ("nemojax.config", "nemojax.errors", "nemojax.convert")


def _source_files(folders=tuple(PACKAGES)):
  for folder in folders:
    yield from sorted((ROOT / folder).rglob("*.py"))


def _module_name(path: pathlib.Path) -> str:
  rel = path.relative_to(ROOT)
  parts = [PACKAGES[rel.parts[0]], *rel.parts[1:]]
  parts[-1] = parts[-1].removesuffix(".py")
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def _all_modules() -> set[str]:
  return {_module_name(p) for p in _source_files()}


def _imports(path: pathlib.Path, modules: set[str]) -> set[str]:
  """Project modules imported by `path` (`from pkg import submodule` resolves to the submodule)."""
  tree = ast.parse(path.read_text(), str(path))
  me = _module_name(path)
  package = me if path.name == "__init__.py" else me.rpartition(".")[0]
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
      names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
               for a in node.names]
    else:
      continue
    found.update(n for n in names if n.split(".")[0] == "nemojax")
  found.discard(me)
  return found


def _graph() -> dict[str, set[str]]:
  modules = _all_modules()
  return {_module_name(p): _imports(p, modules) for p in _source_files()}


def test_no_import_cycles():
  graph = _graph()
  cycles, state = [], {}

  def visit(node, stack):
    state[node] = "open"
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == "open":
        cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
      elif nxt in graph and nxt not in state:
        visit(nxt, stack + [nxt])
    state[node] = "done"

  for node in sorted(graph):
    if node not in state:
      visit(node, [node])
  assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_convert_knows_only_config_and_names():
  bad = {m: sorted(i for i in deps if not i.startswith(CONVERT_ALLOWED))
         for m, deps in _graph().items() if m.startswith("nemojax.convert")}
  bad = {m: d for m, d in bad.items() if d}
  assert not bad, f"convert/ may import only {CONVERT_ALLOWED}; found {bad}"


def test_kernels_import_only_kernels():
  bad = {m: sorted(i for i in deps if not i.startswith("nemojax.kernels"))
         for m, deps in _graph().items() if m.startswith("nemojax.kernels")}
  bad = {m: d for m, d in bad.items() if d}
  assert not bad, f"kernels/ may import nothing from nemojax/ outside kernels/; found {bad}"


def test_model_does_not_import_upwards():
  bad = {m: sorted(i for i in deps if i == "nemojax" or i.startswith(ABOVE_MODEL))
         for m, deps in _graph().items() if m in MODEL_MODULES}
  bad = {m: d for m, d in bad.items() if d}
  assert not bad, f"the model imports the engine, front door or checkpoints: {bad}"


def _repo_python_files():
  for folder in (*PACKAGES, "tests", "benchmarks", "notebooks"):
    yield from sorted((ROOT / folder).rglob("*.py"))


def test_file_sizes():
  big = {str(p.relative_to(ROOT)): n for p in _repo_python_files()
         if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES}
  assert not big, f"files over {MAX_FILE_LINES} lines: {big}"


def test_function_sizes():
  long = []
  for path in _repo_python_files():
    lines = path.read_text().splitlines()
    for node in ast.walk(ast.parse("\n".join(lines), str(path))):
      if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        continue
      body = lines[node.lineno - 1:node.end_lineno]
      if len(body) > MAX_FUNCTION_LINES and not any(KERNEL_BODY_MARK in b for b in body):
        long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({len(body)} lines)")
  assert not long, (f"functions over {MAX_FUNCTION_LINES} lines (a kernel body may carry "
                    f"'{KERNEL_BODY_MARK} why'): {long}")


def _private_uses(path: pathlib.Path) -> list[str]:
  """Underscore names of the package used in `path` (imported, or read off an imported name)."""
  tree = ast.parse(path.read_text(), str(path))
  bound, found = set(), []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for a in node.names:
        if a.name.split(".")[0] == "nemojax":
          bound.add(a.asname or a.name.split(".")[0])
    elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "nemojax":
      for a in node.names:
        bound.add(a.asname or a.name)
        if a.name.startswith("_"):
          found.append(f"{path.name}:{node.lineno} imports {node.module}.{a.name}")
  for node in ast.walk(tree):
    if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
        and not node.attr.startswith("__")):
      root = node.value
      while isinstance(root, ast.Attribute):
        root = root.value
      if isinstance(root, ast.Name) and root.id in bound:
        found.append(f"{path.name}:{node.lineno} uses .{node.attr}")
  return found


@pytest.mark.parametrize("folder", ["tests", "benchmarks", "notebooks"])
def test_no_private_names_outside_the_package(folder):
  found = [u for p in sorted((ROOT / folder).rglob("*.py")) for u in _private_uses(p)]
  assert not found, f"{folder}/ reaches private names of the package: {found}"


def test_structure_checks_can_fail(tmp_path):
  """The parsers above see what they must: a cycle, a private name, a back-arrow."""
  modules = {"nemojax.a", "nemojax.b"}
  src = tmp_path / "nemojax"
  src.mkdir()
  (src / "a.py").write_text("from nemojax import b\nimport nemojax.sampler\n")
  private = "_helper"  # kept out of this file's own import lines
  (src / "t.py").write_text(f"from nemojax import sampler as S\nS.{private}()\n"
                            f"from nemojax.x import {private}\n")
  global ROOT
  saved, ROOT = ROOT, tmp_path
  try:
    assert _imports(src / "a.py", modules) == {"nemojax.b", "nemojax.sampler"}
    assert len(_private_uses(src / "t.py")) == 2
  finally:
    ROOT = saved
