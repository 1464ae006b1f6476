"""``reco-ref demo`` (reco_ref.eval.demo, re-exported as reco_ref.demo.run_demo): end to end on the shipped sample, the CLI verb, bad input, the shipped data.

The end-to-end run uses the real embedded encoder (reco-mini) on ``weights/demo``; it takes ~10 s on 2 cores.
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest

from reco_ref.cli import main
from reco_ref.demo import run_demo
from reco_ref.eval.data import balanced_subset
from reco_ref.eval.demo import figure
from reco_ref.eval.metrics import knn_vote, zero_shot
from reco_ref.errors import MemoryFormatError, RecoError
from reco_ref.paths import weights_dir

ROOT = Path(__file__).resolve().parents[2]
DEMO = weights_dir() / "demo"
HAVE_RECO_MINI = (weights_dir() / "reco-mini" / "encoder.json").is_file()
needs_reco_mini = pytest.mark.skipif(not HAVE_RECO_MINI, reason="weights/reco-mini not present")
needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                                      reason="matplotlib (the demo extra) not installed")
PNG = b"\x89PNG\r\n\x1a\n"


def _hide_matplotlib(monkeypatch) -> None:
    """Make the demo's matplotlib imports raise ImportError, as on an install without the demo extra."""
    import sys

    for name in ("matplotlib", "matplotlib.backends", "matplotlib.backends.backend_agg", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, name, None)


def _pairs() -> list[dict]:
    with open(DEMO / "pairs.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One verbose run of the demo on the shipped data: (results dict, printed report, out dir)."""
    from reco_ref.encoders import load
    from reco_ref.reco.weights import init_reco_weights, save_reco_weights

    out = tmp_path_factory.mktemp("demo")
    enc = load("reco-mini")
    # "trained" weights that are the identity: the trained row must then equal the frozen one exactly
    weights = tmp_path_factory.mktemp("w") / "identity.npz"
    save_reco_weights(weights, init_reco_weights(enc.dim, meta={"encoder_fingerprint": enc.fingerprint}))
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        results = run_demo(out_dir=out, k=10, seed=0, fusion=weights)
    return results, buf.getvalue(), out


# ------------------------------------------------------------------------------------------ end to end
@needs_reco_mini
def test_demo_prints_every_step(demo_run):
    _, text, out = demo_run
    for step in ("[1/6] encode", "[2/6] memory", "[3/6] search", "[4/6] fuse", "[5/6] evaluate", "[6/6] compare"):
        assert step in text
    assert "UNTRAINED" in text and "refined == frozen" in text
    assert str(out / "results.json") in text


@needs_reco_mini
def test_demo_numbers_are_sane(demo_run):
    r, _, _ = demo_run
    rows = _pairs()
    n_mem = sum(p["split"] == "memory" for p in rows)
    n_q = sum(p["split"] == "query" for p in rows)
    classes = sorted({p["category"] for p in rows})
    assert r["data"]["memory_rows"] == n_mem and r["data"]["queries"] == n_q
    assert sorted(r["data"]["classes"]) == classes
    ev = r["eval"]
    for key in ("zero_shot_frozen", "zero_shot_reco_untrained", "knn_vote", "chance", "majority"):
        assert 0.0 <= ev[key] <= 1.0, key
    assert ev["chance"] == pytest.approx(1 / len(classes))
    # retrieval carries class information: the vote and the neighbours beat chance
    assert ev["knn_vote"] > ev["chance"]
    assert r["search"]["neighbour_precision"] > r["search"]["neighbour_precision_chance"]
    # examples: neighbours are sorted by score and their 'same' flags agree with the categories
    for ex in r["examples"]:
        s = [nb["score"] for nb in ex["neighbours"]]
        assert s == sorted(s, reverse=True) and len(s) == 10
        assert all(nb["same"] == (nb["category"] == ex["category"]) for nb in ex["neighbours"])


@needs_reco_mini
def test_demo_fusion_is_identity_at_init(demo_run):
    f = demo_run[0]["fusion"]
    assert f["trained"] is False
    assert f["max_abs_refined_minus_frozen_image"] <= 1e-6
    assert f["max_abs_refined_minus_frozen_text"] <= 1e-6
    assert f["bit_identical_to_normalized_query"] is True  # NumPy reference: exactly normalize(query) at init
    assert f["max_abs_refined_minus_normalized_query"] == 0.0
    ev = demo_run[0]["eval"]
    assert ev["reco_untrained_equals_frozen"] is True
    assert ev["zero_shot_reco_untrained"] == ev["zero_shot_frozen"]
    # at init every refined embedding equals its frozen one, so each of the three RECO terms is InfoNCE(v, t)
    for term in f["reco_loss_terms"]:
        assert term == pytest.approx(f["infonce_frozen"], rel=1e-5)
    assert f["reco_loss_init"] == pytest.approx(3 * f["infonce_frozen"], rel=1e-5)
    assert f["infonce_frozen"] > 0 and math.isfinite(f["infonce_frozen"])
    # step 4b: the trained weights given (identity here) go through reco.refine and give the frozen numbers
    assert f["trained_weights"].endswith("identity.npz")
    assert ev["zero_shot_reco_trained"] == ev["zero_shot_frozen"]
    assert "RECO with trained φ" in demo_run[1]


@needs_reco_mini
def test_demo_writes_results_and_a_valid_memory(demo_run):
    from reco_ref.encoders import load
    from reco_ref.memory import Memory

    r, _, out = demo_run
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(r))
    mem = Memory.open(out / "memory", encoder=load("reco-mini"))
    assert len(mem) == r["data"]["memory_rows"]
    assert mem.key_dim == r["encoder"]["key_dim"]
    captions = {p["caption"] for p in _pairs() if p["split"] == "memory"}
    assert {m["caption"] for m in mem.metadata(np.arange(len(mem)))} == captions
    if importlib.util.find_spec("matplotlib") is not None:
        png = Path(r["files"]["figure"])
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a second run into the same folder refuses to overwrite the memory
    with pytest.raises(MemoryFormatError, match="already exists"):
        run_demo(out_dir=out, quiet=True)


