"""The published numbers reproduce to their printed digits from shipped files (issue 21).

Every headline number of README.md, docs/results.md, docs/demo.md and weights/reco-mini-fusion/MODEL_CARD.md is
read out of the page (tables are parsed by header and row, sentences by a pattern) and compared, as printed text,
with the value its command measures formatted to the same number of decimals. A mismatch names the page, the
cell, the printed and the measured value; every mismatch of a test is listed at once.

* default run (~15–40 s): ``reco-ref demo`` once, with the shipped ``fusion.npz`` (the existing demo tests run it
  with identity weights, so their run cannot be reused), for docs/demo.md's tables, the demo rows of
  docs/results.md and the model card, and README's flag sentence; the weights' own record
  (``weights/reco-mini-fusion/metrics.json`` and each ``.npz``'s ``meta``) for every RECO-headline cell.
* ``-m "slow or not slow"`` with ``../shared/data``: docs/results.md's "one row from the shipped file" commands
  (``reco-ref build-memory`` of the Flowers-102 train split, then ``reco-ref eval`` with ``lodo-flowers.npz``),
  run as printed in the page, against the page's Flowers-102 row (~1.5 min on 2 cores).
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
RESULTS = ROOT / "docs" / "results.md"
DEMO_MD = ROOT / "docs" / "demo.md"
FUSION = ROOT / "weights" / "reco-mini-fusion"
CARD = FUSION / "MODEL_CARD.md"
#: metrics.json run name of each shipped file
RUN_OF = {"fusion.npz": "ship", "lodo-flowers.npz": "lodo-flowers", "lodo-cub.npz": "lodo-cub"}
#: the dataset each leave-one-dataset-out file is scored on
LODO = {"flowers102": "lodo-flowers", "cub100": "lodo-cub"}

HAVE_RECO_MINI = (ROOT / "weights" / "reco-mini" / "encoder.json").is_file()
HAVE_FUSION = (FUSION / "metrics.json").is_file() and all((FUSION / f).is_file() for f in RUN_OF)
needs_fusion = pytest.mark.skipif(not HAVE_FUSION, reason="weights/reco-mini-fusion not present")


# ------------------------------------------------------------------------------------------ reading the pages
def _rel(p: Path) -> str:
    return p.relative_to(ROOT).as_posix()


def _text(page: Path) -> str:
    return page.read_text(encoding="utf-8")


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def tables(text: str) -> list[list[list[str]]]:
    """Every Markdown table of ``text``: rows of stripped cells, header first, the ``|---|`` line dropped."""
    out, cur = [], []
    for line in text.splitlines() + [""]:
        s = line.strip()
        if s.startswith("|") and s.endswith("|"):
            if not re.fullmatch(r"\|[\s:|-]+\|", s):
                cur.append(_cells(s))
        elif cur:
            out.append(cur)
            cur = []
    return out


def table(page: Path, *header: str, after: str | None = None) -> tuple[list[str], list[list[str]]]:
    """(header, body rows) of the first table of ``page`` (after the text ``after``) whose header has every
    column named in ``header``; fails, naming the page, when there is none."""
    text = _text(page)
    if after is not None:
        i = text.find(after)
        assert i >= 0, f"{_rel(page)}: {after!r} not found (update tests/docs/test_numbers_reproduce.py with the page)"
        text = text[i:]
    for t in tables(text):
        if all(h in t[0] for h in header):
            return t[0], t[1:]
    raise AssertionError(f"{_rel(page)}: no table with columns {header} (update tests/docs/test_numbers_reproduce.py "
                         "with the page)")


def row(page: Path, head: list[str], body: list[list[str]], first: str) -> dict[str, str]:
    """The row of a table whose first cell starts with ``first``, as {column: cell}."""
    hits = [r for r in body if r[0].startswith(first)]
    assert len(hits) == 1, f"{_rel(page)}: {len(hits)} rows start with {first!r} (expected one) in the table " \
                           f"{' | '.join(head)}"
    return dict(zip(head, hits[0]))


def sentence(page: Path, pattern: str) -> re.Match:
    """The first match of ``pattern`` in ``page`` (any run of white space in the page matches one space)."""
    text = re.sub(r"\s+", " ", _text(page))
    m = re.search(pattern, text)
    assert m, f"{_rel(page)}: no text matches {pattern!r} (update tests/docs/test_numbers_reproduce.py with the page)"
    return m


NUM = re.compile(r"[-+−]?\d+(?:,\d{3})*(?:\.\d+)?")


def numbers(cell: str) -> list[str]:
    """The printed numbers of a cell, in order (bold and prose around them dropped)."""
    return NUM.findall(cell.replace("**", ""))


def printed_like(measured: float, printed: str) -> str:
    """``measured`` formatted as ``printed`` is: the same number of decimals (and a sign when it has one)."""
    p = printed.replace("−", "-")
    d = len(p.split(".", 1)[1]) if "." in p else 0
    s = f"{measured:+.{d}f}" if p[0] in "+-" else f"{measured:.{d}f}"
    return s


class Ledger:
    """Collects comparisons; ``done()`` fails once, listing every mismatch (page, cell, printed, measured)."""

    def __init__(self) -> None:
        self.bad: list[str] = []
        self.n = 0

    def num(self, page: Path, cell: str, printed: str, measured: float) -> None:
        """A printed decimal against a measured float, compared to the printed digits."""
        self.n += 1
        want = printed_like(measured, printed)
        if printed.replace("−", "-") != want:
            self.bad.append(f"{_rel(page)}, {cell}: printed {printed}, measured {measured!r} (= {want} to the "
                            f"printed digits)")

    def cell(self, page: Path, where: str, cell: str, measured: list[float]) -> None:
        """Every number of a table cell (``a / b`` pairs included) against the measured values, in order."""
        got = numbers(cell)
        if len(got) < len(measured):
            self.n += 1
            self.bad.append(f"{_rel(page)}, {where}: printed {cell!r}, measured {measured} (expected "
                            f"{len(measured)} numbers)")
            return
        for i, (p, m) in enumerate(zip(got, measured)):
            self.num(page, where if len(measured) == 1 else f"{where} (number {i + 1})", p, m)

    def same(self, page: Path, cell: str, printed, measured) -> None:
        """An exact (integer or text) value."""
        self.n += 1
        if str(printed) != str(measured):
            self.bad.append(f"{_rel(page)}, {cell}: printed {printed}, measured {measured}")

    def done(self) -> None:
        assert self.n > 0, "nothing was compared"
        if self.bad:
            pytest.fail(f"{len(self.bad)} of {self.n} published numbers do not reproduce:\n  " + "\n  ".join(self.bad),
                        pytrace=False)


# ------------------------------------------------------------------------------------ the weights' own record
def _metrics() -> dict:
    return json.loads((FUSION / "metrics.json").read_text(encoding="utf-8"))


def _meta(name: str) -> dict:
    from reco_ref.reco.weights import META_KEY, decode_meta

    path = FUSION / name
    with np.load(path, allow_pickle=False) as z:  # the meta entry only: the arrays are not read
        return decode_meta(path, z[META_KEY])


def _top1(run: dict, ds: str, method: str, step0: bool = False) -> float:
    block = run["step0"] if step0 else run
    if ds == "clipart":
        return block["do_no_harm"][method]["top1"]
    return block["eval"][ds][method]["top1"]


@needs_fusion
def test_weights_record_agrees_with_itself():
    """Each shipped file's ``meta`` holds the numbers of metrics.json, kept epoch 0, saw what the docs say, and was
    trained with exact search; the docs say so."""
    runs = _metrics()["runs"]
    saw = {"fusion.npz": {"flowers102", "cub100"}, "lodo-flowers.npz": {"cub100"}, "lodo-cub.npz": {"flowers102"}}
    for name, run in RUN_OF.items():
        meta = _meta(name)
        for ds in ("flowers102", "cub100"):
            for m in ("frozen", "surrogate", "knn_vote", "reco"):
                assert meta["metrics"][ds][m] == runs[run]["eval"][ds][m]["top1"], (name, ds, m)
        for m in ("frozen", "surrogate", "reco"):
            assert meta["metrics"]["do_no_harm_clipart"][m] == runs[run]["do_no_harm"][m]["top1"], (name, m)
        # "epoch 0 kept": the shipped arrays are the step-0 layer, so its step-0 and shipped numbers are one
        assert (meta["selected"]["epoch"], meta["selected"]["step"]) == (0, 0), name
        assert runs[run]["selected"]["epoch"] == 0, name
        for ds in ("flowers102", "cub100"):
            assert runs[run]["step0"]["eval"][ds]["reco"]["top1"] == runs[run]["eval"][ds]["reco"]["top1"], (name, ds)
        assert {d["name"] for d in meta["saw_datasets"]} == saw[name], name  # leave-one-dataset-out is what it says
        assert meta["recipe"]["exact_search"] is True and meta["search"] == "uni", name
    # the search kind of every published number is stated: exact in training, HNSW at evaluation
    res = re.sub(r"\s+", " ", _text(RESULTS))
    assert "**Search:** exact in training; HNSW at evaluation" in res
    assert "every row uses the same HNSW search at evaluation" in re.sub(r"\s+", " ", _text(README))
    assert "training searched exactly" in re.sub(r"\s+", " ", _text(README))


@needs_fusion
def test_results_headline_table_is_the_weights_record():
    """docs/results.md, issue-18 table: every cell of the Flowers, CUB, in-domain and do-no-harm rows."""
    runs, L = _metrics()["runs"], Ledger()
    head, body = table(RESULTS, "evaluated on", "frozen", "RECO step 0", "RECO shipped", "RECO / vote")
    for ds, first in (("flowers102", "Flowers-102 test (`lodo-flowers.npz`)"),
                      ("cub100", "CUB-100 test (`lodo-cub.npz`)")):
        r, run = row(RESULTS, head, body, first), runs[LODO[ds]]
        where = f"table 'evaluated on | frozen | …', row {first!r}"
        for col, m in (("frozen", "frozen"), ("surrogate", "surrogate"), ("k-NN vote", "knn_vote"),
                       ("RECO shipped", "reco")):
            L.cell(RESULTS, f"{where}, column {col!r}", r[col], [_top1(run, ds, m)])
        L.cell(RESULTS, f"{where}, column 'RECO step 0'", r["RECO step 0"], [_top1(run, ds, "reco", step0=True)])
        ratio = 100 * _top1(run, ds, "reco") / _top1(run, ds, "knn_vote")
        L.cell(RESULTS, f"{where}, column 'RECO / vote' (%)", r["RECO / vote"], [ratio])
    first = "Flowers-102 / CUB-100 test (`fusion.npz`, in-domain)"
    r, ship = row(RESULTS, head, body, first), runs["ship"]
    L.cell(RESULTS, f"row {first!r}, column 'RECO step 0'", r["RECO step 0"],
           [_top1(ship, "flowers102", "reco", True), _top1(ship, "cub100", "reco", True)])
    L.cell(RESULTS, f"row {first!r}, column 'RECO shipped'", r["RECO shipped"],
           [_top1(ship, "flowers102", "reco"), _top1(ship, "cub100", "reco")])
    first = "clip-art vs Flowers + CUB memory, do no harm (195), every file"
    r = row(RESULTS, head, body, first)
    L.same(RESULTS, f"row {first!r}, column 'k-NN vote'", r["k-NN vote"], "—")
    for name, run in RUN_OF.items():  # "every file": each file's own do-no-harm run prints the same digits
        where = f"row {first!r} ({name})"
        for col, m, s0 in (("frozen", "frozen", False), ("surrogate", "surrogate", False),
                           ("RECO step 0", "reco", True), ("RECO shipped", "reco", False)):
            L.cell(RESULTS, f"{where}, column {col!r}", r[col], [_top1(runs[run], "clipart", m, s0)])
        gain = 100 * (_top1(runs[run], "clipart", "reco") - _top1(runs[run], "clipart", "frozen"))
        L.num(RESULTS, f"{where}, column 'target' (points above frozen)",
              re.search(r"\(([+−-][\d.]+)\)", r["target"]).group(1), gain)
    assert _top1(runs["ship"], "clipart", "reco") == runs["ship"]["do_no_harm"]["reco"]["top1"]
    # the paper's-claims section quotes the CUB-100 references of the same memory
    m = sentence(RESULTS, r"CUB-100 test, ([\d,]+) images, mode both, k = 10; frozen ([\d.]+), surrogate ([\d.]+), "
                          r"k-NN vote ([\d.]+)")
    cub = runs["lodo-cub"]["eval"]["cub100"]
    L.same(RESULTS, "'The paper's claims' preamble, CUB-100 test images", m.group(1), f"{cub['n']:,}")
    for g, key in ((2, "frozen"), (3, "surrogate"), (4, "knn_vote")):
        L.num(RESULTS, f"'The paper's claims' preamble, {key}", m.group(g), cub[key]["top1"])
    L.done()


@needs_fusion
def test_readme_headline_table_is_the_weights_record():
    """README.md, the RECO-HEADLINE table and the sentences under it."""
    runs, L = _metrics()["runs"], Ledger()
    text = _text(README)
    block = text[text.index("<!-- RECO-HEADLINE"):text.index("<!-- /RECO-HEADLINE -->")]
    (head, *body), = tables(block)
    fl, cub, clip = head[1], head[2], head[3]
    n = {fl: runs["lodo-flowers"]["eval"]["flowers102"]["n"], cub: runs["lodo-cub"]["eval"]["cub100"]["n"],
         clip: runs["ship"]["do_no_harm"]["n"]}
    for col, count in n.items():
        L.same(README, f"RECO-HEADLINE header {col!r} (images)", numbers(col)[-1], f"{count:,}")
    lodo = {fl: runs["lodo-flowers"], cub: runs["lodo-cub"]}
    dsof = {fl: "flowers102", cub: "cub100"}
    for first, m, s0 in (("frozen encoder", "frozen", False), ("surrogate", "surrogate", False),
                         ("k-NN label vote", "knn_vote", False), ("RECO at step 0", "reco", True),
                         ("**RECO**, weights trained on the *other* dataset", "reco", False)):
        r = row(README, head, body, first)
        for col in (fl, cub):
            L.cell(README, f"RECO-HEADLINE row {first!r}, column {col!r}", r[col], [_top1(lodo[col], dsof[col], m, s0)])
        where = f"RECO-HEADLINE row {first!r}, column {clip!r}"
        if m == "knn_vote":
            L.same(README, where, r[clip], "—")
        elif first.startswith("**RECO**"):  # lodo-flowers / lodo-cub
            L.cell(README, where, r[clip],
                   [_top1(runs["lodo-flowers"], "clipart", m), _top1(runs["lodo-cub"], "clipart", m)])
        else:
            L.cell(README, where, r[clip], [_top1(runs["ship"], "clipart", m, s0)])
    first = "RECO, shipped `fusion.npz`"
    r = row(README, head, body, first)
    for col, ds in ((fl, "flowers102"), (cub, "cub100"), (clip, "clipart")):
        L.cell(README, f"RECO-HEADLINE row {first!r}, column {col!r}", r[col], [_top1(runs["ship"], ds, "reco")])
    m = sentence(README, r"Leave-one-dataset-out RECO reaches (\d+) % \(Flowers\) and (\d+) % \(CUB\) of the k-NN vote")
    for g, ds in ((1, "flowers102"), (2, "cub100")):
        run = runs[LODO[ds]]
        L.num(README, f"'reaches … % ({ds}) of the k-NN vote'", m.group(g),
              100 * _top1(run, ds, "reco") / _top1(run, ds, "knn_vote"))
    m = sentence(README, r"stays within ([\d.]+) points of the frozen encoder \(above it\)")
    for run in ("lodo-flowers", "lodo-cub"):
        gain = 100 * (_top1(runs[run], "clipart", "reco") - _top1(runs[run], "clipart", "frozen"))
        assert gain > 0, f"README.md: 'above it', but {run} is {gain:.2f} points below frozen on the clip-art"
        L.num(README, f"'stays within … points of the frozen encoder' ({run})", m.group(1), gain)
    L.done()


@needs_fusion
def test_model_card_metrics_table_is_the_weights_record():
    """MODEL_CARD.md, the Metrics table (the demo row is checked with the demo run below)."""
    runs, L = _metrics()["runs"], Ledger()
    head, body = table(CARD, "data", "frozen", "step 0", "shipped")
    for ds, first in (("flowers102", "Flowers-102 test, `lodo-flowers.npz`"),
                      ("cub100", "CUB-100 test, `lodo-cub.npz`")):
        r, run = row(CARD, head, body, first), runs[LODO[ds]]
        for col, m, s0 in (("frozen", "frozen", False), ("surrogate", "surrogate", False),
                           ("k-NN vote", "knn_vote", False), ("step 0", "reco", True), ("shipped", "reco", False)):
            L.cell(CARD, f"Metrics row {first!r}, column {col!r}", r[col], [_top1(run, ds, m, s0)])
    first = "Flowers-102 / CUB-100 test, `fusion.npz` (in-domain)"
    r = row(CARD, head, body, first)
    for col, s0 in (("step 0", True), ("shipped", False)):
        L.cell(CARD, f"Metrics row {first!r}, column {col!r}", r[col],
               [_top1(runs["ship"], "flowers102", "reco", s0), _top1(runs["ship"], "cub100", "reco", s0)])
    first = "clip-art vs Flowers + CUB memory (do no harm), every file"
    r = row(CARD, head, body, first)
    for run in RUN_OF.values():
        for col, m, s0 in (("frozen", "frozen", False), ("surrogate", "surrogate", False),
                           ("step 0", "reco", True), ("shipped", "reco", False)):
            L.cell(CARD, f"Metrics row {first!r} ({run}), column {col!r}", r[col], [_top1(runs[run], "clipart", m, s0)])
    L.done()


# ------------------------------------------------------------------------------------------ the demo, once
@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict:
    """``reco-ref demo`` as docs/results.md prints it (the shipped fusion.npz), into a temporary --out:
    its results.json."""
    if not (HAVE_RECO_MINI and HAVE_FUSION):
        pytest.skip("weights/reco-mini or weights/reco-mini-fusion not present")
    from reco_ref.cli import main

    out = tmp_path_factory.mktemp("numbers") / "demo"
    assert main(["demo", "--out", str(out), "--quiet"]) == 0
    r = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert Path(r["fusion"]["trained_weights"]).resolve() == (FUSION / "fusion.npz").resolve()
    assert r["search"]["k"] == 10
    return r


METHOD_OF = {"frozen": "frozen", "surrogate": "surrogate", "1-NN": "1-NN", "10-NN vote": "k-NN vote",
             "k-NN vote": "k-NN vote", "RECO (shipped)": "RECO", "RECO": "RECO"}


def _set_of(cell: str) -> str:
    return "flags" if cell.startswith("flags") else "clipart" if cell.startswith("clip-art") else cell


def test_demo_md_comparison_table_reproduces(demo):
    """docs/demo.md, step 6's measured table (top-1, right, fixed, broken, missed), and the sentence under it."""
    L = Ledger()
    head, body = table(DEMO_MD, "set", "method", "top-1", "right", "fixed", "broken", "missed")
    seen, current = set(), None
    for cells in body:
        r = dict(zip(head, cells))
        current = _set_of(r["set"]) if r["set"] else current
        c, m = demo["compare"][current], METHOD_OF[r["method"]]
        where = f"step-6 table, set {current!r}, method {r['method']!r}"
        seen.add((current, m))
        L.cell(DEMO_MD, f"{where}, column 'top-1'", r["top-1"], [c["top1"][m]])
        L.same(DEMO_MD, f"{where}, column 'right'", r["right"], f"{c['counts'][m]['right']}/{c['queries']}")
        for col in ("fixed", "broken", "missed"):
            L.same(DEMO_MD, f"{where}, column {col!r}", r[col], "—" if m == "frozen" else c["counts"][m][col])
    assert len(seen) == 10, f"docs/demo.md step-6 table: {sorted(seen)} (expected 5 methods × 2 sets)"
    # the set labels name the query counts
    for cells in body:
        if cells[0]:
            s = _set_of(cells[0])
            L.same(DEMO_MD, f"step-6 table, set cell {cells[0]!r} (queries)", numbers(cells[0])[0],
                   demo["compare"][s]["queries"])
    m = sentence(DEMO_MD, r"they fix (\d+) flags and break (\d+) \(")
    L.same(DEMO_MD, "'they fix … flags'", m.group(1), demo["compare"]["flags"]["counts"]["RECO"]["fixed"])
    L.same(DEMO_MD, "'… and break …' (flags)", m.group(2), demo["compare"]["flags"]["counts"]["RECO"]["broken"])
    m = sentence(DEMO_MD, r"On the clip-art RECO fixes (\d+) queries and breaks (\d+)")
    clip = demo["compare"]["clipart"]["counts"]["RECO"]
    L.same(DEMO_MD, "'On the clip-art RECO fixes … queries'", m.group(1), clip["fixed"])
    L.same(DEMO_MD, "'… and breaks …' (clip-art)", m.group(2), clip["broken"])
    L.done()


