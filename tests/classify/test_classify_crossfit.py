"""[ours] The label readout (``--readout-values label``) and cross-fitted choices (``--validation crossfit``).

The label readout is the score readout with each item's one-hot class as its value, read against ``I``: float64
central differences of its gradients, the exact score-weighted vote it computes, and the memory rows' labels it
reads. Cross-fitting: the folds' properties, the pooled score, every choice equal to the argmax of the pooled
out-of-fold record it keeps, the final run stopping at the kept epoch, the probe baseline under the same rule, and
an interrupted run resumed to the same weights.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from classify_testlib import central_differences, make_encoder, write_dataset
from reco_ref.classify.crossfit import crossfit_folds, crossfit_probe, crossfit_state_path, crossfit_train, \
    pooled_score
from reco_ref.classify.model import classify_backward, classify_forward, cross_entropy_backward, \
    cross_entropy_forward, init_params
from reco_ref.classify.train import READOUT_SCALES, ClassifyConfig, balanced_top1, label_values, load_classifier, \
    memory_row_labels
from reco_ref.cli import main
from reco_ref.errors import CheckpointError, DatasetError, ShapeError
from reco_ref.memory import Memory, build_memory, read_pairs

ENC = "classify_testlib:make_encoder"


def test_label_values_are_one_hot_and_zero_where_invalid_or_unlabelled():
    row_labels = np.array([2, -1, 0, 1])
    rows = np.array([[0, 1, 2], [3, -1, 0]])
    valid = np.array([[True, True, True], [True, False, False]])
    v = label_values(row_labels, rows, valid, 3)
    assert v.shape == (2, 3, 3) and v.dtype == np.float32
    assert v[0, 0].tolist() == [0, 0, 1] and not v[0, 1].any() and v[0, 2].tolist() == [1, 0, 0]
    assert v[1, 0].tolist() == [0, 1, 0] and not v[1, 1:].any()  # an invalid slot reads nothing, even row 0's label


def _label_case(rng, B=5, k=4, D=6, C=3, attention="none"):
    P = init_params(D, C, key_dim=5, value_dim=7, width=8, heads=2, attention=attention,
                    class_text=np.eye(C), dtype=np.float64)
    P["w_c"] = rng.standard_normal(P["w_c"].shape)
    P["b_c"] = rng.standard_normal(P["b_c"].shape)
    P["ro_beta"] = np.array([1.3])
    P["ro_log_sv"] = np.array([0.4])
    q = rng.standard_normal((B, D))
    K, V = rng.standard_normal((B, k, 5)), rng.standard_normal((B, k, 7))
    valid = rng.uniform(size=(B, k)) < 0.8
    valid[:, 0] = True
    lab = rng.integers(-1, C, (B, k))
    R = label_values(np.arange(-1, C), lab + 1, valid, C, np.float64)  # rows 0..C map to labels -1..C-1
    sc = rng.uniform(-1, 1, (B, k))
    y = rng.integers(0, C, B)
    return P, q, K, V, valid, R, sc, y, lab


@pytest.mark.parametrize("attention", ["none", "softmax"])
def test_label_readout_gradients_by_central_differences(attention):
    rng = np.random.default_rng([21, len(attention)])
    P, q, K, V, valid, R, sc, y, _ = _label_case(rng, attention=attention)

    def loss():
        lg, _ = classify_forward(P, q, K, V, valid, heads=2, attention=attention, logit_scale=2.0, scores=sc,
                                 readout_values=R)
        return cross_entropy_forward(lg, y)[0]

    lg, cache = classify_forward(P, q, K, V, valid, heads=2, attention=attention, logit_scale=2.0, scores=sc,
                                 readout_values=R)
    g = classify_backward(P, cache, cross_entropy_backward(cross_entropy_forward(lg, y)[1]), return_input_grads=True)
    assert "ro_class_text" not in g
    checks = {"ro_beta": P["ro_beta"], "ro_log_sv": P["ro_log_sv"], "w_c": P["w_c"], "scores": sc,
              "readout_values": R}
    if attention == "softmax":
        checks |= {"values": V, "w_o": P["w_o"]}
    for name, arr in checks.items():
        num = central_differences(loss, arr)
        err = np.linalg.norm(g[name] - num) / max(np.linalg.norm(num), 1e-8)
        assert err <= 1e-7, (name, err)


def test_label_readout_is_the_score_weighted_vote():
    """With a zero head the logits are exactly s_v · Σ_j softmax_j(β s_j) onehot(y_j) over the valid items."""
    rng = np.random.default_rng(4)
    P, q, K, V, valid, R, sc, y, lab = _label_case(rng)
    P["w_c"][:] = 0
    P["b_c"][:] = 0
    lg, _ = classify_forward(P, q, K, V, valid, heads=2, attention="none", scores=sc, readout_values=R)
    beta, sv = P["ro_beta"][0], np.exp(P["ro_log_sv"][0])
    want = np.zeros_like(lg)
    for b in range(len(q)):
        w = np.where(valid[b], np.exp(beta * sc[b]), 0)
        w /= w.sum()
        for j in range(valid.shape[1]):
            if valid[b, j] and lab[b, j] >= 0:
                want[b, lab[b, j]] += sv * w[j]
    assert np.abs(lg - want).max() <= 1e-12
    with pytest.raises(ShapeError, match="readout_values"):
        classify_forward(P, q, K, V, valid, heads=2, attention="none", scores=sc, readout_values=R[:, :2])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("xf")
    manifest = write_dataset(tmp / "data", per_class_train=(24, 10, 3, 1))
    build_memory(tmp / "mem", read_pairs(manifest, split="train", caption_template="a photo of a {class_name}."),
                 make_encoder(), progress=False)
    build_memory(tmp / "mem-nonames", read_pairs(manifest, split="train", caption_template="kind class {label}."),
                 make_encoder(), progress=False)
    return tmp, manifest


def test_memory_row_labels_read_the_captions_and_refuse_a_memory_without_classes(setup):
    tmp, manifest = setup
    mem = Memory.open(tmp / "mem", encoder=make_encoder())
    lab, how = memory_row_labels(mem, ["class0", "class1", "class2", "class3"])
    assert np.bincount(lab).tolist() == [24, 10, 3, 1] and "caption" in how
    with pytest.raises(DatasetError, match="readout-values caption"):
        memory_row_labels(Memory.open(tmp / "mem-nonames", encoder=make_encoder()), ["class0", "class1"])


def test_crossfit_folds_spread_every_class_and_never_hold_out_a_single_row():
    y = np.repeat(np.arange(5), [1, 2, 7, 10, 23])
    f = crossfit_folds(y, 5, seed=3)
    assert (f[y == 0] == -1).all() and (f[y > 0] >= 0).all()
    for c in range(1, 5):
        counts = np.bincount(f[y == c], minlength=5)
        assert counts.max() - counts.min() <= 1  # dealt round-robin
    assert np.array_equal(f, crossfit_folds(y, 5, seed=3))
    assert not np.array_equal(f, crossfit_folds(y, 5, seed=4))
    pred = y.copy()
    pred[y == 0] = 4  # the unscored class's mistakes do not count
    pred[np.flatnonzero(y == 4)[:23 // 2]] = 0
    assert pooled_score(pred, y, f) == pytest.approx(balanced_top1(pred[y > 0], y[y > 0]))
    with pytest.raises(ShapeError, match="folds"):
        crossfit_folds(y, 1)


def _train(tmp, manifest, out, *extra, memory="mem"):
    return main(["classify", "train", "--dataset", str(manifest), "--split", "train", "--memory", str(tmp / memory),
                 "--out", str(out), "--model", ENC, "--epochs", "2", "--batch-size", "16", "--lr", "1e-2",
                 "--width", "8", "--heads", "2", "-k", "4", "--quiet", "--no-progress", *extra])


XF = ("--readout", "--readout-values", "label", "--attention", "none", "--head-init", "probe", "--logit-adjust", "1",
      "--validation", "crossfit")


def test_crossfit_keeps_the_argmax_of_its_pooled_record_and_the_report_says_so(setup):
    tmp, manifest = setup
    out = tmp / "xf.npz"
    assert _train(tmp, manifest, out, *XF) == 0
    params, meta = load_classifier(out)
    xf = meta["crossfit"]
    grid = {(g["l2"], g["scale"]): (g["top1"], g["loss"]) for g in xf["start_grid"]}
    assert {s for _, s in grid} == set(READOUT_SCALES) and len(grid) == 5 * len(READOUT_SCALES)
    assert (xf["l2"], xf["readout_scale"]) == max(grid, key=lambda k: (grid[k][0], -grid[k][1]))
    by = {int(e): (v["top1"], v["loss"]) for e, v in xf["by_epoch"].items()}
    assert sorted(by) == [0, 1, 2]  # the start and both epochs
    assert meta["best_epoch"] == max(by, key=lambda e: (by[e][0], -by[e][1]))
    assert meta["val_top1"] == by[meta["best_epoch"]][0] and by[0] == grid[(xf["l2"], xf["readout_scale"])]
    assert xf["scored_rows"] == 24 + 10 + 3  # the class with one row is never held out
    assert meta["dims"]["readout_dim"] == 4 and np.array_equal(params["ro_class_text"], np.eye(4))
    assert params["ro_log_sv"][0] == pytest.approx(np.log(xf["readout_scale"]), abs=0.2 if meta["best_epoch"] else 1e-6)
    assert not crossfit_state_path(out).exists() and not (tmp / "xf.npz.ckpt.npz").exists()
    assert not list(tmp.glob("xf.npz.fold*"))
    js = tmp / "xf.json"
    assert main(["classify", "eval", "--weights", str(out), "--dataset", str(manifest), "--split", "test",
                 "--memory", str(tmp / "mem"), "--json", str(js), "--model", ENC, "--quiet", "--no-progress"]) == 0
    r = json.loads(js.read_text())
    assert r["top1"] >= 0.75 and "cross-fitting" in r["baselines"]["logistic_probe"]["fit"]


def test_the_final_run_stops_at_the_kept_epoch(setup, monkeypatch):
    """A start that wins on the pooled record is returned as it is: epoch 0 means no training step."""
    from reco_ref.classify import crossfit as xfmod

    tmp, manifest = setup
    seen = []
    real = xfmod.train_classifier

    def spy(*a, **kw):
        seen.append(kw.get("stop_after"))
        return real(*a, **kw)

    monkeypatch.setattr(xfmod, "train_classifier", spy)
    out = tmp / "stop.npz"
    assert _train(tmp, manifest, out, *XF, "--lr", "5") == 0  # a huge step ruins every epoch: the start is kept
    _, meta = load_classifier(out)
    assert meta["best_epoch"] == 0 and seen == [None] * 5 + [0]


def test_crossfit_resumes_an_interrupted_run_to_the_same_weights(setup, monkeypatch):
    from reco_ref.classify import crossfit as xfmod

    tmp, manifest = setup
    whole = tmp / "whole.npz"
    assert _train(tmp, manifest, whole, *XF) == 0
    real, calls = xfmod.train_classifier, []

    def dies_in_fold_three(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(xfmod, "train_classifier", dies_in_fold_three)
    out = tmp / "cut.npz"
    assert _train(tmp, manifest, out, *XF) != 0  # the CLI reports the interrupt and exits non-zero
    assert len(json.loads(crossfit_state_path(out).read_text())["done"]) == 2
    monkeypatch.setattr(xfmod, "train_classifier", real)
    assert _train(tmp, manifest, out, *XF) != 0  # a record exists: resume is asked for, not assumed
    assert _train(tmp, manifest, out, *XF, "--resume") == 0
    a, ma = load_classifier(whole)
    b, mb = load_classifier(out)
    assert ma["crossfit"] == mb["crossfit"] and all(np.array_equal(a[n], b[n]) for n in a)
    with pytest.raises(CheckpointError, match="another run"):  # a record of another start is refused
        crossfit_state_path(out).write_text(json.dumps({"identity": {"config": "x"}, "done": {}}))
        y = np.repeat(np.arange(4), [24, 10, 3, 1])
        crossfit_train(np.zeros((38, 16), np.float32), None, y, 4, None,
                       ClassifyConfig(memory=False, validation="crossfit"), out=out, resume=True)


def test_crossfit_probe_takes_the_l2_with_the_best_pooled_score():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), [30, 12, 4])
    x = rng.standard_normal((len(y), 5)) + 2 * np.eye(3, 5)[y]
    p = crossfit_probe(x, y, 3, seed=1, l2=(1e-4, 1e-1, 10.0))
    sc = {float(k): v for k, v in p["val_top1"].items()}
    assert sc[p["l2"]] == max(sc.values()) and sc[10.0] < sc[1e-4]
    assert p["W"].shape == (5, 3)


def test_options_are_checked(setup):
    tmp, manifest = setup
    with pytest.raises(ShapeError, match="readout_values"):
        ClassifyConfig(readout_values="label").check()  # only the readout reads labels
    with pytest.raises(ShapeError, match="readout_values"):
        ClassifyConfig(readout=True, readout_values="caps").check()
    assert ClassifyConfig(readout=True).fingerprint() != ClassifyConfig(readout=True, readout_values="label").fingerprint()
    assert _train(tmp, manifest, tmp / "nonames.npz", *XF, memory="mem-nonames") != 0
    assert not (tmp / "nonames.npz").exists()


def test_a_fold_without_rows_is_skipped_and_the_record_stays_finite(tmp_path):
    """Two classes of two rows: three of the five folds hold no row; they get no run and no NaN in the record."""
    rng = np.random.default_rng(2)
    y = np.array([0, 0, 1, 1])
    x = (rng.standard_normal((4, 6)) + 3 * np.eye(2, 6)[y]).astype(np.float32)
    seen = []
    params, info = crossfit_train(x, None, y, 2, None, ClassifyConfig(memory=False, validation="crossfit", epochs=2),
                                  out=tmp_path / "w.npz", head_fit=lambda rows, l2: _probe(x[rows], y[rows], l2),
                                  l2_grid=(1e-6, 1e-2), log=seen.append, progress=False)
    assert sum("holds no row" in m for m in seen) == 5 - len(set(crossfit_folds(y, 5, 0)))
    xf = info["crossfit"]
    assert all(np.isfinite(g["loss"]) for g in xf["start_grid"])
    assert all(np.isfinite(v["loss"]) for v in xf["by_epoch"].values())


def _probe(x, y, l2):
    from reco_ref.classify.baselines import fit_logistic_probe

    p = fit_logistic_probe(x, y, 2, val=None, l2=(l2,))
    return p["W"], p["b"]
