"""Training and inference with the relevance bias (docs/reco.md §2 "Relevance bias" [ours], issue 18).

Scores travel from the search into the layer in training (``PreparedSource.scores_*``), validation and
``refine``; ``train_groups="relevance"`` trains only β, γ and τ; ``irrelevant_fraction`` adds sources whose
search excludes the query's own class; the score map is the z-score against unrelated pairs of the training memory.
"""

from __future__ import annotations

import numpy as np
import pytest

from reco_ref.errors import RecoError, ShapeError
from reco_ref.fusion import RELEVANCE_NAMES, fusion_forward, score_features
from reco_ref.train.loop import TrainConfig, ValSet, train
from reco_ref.train.pairs import labels_of, nearest_score_median, prepare_source, score_map, unrelated_score_stats
from reco_ref.reco.refine import refine, retrieve_for
from reco_ref.reco.weights import load_reco_weights

from train_testlib import make_run_data

CFG = dict(k=5, batch_size=16, epochs=2, heads=4, lr=5e-2, warmup_steps=2, checkpoint_every=4, weight_decay=0.0,
           init="copy", relevance=True, train_groups="relevance", exact_search=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_run_data(tmp_path_factory.mktemp("run"))


def _val(d):
    return [ValSet("val", d["val"], d["train"], d["labels"][320:], d["class_text"])]


def test_unrelated_score_stats_is_the_mean_and_std_of_random_pairs():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 8))
    m, s = unrelated_score_stats(x, pairs=50000, seed=1)
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    c = (u @ u.T)[~np.eye(400, dtype=bool)]
    assert abs(m - c.mean()) < 0.01 and abs(s - c.std()) < 0.01
    assert unrelated_score_stats(x, seed=1) == unrelated_score_stats(x, seed=1)
    with pytest.raises(RecoError, match="at least 2 rows"):
        unrelated_score_stats(x[:1])


def test_prepared_scores_are_the_search_cosines(data):
    src = prepare_source(data["train"], k=5, exact=True)
    keys = np.asarray(data["train"].image_keys if data["train"].key_dim else data["train"].image, np.float64)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    i = np.arange(len(src))[:, None]
    want = np.einsum("nd,nkd->nk", keys, keys[src.rows_i])  # query key · neighbour key
    assert np.allclose(np.where(src.valid_i, src.scores_i, 0), np.where(src.valid_i, want, 0), atol=1e-5)
    assert (src.rows_i != i).all()  # own row excluded
    maps = score_map(src, "unrelated")
    assert np.allclose(maps["image"], unrelated_score_stats(keys), rtol=1e-9) and len(maps["text"]) == 2
    near = score_map(src, "neighbour")
    assert near["image"][1] == maps["image"][1] and np.isclose(near["image"][0], nearest_score_median(keys), rtol=1e-9)


def test_irrelevant_source_never_retrieves_the_query_class(data):
    irr = prepare_source(data["train"], k=5, exact=True, irrelevant=True)
    lab = labels_of(data["train"])
    assert irr.valid_i.any() and irr.valid_t.any()
    for rows, valid in ((irr.rows_i, irr.valid_i), (irr.rows_t, irr.valid_t)):
        same = lab[np.where(valid, rows, 0)] == lab[:, None]
        assert not (same & valid).any()


def test_relevance_training_moves_only_beta_gamma_tau_and_keeps_the_score_map(data, tmp_path):
    r = train([{"pairs": data["train"]}], tmp_path / "a", TrainConfig(**CFG, irrelevant_fraction=0.5),
              val=_val(data), progress=False)
    w0 = load_reco_weights(tmp_path / "a" / "last.npz")
    from reco_ref.reco.weights import init_reco_weights

    src = prepare_source(data["train"], k=5, exact=True)
    start = init_reco_weights(w0.dim, heads=4, init="copy", k=5, relevance=True,
                              maps=score_map(src))
    for m in ("image", "text"):
        a, b = getattr(w0, m), getattr(start, m)
        assert (a.config.rel_center, a.config.rel_width) == (b.config.rel_center, b.config.rel_width)
        for n in a:
            if n in RELEVANCE_NAMES:
                assert not np.array_equal(a[n], b[n]), f"{m}.{n} did not train"
            else:
                assert np.array_equal(a[n], b[n]), f"{m}.{n} moved although frozen"
    assert [s["name"] for s in w0.meta["sources"]] == ["source0", "source0:irrelevant"]
    assert r.history[0]["epoch"] == 0 and len(r.history) == 3