def test_demo_md_steps_1_to_5_reproduce(demo):
    """docs/demo.md, the 'Measured (shipped data, k = 10)' table of steps 1–5 and the numbers around it."""
    L, ev = Ledger(), demo["eval"]
    n = ev["n_queries"]
    head, body = table(DEMO_MD, "method", "top-1", after="**Measured** (shipped data")
    r = row(DEMO_MD, head, body, "zero-shot, frozen encoder")
    L.cell(DEMO_MD, "steps 1–5 table, 'zero-shot, frozen encoder'", r["top-1"], [ev["zero_shot_frozen"]])
    L.same(DEMO_MD, "steps 1–5 table, 'zero-shot, frozen encoder' (right)",
           re.search(r"\((\d+/\d+)\)", r["top-1"]).group(1),
           f"{round(ev['zero_shot_frozen'] * n)}/{n}")
    r = row(DEMO_MD, head, body, "zero-shot, RECO with untrained φ")
    L.cell(DEMO_MD, "steps 1–5 table, 'zero-shot, RECO with untrained φ'", r["top-1"],
           [ev["zero_shot_reco_untrained"]])
    if "identical predictions" in r["top-1"]:
        L.same(DEMO_MD, "steps 1–5 table, 'RECO with untrained φ' (identical predictions)", True,
               ev["reco_untrained_equals_frozen"])
    r = row(DEMO_MD, head, body, f"{demo['search']['k']}-NN vote of image→image neighbours")
    L.cell(DEMO_MD, "steps 1–5 table, 'k-NN vote'", r["top-1"], [ev["knn_vote"]])
    L.same(DEMO_MD, "steps 1–5 table, 'k-NN vote' (right)", re.search(r"\((\d+/\d+)\)", r["top-1"]).group(1),
           f"{round(ev['knn_vote'] * n)}/{n}")
    r = row(DEMO_MD, head, body, "chance / majority class")
    L.cell(DEMO_MD, "steps 1–5 table, 'chance / majority class'", r["top-1"], [ev["chance"], ev["majority"]])
    m = sentence(DEMO_MD, r"(\d+) % of the image→image neighbours share the query's category; chance is (\d+) %")
    L.num(DEMO_MD, "'… % of the image→image neighbours share the query's category'", m.group(1),
          100 * demo["search"]["neighbour_precision"])
    L.num(DEMO_MD, "'chance is … %'", m.group(2), 100 * demo["search"]["neighbour_precision_chance"])
    m = sentence(DEMO_MD, r"max \|\S+ − v\| = ([\d.]+)e-(\d+)")
    mant, exp = f"{demo['fusion']['max_abs_refined_minus_frozen_image']:.{len(m.group(1)) - 2}e}".split("e")
    L.same(DEMO_MD, "'max |v̄ − v|'", f"{m.group(1)}e-{m.group(2)}", f"{mant}e-{int(exp[1:])}")
    L.done()


