"""Every notebook in ``notebooks/`` runs top to bottom, offline, in a fresh kernel.

The notebooks' source of truth is jupytext's *percent* format (``notebooks/*.py``: ``# %%`` starts a code cell,
``# %% [markdown]`` a text cell), so diffs stay readable and no outputs are ever committed.  Open one in Jupyter
with ``jupytext --to ipynb notebooks/fusion_by_hand.py`` (or the jupytext Jupyter plug-in), or run it as a plain
script: ``python3 notebooks/fusion_by_hand.py``.

Here each one is converted in memory and executed by nbclient in a temporary working folder, with this checkout
first on ``PYTHONPATH`` (so the kernel imports the code under test, not another install); figures come back
as PNGs rendered by matplotlib's Agg (the kernel's inline backend).  A cell that raises fails the test with the cell's traceback.  The run time of each
notebook is printed (``-s``); the budget is < 60 s on 2 cores (kept by design, not asserted: no timed asserts).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.py"))
CELL_TIMEOUT_S = 300  # a hung cell fails instead of blocking the suite; far above any cell's real time

jupytext = pytest.importorskip("jupytext", reason="jupytext (test extra) reads the notebooks' percent-format source")
nbclient = pytest.importorskip("nbclient", reason="nbclient (test extra) executes the notebooks")


def test_notebooks_exist_and_no_ipynb_committed():
    assert NOTEBOOKS, "notebooks/*.py: no notebook found"
    stray = sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))
    assert not stray, f"notebooks/: {stray} — the .py percent files are the source of truth; do not commit .ipynb"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_percent_format(path):
    text = path.read_text(encoding="utf-8")
    assert "format_name: percent" in text.split("# %%", 1)[0], f"{path.name}: missing the jupytext percent header"
    nb = jupytext.reads(text, fmt="py:percent")
    kinds = {c.cell_type for c in nb.cells}
    assert {"code", "markdown"} <= kinds, f"{path.name}: expected both code and markdown cells, found {kinds}"
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend (Agg-rendered PNGs)
    monkeypatch.setenv("RECO_REF_NOTEBOOK_TEST", "1")
    nb = jupytext.read(path, fmt="py:percent")
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    t = time.perf_counter()
    client.execute()
    with capsys.disabled():
        print(f"\n{path.name}: executed in {time.perf_counter() - t:.1f} s")
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    images = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
                 for o in c.get("outputs", []))
    assert images >= 1, f"{path.name}: no figure was drawn"
