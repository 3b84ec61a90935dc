"""Every notebook runs top to bottom on a tiny model."""

import pathlib
import runpy

import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.py"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, monkeypatch, capsys):
  monkeypatch.setenv("NEMOJAX_NOTEBOOK_TINY", "1")
  runpy.run_path(str(path), run_name="__main__")
  out = capsys.readouterr().out
  assert "backend:" in out and "state change" in out
  assert "Traceback" not in out


def test_there_are_notebooks():
  assert NOTEBOOKS, "notebooks/ should hold at least one py:percent notebook"
