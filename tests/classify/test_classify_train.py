"""reco_ref.classify.train: label noise, held-out rows, shot groups, retrieval with self-exclusion, weights file."""

from __future__ import annotations

import numpy as np
import pytest

from classify_testlib import make_encoder, write_dataset
from reco_ref.classify.train import ClassifyConfig, holdout_rows, load_classifier, retrieve_items, \
    save_classifier, shot_groups, symmetric_label_noise
from reco_ref.errors import ParamsFormatError, ShapeError
from reco_ref.eval.data import own_rows
from reco_ref.memory import build_memory, read_pairs


def test_symmetric_noise_flips_the_rate_to_other_classes():
    y = np.repeat(np.arange(10), 1000)
    noisy = symmetric_label_noise(y, 0.4, 10, seed=3)
    flipped = noisy != y
    assert abs(flipped.mean() - 0.4) < 0.02
    # uniform over the 9 other classes: each gets about 1/9 of a class's flips
    counts = np.bincount(noisy[flipped & (y == 0)], minlength=10)
    assert counts[0] == 0 and counts[1:].min() > 0.6 * counts[1:].mean()
    assert np.array_equal(noisy, symmetric_label_noise(y, 0.4, 10, seed=3))
    with pytest.raises(ShapeError, match="noise"):
        symmetric_label_noise(y, 1.0, 10)


def test_holdout_spares_the_tail_and_groups_follow_counts():
    y = np.repeat([0, 1, 2], [30, 12, 3])
    held = holdout_rows(y, 0.1, seed=0)
    assert np.bincount(y[held], minlength=3).tolist() == [3, 1, 0]
    assert shot_groups([21, 20, 5, 4, 0]).tolist() == [0, 1, 1, 2, 2]


def test_retrieve_items_excludes_own_item(tmp_path):
    manifest = write_dataset(tmp_path / "data", per_class_train=(6, 6))
    enc = make_encoder()
    build_memory(tmp_path / "mem", read_pairs(manifest, split="train", caption_template="a photo of a {class_name}."),
                 enc, progress=False)
    from reco_ref.eval.data import read_split
    from reco_ref.memory import Memory

    mem = Memory.open(tmp_path / "mem", encoder=enc)
    ds = read_split(manifest, "train")
    _, keys = enc.encode_images(ds.files, with_keys=True)
    own = own_rows(mem, keys)
    assert sorted(own.tolist()) == list(range(12))
    K, V, valid = retrieve_items(mem, keys, 3, "both", exclude=own)
    assert K.shape == (12, 3, 12) and V.shape == (12, 3, 32) and valid.all()
    assert not any(np.allclose(K[i, j], keys[i]) for i in range(12) for j in range(3))  # never itself
    _, _, valid = retrieve_items(mem, keys, 20, "text", exclude=own)
    assert valid.sum(1).tolist() == [11] * 12  # 12 items minus its own: the rest padded invalid


