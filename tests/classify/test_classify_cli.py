"""reco-ref classify train|eval on a tiny class-structured dataset (fake encoder): contract, overlap, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest

from classify_testlib import make_encoder, write_dataset
from reco_ref.classify.train import ClassifyConfig, load_classifier, train_classifier
from reco_ref.cli import main
from reco_ref.errors import CheckpointError
from reco_ref.memory import build_memory, read_pairs

ENC = "classify_testlib:make_encoder"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("classify")
    manifest = write_dataset(tmp / "data")
    items = read_pairs(manifest, split="train", caption_template="a photo of a {class_name}.")
    build_memory(tmp / "mem", items, make_encoder(), progress=False)  # the training images are in the memory
    return tmp, manifest


def _train(tmp, manifest, out, *extra):
    return main(["classify", "train", "--dataset", str(manifest), "--split", "train", "--memory", str(tmp / "mem"),
                 "--out", str(out), "--model", ENC, "--epochs", "40", "--batch-size", "16", "--lr", "1e-2",
                 "--width", "8", "--heads", "2", "-k", "4",
                 "--quiet", "--no-progress", *extra])


def test_train_eval_contract(setup, capsys):
    tmp, manifest = setup
    assert _train(tmp, manifest, tmp / "w.npz") == 0
    assert _train(tmp, manifest, tmp / "nomem.npz", "--no-memory") == 0
    params, meta = load_classifier(tmp / "w.npz")
    assert meta["train_class_counts"] == [30, 12, 3] and meta["memory_overlap"] == 45
    assert set(params) >= {"w_q", "w_k", "w_v", "w_o", "w_c"} and not (tmp / "w.npz.ckpt.npz").exists()
    for w in ("w", "nomem"):
        out = tmp / f"{w}.json"
        assert main(["classify", "eval", "--weights", str(tmp / f"{w}.npz"), "--dataset", str(manifest), "--split",
                     "test", "--memory", str(tmp / "mem"), "--json", str(out), "--model", ENC, "--quiet",
                     "--no-progress"]) == 0
        r = json.loads(out.read_text())
        assert {"top1", "many", "medium", "few", "n", "classes"} <= set(r)
        assert r["n"] == 12 and r["classes"] == 3 and (r["n_many"], r["n_medium"], r["n_few"]) == (4, 4, 4)
        # well-separated classes: both beat chance (1/3); the memory's captions lift the 3-shot class
        assert r["top1"] >= (0.9 if w == "w" else 0.5)
        assert out.with_suffix(".md").read_text().count("|") > 10 and out.with_suffix(".png").stat().st_size > 500


def test_one_line_errors(setup, capsys):
    tmp, manifest = setup
    assert main(["classify", "eval", "--weights", str(tmp / "missing.npz"), "--dataset", str(manifest),
                 "--memory", str(tmp / "mem"), "--json", str(tmp / "x.json"), "--model", ENC, "--quiet"]) == 1
    assert "reco-ref classify: error:" in capsys.readouterr().err
    assert main(["classify", "train", "--dataset", str(manifest), "--out", str(tmp / "y.npz"), "--model", ENC]) == 1
    assert "--memory" in capsys.readouterr().err


def test_checkpoint_resume_equals_uninterrupted(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.standard_normal((40, 6)).astype(np.float32)
    y = rng.integers(0, 3, 40)
    cfg = ClassifyConfig(memory=False, epochs=4, batch_size=16)
    full, _ = train_classifier(img, None, y, 3, None, cfg, progress=False)
    ck = tmp_path / "c.npz"
    train_classifier(img, None, y, 3, None, ClassifyConfig(memory=False, epochs=4, batch_size=16), progress=False,
                     checkpoint=ck)
    # pretend the run stopped after epoch 2: rewrite the checkpoint from a 2-epoch run of the same config
    two = ClassifyConfig(memory=False, epochs=4, batch_size=16)
    ck.unlink()

    class Stop(Exception):
        pass

    import reco_ref.classify.train as tr
    real = tr.atomic_save_npz
    calls = {"n": 0}

    def save_then_stop(path, arrays):
        real(path, arrays)
        calls["n"] += 1
        if calls["n"] == 2:
            raise Stop

    tr.atomic_save_npz = save_then_stop
    try:
        with pytest.raises(Stop):
            train_classifier(img, None, y, 3, None, two, progress=False, checkpoint=ck)
    finally:
        tr.atomic_save_npz = real
    with pytest.raises(CheckpointError, match="resume"):
        train_classifier(img, None, y, 3, None, two, progress=False, checkpoint=ck)
    with pytest.raises(CheckpointError, match="another configuration"):
        train_classifier(img, None, y, 3, None, ClassifyConfig(memory=False, epochs=5, batch_size=16),
                         progress=False, checkpoint=ck, resume=True)
    resumed, info = train_classifier(img, None, y, 3, None, two, progress=False, checkpoint=ck, resume=True)
    assert len(info["history"]) == 4
    for n in full:
        np.testing.assert_array_equal(resumed[n], full[n])