def test_refine_feeds_the_scores_and_they_matter(data, tmp_path):
    train([{"pairs": data["train"]}], tmp_path / "b", TrainConfig(**CFG), progress=False)
    w = load_reco_weights(tmp_path / "b" / "last.npz")
    mem = data["train"]
    q = np.asarray(data["val"].image[:12])
    keys = None if data["val"].image_keys is None else np.asarray(data["val"].image_keys[:12])
    got, rows, valid = refine(w.image, mem, q, "image", search_queries=keys, k=5, exact=True)
    nb, ok, r, sc = retrieve_for(mem, q, "image", search_queries=keys, k=5, exact=True, with_scores=True)
    want, _ = fusion_forward(w.image, q, nb, ok, scores=sc)
    assert np.array_equal(got, want) and np.array_equal(rows, r)
    other, _ = fusion_forward(w.image, q, nb, ok, scores=np.zeros_like(sc))
    assert not np.allclose(other, want, atol=1e-6)  # the scores change the answer: refine must not drop them
    with pytest.raises(ShapeError, match="needs the neighbours' search scores"):
        fusion_forward(w.image, q, nb, ok)
    f = score_features(w.image, sc, ok)
    c = w.image.config
    assert np.allclose(f[ok], (sc[ok] - c.rel_center) / c.rel_width, rtol=1e-5)


def test_config_refuses_inconsistent_recipes():
    with pytest.raises(RecoError, match="needs relevance=True"):
        TrainConfig(train_groups="relevance").check()
    with pytest.raises(RecoError, match="irrelevant_fraction"):
        TrainConfig(irrelevant_fraction=1.0).check()
    with pytest.raises(RecoError, match="init"):
        TrainConfig(init="zeros").check()


def test_irrelevant_episodes_skip_unlabelled_memories(data, tmp_path):
    """A memory without labels (generic pairs) cannot give class-excluded episodes: it trains as it is, and the
    labelled source beside it still gets its irrelevant copy."""
    from train_testlib import build

    plain = build(tmp_path / "plain", data["image"][:200], data["text"][:200], data["keys"][:200])
    r = train([{"pairs": data["train"]}, {"pairs": plain}], tmp_path / "c",
              TrainConfig(**dict(CFG, epochs=1), irrelevant_fraction=0.5), progress=False)
    names = [s["name"] for s in load_reco_weights(tmp_path / "c" / "last.npz").meta["sources"]]
    assert names == ["source0", "source0:irrelevant", "source1"]
    assert r.steps > 0


def _batch_loss(model, src, idx):
    """Loss of one batch, its caches and the gradients ``_Model.backward`` hands to AdamW."""
    from reco_ref.train.losses import reco_loss_backward, reco_loss_forward

    v, t, nb_i, m_i, nb_t, m_t = src.batch(idx)
    s_i, s_t = src.batch_scores(idx)
    dt = model.modules["image"]["rel_beta"].dtype  # the float64 check casts the batch with the params
    v, t, nb_i, nb_t = (np.asarray(a, dt) for a in (v, t, nb_i, nb_t))
    s_i, s_t = np.asarray(s_i, dt), np.asarray(s_t, dt)
    vb, ci = model.forward("image", v, nb_i, m_i, s_i, src)
    tb, ct = model.forward("text", t, nb_t, m_t, s_t, src)
    loss, lc = reco_loss_forward(vb, tb, v, t, float(model.tau))
    dvb, dtb, _ = reco_loss_backward(lc)
    return float(loss), model.backward("image", ci, dvb) | model.backward("text", ct, dtb)


