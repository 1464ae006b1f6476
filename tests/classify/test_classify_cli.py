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
        md = out.with_suffix(".md").read_text()
        assert md.count("|") > 10 and out.with_suffix(".png").stat().st_size > 500
        # the honest baselines beside it: a logistic probe on the same features and the k-NN vote over the memory
        probe, vote = r["baselines"]["logistic_probe"], r["baselines"]["knn_vote"]
        assert {"top1", "many", "medium", "few", "l2"} <= set(probe) and probe["top1"] >= 0.5
        assert vote["top1"] >= 0.5 and vote["k"] == 4 and "logistic_probe" in md and "knn_vote" in md
    assert main(["classify", "eval", "--weights", str(tmp / "w.npz"), "--dataset", str(manifest), "--split", "test",
                 "--memory", str(tmp / "mem"), "--json", str(tmp / "nb.json"), "--model", ENC, "--quiet",
                 "--no-progress", "--no-baselines"]) == 0
    assert "baselines" not in json.loads((tmp / "nb.json").read_text())


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
    real = tr.save_checkpoint  # the training loop's checkpoint format (reco_ref.train.checkpoint)
    calls = {"n": 0}

    def save_then_stop(*args):
        real(*args)
        calls["n"] += 1
        if calls["n"] == 2:
            raise Stop

    tr.save_checkpoint = save_then_stop
    try:
        with pytest.raises(Stop):
            train_classifier(img, None, y, 3, None, two, progress=False, checkpoint=ck)
    finally:
        tr.save_checkpoint = real
    with pytest.raises(CheckpointError, match="resume"):
        train_classifier(img, None, y, 3, None, two, progress=False, checkpoint=ck)
    with pytest.raises(CheckpointError, match="another configuration"):
        train_classifier(img, None, y, 3, None, ClassifyConfig(memory=False, epochs=5, batch_size=16),
                         progress=False, checkpoint=ck, resume=True)
    resumed, info = train_classifier(img, None, y, 3, None, two, progress=False, checkpoint=ck, resume=True)
    assert len(info["history"]) == 4
    for n in full:
        np.testing.assert_array_equal(resumed[n], full[n])



def test_old_inline_checkpoint_refused_in_one_line(tmp_path):
    """A checkpoint of classify's older inline format (``param.*``/``opt.*`` + ``info``) is refused with one line
    naming the file and saying to delete it; nothing of it is read into the run."""
    from reco_ref.io import atomic_save_npz

    rng = np.random.default_rng(0)
    img = rng.standard_normal((40, 6)).astype(np.float32)
    y = rng.integers(0, 3, 40)
    cfg = ClassifyConfig(memory=False, epochs=2, batch_size=16)
    ck = tmp_path / "old.ckpt.npz"
    info = {"config": cfg.fingerprint(), "epoch": 1, "best_epoch": 1, "best_acc": -1.0, "history": []}
    atomic_save_npz(ck, {"param.w_c": np.zeros((6, 3), np.float32),
                         "info": np.frombuffer(json.dumps(info).encode(), np.uint8)})
    with pytest.raises(CheckpointError) as exc:
        train_classifier(img, None, y, 3, None, cfg, progress=False, checkpoint=ck, resume=True)
    msg = str(exc.value)
    assert str(ck) in msg and "delete it to start over" in msg and "\n" not in msg