def test_demo_rows_of_results_readme_and_card_reproduce(demo):
    """The demo's numbers where docs/results.md, README.md and the model card quote them."""
    L, c = Ledger(), demo["compare"]
    # docs/results.md, issue-18 table: `reco-ref demo` rows (RECO step 0 = shipped: the file kept epoch 0)
    assert (_meta("fusion.npz")["selected"]["epoch"]) == 0
    head, body = table(RESULTS, "evaluated on", "frozen", "RECO step 0", "RECO shipped")
    for s, first in (("flags", "`reco-ref demo`, flags"), ("clipart", "`reco-ref demo`, clip-art")):
        r = row(RESULTS, head, body, first)
        L.same(RESULTS, f"issue-18 table, row {r['evaluated on']!r} (queries)", numbers(r["evaluated on"])[0],
               c[s]["queries"])
        for col, m in (("frozen", "frozen"), ("surrogate", "surrogate"), ("k-NN vote", "k-NN vote"),
                       ("RECO step 0", "RECO"), ("RECO shipped", "RECO")):
            L.cell(RESULTS, f"issue-18 table, row {r['evaluated on']!r}, column {col!r}", r[col], [c[s]["top1"][m]])
    # docs/results.md, 'The demo (offline, shipped data)'
    head, body = table(RESULTS, "set", "frozen", "surrogate", "1-NN", "k-NN vote", "RECO (shipped)",
                       after="## The demo (offline, shipped data)")
    for s, first in (("flags", "flags"), ("clipart", "clip-art")):
        r = row(RESULTS, head, body, first)
        L.same(RESULTS, f"'The demo' table, row {r['set']!r} (queries)", numbers(r["set"])[0], c[s]["queries"])
        for col in ("frozen", "surrogate", "1-NN", "k-NN vote", "RECO (shipped)"):
            L.cell(RESULTS, f"'The demo' table, row {r['set']!r}, column {col!r}", r[col],
                   [c[s]["top1"][METHOD_OF[col]]])
    m = sentence(RESULTS, r"on the flags RECO fixes (\d+) quer(?:y|ies) .*? and breaks (\d+) it got right; "
                          r"on the clip-art it fixes (\d+) and breaks (\d+)")
    for g, s, k in ((1, "flags", "fixed"), (2, "flags", "broken"), (3, "clipart", "fixed"), (4, "clipart", "broken")):
        L.same(RESULTS, f"'The demo' sentence, {s} RECO {k}", m.group(g), c[s]["counts"]["RECO"][k])
    # README.md: "The demo's flag memory: frozen 0.075, 1-NN 0.980, shipped RECO 0.945 on 255 flags"
    m = sentence(README, r"The demo's flag memory: frozen ([\d.]+), 1-NN ([\d.]+), shipped RECO ([\d.]+) "
                         r"on ([\d,]+) flags")
    for g, meth in ((1, "frozen"), (2, "1-NN"), (3, "RECO")):
        L.num(README, f"'The demo's flag memory' sentence, {meth}", m.group(g), c["flags"]["top1"][meth])
    L.same(README, "'The demo's flag memory' sentence, flags", m.group(4), c["flags"]["queries"])
    # MODEL_CARD.md: "`reco-ref demo` flags / clip-art, `fusion.npz`"
    head, body = table(CARD, "data", "frozen", "step 0", "shipped")
    r = row(CARD, head, body, "`reco-ref demo` flags / clip-art")
    for col, meth in (("frozen", "frozen"), ("surrogate", "surrogate"), ("k-NN vote", "k-NN vote"),
                      ("step 0", "RECO"), ("shipped", "RECO")):
        L.cell(CARD, f"Metrics row '`reco-ref demo` flags / clip-art', column {col!r}", r[col],
               [c["flags"]["top1"][meth], c["clipart"]["top1"][meth]])
    L.done()


