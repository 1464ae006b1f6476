"""reco_ref.eval.latency.profile_query: every step timed, the prediction it makes is the pipeline's own."""

from __future__ import annotations

import numpy as np
import pytest

from reco_ref.eval.data import SHIPPED_PROMPT, shipped_data
from reco_ref.encoders import load
from reco_ref.errors import RecoError
from reco_ref.eval.latency import STEPS, format_profile, profile_query
from reco_ref.fusion import fusion_forward, init_params
from reco_ref.memory import Memory, build_memory_from_arrays, retrieve


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    ds = shipped_data()
    enc = load("reco-mini", threads=2)
    mem_items = ds["memory"][:24]
    img, keys = enc.encode_images([it["image"] for it in mem_items], with_keys=True)
    txt = enc.encode_texts([it["caption"] for it in mem_items])
    root = tmp_path_factory.mktemp("lat") / "memory"
    build_memory_from_arrays(root, img, txt, keys=keys, name=enc.name, fingerprint=enc.fingerprint, progress=False)
    mem = Memory.open(root, encoder=enc)
    cls = enc.encode_texts([SHIPPED_PROMPT.format(c) for c in ds["class_names"]])
    phi = init_params(enc.dim, 8, seed=0)
    rng = np.random.default_rng(0)
    phi["w_o"][...] = rng.normal(0, 0.05, phi["w_o"].shape)  # not the identity
    return enc, mem, phi, cls, [q["image"] for q in ds["queries"][:3]]


def test_profile_query_times_every_step_and_predicts_like_the_pipeline(setup):
    enc, mem, phi, cls, photos = setup
    p = profile_query(photos, enc, mem, phi, cls, k=5, batch=4, repeats=1)
    assert p["steps"] == STEPS and set(p["batch1_ms"]) == set(STEPS) == set(p["batch_ms_per_image"])
    assert all(v > 0 for v in p["batch1_ms"].values()) and all(v > 0 for v in p["batch_ms_per_image"].values())
    assert p["batch1_total_ms"] == pytest.approx(sum(p["batch1_ms"].values()))
    # the same trip without the timer
    v, key = enc.encode_images(photos[:1], with_keys=True)
    r, mask, _ = retrieve(mem, key, "image", k=5)
    v_bar, _ = fusion_forward(phi, v, r, mask)
    assert p["prediction"] == int(np.argmax(v_bar @ cls.T, axis=1)[0])
    table = format_profile(p)
    for s in (*STEPS, "total", "batch 4 ms/img"):
        assert s in table
    assert "batch_ms_per_image" not in profile_query(photos, enc, mem, phi, cls, k=5, batch=0, repeats=1)


def test_profile_query_bad_arguments(setup):
    enc, mem, phi, cls, photos = setup
    with pytest.raises(RecoError, match="at least one image"):
        profile_query([], enc, mem, phi, cls)
    with pytest.raises(RecoError, match="class_emb"):
        profile_query(photos, enc, mem, phi, cls[:, :10])
    with pytest.raises(RecoError, match="k: expected"):
        profile_query(photos, enc, mem, phi, cls, k=0)


def test_profile_query_with_a_memory_relative_module_scores_like_evaluation(setup):
    """φ_I reading scores against the memory's own map, and the relevance gate in the scoring step: the profiled
    prediction is the one zero-shot evaluation makes (refined class text blended with the frozen by the gate)."""
    from reco_ref.fusion import gated_scores, relevance_gate, score_features
    from reco_ref.memory.score_map import memory_score_map

    enc, mem, _, cls, photos = setup
    phi = init_params(enc.dim, 8, init="copy", k=5, relevance=True, rel_beta=3.0, rel_gamma=-3.0,
                      rel_source="memory")
    cls_bar = np.asarray(cls[::-1], np.float32)  # any second class set: the blend must tell them apart
    p = profile_query(photos, enc, mem, phi, cls_bar, k=5, batch=0, repeats=1, class_frozen=cls)
    v, key = enc.encode_images(photos[:1], with_keys=True)
    r, mask, _, sc = retrieve(mem, key, "image", k=5, with_scores=True)
    smap = memory_score_map(mem, "image")
    v_bar, _ = fusion_forward(phi, v, r, mask, scores=sc, score_map=smap)
    gate = relevance_gate(phi, score_features(phi, sc, mask, score_map=smap), mask)
    assert p["prediction"] == int(np.argmax(gated_scores(v_bar, cls_bar, cls, gate), axis=1)[0])
    with pytest.raises(RecoError, match="class_frozen"):
        profile_query(photos, enc, mem, phi, cls_bar, k=5, batch=0, repeats=1, class_frozen=cls[:2])