def test_hold_threshold_gradient_is_the_tied_derivative(data):
    """``hold_threshold``: the gradient given for β is dL/dβ along the tie γ = β·f* + ln k (central difference,
    float64 front door on the NumPy reference), and γ gets none of its own."""
    from reco_ref.train.loop import _Model

    cfg = TrainConfig(**dict(CFG, backend="numpy"), rel_map="memory", rel_beta=2.0, rel_gamma=-4.0,
                      hold_threshold=True)
    cfg.check()
    src = prepare_source(data["train"], k=5, exact=True)
    model = _Model(cfg, data["train"].dim, score_map(src, "memory"))
    for phi in model.modules.values():  # float64 so the difference quotient resolves the derivative
        for n in phi:
            phi[n] = np.asarray(phi[n], np.float64)
    idx = np.arange(16)
    _, g = _batch_loss(model, src, idx)
    fstar = (-4.0 - np.log(5)) / 2.0
    assert model.threshold() == pytest.approx(fstar)
    for m in ("image", "text"):
        assert not g[f"{m}.rel_gamma"].any()
        phi = model.modules[m]
        for h in (0, 3):
            eps = 1e-5
            b0, g0 = phi["rel_beta"][h], phi["rel_gamma"][h]
            phi["rel_beta"][h], phi["rel_gamma"][h] = b0 + eps, g0 + fstar * eps
            lp, _ = _batch_loss(model, src, idx)
            phi["rel_beta"][h], phi["rel_gamma"][h] = b0 - eps, g0 - fstar * eps
            lm, _ = _batch_loss(model, src, idx)
            phi["rel_beta"][h], phi["rel_gamma"][h] = b0, g0
            fd = (lp - lm) / (2 * eps)
            assert abs(fd - g[f"{m}.rel_beta"][h]) <= 1e-6 + 1e-5 * abs(fd), (m, h, fd, g[f"{m}.rel_beta"][h])


def test_hold_threshold_keeps_every_heads_threshold_while_beta_trains(data, tmp_path):
    cfg = TrainConfig(**CFG, rel_map="memory", rel_beta=2.0, rel_gamma=-4.0, hold_threshold=True)
    train([{"pairs": data["train"]}], tmp_path / "h", cfg, progress=False)
    w = load_reco_weights(tmp_path / "h" / "last.npz")
    fstar = (-4.0 - np.log(5)) / 2.0
    for m in ("image", "text"):
        phi = getattr(w, m)
        assert not np.allclose(phi["rel_beta"], 2.0), f"{m}: β did not train"
        got = (np.asarray(phi["rel_gamma"], np.float64) - np.log(5)) / np.asarray(phi["rel_beta"], np.float64)
        assert np.allclose(got, fstar, rtol=1e-5), (m, got)
    import json

    assert json.loads((tmp_path / "h" / "config.json").read_text())["config"]["hold_threshold"] is True
    with pytest.raises(RecoError, match="hold_threshold"):
        TrainConfig(relevance=True, hold_threshold=True).check()  # train_groups "all"
    with pytest.raises(RecoError, match="hold_threshold"):
        TrainConfig(**dict(CFG, rel_beta=0.0), hold_threshold=True).check()


def test_library_train_refuses_a_bad_seed_heads_or_source_weight(data, tmp_path):
    """A Python caller of ``train`` gets the CLI's checks: seed range, heads dividing the width, source weight."""
    for bad in (-1, 2**32, True):
        with pytest.raises(RecoError, match="seed"):
            TrainConfig(seed=bad).check()
    with pytest.raises(RecoError, match="does not divide"):
        train([{"pairs": data["train"]}], tmp_path / "h7", TrainConfig(**dict(CFG, heads=7)), progress=False)
    for w in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(RecoError, match="weight"):
            prepare_source(data["train"], k=5, exact=True, weight=w)
