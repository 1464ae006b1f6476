"""The memory room's import graph has no loops (issue 8.3), and fail points do what docs/failpoints.md says."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "reco_ref" / "memory"


def _imports(path: Path) -> set[str]:
    """Sibling modules of reco_ref.memory that ``path`` imports anywhere (top level or inside functions)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                out.add(node.module.split(".")[0])
            else:  # from . import format as fmt
                out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("reco_ref.memory."):
            out.add(node.module.split(".")[2])
    return out


def test_memory_imports_form_no_cycle_and_none_is_lazy():
    mods = {p.stem: p for p in PKG.glob("*.py") if p.stem != "__init__"}
    graph = {m: _imports(p) & set(mods) for m, p in mods.items()}
    # depth-first search for a back edge
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            assert state.get(n) != 1, f"import cycle: {' -> '.join(path + [m, n])}"
            if n not in state:
                visit(n, path + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    # sibling imports sit at module top level (a lazy import is how a loop hides).  Two deferrals are
    # allowed, each for a reason that is not a loop: cli.py defers .commands so `reco-ref --help` does not
    # load hnswlib (nothing imports cli), commands.py defers .dask_build (Dask is an optional dependency).
    allowed = {("cli", "commands"), ("cli", None), ("commands", "dask_build")}
    assert not any("cli" in deps for deps in graph.values())
    for m, p in mods.items():
        tree = ast.parse(p.read_text())
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and id(node) not in top \
                    and (m, node.module) not in allowed:
                raise AssertionError(f"{p.name}:{node.lineno}: lazy import of .{node.module}")


def test_failpoint_is_inert_unless_armed_and_kills_when_armed(monkeypatch):
    from reco_ref import failpoints

    monkeypatch.delenv(failpoints.ENV, raising=False)
    failpoints.failpoint("memory.commit")  # nothing happens
    monkeypatch.setenv(failpoints.ENV, "memory.chunk:2, other")
    assert failpoints.armed() == {"memory.chunk:2", "other"}
    failpoints.failpoint("memory.chunk", 1)  # not this one
    code = "from reco_ref.failpoints import failpoint\nfailpoint('memory.chunk', 2)\nprint('survived')"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == -9 and "survived" not in p.stdout


def test_failpoint_alias_and_every_point_documented(monkeypatch):
    """``RECO_REF_TRAIN_KILL_AT_STEP=N`` (the training loop's old kill hook) arms ``train.step:N``, and every
    point the runtime marks is a row of docs/failpoints.md."""
    import re

    from reco_ref import failpoints

    monkeypatch.delenv(failpoints.ENV, raising=False)
    monkeypatch.setenv("RECO_REF_TRAIN_KILL_AT_STEP", "27")
    assert failpoints.armed() == {"train.step:27"}
    failpoints.failpoint("train.step", 26)  # not this one
    code = "from reco_ref.failpoints import failpoint\nfailpoint('train.step', 27)\nprint('survived')"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == -9 and "survived" not in p.stdout
    points = {m for f in (ROOT / "reco_ref").rglob("*.py")
              for m in re.findall(r"""\bfailpoint\(["']([\w.-]+)["']""", f.read_text(encoding="utf-8"))}
    assert {"memory.chunk", "memory.commit", "train.step"} <= points
    doc = (ROOT / "docs" / "failpoints.md").read_text(encoding="utf-8")
    assert not [pt for pt in points if f"| `{pt}" not in doc], "fail points missing from docs/failpoints.md"
