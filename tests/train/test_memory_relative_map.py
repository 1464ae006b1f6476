"""The memory-relative score map and the relevance gate (issue 18, "do no harm" [ours]).

A module with ``FusionConfig.rel_source == "memory"`` reads each neighbour's search score against the searched
memory's own scale (:mod:`reco_ref.memory.score_map`); the image module's gate blends refined and frozen class
text per query (:func:`reco_ref.fusion.gated_scores`).
"""

from __future__ import annotations

import numpy as np
import pytest

from reco_ref.errors import ParamsFormatError, RecoError, SearchError, ShapeError
from reco_ref.fusion import (
    FusionConfig, fusion_forward, gated_scores, init_params, relevance_gate, score_features,
)
from reco_ref.fusion.params import load_param_set, save_param_set
from reco_ref.fusion.reference import fusion_forward as reference_forward
from reco_ref.memory import ShardedMemory, write_shards_manifest
from reco_ref.memory.score_map import SAME_VECTOR, memory_score_map, space_score_map
from reco_ref.train.loop import TrainConfig, ValSet, train
from reco_ref.train.pairs import prepare_source, score_map
from reco_ref.reco.refine import refine, retrieve_for
from reco_ref.reco.weights import load_reco_weights

from train_testlib import build, clustered, make_run_data


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_run_data(tmp_path_factory.mktemp("run"))


def _unit(a):
    a = np.asarray(a, np.float64)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


# ---- the map -------------------------------------------------------------------------------------------------
def test_space_map_is_the_median_and_robust_spread_of_nearest_distinct_cosines():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 16))
    c, w = space_score_map(x, queries=300)
    u = _unit(x)
    s = u @ u.T
    np.fill_diagonal(s, -np.inf)
    nn = s.max(axis=1)  # every row a query: exactly these statistics
    q25, q50, q75 = np.percentile(nn, [25, 50, 75])
    assert np.isclose(c, q50, rtol=1e-12) and np.isclose(w, (q75 - q25) / 1.349, rtol=1e-12)
    assert space_score_map(x) == space_score_map(x)  # a pure function of the seed


def test_joining_two_domains_keeps_each_ones_scale():
    """The width is measured among nearest neighbours: two far-apart domains joined have about the scale of each
    (the spread of unrelated pairs would grow with the gap between them)."""
    rng = np.random.default_rng(8)
    z = rng.standard_normal((1, 24)) * 3
    a = _unit(z + rng.standard_normal((400, 24)))
    b = _unit(-z + rng.standard_normal((400, 24)))  # the opposite direction: unrelated cosines near -1 across
    ab = np.concatenate([a, b])
    ca, wa = space_score_map(a, queries=400)
    cab, wab = space_score_map(ab, queries=800)
    assert abs(cab - ca) < 0.01 and 0.8 < wab / wa < 1.25
    assert (ab @ ab.T).std() > 10 * (a @ a.T).std()  # what an unrelated-pair width would have done


def test_duplicates_are_not_neighbours():
    """60 rows per caption: the nearest *other* row of a caption is its nearest other caption, not itself."""
    rng = np.random.default_rng(1)
    distinct = rng.standard_normal((20, 8))
    dup = np.repeat(distinct, 60, axis=0)  # [1200, 8]
    c_dup, _ = space_score_map(dup, queries=1200)
    u = _unit(distinct)
    s = u @ u.T
    np.fill_diagonal(s, -np.inf)
    assert c_dup < SAME_VECTOR
    assert np.isclose(c_dup, np.median(s.max(axis=1)), rtol=1e-9)


def test_cross_map_excludes_the_own_pair_not_identical_vectors():
    rng = np.random.default_rng(9)
    img = rng.standard_normal((60, 8))
    txt = img + 0.01 * rng.standard_normal((60, 8))  # each caption ≈ its own image: the own pair must not count
    c, _ = space_score_map(txt, query_parts=img, queries=60)
    s = _unit(img) @ _unit(txt).T
    np.fill_diagonal(s, -np.inf)
    assert np.isclose(c, np.median(s.max(axis=1)), rtol=1e-12)
    with pytest.raises(RecoError, match="same rows"):
        space_score_map(txt, query_parts=img[:30])


def test_parts_give_the_map_of_their_concatenation():
    x = np.random.default_rng(2).standard_normal((500, 12)).astype(np.float32)
    assert space_score_map([x[:123], x[123:400], x[400:]]) == space_score_map(x)