def test_weights_file_round_trip_and_refusals(tmp_path):
    from reco_ref.classify.model import init_params

    cfg = ClassifyConfig(width=8, heads=2)
    p = init_params(6, 3, key_dim=5, value_dim=6, width=8, heads=2)
    meta = {"config": cfg.__dict__, "dims": {"dim": 6, "classes": 3, "key_dim": 5, "value_dim": 6},
            "train_class_counts": [30, 12, 3]}
    save_classifier(tmp_path / "w.npz", p, meta)
    q, m = load_classifier(tmp_path / "w.npz")
    assert all(np.array_equal(q[n], p[n]) for n in p) and m["train_class_counts"] == [30, 12, 3]
    save_classifier(tmp_path / "bad.npz", {n: a for n, a in p.items() if n != "w_k"}, meta)
    with pytest.raises(ParamsFormatError, match="param.w_k"):
        load_classifier(tmp_path / "bad.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(Exception, match="junk.npz"):
        load_classifier(tmp_path / "junk.npz")


def test_logistic_probe_matches_the_optimum_and_chooses_l2_on_held_out_rows():
    """The probe's solution has zero gradient (float64), its λ comes from the validation rows only, and its
    loss/gradient pair passes central differences."""
    from reco_ref.classify.baselines import _loss_grad, fit_logistic_probe

    rng = np.random.default_rng(0)
    C, D = 3, 5
    centres = rng.standard_normal((C, D))
    y = rng.integers(0, C, 120)
    x = centres[y] + 0.8 * rng.standard_normal((120, D))
    yv = rng.integers(0, C, 60)
    xv = centres[yv] + 0.8 * rng.standard_normal((60, D))
    p = fit_logistic_probe(x, y, C, val=(xv, yv), l2=(1e-3, 1e-1))
    assert set(p["val_top1"]) == {"0.001", "0.1"} and p["l2"] in (1e-3, 1e-1)
    theta = np.concatenate([p["W"].ravel(), p["b"]])
    xa, ya = np.concatenate([x, xv]), np.concatenate([y, yv])  # refitted on train + validation rows
    _, g = _loss_grad(theta, xa, ya, C, p["l2"])
    assert np.abs(g).max() < 1e-4
    q = fit_logistic_probe(x, y, C, val=(xv, yv), l2=(1e-3, 1e-1), refit_with_val=False)  # the training rows only
    assert q["l2"] == p["l2"]
    assert np.abs(_loss_grad(np.concatenate([q["W"].ravel(), q["b"]]), x, y, C, q["l2"])[1]).max() < 1e-4
    t = rng.standard_normal(theta.size) * 0.1
    _, g = _loss_grad(t, xa, ya, C, 0.01)
    for i in rng.choice(t.size, 6, replace=False):
        e = np.zeros_like(t)
        e[i] = 1e-6
        fd = (_loss_grad(t + e, xa, ya, C, 0.01)[0] - _loss_grad(t - e, xa, ya, C, 0.01)[0]) / 2e-6
        assert abs(fd - g[i]) < 1e-6


def test_head_init_probe_starts_at_the_probe_and_epoch_0_is_a_candidate():
    """head=(W, b): s·q W_c + b_c equals q W + b at the start; epoch 0 is validated and kept if no epoch beats it."""
    from reco_ref.classify.train import ClassifyConfig, train_classifier

    rng = np.random.default_rng(4)
    C, D = 3, 6
    centres = rng.standard_normal((C, D))
    y = rng.integers(0, C, 90)
    x = (centres[y] + 0.5 * rng.standard_normal((90, D))).astype(np.float32)
    W, b = rng.standard_normal((D, C)), rng.standard_normal(C)
    cfg = ClassifyConfig(memory=False, epochs=2, lr=0.0, logit_scale=4.0, batch_size=32)  # lr 0: nothing moves
    params, info = train_classifier(x, None, y, C, None, cfg, val=(x[:30], None, y[:30], None), progress=False,
                                    head=(W, b))
    assert info["history"][0]["epoch"] == 0 and info["best_epoch"] == 0
    assert np.allclose(4.0 * x @ params["w_c"] + params["b_c"], x @ W + b, atol=1e-5)


def test_head_init_prompts_starts_as_the_zero_shot_cosine_classifier():
    """prompt_head: at step 0 (lr 0: nothing moves, epoch 0 kept) the logits are s·cos(q, t_c) — with memory too,
    whose module starts at z = q — and the prompts' norms do not matter."""
    from reco_ref.classify.train import prompt_head, train_classifier, _logits

    rng = np.random.default_rng(5)
    C, D, s = 4, 8, 16.0
    T = rng.standard_normal((C, D)) * rng.uniform(0.5, 3.0, (C, 1))  # prompts of assorted norms
    y = rng.integers(0, C, 60)
    x = T[y] / np.linalg.norm(T[y], axis=1, keepdims=True) + 0.3 * rng.standard_normal((60, D))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # unit queries, as the encoders give
    cos = x @ (T / np.linalg.norm(T, axis=1, keepdims=True)).T
    cfg = ClassifyConfig(memory=False, epochs=2, lr=0.0, logit_scale=s, batch_size=32, head_init="prompts")
    params, info = train_classifier(x, None, y, C, None, cfg, val=(x[:20], None, y[:20], None), progress=False,
                                    head=prompt_head(T, s))
    assert info["history"][0]["epoch"] == 0 and info["best_epoch"] == 0
    assert np.allclose(_logits(params, cfg, None, x, None, None), s * cos, atol=1e-5)
    assert np.array_equal(params["b_c"], np.zeros(C, np.float32))
    with pytest.raises(ShapeError, match="zero or not finite"):
        prompt_head(np.zeros((2, D)), s)
    with pytest.raises(ShapeError, match="head_init"):
        ClassifyConfig(head_init="prompt").check()
