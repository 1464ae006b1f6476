"""``reco-ref eval`` and ``reco-ref query`` with the real reco-mini encoder on a slice of the shipped demo sample
(a dataset manifest written on the fly), plus one run on ../shared/data (marked ``data``)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from reco_ref.cli import main
from reco_ref.paths import weights_dir

DEMO = weights_dir() / "demo"
HAVE_RECO_MINI = (weights_dir() / "reco-mini" / "encoder.json").is_file()
pytestmark = pytest.mark.skipif(not HAVE_RECO_MINI, reason="weights/reco-mini not present")
CONTRACT = ("frozen", "reco", "knn_vote", "n", "classes", "k", "mode", "fusion")
METRICS = {"top1", "top5", "mean_per_class_recall"}


def _write_manifest(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "label", "class_name", "split"])
        w.writerows(rows)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A manifest of 8 memory ('train') + 4 query ('test') images per demo category, its memory, identity weights."""
    from reco_ref.encoders import load
    from reco_ref.eval.data import embed_split, read_split
    from reco_ref.memory import build_memory_from_arrays, read_pairs_csv
    from reco_ref.reco.weights import init_reco_weights, save_reco_weights

    root = tmp_path_factory.mktemp("evalcli")
    with open(DEMO / "pairs.csv", newline="", encoding="utf-8") as fh:
        pairs = list(csv.DictReader(fh))
    rows, taken = [], {}
    for p in pairs:
        split = "train" if p["split"] == "memory" else "test"
        key = (p["label"], split)
        if taken.get(key, 0) < (8 if split == "train" else 4):
            taken[key] = taken.get(key, 0) + 1
            rows.append([str(DEMO / p["image"]), p["label"], p["category"], split])
    manifest = root / "data" / "manifest.csv"
    manifest.parent.mkdir()
    _write_manifest(manifest, rows)
    enc = load("reco-mini")
    items = read_pairs_csv(manifest, split="train", caption_template="a drawing of a {class_name}.",
                           allow_outside=True)  # absolute paths into weights/demo (docs/bad_inputs.md, §3)
    # memory from the cached split embeddings: the train-split evaluation below then decodes no image again
    img, keys = embed_split(read_split(manifest, "train"), enc, cache_dir=root / "cache")
    build_memory_from_arrays(root / "mem", img, enc.encode_texts([it["caption"] for it in items]), keys=keys,
                             name=enc.name, fingerprint=enc.fingerprint, items=items, progress=False)
    w = init_reco_weights(enc.dim, meta={"encoder_name": enc.name, "encoder_fingerprint": enc.fingerprint})
    save_reco_weights(root / "identity.npz", w)
    return {"root": root, "manifest": manifest, "mem": root / "mem", "w": root / "identity.npz", "enc": enc,
            "rows": rows}


def _eval(setup, *extra):
    # one embedding cache for the module: each split is decoded and encoded once
    return ["eval", "--memory", str(setup["mem"]), "--dataset", str(setup["manifest"]), "--cache",
            str(setup["root"] / "cache"), *extra]


def _one_line_error(capsys, argv, verb):
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"reco-ref {verb}: error: ")
    return err


