"""[ours] long-tail options of the classifier: the logit-adjusted loss, balanced validation, the readout's start scale."""

from __future__ import annotations

import json

import numpy as np
import pytest

from classify_testlib import central_differences, make_encoder, random_case, write_dataset
from reco_ref.classify.model import classify_backward, classify_forward, cross_entropy_backward, \
    cross_entropy_forward
from reco_ref.classify.train import READOUT_SCALES, ClassifyConfig, _logits, balanced_top1, holdout_rows, \
    load_classifier, log_prior, train_classifier
from reco_ref.cli import main
from reco_ref.errors import ShapeError
from reco_ref.memory import build_memory, read_pairs

ENC = "classify_testlib:make_encoder"


def test_log_prior_and_balanced_top1():
    y = np.array([0, 0, 0, 1])
    assert np.allclose(log_prior(y, 3), np.log(np.array([3, 1, 1]) / 5))  # an absent class counts as one row
    assert np.isfinite(log_prior(y, 3)).all()
    pred = np.array([0, 0, 0, 0])
    assert balanced_top1(pred, y) == 0.5 and (pred == y).mean() == 0.75


def test_tail_holdout_takes_one_of_every_class_with_two_rows():
    y = np.repeat([0, 1, 2, 3], [30, 12, 2, 1])
    held = holdout_rows(y, 0.1, seed=0, tail=True)
    assert np.bincount(y[held], minlength=4).tolist() == [3, 1, 1, 0]  # the 1-row class keeps its row
    assert np.bincount(y[holdout_rows(y, 0.1, seed=0)], minlength=4).tolist() == [3, 1, 0, 0]


@pytest.mark.parametrize("memory", [True, False])
def test_logit_adjusted_loss_gradient_is_the_plain_backward(memory):
    """d/dθ CE(f(θ) + τ log π) — float64 central differences — equals classify_backward of the cross-entropy of the
    adjusted logits: the adjustment is a constant shift, the module's backward is unchanged."""
    rng = np.random.default_rng(11)
    p, q, K, V, valid, y = random_case(rng, memory=memory)
    if not memory:
        K = V = valid = None
    kw = dict(heads=2, logit_scale=3.0)
    C = p["b_c"].shape[0]
    adj = 1.0 * log_prior(np.array([0, 0, 0, 1, 2, 0, 1]), C)

    def loss():
        logits, _ = classify_forward(p, q, K, V, valid, **kw)
        return cross_entropy_forward(logits + adj, y)[0]

    logits, cache = classify_forward(p, q, K, V, valid, **kw)
    grads = classify_backward(p, cache, cross_entropy_backward(cross_entropy_forward(logits + adj, y)[1]))
    for name in ("w_c", "b_c") + (("w_o",) if memory else ()):
        num = central_differences(loss, p[name])
        assert np.abs(num - grads[name]).max() <= 1e-7 * max(1.0, np.abs(num).max()), name


def _long_tail(rng, C=4, D=8, counts=(200, 60, 12, 4), n_test=60):
    centres = rng.standard_normal((C, D)) * 0.8
    y = np.repeat(np.arange(C), counts)
    yt = np.repeat(np.arange(C), n_test)
    draw = lambda lab: (centres[lab] + rng.standard_normal((len(lab), D))).astype(np.float32)  # noqa: E731
    return draw(y), y, draw(yt), yt


def test_logit_adjustment_lifts_the_balanced_accuracy_of_a_long_tailed_fit():
    """Overlapping classes, counts 200/60/12/4: trained plainly the classifier leans to the head; with τ = 1 it
    predicts the tail more and its class-mean top-1 on a balanced test rises (two seeds of data)."""
    for seed in (0, 1):
        x, y, xt, yt = _long_tail(np.random.default_rng(seed))
        got = {}
        for tau in (0.0, 1.0):
            cfg = ClassifyConfig(memory=False, epochs=30, lr=2e-2, logit_scale=4.0, batch_size=64, logit_adjust=tau)
            params, _ = train_classifier(x, None, y, 4, None, cfg, progress=False)
            pred = _logits(params, cfg, None, xt, None, None).argmax(1)
            got[tau] = (balanced_top1(pred, yt), (pred == 3).sum())
        assert got[1.0][0] > got[0.0][0] + 0.02, got
        assert got[1.0][1] > got[0.0][1], got


def test_balanced_validation_keeps_the_epoch_by_class_mean_top1():
    rng = np.random.default_rng(2)
    x, y, xt, yt = _long_tail(rng)
    val = (xt[::3], None, yt[::3], None)
    cfg = ClassifyConfig(memory=False, epochs=4, lr=2e-2, logit_scale=4.0, batch_size=64, validation="balanced")
    params, info = train_classifier(x, None, y, 4, None, cfg, val=val, progress=False)
    pred = _logits(params, cfg, None, val[0], None, None).argmax(1)
    assert info["val_top1"] == pytest.approx(balanced_top1(pred, val[2]))
    assert info["val_top1"] == max(h["val_top1"] for h in info["history"])


