"""``reco-ref ablate`` end to end on tiny synthetic memories: every arm trains, evaluates and lands in one table."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np

from reco_ref.cli import main

from train_testlib import build, make_run_data

RECIPE = ["-k", "5", "--batch-size", "16", "--epochs", "1", "--heads", "4", "--lr", "2e-3", "--warmup-steps", "5",
          "--no-progress", "--model", "train_testlib:class_encoder"]


def _eval_args(tmp_path, d) -> list[str]:
    """``ablate`` arguments for training on the run data and evaluating on its validation rows, whose embeddings
    are given precomputed (no image decoding)."""
    np.save(tmp_path / "img.npy", d["image"][320:])
    np.save(tmp_path / "keys.npy", d["keys"][320:])
    manifest = tmp_path / "eval.csv"
    manifest.write_text("file,label,class_name,split\n" + "".join(
        f"x{i}.jpg,{c},c{c},test\n" for i, c in enumerate(d["labels"][320:])))
    return ["ablate", "--memory", str(tmp_path / "train_mem"), "--eval-memory", str(tmp_path / "train_mem"),
            "--eval-dataset", str(manifest), "--eval-embeddings", str(tmp_path / "img.npy"), "--eval-keys",
            str(tmp_path / "keys.npy")]


def test_ablate_cli_all_arms(tmp_path):
    d = make_run_data(tmp_path)
    small = build(tmp_path / "small", d["image"][:4], d["text"][:4], d["keys"][:4])
    args = _eval_args(tmp_path, d) + ["--small-memory", str(small.root), "--ks", "1,5", "--out", str(tmp_path / "abl"),
                                      *RECIPE]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(args) == 0
    res = json.loads((tmp_path / "abl" / "ablations.json").read_text())
    arms = [(r["arm"], r["search"], r["fuse"], r["k"], r["model"], r["memory_at_training"]) for r in res["rows"]]
    assert arms == [("search_fuse", "uni", "cross", 5, "reco", "100 %"), ("search_fuse", "cross", "cross", 5, "reco", "100 %"),
                    ("search_fuse", "uni", "uni", 5, "reco", "100 %"), ("search_fuse", "cross", "uni", 5, "reco", "100 %"),
                    ("untrained", "uni", "cross", 5, "reco", "100 %"),
                    ("k", "uni", "cross", 1, "reco", "100 %"), ("k", "uni", "cross", 5, "reco", "100 %"),
                    ("mlp", "uni", "cross", 5, "mlp", "100 %"), ("small_memory", "uni", "cross", 5, "reco", "1 %")]
    for r in res["rows"]:
        assert 0.0 <= r["top1"] <= 1.0 and r["frozen_top1"] == res["rows"][0]["frozen_top1"]
    # k=5 row uses the same weights and k as the uni/cross row
    assert res["rows"][6]["top1"] == res["rows"][0]["top1"]
    # the untrained row is the identity-init layer at step 0: exactly the frozen encoder here
    assert res["rows"][4]["top1"] == res["rows"][4]["frozen_top1"]
    md = (tmp_path / "abl" / "ablations.md").read_text()
    assert md.count("\n| ") == 9 + 1 and "equal-size MLP control" in md
    # the same command again resumes every arm from its finished checkpoint: same table (replacing the finished
    # tables takes --overwrite: no verb replaces its outputs untold)
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(args + ["--overwrite"]) == 0
    assert json.loads((tmp_path / "abl" / "ablations.json").read_text())["rows"] == res["rows"]


def test_ablate_errors(tmp_path):
    d = make_run_data(tmp_path)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["ablate", "--memory", str(tmp_path / "train_mem"), "--eval-memory", str(tmp_path / "train_mem"),
                   "--eval-dataset", str(d["manifest"]), "--eval-split", "train", "--ks", "1,x", "--out",
                   str(tmp_path / "o"), *RECIPE])
    assert rc == 1 and err.getvalue().startswith("reco-ref ablate: error: --ks: expected comma-separated integers")


def test_ablate_relevance_recipe_untrained_row_is_the_start(tmp_path):
    """With relevance-only training the untrained row is the copy-init layer with β, γ at their start values, and
    the MLP control still trains (it has no relevance arrays)."""
    d = make_run_data(tmp_path)
    args = _eval_args(tmp_path, d) + ["--ks", "5", "--arms", "k,mlp", "--out", str(tmp_path / "abl"),
            "--init", "copy", "--relevance", "--train-groups", "relevance", "--irrelevant-fraction", "0.5",
            "--rel-map", "neighbour", *RECIPE]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(args) == 0
    res = json.loads((tmp_path / "abl" / "ablations.json").read_text())
    arms = [r["arm"] for r in res["rows"]]
    assert arms == ["untrained", "k", "mlp"]
    from reco_ref.train.loop import TrainConfig, step0_weights
    from reco_ref.reco.weights import load_reco_weights

    w = load_reco_weights(tmp_path / "abl" / "arm-uni-cross" / "best.npz")
    cfg = TrainConfig(k=5, heads=4, init="copy", relevance=True, train_groups="relevance", rel_map="neighbour")
    w0 = step0_weights(w, cfg)
    for m in ("image", "text"):
        a, b = getattr(w, m), getattr(w0, m)
        assert a.config == b.config
        assert all(np.array_equal(a[n], b[n]) for n in a if not n.startswith("rel_"))
        assert np.all(b["rel_beta"] == 1.0) and np.all(b["rel_gamma"] == 0.0)
