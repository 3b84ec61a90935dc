"""Every notebook runs top to bottom in TINY mode on the CPU; its cells assert what they show."""

import json
import os
import pathlib
import runpy
import sys

import pytest

from nemojax.testing import notebook_model

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.py"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, monkeypatch, capsys):
  monkeypatch.setenv("NEMOJAX_NOTEBOOK_TINY", "1")
  monkeypatch.delenv("NEMOJAX_MODEL", raising=False)
  monkeypatch.delenv("NEMOJAX_DOWNLOAD", raising=False)
  # Plots draw off screen when matplotlib is installed; without it the notebooks skip them.
  monkeypatch.setenv("MPLBACKEND", "Agg")
  runpy.run_path(str(path), run_name="__main__")
  if "matplotlib.pyplot" in sys.modules:
    sys.modules["matplotlib.pyplot"].close("all")
  out = capsys.readouterr().out
  assert "backend:" in out and "tiny: True" in out


def test_every_notebook_has_a_tiny_switch_and_an_ipynb_twin(monkeypatch):
  monkeypatch.setenv("NEMOJAX_NOTEBOOK_TINY", "1")
  assert notebook_model().tiny  # the switch every notebook's set-up cell goes through
  assert len(NOTEBOOKS) >= 5, f"expected the five research notebooks, found {NOTEBOOKS}"
  for path in NOTEBOOKS:
    text = path.read_text()
    assert "notebook_model()" in text, f"{path.name}: no TINY switch (testing.notebook_model)"
    assert "TPU" in text, f"{path.name}: say what happens on a TPU"
    twin = path.with_suffix(".ipynb")
    assert twin.is_file(), f"{path.name}: no executed {twin.name} (jupytext --to ipynb --execute)"
    # The twins hold one GPU run's outputs and figures (the 9B shape): small, but not tiny.
    assert os.path.getsize(twin) < 500_000, f"{twin.name} is over 500 KB"
    if "plt.show()" in text:  # a run with matplotlib's inline backend keeps its figures
      assert '"image/png"' in twin.read_text(), f"{twin.name}: the source draws figures, none kept"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_ipynb_twin_is_the_executed_source(path):
  """The committed .ipynb has the .py's code cells, every one executed (it is a run of this
  source, wherever it ran: the twins come from a GPU run, the tests run the .py on a CPU)."""
  jupytext = pytest.importorskip("jupytext")
  source = [c.source for c in jupytext.read(path).cells
            if c.cell_type == "code" and c.source.strip()]
  twin = json.loads(path.with_suffix(".ipynb").read_text())
  cells = [c for c in twin["cells"] if c["cell_type"] == "code" and "".join(c["source"]).strip()]
  assert ["".join(c["source"]) for c in cells] == source, (
      f"{path.stem}.ipynb is not a run of {path.name}: rebuild it (see README, Notebooks)")
  unrun = [i for i, c in enumerate(cells) if c.get("execution_count") is None]
  assert not unrun, f"{path.stem}.ipynb: code cells {unrun} were not executed"
  errors = [o.get("ename") for c in cells for o in c.get("outputs", [])
            if o["output_type"] == "error"]
  assert not errors, f"{path.stem}.ipynb holds errors: {errors}"
