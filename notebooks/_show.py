"""``show_figure(name)``: a notebook's figure inline in Jupyter, or saved as a PNG when there is no display.

Every notebook ends a figure with ``show_figure("name")`` where it would call ``plt.show()``:

* in Jupyter, or in a script with a display (an interactive matplotlib backend), it is ``plt.show()``;
* in a script without a display (a non-interactive backend such as Agg: ``python3 notebooks/X.py`` on a
  server, or ``MPLBACKEND=Agg``) the figure is saved as ``notebooks/figures/X/NN-name.png`` (``NN`` counts the
  figures in order) and its path is printed;
* ``python3 notebooks/X.py --out DIR`` (or the environment variable ``RECO_REF_FIGURES=DIR``, which Jupyter
  honours too) saves the PNGs into ``DIR`` instead, whether or not they are also shown.

Run as a script, a notebook first prints the one command that opens it in Jupyter. ``notebooks/figures/``
is git-ignored. This file is plumbing, not a notebook: it holds no RECO logic.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt

NON_INTERACTIVE = {"agg", "cairo", "pdf", "pgf", "ps", "svg", "template"}  # matplotlib's backends with no window


def _out_arg(argv: list[str]) -> str | None:
    """The value of ``--out DIR`` / ``--out=DIR`` in ``argv``, else None."""
    for i, a in enumerate(argv):
        if a == "--out" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--out="):
            return a.split("=", 1)[1]
    return None


_main_file = getattr(sys.modules.get("__main__"), "__file__", None)
SCRIPT = bool(_main_file) and "ipykernel" not in sys.modules   # `python3 notebooks/X.py`, not a Jupyter kernel
_asked = (_out_arg(sys.argv[1:]) if SCRIPT else None) or os.environ.get("RECO_REF_FIGURES") or None
OUT = (Path(_asked) if _asked else
       Path(__file__).resolve().parent / "figures" / (Path(_main_file).stem if SCRIPT else "notebook"))
_saved = 0


def _shown() -> bool:
    """Can ``plt.show()`` put the figure in front of someone (Jupyter's inline backend, a window)?"""
    return matplotlib.get_backend().lower() not in NON_INTERACTIVE


def _nice(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def show_figure(name: str = "", fig=None) -> Path | None:
    """Show ``fig`` (default: the current figure); save it as a PNG if it cannot be shown or ``--out`` asked.

    Returns the PNG's path when one was written.
    """
    global _saved
    fig = fig if fig is not None else plt.gcf()
    shown, path = _shown(), None
    if _asked or not shown:
        _saved += 1
        OUT.mkdir(parents=True, exist_ok=True)
        path = OUT / f"{_saved:02d}{'-' + name if name else ''}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        print(f"[figure {_saved} saved: {_nice(path)}]")
    if shown:
        plt.show()
    else:
        plt.close(fig)
    return path


if SCRIPT:
    _nb = Path(sys.argv[0])
    print(f"[{_nb} run as a script; as a notebook in Jupyter: "
          f"jupytext --to ipynb {_nb} && jupyter lab {_nb.with_suffix('.ipynb')}]")