def test_eval_contract_json_markdown_png(setup, tmp_path, capsys):
    out = tmp_path / "r.json"
    argv = _eval(setup, "--split", "test", "--fusion", str(setup["w"]), "--mode", "both", "--k", "5",
                 "--json", str(out), "--markdown", str(tmp_path / "r.md"), "--png", str(tmp_path / "r.png"),
                 "--templates", "single", "--quiet")
    assert main(argv) == 0
    assert capsys.readouterr().out == ""
    r = json.loads(out.read_text())
    assert all(key in r for key in CONTRACT)
    for key in ("frozen", "reco", "knn_vote", "surrogate"):
        assert set(r[key]) >= METRICS, key
        assert all(0.0 <= r[key][m] <= 1.0 for m in METRICS)
    n_test = sum(row[3] == "test" for row in setup["rows"])
    assert r["n"] == n_test and r["k"] == 5 and r["mode"] == "both" and r["fusion"] == str(setup["w"])
    assert r["classes"] == len({row[1] for row in setup["rows"]})
    assert r["reco"] == r["frozen"]  # identity weights reproduce the frozen encoder exactly
    assert "files of the dataset manifest" in r["knn_vote_labels"]
    assert r["knn_vote"]["top1"] > r["chance"]
    # a test image found in the memory itself (cosine >= 0.9999: the clip-art sample holds one such duplicate)
    # is excluded from its own retrieval; most are not memory rows
    assert 0 <= r["excluded_own_rows"] < r["n"] // 4 and r["templates"] == "single"
    assert r["command"].startswith("reco-ref eval --memory ")
    # weights without a record of what they saw are marked so, never presented as held-out
    assert r["reco_weights_saw_dataset"] == "unknown"
    assert "| RECO (trained fusion) — unknown whether the weights saw it |" in (tmp_path / "r.md").read_text()
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_cache_dir_off_means_no_cache(setup, tmp_path, capsys, monkeypatch):
    """--cache-dir off (any case) is "no cache" in eval as in classify and $RECO_REF_CACHE: no folder named "off"
    is written, the run works (eval.data.cache_dir_option)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RECO_REF_CACHE", raising=False)
    argv = ["eval", "--memory", str(setup["mem"]), "--dataset", str(setup["manifest"]), "--split", "test",
            "--cache-dir", " OFF", "--fusion", str(setup["w"]), "--k", "5", "--json", str(tmp_path / "r.json"),
            "--templates", "single", "--quiet"]
    assert main(argv) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_cache_dir_option_reads_the_off_words_one_way():
    from reco_ref.eval.data import cache_dir_option, cache_disabled

    for word in ("", "off", " Off ", "0"):
        assert cache_disabled(word) and cache_dir_option(word, lambda: "default") is None
    assert cache_dir_option(None, lambda: "default") == "default"
    assert cache_dir_option("c", lambda: "default") == "c" and not cache_disabled("offline")


def test_eval_train_split_excludes_own_rows_and_prints_table(setup, tmp_path, capsys):
    assert main(_eval(setup, "--split", "train", "--fusion", str(setup["w"]), "--no-progress",
                      "--json", str(tmp_path / "t.json"))) == 0
    printed = capsys.readouterr().out
    assert "| frozen encoder |" in printed and "k-NN vote labels:" in printed
    r = json.loads((tmp_path / "t.json").read_text())
    assert r["excluded_own_rows"] == r["n"] == r["memory_rows"]  # every train image is a memory row


def test_eval_fusion_none_reports_the_references_only(setup, tmp_path, capsys):
    assert main(_eval(setup, "--fusion", "none", "--quiet", "--json", str(tmp_path / "n.json"))) == 0
    r = json.loads((tmp_path / "n.json").read_text())
    assert all(key in r for key in CONTRACT) and r["reco"] is None and r["fusion"] is None
    assert set(r["surrogate"]) >= METRICS and set(r["knn_vote"]) >= METRICS and "reco" not in r["by_mode"]


def test_eval_without_shipped_weights_says_how_to_pass_fusion(setup, tmp_path, capsys, monkeypatch):
    import reco_ref.reco.weights as weights

    monkeypatch.setattr(weights, "default_weights_path", lambda name="reco-mini": tmp_path / "none" / "fusion.npz")
    err = _one_line_error(capsys, _eval(setup, "--json", str(tmp_path / "x.json")), "eval")
    assert "no shipped fusion weights" in err and "--weights" in err
    assert not (tmp_path / "x.json").exists()


def test_eval_mismatches_are_one_line_errors(setup, tmp_path, capsys):
    from reco_ref.memory import build_memory_from_arrays
    from reco_ref.reco.weights import init_reco_weights, save_reco_weights

    save_reco_weights(tmp_path / "w16.npz", init_reco_weights(16, heads=4))
    err = _one_line_error(capsys, _eval(setup, "--fusion", str(tmp_path / "w16.npz")), "eval")
    assert "dim 16" in err and str(setup["enc"].dim) in err
    save_reco_weights(tmp_path / "wfp.npz", init_reco_weights(setup["enc"].dim, meta={"encoder_fingerprint": "ab" * 32}))
    err = _one_line_error(capsys, _eval(setup, "--fusion", str(tmp_path / "wfp.npz")), "eval")
    assert "fingerprint" in err
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4, 32)).astype(np.float32)
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    build_memory_from_arrays(tmp_path / "m32", a, a, name="other", fingerprint="cd" * 32, progress=False)
    err = _one_line_error(capsys, ["eval", "--memory", str(tmp_path / "m32"), "--dataset", str(setup["manifest"]),
                                   "--fusion", str(setup["w"])], "eval")
    assert "m32" in err
    err = _one_line_error(capsys, _eval(setup, "--split", "valid", "--fusion", str(setup["w"])), "eval")
    assert "no rows with split 'valid'" in err


def test_eval_pairs_gives_recall_at_k(setup, tmp_path, capsys):
    argv = ["eval", "--memory", str(setup["mem"]), "--pairs", str(DEMO / "pairs.csv"), "--split", "query",
            "--fusion", str(setup["w"]), "--k", "3", "--json", str(tmp_path / "r.json"), "--markdown",
            str(tmp_path / "r.md"), "--png", str(tmp_path / "r.png"), "--no-progress"]
    assert main(argv) == 0
    assert "| frozen encoder |" in capsys.readouterr().out
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["task"] == "retrieval" and r["k"] == 3
    for side in ("image_to_text", "text_to_image"):
        rec = r["frozen"][side]
        assert set(rec) == {"R@1", "R@5", "R@10"} and rec["R@1"] <= rec["R@5"] <= rec["R@10"] <= 1.0
        assert r["reco"]["both"][side] == rec  # identity weights
    assert "i→t R@1" in (tmp_path / "r.md").read_text() and (tmp_path / "r.png").is_file()
    err = _one_line_error(capsys, argv + ["--dataset", str(setup["manifest"])], "eval")
    assert "exactly one of --dataset" in err


@pytest.mark.parametrize("opt, value", [("--k", "0"), ("--alpha", "-1"), ("--alpha", "nan"), ("--batch-size", "0"),
                                        ("--dup-threshold", "2"), ("--mode", "all")])
def test_eval_numeric_options_are_checked_at_the_door(setup, capsys, opt, value):
    with pytest.raises(SystemExit):
        main(_eval(setup, opt, value))
    assert "error" in capsys.readouterr().err


def test_query_image_with_classes_json(setup, tmp_path, capsys):
    names = tmp_path / "names.txt"
    classes = sorted({row[2] for row in setup["rows"]})
    names.write_text("\n".join(classes) + "\n")
    image = next(row[0] for row in setup["rows"] if row[3] == "test")
    assert main(["query", image, "--memory", str(setup["mem"]), "--fusion", str(setup["w"]),
                 "--class-names", str(names), "-k", "4", "--json", "-"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["modality"] == "image" and len(r["neighbours"]) == 4
    scores = [nb["score"] for nb in r["neighbours"]]
    assert scores == sorted(scores, reverse=True)
    assert all(nb["caption"].startswith("a drawing of a ") for nb in r["neighbours"])
    assert len(r["frozen_top"]) == 5 and {c["class"] for c in r["frozen_top"]} <= set(classes)
    assert r["reco_top"] == r["frozen_top"] or [c["class"] for c in r["reco_top"]] == [c["class"] for c in r["frozen_top"]]
    assert r["refined_minus_frozen_cosine"] == pytest.approx(0.0, abs=1e-6)  # identity weights


def test_query_text_prints_neighbours_and_classes_from_a_manifest(setup, capsys):
    assert main(["query", "--text", "a drawing of a cat.", "--memory", str(setup["mem"]), "--fusion", str(setup["w"]),
                 "--classes", str(setup["manifest"]), "-k", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("text query 'a drawing of a cat.': 3 neighbours")
    assert "frozen top classes" in out and "refined (RECO) top classes" in out
    assert main(["query", "--text", "a cat", "--memory", str(setup["mem"]), "--fusion", "none", "--classes",
                 str(setup["manifest"]), "--json", "-"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert "reco_top" not in r and len(r["frozen_top"]) == 5 and r["fusion"] is None


def test_query_profile_breaks_the_trip_into_steps(setup, capsys):
    image = next(row[0] for row in setup["rows"] if row[3] == "test")
    assert main(["query", image, "--memory", str(setup["mem"]), "--fusion", str(setup["w"]), "--classes",
                 str(setup["manifest"]), "-k", "3", "--profile", "--json", "-"]) == 0
    p = json.loads(capsys.readouterr().out)["profile"]
    assert p["steps"] == ["decode", "preprocess", "image graph", "search", "fusion", "scoring"]
    assert set(p["batch1_ms"]) == set(p["steps"]) and all(v >= 0 for v in p["batch1_ms"].values())
    assert p["batch"] == 64 and set(p["batch_ms_per_image"]) == set(p["steps"])
    assert main(["query", image, "--memory", str(setup["mem"]), "--fusion", str(setup["w"]), "--classes",
                 str(setup["manifest"]), "-k", "3", "--profile"]) == 0
    out = capsys.readouterr().out
    assert "one photo, encoder reco-mini" in out and "batch 64 ms/img" in out
    # the scoring step needs classes; a text query has no photo to time
    base = ["--memory", str(setup["mem"]), "--fusion", str(setup["w"]), "--profile"]
    assert "--profile" in _one_line_error(capsys, ["query", image, *base], "query")
    assert "--profile" in _one_line_error(capsys, ["query", "--text", "a cat", "--classes", str(setup["manifest"]),
                                                   *base], "query")


def test_query_errors(setup, tmp_path, capsys):
    base = ["--memory", str(setup["mem"]), "--fusion", str(setup["w"])]
    assert "exactly one" in _one_line_error(capsys, ["query", "x.png", "--text", "a cat", *base], "query")
    assert "exactly one" in _one_line_error(capsys, ["query", *base], "query")
    assert "not found" in _one_line_error(capsys, ["query", str(tmp_path / "nope.png"), *base], "query")
    (tmp_path / "dup.txt").write_text("cat\ncat\n")
    assert "twice" in _one_line_error(capsys, ["query", "--text", "a", "--class-names", str(tmp_path / "dup.txt"),
                                               *base], "query")
    with pytest.raises(SystemExit):
        main(["query", "--text", "a", "-k", "0", *base])


# ---------------------------------------------------------------------------------------------- real data
@pytest.mark.data
def test_eval_on_a_flowers102_slice(shared_data, tmp_path):
    """Classes 0..29: 1 train image each as memory, ~24 test images: the vote and the surrogate beat frozen."""
    from reco_ref.encoders import load
    from reco_ref.eval.data import read_split
    from reco_ref.eval.evaluate import evaluate_dataset
    from reco_ref.memory import build_memory, read_pairs_csv
    from reco_ref.reco.weights import init_reco_weights, save_reco_weights

    train = read_split(shared_data / "flowers102", "train")
    test = read_split(shared_data / "flowers102", "test")
    first = {int(y): f for f, y in reversed(list(zip(train.files, train.labels))) if y < 30}
    rows = [[f, y, train.class_names[y], "train"] for y, f in sorted(first.items())]
    rows += [[f, int(y), test.class_names[y], "test"] for f, y in list(zip(test.files, test.labels))[::10] if y < 30]
    _write_manifest(tmp_path / "manifest.csv", rows)
    enc = load("reco-mini")
    items = read_pairs_csv(tmp_path / "manifest.csv", split="train", allow_outside=True)  # absolute dataset paths
    build_memory(tmp_path / "mem", items, enc, progress=False)
    w = init_reco_weights(enc.dim, meta={"encoder_fingerprint": enc.fingerprint})
    save_reco_weights(tmp_path / "w.npz", w)
    r = evaluate_dataset(tmp_path / "mem", tmp_path / "manifest.csv", "test", fusion=tmp_path / "w.npz", k=5,
                         model=enc)
    assert r["n"] == len(rows) - 30 and r["classes"] == 30 and r["templates"] == "flowers"
    assert r["knn_vote"]["top1"] > r["frozen"]["top1"] and r["surrogate"]["top1"] > r["frozen"]["top1"]


def test_query_with_memory_relative_weights_reports_the_gate_and_scores_like_eval(setup, tmp_path, capsys):
    """Relevance weights reading scores against the memory: `query` reports the image's gate, and its RECO class
    ranking is the gated one (refined class text blended with the frozen by that gate)."""
    import numpy as np

    from reco_ref.eval.templates import class_embeddings, resolve_templates
    from reco_ref.fusion import gated_scores
    from reco_ref.memory import Memory
    from reco_ref.reco.refine import refine
    from reco_ref.reco.weights import init_reco_weights, save_reco_weights

    enc = setup["enc"]
    w = init_reco_weights(enc.dim, init="copy", k=4, relevance=True, rel_beta=2.0, rel_gamma=-4.0,
                          rel_source="memory", meta={"encoder_name": enc.name, "encoder_fingerprint": enc.fingerprint})
    save_reco_weights(tmp_path / "mem-rel.npz", w)
    names = tmp_path / "names.txt"
    classes = sorted({row[2] for row in setup["rows"]})
    names.write_text("\n".join(classes) + "\n")
    image = next(row[0] for row in setup["rows"] if row[3] == "test")
    assert main(["query", image, "--memory", str(setup["mem"]), "--fusion", str(tmp_path / "mem-rel.npz"),
                 "--class-names", str(names), "-k", "4", "--json", "-"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert 0.0 <= r["relevance_gate"] <= 1.0
    mem = Memory.open(setup["mem"], encoder=enc)
    v, key = enc.encode_images([image], with_keys=True)
    vb, _, _, gate = refine(w.image, mem, v, "image", search_queries=key, k=4, with_gate=True)
    assert r["relevance_gate"] == pytest.approx(float(gate[0]))
    cls = class_embeddings(enc, classes, resolve_templates(None)[1])
    tb = refine(w.text, mem, cls, "text", k=4)[0]
    s = gated_scores(vb, tb, cls, gate)[0]
    assert [c["class"] for c in r["reco_top"]] == [classes[i] for i in np.argsort(-s, kind="stable")[:5]]


def test_query_ranks_with_the_template_set_eval_uses_for_the_dataset(setup, tmp_path):
    """`query --classes MANIFEST` ranks with the template set `eval` picks for that dataset (by its folder's name);
    class names alone get the generic set; --templates overrides. The set used is in the JSON."""
    from reco_ref.eval.evaluate import query

    flowers = tmp_path / "flowers102" / "manifest.csv"
    flowers.parent.mkdir()
    flowers.write_text("file,label,class_name,split\n")
    image = next(row[0] for row in setup["rows"] if row[3] == "test")
    kw = dict(image=image, fusion="none", class_names=["bird", "dog"], k=3, model=setup["enc"])
    assert query(setup["mem"], classes_manifest=flowers, **kw)["templates"] == "flowers"
    assert query(setup["mem"], **kw)["templates"] == "generic"
    assert query(setup["mem"], classes_manifest=flowers, templates="single", **kw)["templates"] == "single"