def test_train_caches_embeddings_by_default_and_off_disables_it(setup, tmp_path, monkeypatch, capsys):
    """Without --cache-dir and $RECO_REF_CACHE, the embeddings land in $XDG_CACHE_HOME/reco_ref/embeddings and the
    plan (epochs × steps, checkpoint, how to resume) is printed before training; --cache-dir off writes nothing."""
    tmp, manifest = setup
    monkeypatch.delenv("RECO_REF_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    args = ["classify", "train", "--dataset", str(manifest), "--memory", str(tmp / "mem"), "--model", ENC,
            "--epochs", "2", "--width", "8", "--heads", "2", "-k", "4", "--no-progress"]
    assert main(args + ["--out", str(tmp_path / "a.npz")]) == 0
    out = capsys.readouterr().out
    assert "plan: 2 epochs" in out and "--resume" in out and "epoch 1/2:" in out
    assert list((tmp_path / "xdg" / "reco_ref" / "embeddings").glob("emb-*.npz"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg2"))
    assert main(args + ["--out", str(tmp_path / "b.npz"), "--cache-dir", "off"]) == 0
    assert not (tmp_path / "xdg2").exists()


def test_interrupt_says_how_to_resume(setup, tmp_path, monkeypatch, capsys):
    import reco_ref.classify.commands as commands

    tmp, manifest = setup

    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(commands, "train_classifier", stop)
    with pytest.raises(KeyboardInterrupt):
        commands.train_from_manifest(manifest, "train", tmp / "mem", tmp_path / "c.npz", ClassifyConfig(k=4, width=8,
                                     heads=2, epochs=1), encoder=make_encoder(), progress=False)
    assert "rerun the same command with --resume" in capsys.readouterr().out


@pytest.mark.parametrize("attention", ["softmax", "none"])
def test_readout_train_eval_round_trip(setup, attention):
    """--readout stores the class prompts and the readout's scalars in the weights; eval reads them back; the
    3-shot class is recognised through the memory's captions."""
    tmp, manifest = setup
    out = tmp / f"ro-{attention}.npz"
    assert _train(tmp, manifest, out, "--readout", "--attention", attention) == 0
    params, meta = load_classifier(out)
    assert {"ro_beta", "ro_log_sv", "ro_class_text"} <= set(params) and meta["config"]["readout"]
    assert params["ro_class_text"].shape == (3, 16) and meta["dims"]["readout_dim"] == 16
    js = tmp / f"ro-{attention}.json"
    assert main(["classify", "eval", "--weights", str(out), "--dataset", str(manifest), "--split", "test",
                 "--memory", str(tmp / "mem"), "--json", str(js), "--model", ENC, "--quiet", "--no-progress",
                 "--no-baselines"]) == 0
    r = json.loads(js.read_text())
    assert r["top1"] >= 0.9 and r["few"] == 1.0


def test_readout_options_are_checked():
    for kw, match in ((dict(readout=True, memory=False), "needs a memory"), (dict(readout=True, values="image"),
                      "captions"), (dict(attention="none"), "only goes with"), (dict(readout=True,
                      readout_template="a photo"), "readout_template")):
        with pytest.raises(Exception, match=match):
            ClassifyConfig(**kw).check()


def test_the_probe_chooses_its_l2_on_the_classifiers_own_validation_split(tmp_path):
    """--val-split holdout: the classifier's epoch and the probe's λ are chosen on the same split (recorded in the
    weights as val_split); without it, the rule's default (10 % of each class's train rows)."""
    from classify_testlib import write_dataset

    manifest = write_dataset(tmp_path / "data", extra_splits=[("holdout", [4, 4, 4])])
    items = read_pairs(manifest, split="train", caption_template="a photo of a {class_name}.")
    build_memory(tmp_path / "mem", items, make_encoder(), progress=False)
    for extra, want in ((["--val-split", "holdout"], "split 'holdout'"), ([], "held-out rows")):
        out = tmp_path / f"w{len(extra)}.npz"
        assert _train(tmp_path, manifest, out, *extra) == 0
        assert load_classifier(out)[1]["val_split"] == ("holdout" if extra else None)
        js = tmp_path / f"w{len(extra)}.json"
        assert main(["classify", "eval", "--weights", str(out), "--dataset", str(manifest), "--split", "test",
                     "--memory", str(tmp_path / "mem"), "--json", str(js), "--model", ENC, "--quiet",
                     "--no-progress"]) == 0
        assert want in json.loads(js.read_text())["baselines"]["logistic_probe"]["fit"]


@pytest.mark.parametrize("memory", [False, True])
def test_head_init_prompts_cli(setup, memory):
    """--head-init prompts: W_c starts at the unit class-prompt embeddings ("a photo of a {}."), b_c at 0 (lr 0 keeps
    the start: epoch 0); recorded in the weights' config; eval's logits are s·cos(query, prompt)."""
    from reco_ref.classify.train import _logits

    tmp, manifest = setup
    out = tmp / f"prinit-{memory}.npz"
    assert _train(tmp, manifest, out, "--head-init", "prompts", "--lr", "0",
                  *(() if memory else ("--no-memory",))) == 0
    params, meta = load_classifier(out)
    assert meta["config"]["head_init"] == "prompts" and meta["best_epoch"] == 0
    assert meta["history"][0]["epoch"] == 0
    T = make_encoder().encode_texts([f"a photo of a class{c}." for c in range(3)])
    T = T / np.linalg.norm(T, axis=1, keepdims=True)
    assert np.allclose(params["w_c"], T.T, atol=1e-6) and not params["b_c"].any()
    from reco_ref.classify.commands import open_memory
    from reco_ref.eval.data import read_split

    img, keys = make_encoder().encode_images(read_split(manifest, "test").files, with_keys=True)
    mem = open_memory(tmp / "mem", make_encoder()) if memory else None  # the module starts at z = q (W_o = 0)
    logits = _logits(params, ClassifyConfig(**meta["config"]), mem, img, keys, None)
    assert np.allclose(logits, 32.0 * img @ T.T, atol=1e-4)