# ------------------------------------------------------------------- the expensive one: ../shared/data
def _doc_command(verb: str) -> list[str]:
    """The ``reco-ref VERB ...`` command of docs/results.md's "One row from the shipped file" paragraph, as argv."""
    text = _text(RESULTS)
    i = text.find("One row from the shipped file")
    assert i >= 0, "docs/results.md: paragraph 'One row from the shipped file' not found"
    para = re.sub(r"\s+", " ", text[i:text.find("\n\n", i)])
    m = re.search(r"`(reco-ref " + verb + r" [^`]*)`", para)
    assert m, f"docs/results.md, 'One row from the shipped file': no `reco-ref {verb} ...` command"
    return shlex.split(m.group(1))[1:]


def _cub_substitution() -> dict[str, str]:
    """The page's sentence that turns the Flowers-102 commands into the CUB-100 row's: "... the same two commands
    with `A` for `B` and `C` for `D`" → {B: A, D: C}."""
    para = re.sub(r"\s+", " ", _text(RESULTS))
    m = re.search(r"CUB-100 row: the same two commands with `([^`]+)` for `([^`]+)` and `([^`]+)` for `([^`]+)`", para)
    assert m, "docs/results.md: the sentence giving the CUB-100 row's commands was not found"
    return {m.group(2): m.group(1), m.group(4): m.group(3)}