@needs_reco_mini
def test_cli_demo_verb_exits_0(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["demo", "--out", str(out), "--quiet", "-k", "5", "--no-compare"]) == 0
    assert capsys.readouterr().out == ""  # --quiet prints nothing
    r = json.loads((out / "results.json").read_text())
    assert r["search"]["k"] == 5 and r["eval"]["knn_vote"] > r["eval"]["chance"]
    assert "compare" not in r and not (out / "memory-flags").exists()  # --no-compare skips step 6


# ------------------------------------------------------------------------ step 6: flags next to clip-art
@needs_reco_mini
def test_demo_compares_methods_on_flags_and_clipart(demo_run):
    r, text, out = demo_run
    assert "[1/6] encode" in text and "[6/6] compare" in text and "RECO still misses" in text and "RECO breaks" in text
    flags, clip = r["compare"]["flags"], r["compare"]["clipart"]
    assert flags["queries"] == flags["classes"] == 255 and clip["queries"] == 30
    for c in (flags, clip):
        assert set(c["top1"]) == {"frozen", "surrogate", "1-NN", "k-NN vote", "RECO"}
        y = np.array(c["labels"])
        for m, p in c["pred"].items():  # every top-1 is what its per-query predictions say
            assert c["top1"][m] == pytest.approx(float((np.array(p) == y).mean())), m
        # the demo's weights here are the identity: RECO's predictions are the frozen ones, nothing fixed or broken
        assert c["pred"]["RECO"] == c["pred"]["frozen"] and c["fixed"] == c["broken"] == []
        assert len(c["missed"]) == round((1 - c["top1"]["frozen"]) * c["queries"])
    assert clip["top1"]["frozen"] == r["eval"]["zero_shot_frozen"]
    assert clip["top1"]["k-NN vote"] == r["eval"]["knn_vote"]
    # the flag memory's point: the frozen encoder cannot name the flags, their look-alikes in memory can
    assert flags["top1"]["frozen"] < 0.2 < 0.9 < flags["top1"]["1-NN"]
    assert (out / "memory-flags" / "manifest.json").is_file()
    if importlib.util.find_spec("matplotlib") is not None:
        assert Path(r["files"]["comparison"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------- the pictures and where they are
@needs_reco_mini
@needs_matplotlib
def test_demo_writes_both_pictures_and_names_them_last(demo_run):
    r, text, out = demo_run
    last = text.rstrip("\n").splitlines()[-1]
    neighbours, comparison = out / "neighbours.png", out / "comparison.png"
    assert neighbours.is_absolute() and comparison.is_absolute()
    assert last == f"pictures: {neighbours}, {comparison}"
    assert r["files"]["figure"] == str(neighbours) and r["files"]["comparison"] == str(comparison)
    for png in (neighbours, comparison):
        assert png.read_bytes()[:8] == PNG
    # comparison.png is what docs/demo.png copies: small enough to ship (test_shipped_demo_png_is_small_and_shown)
    assert comparison.stat().st_size < 300_000


@needs_reco_mini
def test_demo_without_matplotlib_says_so_in_its_last_line(tmp_path, monkeypatch, capsys):
    from reco_ref.eval.demo import NO_MATPLOTLIB, have_matplotlib
    from reco_ref.eval.demo_compare import comparison_figure

    import shutil

    # a tiny --data folder (8 shipped drawings, 2 classes): the whole demo in a second or two
    data = tmp_path / "data"
    (data / "img").mkdir(parents=True)
    rows = ["file,label,class_name,split"]
    for label, cat in enumerate(("bird", "fish")):
        items = [p for p in _pairs() if p["category"] == cat][:4]
        for j, item in enumerate(items):
            shutil.copy(DEMO / item["image"], data / "img" / f"{cat}{j}.png")
            rows.append(f"img/{cat}{j}.png,{label},{cat},{'test' if j == 3 else 'train'}")
    (data / "manifest.csv").write_text("\n".join(rows) + "\n")

    _hide_matplotlib(monkeypatch)
    assert not have_matplotlib()
    monkeypatch.chdir(tmp_path)  # a relative --out: the printed and recorded paths are still absolute
    assert main(["demo", "--data", "data", "--out", "rel", "-k", "3", "--fusion", "none"]) == 0
    lines = capsys.readouterr().out.rstrip("\n").splitlines()
    assert lines[-1] == NO_MATPLOTLIB and 'pip install -e ".[demo]"' in lines[-1] and "matplotlib" in lines[-1]
    assert sum("matplotlib is not installed" in ln for ln in lines) == 1  # said once, in one line
    assert not list((tmp_path / "rel").glob("*.png"))
    r = json.loads((tmp_path / "rel" / "results.json").read_text())
    assert r["out_dir"] == str(tmp_path / "rel") and "figure" not in r["files"] and r["examples"]
    # step 6's picture is skipped the same way (no exception, nothing written)
    assert comparison_figure(tmp_path / "c.png", [({"queries": 0}, {})]) is False
    assert not (tmp_path / "c.png").exists()


def _table(ax) -> list[list[str]]:
    cells = ax.tables[0].get_celld()
    n_rows, n_cols = max(r for r, _ in cells) + 1, max(c for _, c in cells) + 1
    return [[cells[r, c].get_text().get_text() for c in range(n_cols)] for r in range(n_rows)]


@needs_reco_mini
@needs_matplotlib
def test_comparison_counts_panel_equals_the_counts_of_results_json(demo_run):
    from matplotlib.text import Text

    from reco_ref.eval.data import shipped_data
    from reco_ref.eval.demo_compare import FIGURE_DPI, METHODS, draw_comparison, entities_data

    _, _, out = demo_run
    on_disk = json.loads((out / "results.json").read_text())["compare"]
    sets = [(on_disk["flags"], entities_data()), (on_disk["clipart"], shipped_data())]
    fig = draw_comparison(sets)
    panels = {ax.get_label(): ax for ax in fig.axes if ax.get_label().startswith("counts: ")}
    assert len(panels) == 2
    for c, _ in sets:
        y = np.array(c["labels"])
        ok_f = np.array(c["pred"]["frozen"]) == y
        expect = [["method", "right", "fixed", "broken", "missed"]]
        for m in METHODS:  # counted here from the per-query predictions, independently of the demo's code
            ok = np.array(c["pred"][m]) == y
            counts = {"right": int(ok.sum()), "fixed": int((~ok_f & ok).sum()),
                      "broken": int((ok_f & ~ok).sum()), "missed": int((~ok_f & ~ok).sum())}
            assert c["counts"][m] == counts, m  # results.json carries the panel's numbers
            assert counts["right"] == round(c["top1"][m] * c["queries"])
            vs = ["—"] * 3 if m == "frozen" else [str(counts[k]) for k in ("fixed", "broken", "missed")]
            expect.append([m, f"{counts['right']}/{c['queries']}", *vs])
        assert _table(panels[f"counts: {c['name']}"]) == expect
    # at least one method fixes and one breaks queries here (the panel is not all zeros)
    assert any(c["counts"][m]["fixed"] and c["counts"][m]["broken"] for c, _ in sets for m in METHODS)
    # every text (predictions, counts, captions) is >= 10 pt at the saved dpi: >= 14 px at 100 %
    sizes = [t.get_fontsize() for t in fig.findobj(Text) if t.get_text().strip()]
    assert sizes and min(sizes) >= 10 and FIGURE_DPI >= 100
    w, h = fig.get_size_inches() * FIGURE_DPI
    assert w <= 1200 and h <= 1600  # reasonably sized


def test_compare_report_partitions_queries_and_names_them():
    from reco_ref.eval.demo_compare import pick_examples, report_lines

    names = ["ant", "bee", "cat"]
    y = [0, 1, 2, 0]
    c = {"name": "toy", "queries": 4, "classes": 3, "prompt": "{}", "k": 2, "chance": 1 / 3, "labels": y,
         "top1": {"frozen": 0.5, "RECO": 0.5},
         "pred": {"frozen": [0, 1, 0, 1], "RECO": [2, 1, 2, 0]},
         "fixed": [3], "missed": [2], "broken": [0]}
    lines = report_lines(c, names)
    assert any("frozen wrong, RECO right: 1: ant (bee → ant)" in ln for ln in lines)
    assert any("RECO still misses): 1" in ln for ln in lines)
    assert any("RECO breaks): 1: ant (ant → cat)" in ln for ln in lines)
    assert pick_examples(c) == [(3, "fixed"), (0, "broken"), (2, "missed")]


def test_readme_first_command_installs_the_pictures():
    """README's first command installs the demo extra (matplotlib, for the pictures); torch stays out of runtime."""
    import re
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["optional-dependencies"]["demo"] == ["matplotlib>=3.7"]
    assert not any(re.match(r"(torch|open[_-]clip)", d) for d in project["dependencies"] + ["matplotlib>=3.7"])
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    first = re.search(r"```bash\n(.*?)```", readme, re.S).group(1).splitlines()[0]
    assert first.startswith('python3 -m pip install -e ".[demo]" && reco-ref demo')


def test_shipped_demo_png_is_small_and_shown():
    png = ROOT / "docs" / "demo.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size < 300_000
    assert "docs/demo.png" in (ROOT / "README.md").read_text(encoding="utf-8")


# ----------------------------------------------------------------------------------------- bad input
def _one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("reco-ref demo: error: ") and "\n" not in err
    return err


def test_cli_bad_data_folder_one_line_error(tmp_path, capsys):
    err = _one_line_error(capsys, ["demo", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert "not a directory" in err and "manifest.csv" in err
    err = _one_line_error(capsys, ["demo", "--data", str(tmp_path), "--out", str(tmp_path / "o")])
    assert "no manifest.csv" in err
    assert not (tmp_path / "o").exists()  # nothing written on bad input


def test_cli_bad_manifest_one_line_error(tmp_path, capsys):
    (tmp_path / "manifest.csv").write_text("image,caption\na.jpg,a cat\n")
    err = _one_line_error(capsys, ["demo", "--data", str(tmp_path)])
    assert "file,label,class_name,split" in err and "['image', 'caption']" in err
    (tmp_path / "manifest.csv").write_text("file,label,class_name,split\na.jpg,0,cat,train\n")
    err = _one_line_error(capsys, ["demo", "--data", str(tmp_path)])
    assert "'test'" in err  # no test split to take queries from
    (tmp_path / "manifest.csv").write_text("file,label,class_name,split\na.jpg,0,cat,train\nb.jpg,0,dog,test\n")
    err = _one_line_error(capsys, ["demo", "--data", str(tmp_path)])
    assert "label 0" in err and "'cat'" in err and "'dog'" in err


def test_run_demo_rejects_bad_arguments(tmp_path):
    with pytest.raises(RecoError, match="k: expected a positive integer"):
        run_demo(out_dir=tmp_path, k=0, quiet=True)
    with pytest.raises(RecoError, match="fusion backend.*'nope' unknown"):
        run_demo(out_dir=tmp_path, backend="nope", quiet=True)
    with pytest.raises(FileNotFoundError, match="fusion weights not found"):
        run_demo(out_dir=tmp_path / "w", fusion=tmp_path / "missing.npz", quiet=True)
    assert not (tmp_path / "memory").exists()
    (tmp_path / "manifest.csv").write_text("file,label,class_name,split\na.jpg,0,cat,train\nb.jpg,0,cat,test\n")
    with pytest.raises(RecoError, match="limit: expected a positive integer"):
        run_demo(out_dir=tmp_path / "o", data=tmp_path, limit=0, quiet=True)


def test_cli_rejects_nonpositive_k(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "-k", "0"])
    assert "positive integer" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ helpers
def test_knn_vote_majority_ties_and_empty_rows():
    labels = np.array([[1, 2, 2, 1], [0, 1, 0, 1], [3, 3, 3, 3], [2, 0, 0, 0]])
    scores = np.array([[.9, .5, .4, .3], [.9, .8, .1, .1], [.5, .5, .5, .5], [.9, .1, .1, .1]], np.float32)
    valid = np.array([[1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 1, 0]], bool)
    pred = knn_vote(labels, scores, valid, 4)
    # row 0: 2 votes each for 1 (1.2) and 2 (0.9) -> 1; row 1: tie 0 (1.0) vs 1 (0.9) -> 0
    # row 2: no valid neighbour -> -1; row 3: the invalid slot does not vote: 0 (2 votes) beats 2 (1 vote)
    assert pred.tolist() == [1, 0, -1, 0]
    # a count is never overturned by scores: 3 weak votes beat 2 strong ones
    assert knn_vote(np.array([[5, 5, 7, 7, 7]]), np.array([[1, 1, -1, -1, -1]], np.float32),
                    np.ones((1, 5), bool), 8).tolist() == [7]


def test_zero_shot_is_argmax_of_cosines():
    v = np.eye(3, dtype=np.float32)[[2, 0, 1]]
    t = np.eye(3, dtype=np.float32)
    assert zero_shot(v, t).tolist() == [2, 0, 1]


def test_balanced_subset_spreads_over_classes_and_is_seeded():
    labels = np.repeat(np.arange(5), [40, 3, 10, 10, 1])
    a = balanced_subset(labels, 12, np.random.default_rng(0))
    b = balanced_subset(labels, 12, np.random.default_rng(0))
    assert a.tolist() == b.tolist() and a.tolist() == sorted(a.tolist()) and len(set(a.tolist())) == 12
    counts = np.bincount(labels[a], minlength=5)  # ranks 0 and 1 of every class, then 3 of the 4 rank-2 rows
    assert counts[4] == 1 and set(counts[:4].tolist()) <= {2, 3} and counts.sum() == 12
    assert balanced_subset(labels, 100, np.random.default_rng(0)).tolist() == list(range(labels.size))


def test_figure_is_skipped_without_matplotlib(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)  # import now raises ImportError
    assert figure(tmp_path / "f.png", [{"image": "x", "category": "c", "neighbours": []}], 5) is False
    assert not (tmp_path / "f.png").exists()


# ------------------------------------------------------------------------------------- shipped data
def test_shipped_sample_is_small_licensed_and_well_formed():
    from PIL import Image

    rows = _pairs()
    assert 150 <= len(rows) <= 250
    assert (DEMO / "LICENSE").is_file() and "public domain" in (DEMO / "LICENSE").read_text()
    assert (DEMO / "SOURCE.md").is_file()
    total = 0
    for r in rows:
        path = DEMO / r["image"]
        total += path.stat().st_size
        with Image.open(path) as im:
            assert max(im.size) <= 96, r["image"]
        assert r["caption"].strip() and r["split"] in ("memory", "query")
    assert total <= 1_500_000
    by_cat = {}
    for r in rows:
        by_cat.setdefault((int(r["label"]), r["category"]), set()).add(r["split"])
    labels = sorted(lab for lab, _ in by_cat)
    assert labels == list(range(len(labels)))  # one name per label, labels 0..C-1
    assert all(splits == {"memory", "query"} for splits in by_cat.values())
    assert len({r["image"] for r in rows}) == len(rows)


def test_shipped_queries_are_reco_mini_heldout():
    # the zero-shot numbers are measured on images reco-mini's alignment training never saw
    spec = importlib.util.spec_from_file_location("reco_mini_data", ROOT / "scripts" / "reco_mini_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = _pairs()
    assert all(mod.is_heldout(r["source"]) for r in rows if r["split"] == "query")
    assert not any(mod.is_heldout(r["source"]) for r in rows if r["split"] == "memory")


# ---------------------------------------------------------------------------------------- real data
@pytest.mark.data
@needs_reco_mini
def test_demo_on_flowers102_subset(shared_data, tmp_path, capsys):
    r = run_demo(out_dir=tmp_path, data=shared_data / "flowers102", limit=20, memory_limit=204, k=5, quiet=True)
    assert capsys.readouterr().out == ""  # quiet=True prints nothing
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(r))
    assert r["data"]["queries"] == 20 and r["data"]["memory_rows"] == 204
    assert len(r["data"]["classes"]) == 102 and r["data"]["prompt"] == "a photo of a {}."
    ev = r["eval"]
    assert all(0.0 <= ev[key] <= 1.0 for key in ("zero_shot_frozen", "knn_vote", "majority"))
    assert ev["knn_vote"] > ev["chance"]  # 2 memory images per class already beat 1/102
    assert r["fusion"]["max_abs_refined_minus_frozen_image"] <= 1e-6
    assert (tmp_path / "results.json").is_file()
