"""Every notebook in ``notebooks/`` runs top to bottom, offline, in a fresh kernel.

The notebooks' source of truth is jupytext's *percent* format (``notebooks/*.py``: ``# %%`` starts a code cell,
``# %% [markdown]`` a text cell), so diffs stay readable and no outputs are ever committed.  Open one in Jupyter
with ``jupytext --to ipynb notebooks/fusion_by_hand.py`` (or the jupytext Jupyter plug-in), or run it as a plain
script: ``python3 notebooks/fusion_by_hand.py``.

Here each one is converted in memory and executed by nbclient in a temporary working folder, with this checkout
first on ``PYTHONPATH`` (so the kernel imports the code under test, not another install) and ``notebooks/``
second (for ``notebooks/_show.py``, the notebooks' one helper: show a figure, or save it when there is no
display); figures come back as PNGs rendered by matplotlib's Agg (the kernel's inline backend).  A cell that
raises fails the test with the cell's traceback.  Each one is also run as a plain script without a display
(``python3 notebooks/X.py --out DIR`` under ``MPLBACKEND=Agg``): it must save its figures as PNGs into DIR and
print where.  Both ways, ``TMPDIR`` points at an empty folder that must still be empty afterwards: a run leaves
nothing in ``/tmp``.  The run time of each notebook is printed (``-s``); the budget is < 60 s on 2 cores (kept by
design, not asserted: no timed asserts).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted(p for p in (ROOT / "notebooks").glob("*.py") if not p.name.startswith("_"))  # _show.py: a helper
CELL_TIMEOUT_S = 300  # a hung cell fails instead of blocking the suite; far above any cell's real time
# What a run may leave in TMPDIR that is not the notebook's: onnxruntime (the encoders' runtime) writes one
# fixed-name 51-byte session-id file, `$TMPDIR/.ses`, at import and overwrites it on every later import.
FOREIGN_TMP = {".ses"}

jupytext = pytest.importorskip("jupytext", reason="jupytext (test extra) reads the notebooks' percent-format source")
nbclient = pytest.importorskip("nbclient", reason="nbclient (test extra) executes the notebooks")


def test_notebooks_exist_and_no_ipynb_committed():
    assert NOTEBOOKS, "notebooks/*.py: no notebook found"
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout: cannot tell committed .ipynb files from local ones")
    # `jupytext --to ipynb notebooks/X.py` (how a notebook is opened in Jupyter) writes a git-ignored .ipynb beside it
    tracked = subprocess.run(["git", "ls-files", "--", "notebooks/*.ipynb", "notebooks/figures"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
    assert not tracked, f"{tracked}: the .py percent files are the source of truth; do not commit .ipynb or figures"


def _tmpdir(tmp_path: Path) -> Path:
    """An empty folder for the run's TMPDIR (checked by :func:`_left_in`)."""
    d = tmp_path / "TMPDIR"
    d.mkdir()
    return d


def _left_in(tmpdir: Path) -> list[str]:
    return sorted(p.name for p in tmpdir.iterdir() if p.name not in FOREIGN_TMP)


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
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), str(ROOT / "notebooks"),
                                                      os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend (Agg-rendered PNGs)
    monkeypatch.delenv("RECO_REF_FIGURES", raising=False)  # shown inline, not saved
    monkeypatch.setenv("RECO_REF_NOTEBOOK_TEST", "1")
    tmpdir = _tmpdir(tmp_path)
    monkeypatch.setenv("TMPDIR", str(tmpdir))
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
    assert not _left_in(tmpdir), f"{path.name}: left {_left_in(tmpdir)} in TMPDIR"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_as_script_saves_figures(path, tmp_path, capsys):
    """`python3 notebooks/X.py` with no display: every figure lands in the output folder as a PNG, its path
    printed; the Jupyter command is printed; nothing is left in TMPDIR.  One notebook is pointed at its folder by
    ``RECO_REF_FIGURES``, the others by ``--out``."""
    import matplotlib

    out, tmpdir = tmp_path / "figures", _tmpdir(tmp_path)
    env = {**os.environ, "MPLBACKEND": "Agg", "TMPDIR": str(tmpdir), "RECO_REF_NOTEBOOK_TEST": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           # matplotlib's own cache, resolved here: a fresh one would be built in TMPDIR if $HOME is read-only
           "MPLCONFIGDIR": os.environ.get("MPLCONFIGDIR") or matplotlib.get_configdir()}
    env.pop("RECO_REF_FIGURES", None)
    args = [sys.executable, str(path)]
    if path.stem == "fusion_by_hand":
        env["RECO_REF_FIGURES"] = str(out)
    else:
        args += ["--out", str(out)]
    t = time.perf_counter()
    run = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=CELL_TIMEOUT_S)
    with capsys.disabled():
        print(f"\n{path.name} as a script: {time.perf_counter() - t:.1f} s")
    assert run.returncode == 0, f"{path.name} failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    assert f"jupytext --to ipynb {path} && jupyter lab {path.with_suffix('.ipynb')}" in run.stdout
    printed = re.findall(r"\[figure \d+ saved: (.+\.png)\]", run.stdout)
    pngs = sorted(out.glob("*.png"))
    assert pngs, f"{path.name}: no PNG in {out}:\n{run.stdout[-2000:]}"
    assert sorted(tmp_path / p for p in printed) == pngs, (printed, pngs)   # printed relative to the cwd
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000 for p in pngs)
    assert "FigureCanvasAgg is non-interactive" not in run.stderr   # plt.show() was never called without a display
    assert not _left_in(tmpdir), f"{path.name}: left {_left_in(tmpdir)} in TMPDIR"