@pytest.mark.slow
@pytest.mark.data
@pytest.mark.parametrize("dataset", ["flowers102", "cub100"])
def test_lodo_row_reproduces_from_the_shipped_file(shared_data, tmp_path, dataset):
    """docs/results.md, the Flowers-102 and CUB-100 rows: the page's own build-memory (one index thread) and eval
    commands, run as printed (CUB-100: with the substitution the page states); every cell to the printed digits."""
    sub = {} if dataset == "flowers102" else _cub_substitution()

    def doc(verb: str) -> list[str]:
        argv = _doc_command(verb)
        for old, new in sub.items():
            argv = [a.replace(old, new) for a in argv]
        return argv

    def run(argv: list[str]) -> None:
        argv = [a.replace("../shared/data", str(shared_data)) for a in argv]
        p = subprocess.run([sys.executable, "-m", "reco_ref.cli", *argv], cwd=ROOT, capture_output=True, text=True)
        assert p.returncode == 0, f"reco-ref {' '.join(argv)} exited {p.returncode}:\n{p.stderr[-2000:]}"

    mem, out = tmp_path / f"mem-{dataset}-train", tmp_path / "r.json"
    build = doc("build-memory")
    assert dataset in " ".join(build) and "--split" in build and "train" in build
    assert "--index-threads" in build and build[build.index("--index-threads") + 1] == "1"
    if "--out" not in build:  # the page names the memory MEM and leaves the required --out to the reader
        build += ["--out", "MEM"]
    run([str(mem) if a == "MEM" else a for a in build])
    ev = doc("eval")
    weights = LODO[dataset] + ".npz"
    assert "--exact" not in ev, "docs/results.md states HNSW at evaluation"
    assert weights in " ".join(ev) and "--k" in ev and ev[ev.index("--k") + 1] == "10"
    run([str(mem) if a == "MEM" else str(out) if a == "r.json" else a for a in ev])
    r = json.loads(out.read_text(encoding="utf-8"))
    n = {"flowers102": 819, "cub100": 2999}[dataset]
    assert r["n"] == n and r["k"] == 10 and r["split"] == "test" and r["mode"] == "both"

    L = Ledger()
    head, body = table(RESULTS, "evaluated on", "frozen", "RECO step 0", "RECO shipped")
    first = {"flowers102": "Flowers-102 test (`lodo-flowers.npz`)", "cub100": "CUB-100 test (`lodo-cub.npz`)"}[dataset]
    cells = row(RESULTS, head, body, first)
    # the page's memory is built with one index thread (the same HNSW graph on every build, as the record's): every
    # cell, including those that read the image index (surrogate, vote, RECO), to the printed digits
    for col, key in (("frozen", "frozen"), ("surrogate", "surrogate"), ("k-NN vote", "knn_vote"),
                     ("RECO shipped", "reco"), ("RECO step 0", "reco")):  # step 0 = shipped: the file kept epoch 0
        L.cell(RESULTS, f"row {first!r}, column {col!r} (reco-ref eval)", cells[col], [r[key]["top1"]])
    L.done()
