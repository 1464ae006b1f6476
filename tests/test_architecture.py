"""The house rules of docs/architecture.md, read off the source with ``ast`` (no import needed, fast).

* every module of ``reco_ref/`` belongs to a known room, and a room imports only the rooms listed for it
  in ``MAY_IMPORT`` (the pipeline order tokenizers → encoders → memory → fusion → reco → train → eval; fusion
  imports neither memory nor encoders) plus the shared helpers, which import no room;
* eval/ and export/ apply trained weights through ``reco/`` (the weights file, retrieve → fuse), and import
  ``train/`` only where they train (``TRAINS``, each with its reason);
* no import cycle between modules — counting imports inside functions too (a lazy import hides a loop,
  it does not remove it);
* the runtime never imports the build/export frameworks (``torch``, ``onnx``): only ``reco_ref/export/``
  may, and only inside functions.
* no module is over 600 lines (``MAX_LINES``) unless ``LONG_FILES`` lists it with its reason.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "reco_ref"

#: top-level modules that are shared helpers (import no room) — ARCHITECTURE.md "shared helpers"
SHARED = {"reco_ref", "reco_ref.errors", "reco_ref.io", "reco_ref.checks", "reco_ref.paths", "reco_ref.backends",
          "reco_ref.failpoints", "reco_ref.template_fmt", "reco_ref.options", "reco_ref.datasets",
          "reco_ref.chunks"}

#: room → the rooms it may import (besides itself and the shared helpers)
MAY_IMPORT = {
    "tokenizers": set(),
    "encoders": {"tokenizers"},
    "memory": {"tokenizers", "encoders"},
    "fusion": set(),
    "reco": {"memory", "fusion"},  # the model: the weights file and retrieve → fuse; imports neither train nor eval
    "train": {"memory", "fusion", "reco"},  # the loop retrieves from a memory (issue 9); memory never imports train
    "eval": {"tokenizers", "encoders", "memory", "fusion", "reco", "train"},
    "classify": {"tokenizers", "encoders", "memory", "fusion", "reco", "train", "eval"},
    "export": {"tokenizers", "encoders", "fusion", "reco"},  # export-fusion reads the weights file from reco/
    "cli": {"tokenizers", "encoders", "memory", "fusion", "reco", "train", "eval", "classify", "export"},
}

#: the modules of eval/ and export/ that may import train/, each with its reason; every other one applies trained
#: weights through reco/ (issue 22 item 1: inference does not live in the training room)
TRAINS = {
    "reco_ref.eval.ablate": "ablate trains the fusion module and its controls",
    "reco_ref.eval.cli": "ablate's parser reuses train's data and recipe options",
    "reco_ref.eval.demo": "step 4 prints the RECO loss at init (the objective training lowers)",
}

#: known upward imports, each with its reason; an edge not listed here fails the test
KNOWN_UPWARD: set[tuple[str, str]] = set()

#: rooms whose internal import cycle is tolerated (none: memory's store ⇄ shards loop is gone, issue 8 item 3)
CYCLE_EXEMPT_ROOMS: set[str] = set()


def _modules() -> dict[str, Path]:
    mods = {}
    for p in PKG.rglob("*.py"):
        parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    return mods


MODULES = _modules()


def _imports(name: str, path: Path) -> tuple[set[str], set[str]]:
    """(reco_ref modules imported anywhere in the file, top-level names of other packages imported)."""
    is_pkg = path.name == "__init__.py"
    ours, theirs = set(), set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for a in node.names:
                top = a.name.split(".")[0]
                if top == "reco_ref":
                    ours.add(a.name)
                else:
                    theirs.add(top)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "reco_ref":
                theirs.add(mod.split(".")[0])
                continue
            for a in node.names:  # `from pkg import sub` imports the submodule when there is one
                ours.add(f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODULES else mod)
    return {m for m in ours if m in MODULES and m != name}, theirs


GRAPH = {n: _imports(n, p)[0] for n, p in MODULES.items()}


def room(module: str) -> str:
    if module in SHARED:
        return "shared"
    if module == "reco_ref.demo":  # being moved into reco_ref/eval/ (issue 8 item 1)
        return "eval"
    parts = module.split(".")
    if len(parts) == 2 and parts[1] == "cli":
        return "cli"
    return parts[1]


def test_every_module_is_in_a_known_room():
    unknown = sorted(m for m in MODULES if room(m) not in MAY_IMPORT and room(m) != "shared")
    assert not unknown, f"modules outside the rooms of docs/architecture.md (add the room to MAY_IMPORT and the doc): {unknown}"


def test_rooms_import_only_the_rooms_above_them():
    bad = []
    for mod, deps in GRAPH.items():
        r = room(mod)
        allowed = set() if r == "shared" else MAY_IMPORT[r] | {"shared"}
        for dep in deps:
            rd = room(dep)
            if rd != r and rd not in allowed and (mod, dep) not in KNOWN_UPWARD:
                bad.append(f"{mod} ({r}) imports {dep} ({rd})")
    assert not bad, "imports against the room order:\n" + "\n".join(sorted(bad))


def test_inference_applies_weights_through_reco_not_train():
    bad = sorted(f"{mod} imports {dep}" for mod, deps in GRAPH.items() if room(mod) in ("eval", "export")
                 and mod not in TRAINS for dep in deps if room(dep) == "train")
    assert not bad, "inference reaching into the training room (use reco_ref.reco):\n" + "\n".join(bad)
    assert "reco_ref.reco.weights" in MODULES and "reco_ref.reco.refine" in MODULES, "the model's room is missing"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    cycles = [c for c in _cycles(GRAPH) if not all(room(m) in CYCLE_EXEMPT_ROOMS for m in c)]
    assert not cycles, f"import cycles: {cycles}"


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_runtime_never_imports_build_frameworks():
    bad = []
    for mod, path in MODULES.items():
        if room(mod) == "export":
            continue
        heavy = _imports(mod, path)[1] & {"torch", "onnx", "open_clip", "tensorflow"}
        if heavy:
            bad.append(f"{mod}: {sorted(heavy)}")
    assert not bad, "runtime modules importing build/export frameworks (move them to reco_ref/export or scripts/tools):\n" + "\n".join(bad)


def test_export_imports_its_frameworks_lazily():
    for mod, path in MODULES.items():
        if room(mod) != "export":
            continue
        top = [n for n in ast.parse(path.read_text(encoding="utf-8")).body if isinstance(n, (ast.Import, ast.ImportFrom))]
        names = {a.name.split(".")[0] for n in top for a in n.names} | {(n.module or "").split(".")[0] for n in top if isinstance(n, ast.ImportFrom)}
        assert not names & {"torch", "onnx", "open_clip"}, f"{mod} imports a framework at module level: the CLI would need it to start"


#: the most lines a module of reco_ref/ may hold (issue 22 item 4: a file a reader can hold in mind, split by concern)
MAX_LINES = 600

#: modules allowed over MAX_LINES, each with its reason; an entry that is no longer over the limit fails too
LONG_FILES = {
    "reco_ref.fusion.reference": "the NumPy reference is the readable truth of docs/reco.md §2: every step pair, then "
                                 "the layer composed of them, read top to bottom; the calling-convention walk "
                                 "(tests/fusion/test_fusion_convention.py) reads the steps off this one module",
}


def _too_long(modules: dict[str, Path], limit: int = MAX_LINES) -> dict[str, int]:
    """Module -> line count, for the modules over ``limit`` lines."""
    counts = {mod: len(path.read_text(encoding="utf-8").splitlines()) for mod, path in modules.items()}
    return {mod: n for mod, n in counts.items() if n > limit}


def test_no_module_over_600_lines():
    over = _too_long(MODULES)
    bad = sorted(f"{MODULES[m].relative_to(PKG.parent)}: {n} lines" for m, n in over.items() if m not in LONG_FILES)
    assert not bad, (f"modules over {MAX_LINES} lines (split them by concern, or list them in LONG_FILES with the "
                     "reason):\n" + "\n".join(bad))
    stale = sorted(m for m in LONG_FILES if m not in over)
    assert not stale, f"LONG_FILES lists modules that are no longer over {MAX_LINES} lines (remove them): {stale}"


def test_the_line_check_sees_a_long_file(tmp_path):
    (tmp_path / "long.py").write_text("x = 1\n" * (MAX_LINES + 1), encoding="utf-8")
    (tmp_path / "short.py").write_text("x = 1\n" * MAX_LINES, encoding="utf-8")
    assert _too_long({"a.long": tmp_path / "long.py", "a.short": tmp_path / "short.py"}) == {"a.long": MAX_LINES + 1}