@pytest.mark.parametrize("bad, match", [
    (np.ones((1, 4)), "at least 2 rows"),
    (np.ones((5, 4)), "same vector"),
    (np.eye(4), "no spread"),
    (np.array([[1.0, 0.0], [np.nan, 1.0]]), "not finite"),
    ([np.ones((3, 4)), np.ones((3, 5))], "different widths"),
])
def test_space_map_refuses_what_has_no_scale(bad, match):
    with pytest.raises(RecoError, match=match):
        space_score_map(bad)


def test_memory_map_reads_the_search_space_and_is_cached(data, tmp_path):
    mem = data["train"]
    got = memory_score_map(mem, "image")
    assert got == space_score_map(np.asarray(mem.image_keys))  # keys: what the image index searches
    assert memory_score_map(mem, "text") == space_score_map(np.asarray(mem.text))
    assert memory_score_map(mem, "image") is got  # computed once per opened memory
    # a sharded memory: the same map as one memory of the same rows
    # (shard folders lie inside the sharded memory's folder: shards.json names them, confined to it)
    build(tmp_path / "sharded" / "s0", data["image"][:150], data["text"][:150], data["keys"][:150])
    build(tmp_path / "sharded" / "s1", data["image"][150:320], data["text"][150:320], data["keys"][150:320])
    write_shards_manifest(tmp_path / "sharded", ["s0", "s1"])
    sh = ShardedMemory.open(tmp_path / "sharded")
    assert memory_score_map(sh, "image") == space_score_map(np.asarray(data["keys"][:320]))
    with pytest.raises(RecoError, match="modality"):
        memory_score_map(mem, "audio")


# ---- the config and the front door -----------------------------------------------------------------------------
def test_rel_source_round_trips_and_old_files_read_as_fixed(tmp_path):
    p = init_params(16, 4, relevance=True, init="copy", k=5, rel_source="memory", rel_center=0.7, rel_width=0.05)
    save_param_set(tmp_path / "m.npz", {"image": p})
    q = load_param_set(tmp_path / "m.npz")[0]["image"]
    assert q.config == p.config and q.config.rel_source == "memory"
    fixed = init_params(16, 4, relevance=True)
    assert "source" not in fixed.config.to_json()["relevance"]  # files without it: fixed, as before
    with pytest.raises(ValueError, match="rel_source"):
        FusionConfig(16, 4, relevance=True, rel_source="query")
    with pytest.raises(ValueError, match="needs relevance"):
        FusionConfig(16, 4, rel_source="memory")