def test_options_are_checked():
    for kw, match in ((dict(logit_adjust=-1.0), "logit_adjust"), (dict(logit_adjust=float("nan")), "logit_adjust"),
                      (dict(validation="mean"), "validation"), (dict(readout_scale=-2.0), "readout_scale")):
        with pytest.raises(ShapeError, match=match):
            ClassifyConfig(**kw).check()
    # a default run keeps the fingerprint it had before these options existed (its checkpoint still resumes)
    assert ClassifyConfig().fingerprint() == "436e4add9cf6c4d4"
    assert ClassifyConfig(readout_scale=64.0).fingerprint() == ClassifyConfig().fingerprint()  # no readout: moot
    # a checkpoint resumes only its own configuration: each option is part of the run's fingerprint
    assert len({ClassifyConfig().fingerprint(), ClassifyConfig(logit_adjust=1.0).fingerprint(),
                ClassifyConfig(validation="balanced").fingerprint()}) == 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lt")
    manifest = write_dataset(tmp / "data", per_class_train=(30, 12, 3))
    build_memory(tmp / "mem", read_pairs(manifest, split="train", caption_template="a photo of a {class_name}."),
                 make_encoder(), progress=False)
    return tmp, manifest


def _train(tmp, manifest, out, *extra):
    return main(["classify", "train", "--dataset", str(manifest), "--split", "train", "--memory", str(tmp / "mem"),
                 "--out", str(out), "--model", ENC, "--epochs", "3", "--batch-size", "16", "--lr", "1e-2",
                 "--width", "8", "--heads", "2", "-k", "4", "--quiet", "--no-progress", *extra])


def test_readout_scale_is_chosen_on_validation_or_fixed(setup):
    """--readout-scale 0 (default): every scale of the grid is validated at the start and the best kept (recorded);
    a positive value is the start as given (lr 0: nothing moves)."""
    tmp, manifest = setup
    out = tmp / "auto.npz"
    assert _train(tmp, manifest, out, "--readout", "--attention", "none", "--head-init", "probe",
                  "--validation", "balanced", "--logit-adjust", "1") == 0
    params, meta = load_classifier(out)
    by = meta["readout_scale_val"]
    assert sorted(float(s) for s in by) == sorted(READOUT_SCALES)
    # best validation top-1, ties to the lower validation loss
    assert meta["readout_scale_start"] == max(READOUT_SCALES, key=lambda s: (by[f"{s:g}"][0], -by[f"{s:g}"][1]))
    start = meta["history"][0]  # epoch 0, the start, is the kept scale's validation
    assert start["epoch"] == 0 and [start["val_top1"], start["val_loss"]] == by[f"{meta['readout_scale_start']:g}"]
    assert meta["config"]["logit_adjust"] == 1.0 and meta["config"]["validation"] == "balanced"
    assert "every class with >= 2 rows gives one" in meta["validation"]
    fixed = tmp / "fixed.npz"
    assert _train(tmp, manifest, fixed, "--readout", "--attention", "none", "--readout-scale", "48", "--lr",
                  "0") == 0
    params, meta = load_classifier(fixed)
    assert params["ro_log_sv"][0] == pytest.approx(np.log(48.0)) and meta["readout_scale_val"] == {}
    js = tmp / "auto.json"
    assert main(["classify", "eval", "--weights", str(out), "--dataset", str(manifest), "--split", "test",
                 "--memory", str(tmp / "mem"), "--json", str(js), "--model", ENC, "--quiet", "--no-progress"]) == 0
    r = json.loads(js.read_text())
    assert r["few"] == 1.0 and "logistic_probe" in r["baselines"]


def test_logit_adjust_shifts_the_probe_start_by_the_log_prior(setup):
    """--head-init probe --logit-adjust τ: b_c starts at the probe's b − τ log π (lr 0 keeps the start)."""
    tmp, manifest = setup
    outs = {}
    for tau in ("0", "1"):
        outs[tau] = tmp / f"la{tau}.npz"
        assert _train(tmp, manifest, outs[tau], "--no-memory", "--head-init", "probe", "--lr", "0",
                      "--logit-adjust", tau) == 0
    p0, m0 = load_classifier(outs["0"])
    p1, _ = load_classifier(outs["1"])
    y = np.repeat([0, 1, 2], [30, 12, 3])
    held = holdout_rows(y, 0.1, seed=0)
    assert np.allclose(p1["b_c"], p0["b_c"] - log_prior(y[~held], 3), atol=1e-5)
    assert np.array_equal(p1["w_c"], p0["w_c"])