def test_a_bad_source_in_a_file_is_named(tmp_path):
    import json

    save_param_set(tmp_path / "m.npz", {"image": init_params(16, 4, relevance=True, rel_source="memory")})
    arrs = dict(np.load(tmp_path / "m.npz", allow_pickle=False))
    header = json.loads(arrs["__header__"].tobytes().decode())
    assert header["modules"]["image"]["relevance"]["source"] == "memory"
    header["modules"]["image"]["relevance"]["source"] = "query"
    arrs["__header__"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    np.savez(tmp_path / "bad.npz", **arrs)
    with pytest.raises(ParamsFormatError, match="relevance"):
        load_param_set(tmp_path / "bad.npz")


def test_front_door_needs_the_memory_map_and_uses_it_exactly():
    rng = np.random.default_rng(3)
    D, k, B = 16, 5, 7
    fixed = init_params(D, 4, init="copy", k=k, relevance=True, rel_beta=2.0, rel_gamma=-1.0, rel_center=0.8,
                        rel_width=0.04)
    mem = init_params(D, 4, init="copy", k=k, relevance=True, rel_beta=2.0, rel_gamma=-1.0, rel_source="memory")
    q = _unit(rng.standard_normal((B, D))).astype(np.float32)
    nb = _unit(rng.standard_normal((B * k, D))).reshape(B, k, D).astype(np.float32)
    sc = rng.uniform(0.6, 0.95, (B, k)).astype(np.float32)
    with pytest.raises(ShapeError, match="rel_source='memory'"):
        fusion_forward(mem, q, nb, scores=sc)
    want, _ = fusion_forward(fixed, q, nb, scores=sc)
    got, _ = fusion_forward(mem, q, nb, scores=sc, score_map=(0.8, 0.04))
    assert np.array_equal(got, want)  # the memory's map enters exactly as a config's would
    assert np.allclose(score_features(mem, sc, score_map=(0.8, 0.04)), (sc - 0.8) / 0.04, rtol=1e-5)
    for bad in ((0.8, 0.0), (np.nan, 1.0), "x"):
        with pytest.raises(ShapeError, match="score_map"):
            fusion_forward(mem, q, nb, scores=sc, score_map=bad)


# ---- the gate ------------------------------------------------------------------------------------------------
def test_gate_is_the_query_share_of_attention_when_content_logits_are_equal():
    """With W_k = 0 every content logit is equal, so the layer's own attention on the query token (reference
    cache, averaged over heads) is the gate's formula exactly."""
    rng = np.random.default_rng(4)
    D, k, B, h = 16, 6, 5, 4
    p = init_params(D, h, init="copy", k=k, relevance=True, rel_beta=3.0, rel_gamma=-2.0, dtype=np.float64)
    p = dict(p)
    p["w_k"] = np.zeros_like(p["w_k"])
    p["b_k"] = np.zeros_like(p["b_k"])
    p["rel_beta"] = np.array([0.5, 1.0, 3.0, 6.0])
    q = _unit(rng.standard_normal((B, D)))
    nb = _unit(rng.standard_normal((B * k, D))).reshape(B, k, D)
    mask = rng.random((B, k)) > 0.3
    mask[0] = False  # a query with no valid neighbour keeps everything
    f = rng.normal(0, 2, (B, k))
    _, cache = reference_forward(p, q, nb, mask, heads=h, scores=f)
    share = cache["att"]["p"][:, :, 0, 0].mean(axis=1)  # [B]
    got = relevance_gate(p, f, mask)
    assert np.allclose(got, share, rtol=1e-12, atol=1e-15)
    assert got[0] == 1.0
    assert (relevance_gate(init_params(D, h), f) == 0).all()  # the paper's layer has no verdict


def test_gated_scores_blend_refined_and_frozen_class_text():
    rng = np.random.default_rng(5)
    v, tr, tf = rng.standard_normal((6, 8)), rng.standard_normal((3, 8)), rng.standard_normal((3, 8))
    g = np.array([0.0, 1.0, 0.5, 0.25, 0.0, 1.0])
    s = gated_scores(v, tr, tf, g)
    assert np.allclose(s[0], v[0] @ tr.T) and np.allclose(s[1], v[1] @ tf.T)
    assert np.allclose(s[2], 0.5 * v[2] @ tr.T + 0.5 * v[2] @ tf.T)
    assert np.array_equal(gated_scores(v, tr, tf, None), v @ tr.T)
    for bad in (np.full(6, 1.5), np.full(5, 0.5), np.full(6, np.nan)):
        with pytest.raises(ShapeError, match="gate"):
            gated_scores(v, tr, tf, bad)


# ---- refine, training, evaluation ----------------------------------------------------------------------------
def test_refine_reads_scores_against_the_searched_memory(data):
    mem, other = data["train"], data["val"]
    p = init_params(32, 4, init="copy", k=5, relevance=True, rel_beta=3.0, rel_gamma=-3.0, rel_source="memory")
    q = np.asarray(other.image[:10])
    keys = np.asarray(other.image_keys[:10])
    got, rows, valid, gate = refine(p, mem, q, "image", search_queries=keys, k=5, exact=True, with_gate=True)
    nb, ok, r, sc = retrieve_for(mem, q, "image", search_queries=keys, k=5, exact=True, with_scores=True)
    smap = memory_score_map(mem, "image")
    want, _ = fusion_forward(p, q, nb, ok, scores=sc, score_map=smap)
    assert np.array_equal(got, want) and np.array_equal(rows, r)
    assert np.allclose(gate, relevance_gate(p, score_features(p, sc, ok, score_map=smap), ok))
    assert gate.shape == (10,) and ((gate >= 0) & (gate <= 1)).all()
    # cross-modal search: the scores are image→caption cosines, read against the memory's own cross-modal scale
    got_x = refine(p, mem, q, "image", k=5, search="cross", exact=True)[0]
    nb, ok, _, sc = retrieve_for(mem, q, "image", k=5, search="cross", exact=True, with_scores=True)
    xmap = memory_score_map(mem, "image", search="cross")
    assert xmap == space_score_map(np.asarray(mem.text), query_parts=np.asarray(mem.image))
    assert xmap[0] < smap[0]  # image→caption cosines sit far below image→image ones: another scale
    assert np.array_equal(got_x, fusion_forward(p, q, nb, ok, scores=sc, score_map=xmap)[0])


def test_a_far_memory_makes_the_gate_keep_the_query(data, tmp_path):
    """Queries from another domain (far from every memory row, relative to the memory's own neighbour scale) are
    kept: gate ≈ 1 and the refined embedding ≈ the query; queries from the memory's own domain use it."""
    image, text, keys, labels, _ = clustered(240, 32, 12, seed=3, key_dim=48, noise=0.15)  # tight classes
    mem = build(tmp_path / "tight", image[:200], text[:200], keys[:200])
    p = init_params(32, 4, init="copy", k=5, relevance=True, rel_beta=1.0, rel_gamma=-3.0, rel_source="memory")
    rng = np.random.default_rng(6)
    far_keys = _unit(rng.standard_normal((8, 48))).astype(np.float32)  # unrelated to the clustered keys
    far = _unit(rng.standard_normal((8, 32))).astype(np.float32)
    out, _, _, g_far = refine(p, mem, far, "image", search_queries=far_keys, k=5, exact=True, with_gate=True)
    _, _, _, g_near = refine(p, mem, image[200:208], "image", search_queries=keys[200:208], k=5, exact=True,
                             with_gate=True)
    assert g_far.min() > 0.9 and g_near.max() < 0.1
    # ≈ the query (LayerNorm's mean removal in D = 32 keeps it from being exact)
    assert (np.einsum("nd,nd->n", out, far) > 0.98).all()


def test_training_with_the_memory_map_reads_each_source_against_its_own_memory(data, tmp_path):
    cfg = TrainConfig(k=5, batch_size=16, epochs=1, heads=4, lr=5e-2, warmup_steps=2, checkpoint_every=4,
                      weight_decay=0.0, init="copy", relevance=True, train_groups="relevance", exact_search=True,
                      rel_map="memory", rel_beta=3.0, rel_gamma=-3.0)
    val = [ValSet("val", data["val"], data["train"], data["labels"][320:], data["class_text"])]
    r = train([{"pairs": data["train"]}, {"pairs": data["val"], "retrieval": data["train"]}], tmp_path / "m", cfg,
              val=val, progress=False)
    w = load_reco_weights(tmp_path / "m" / "last.npz")
    assert w.image.config.rel_source == "memory" and w.text.config.rel_source == "memory"
    src = prepare_source(data["train"], k=5, exact=True)
    maps = score_map(src, "memory")
    assert maps["image"] == space_score_map(src.space_i) and maps["text"] == space_score_map(src.space_t)
    assert (w.image.config.rel_center, w.image.config.rel_width) == maps["image"]  # recorded: the first source's
    assert r.steps > 0 and 0 <= r.history[-1]["sets"][0]["top1"] <= 1  # validation ran with the gate
    with pytest.raises(RecoError, match="rel_map"):
        TrainConfig(relevance=True, rel_map="query").check()


def test_zero_shot_reports_the_gate_and_falls_back_on_a_far_memory(tmp_path):
    """Queries that the memory does not cover: RECO with the gate scores what the frozen encoder scores (the
    class text is refined with this memory, the gate keeps the frozen class text for these queries)."""
    from reco_ref.eval.zeroshot import evaluate_zero_shot
    from reco_ref.reco.weights import init_reco_weights

    image, text, keys, labels, class_text = clustered(240, 32, 12, seed=3, key_dim=48, noise=0.15)
    mem = build(tmp_path / "tight", image, text, keys)
    w = init_reco_weights(32, heads=4, init="copy", k=5, relevance=True, rel_beta=1.0, rel_gamma=-3.0,
                          rel_source="memory")
    w.meta["encoder_fingerprint"] = mem.fingerprint
    rng = np.random.default_rng(7)
    other = clustered(60, 32, 12, seed=11, key_dim=48, noise=0.15)  # another domain: other centres, other keys
    far_keys = _unit(rng.standard_normal((60, 48))).astype(np.float32)
    r = evaluate_zero_shot(mem, other[0], other[3], other[4].astype(np.float32), [f"c{i}" for i in range(12)],
                           keys=far_keys, weights=w, k=5, exact=True)
    assert r["reco_gate"]["median"] > 0.99
    assert abs(r["reco"]["top1"] - r["frozen"]["top1"]) <= 1 / 60
    near = evaluate_zero_shot(mem, image[:60], labels[:60], class_text.astype(np.float32),
                              [f"c{i}" for i in range(12)], keys=keys[:60], weights=w, k=5, exact=True,
                              exclude=np.arange(60))
    assert near["reco_gate"]["median"] < 0.1


def test_a_built_memory_carries_its_map_and_open_reads_it(data, tmp_path, monkeypatch):
    import json

    import reco_ref.memory.score_map as sm
    from reco_ref.errors import MemoryFormatError
    from reco_ref.memory import Memory, add_arrays_to_memory

    image, text, keys = data["image"], data["text"], data["keys"]
    mem = build(tmp_path / "m", image[:200], text[:200], keys[:200])
    stored = mem.manifest["score_map"]
    assert tuple(stored["image"]) == space_score_map(np.asarray(keys[:200]))
    assert tuple(stored["text"]) == space_score_map(np.asarray(text[:200]))
    monkeypatch.setattr(sm, "space_score_map", lambda *a, **k: pytest.fail("recomputed a stored map"))
    again = Memory.open(tmp_path / "m")
    assert memory_score_map(again, "image") == tuple(stored["image"])
    monkeypatch.undo()
    # adding rows changes the memory, and its map with it
    add_arrays_to_memory(tmp_path / "m", image[200:320], text[200:320], keys=keys[200:320], progress=False,
                         name=mem.manifest["encoder"]["name"], fingerprint=mem.fingerprint, allow_duplicates=True)
    grown = Memory.open(tmp_path / "m")
    assert tuple(grown.manifest["score_map"]["image"]) == space_score_map(np.asarray(keys[:320]))
    # a damaged entry is named when the memory is opened
    path = tmp_path / "m" / "manifest.json"
    m = json.loads(path.read_text())
    m["score_map"]["image"] = [0.8, -1.0]
    path.write_text(json.dumps(m))
    with pytest.raises(MemoryFormatError, match="score_map"):
        Memory.open(tmp_path / "m", verify=False)


# ---- do-no-harm guards in selection ----------------------------------------------------------------------------
@pytest.mark.parametrize("tolerance, kept", [(0.01, 1), (0.5, 3)])
def test_guard_sets_veto_epochs_that_lose_more_than_the_tolerance(data, tmp_path, monkeypatch, tolerance, kept):
    """Selection rises every epoch while the guard falls 0.008 per epoch: with tolerance 0.01 only epochs 0 and 1
    are keepable (epoch 1 wins), with 0.5 the last epoch is kept. Guards never enter the selection mean."""
    import reco_ref.train.loop as loop

    calls = {"n": 0}

    def scripted(model, pv, cfg):
        epoch = calls["n"] // 2
        calls["n"] += 1
        if pv.guard:
            return {"set": pv.name, "loss": 1.0, "top1": 0.5 - 0.008 * epoch, "n": 10, "guard": True}
        return {"set": pv.name, "loss": 1.0, "top1": 0.2 + 0.1 * epoch, "n": 10}

    monkeypatch.setattr(loop, "_validate", scripted)
    val = [ValSet("sel", data["val"], data["train"], data["labels"][320:], data["class_text"]),
           ValSet("guard", data["val"], data["train"], data["labels"][320:], data["class_text"], guard=True)]
    cfg = TrainConfig(k=5, batch_size=16, epochs=3, heads=4, lr=5e-2, warmup_steps=2, checkpoint_every=50,
                      steps_per_epoch=2, weight_decay=0.0, init="copy", relevance=True, train_groups="relevance",
                      exact_search=True, guard_tolerance=tolerance)
    r = train([{"pairs": data["train"]}], tmp_path / "g", cfg, val=val, progress=False)
    assert r.best_record["epoch"] == kept
    assert [h["guards_ok"] for h in r.history] == [True, True, tolerance > 0.016, tolerance > 0.024]
    assert all(h["top1"] == pytest.approx(0.2 + 0.1 * h["epoch"]) for h in r.history)  # the guard is not averaged
    with pytest.raises(RecoError, match="every validation set is a guard"):
        train([{"pairs": data["train"]}], tmp_path / "h", cfg, val=val[1:], progress=False)
    with pytest.raises(RecoError, match="guard_tolerance"):
        TrainConfig(guard_tolerance=-0.1).check()


def test_a_cross_search_source_gets_the_cross_modal_map(data):
    src = prepare_source(data["train"], k=5, exact=True, search="cross")
    maps = score_map(src, "memory")
    mem = data["train"]
    assert maps["image"] == memory_score_map(mem, "image", search="cross")
    assert maps["text"] == memory_score_map(mem, "text", search="cross")
    assert maps["image"] != score_map(prepare_source(mem, k=5, exact=True), "memory")["image"]
