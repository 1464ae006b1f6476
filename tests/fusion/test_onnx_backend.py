"""Fusion backend ``"onnx"`` (reco_ref/fusion/onnx_backend.py) against the NumPy reference, through the front door.

Bound (issue 13): max |onnx − numpy| ≤ 1e-5 on the L2-normalised float32 output, on random shapes with
masks, fully masked rows, NaN in masked slots and k = 0. Both sides run in float32 on the same inputs.
"""

from __future__ import annotations

import numpy as np
import pytest
from fusion_testlib import random_inputs, random_params

pytest.importorskip("onnx")  # in-memory export; the edge path without onnx is tested in tests/export

from reco_ref.errors import BackendUnavailableError, ParamsFormatError, RecoError, ShapeError  # noqa: E402
from reco_ref.export.fusion import attach_in_memory, fusion_model_bytes  # noqa: E402
from reco_ref.fusion import fusion_backward, fusion_forward, init_params, score_features  # noqa: E402
from reco_ref.fusion import onnx_backend  # noqa: E402

TOL = 1e-5
# (B, k, D, heads, p_valid, seed)
CASES = [
    (3, 4, 8, 2, 0.5, 1),     # masked slots, row 0 fully masked
    (2, 0, 8, 1, None, 2),    # k = 0 (T = 1)
    (4, 0, 16, 4, 0.5, 3),    # k = 0 with an (empty) mask
    (2, 3, 16, 4, None, 4),   # no mask
    (1, 16, 32, 4, 0.3, 5),
    (7, 10, 64, 8, 0.7, 6),   # the demo's k, D = 64
    (5, 1, 24, 3, 0.5, 7),    # D not a power of two
    (2, 5, 8, 8, 0.0, 8),     # every neighbour masked, dh = 1
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[f"B{c[0]}k{c[1]}D{c[2]}h{c[3]}" for c in CASES])
def test_onnx_forward_matches_numpy(case):
    B, k, D, heads, p_valid, seed = case
    rng = np.random.default_rng(seed)
    p = random_params(D, heads, rng, dtype=np.float32)
    q, r, mask = random_inputs(B, k, D, rng, dtype=np.float32, p_valid=p_valid)
    if mask is not None and k:
        r[~mask] = np.nan  # masked slots may hold anything
    ref, _ = fusion_forward(p, q, r, mask)
    attach_in_memory(p)
    out, cache = fusion_forward(p, q, r, mask, backend="onnx")
    assert cache["backend"] == "onnx" and out.dtype == np.float32 and out.shape == (B, D)
    err = float(np.abs(out - ref).max())
    print(f"onnx vs numpy {case}: max |Δ| = {err:.2e}")
    assert err <= TOL, err


def test_onnx_session_is_cached_and_batch_is_dynamic():
    rng = np.random.default_rng(0)
    p = random_params(16, 2, rng, dtype=np.float32)
    with pytest.raises(BackendUnavailableError, match="no graph is attached"):
        fusion_forward(p, np.ones((1, 16), np.float32), np.ones((1, 2, 16), np.float32), backend="onnx")
    with pytest.raises(ParamsFormatError, match="params_sha256"):  # a graph made from other weights
        onnx_backend.attach_model(p, fusion_model_bytes(random_params(16, 2, rng, dtype=np.float32)))
    attach_in_memory(p)
    s1 = onnx_backend.session_for(p)
    for B, k in ((1, 3), (9, 0), (4, 12)):
        q, r, mask = random_inputs(B, k, 16, rng, dtype=np.float32)
        ref, _ = fusion_forward(p, q, r, mask)
        out, _ = fusion_forward(p, q, r, mask, backend="onnx")
        assert np.abs(out - ref).max() <= TOL
    assert onnx_backend.session_for(p) is s1


def test_onnx_refuses_backward_float64_and_stale_weights():
    rng = np.random.default_rng(1)
    p = random_params(8, 2, rng, dtype=np.float32)
    q, r, mask = random_inputs(2, 3, 8, rng, dtype=np.float32)
    attach_in_memory(p)
    out, cache = fusion_forward(p, q, r, mask, backend="onnx")
    with pytest.raises(BackendUnavailableError, match="inference only"):
        fusion_backward(p, cache, np.ones_like(out))
    with pytest.raises(RecoError, match="float32 only"):
        fusion_forward(random_params(8, 2, rng), q.astype(np.float64), r.astype(np.float64), mask, backend="onnx")
    p["w_o"] += 0.1  # an in-place update after compiling must not give the old answer
    with pytest.raises(RecoError, match="changed in place"):
        fusion_forward(p, q, r, mask, backend="onnx")
    onnx_backend.clear_cache()
    attach_in_memory(p)
    out2, _ = fusion_forward(p, q, r, mask, backend="onnx")
    ref2, _ = fusion_forward(p, q, r, mask)
    assert np.abs(out2 - ref2).max() <= TOL and np.abs(out2 - out).max() > 1e-3


def test_onnx_identity_at_init():
    rng = np.random.default_rng(2)
    p = init_params(16, 4, seed=0)
    q, r, mask = random_inputs(3, 2, 16, rng, dtype=np.float32)
    attach_in_memory(p)
    out, _ = fusion_forward(p, q, r, mask, backend="onnx")
    np.testing.assert_allclose(out, q, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Relevance bias (docs/reco.md §2 "Relevance bias"): graph input `scores` = features, front door maps raw cosines
# ----------------------------------------------------------------------------------------------


def rel_params(D: int, heads: int, seed: int, **kw):
    """``init_params(..., relevance=True, init="copy")`` with every array perturbed, β and γ per head distinct."""
    p = init_params(D, heads, relevance=True, init="copy", seed=seed, **kw)
    rng = np.random.default_rng(seed + 1000)
    for name, a in p.items():
        a += (rng.standard_normal(a.shape) * (0.5 / np.sqrt(a.shape[0]) if a.ndim == 2 else 0.1)).astype(a.dtype)
    p["rel_beta"][...] = rng.uniform(0.3, 2.0, heads)
    p["rel_gamma"][...] = rng.normal(0.0, 2.0, heads)
    return p


def raw_scores(B: int, k: int, rng, mask=None):
    """Cosines in [0.8, 1] (features (s - 1)/0.02 in [-10, 0]); NaN in masked slots (they may hold anything)."""
    s = (0.8 + 0.2 * rng.random((B, k))).astype(np.float32)
    if mask is not None:
        s[~mask] = np.nan
    return s


@pytest.mark.parametrize("case", CASES, ids=[f"rel-B{c[0]}k{c[1]}D{c[2]}h{c[3]}" for c in CASES])
def test_onnx_relevance_matches_numpy(case):
    B, k, D, heads, p_valid, seed = case
    rng = np.random.default_rng(seed + 50)
    p = rel_params(D, heads, seed)
    q, r, mask = random_inputs(B, k, D, rng, dtype=np.float32, p_valid=p_valid)
    raw = raw_scores(B, k, rng, mask)
    if mask is not None and k:
        r[~mask] = np.nan
    ref, _ = fusion_forward(p, q, r, mask, scores=raw)
    attach_in_memory(p)
    out, cache = fusion_forward(p, q, r, mask, backend="onnx", scores=raw)
    assert cache["backend"] == "onnx" and out.dtype == np.float32 and out.shape == (B, D)
    err = float(np.abs(out - ref).max())
    print(f"onnx vs numpy, relevance {case}: max |Δ| = {err:.2e}")
    assert err <= TOL, err


def test_onnx_relevance_bias_acts_and_uses_the_config_map():
    rng = np.random.default_rng(11)
    B, k, D, heads = 6, 8, 32, 4
    p = rel_params(D, heads, 3, rel_center=0.9, rel_width=0.05)  # a non-default (center, width)
    q, r, mask = random_inputs(B, k, D, rng, dtype=np.float32, p_valid=0.7)
    raw = raw_scores(B, k, rng, mask)
    attach_in_memory(p)
    out, _ = fusion_forward(p, q, r, mask, backend="onnx", scores=raw)
    assert np.abs(out - fusion_forward(p, q, r, mask, scores=raw)[0]).max() <= TOL
    # the scores matter: other scores, other answer (both backends agree on it)
    raw2 = raw_scores(B, k, rng, mask)
    out2, _ = fusion_forward(p, q, r, mask, backend="onnx", scores=raw2)
    assert np.abs(out2 - out).max() > 1e-3
    assert np.abs(out2 - fusion_forward(p, q, r, mask, scores=raw2)[0]).max() <= TOL
    # the graph's own input is the feature (s - center)/width: the backend module directly, features given
    feats = score_features(p, raw, mask)
    direct, _ = onnx_backend.fusion_forward(p, q, np.where(mask[..., None], r, 0).astype(np.float32), mask,
                                            heads=heads, scores=feats)
    assert np.abs(direct - out).max() <= TOL


def test_onnx_relevance_zero_is_the_papers_layer():
    rng = np.random.default_rng(12)
    p = rel_params(16, 2, 4)
    p["rel_beta"][...] = 0
    p["rel_gamma"][...] = 0
    plain = init_params(16, 2, seed=0)
    for n in plain:
        plain[n][...] = p[n]
    q, r, mask = random_inputs(4, 5, 16, rng, dtype=np.float32)
    attach_in_memory(p, plain)
    out, _ = fusion_forward(p, q, r, mask, backend="onnx", scores=raw_scores(4, 5, rng, mask))
    ref, _ = fusion_forward(plain, q, r, mask, backend="onnx")
    assert np.abs(out - ref).max() <= TOL


def test_onnx_relevance_without_scores_is_refused():
    rng = np.random.default_rng(13)
    p = rel_params(16, 4, 5)
    q, r, mask = random_inputs(2, 3, 16, rng, dtype=np.float32)
    attach_in_memory(p)
    with pytest.raises(ShapeError, match="relevance bias.*scores"):  # the front door
        fusion_forward(p, q, r, mask, backend="onnx")
    with pytest.raises(RecoError, match="relevance bias.*got None"):  # the backend module itself
        onnx_backend.fusion_forward(p, q, r, mask, heads=4)
    with pytest.raises(RecoError, match=r"scores: shape \(2, 2\), expected \(2, 3\)"):
        onnx_backend.fusion_forward(p, q, r, mask, heads=4, scores=np.zeros((2, 2), np.float32))


def test_onnx_relevance_digest_and_in_place_edits():
    rng = np.random.default_rng(14)
    p = rel_params(16, 2, 6)
    q, r, mask = random_inputs(3, 4, 16, rng, dtype=np.float32)
    raw = raw_scores(3, 4, rng, mask)
    d0 = onnx_backend.params_digest(p)
    plain = init_params(16, 2, seed=0)
    for n in plain:
        plain[n][...] = p[n]
    assert onnx_backend.params_digest(plain) != d0  # the relevance pair is part of the digest
    other = rel_params(16, 2, 6)
    other["rel_beta"][0] += 0.5  # same 18 arrays, another beta: another graph
    assert onnx_backend.params_digest(other) != d0
    with pytest.raises(ParamsFormatError, match="params_sha256"):
        onnx_backend.attach_model(p, fusion_model_bytes(other))
    attach_in_memory(p)
    fusion_forward(p, q, r, mask, backend="onnx", scores=raw)
    p["rel_gamma"] += 0.25  # an in-place edit of the relevance arrays is caught like any other
    with pytest.raises(RecoError, match="changed in place"):
        fusion_forward(p, q, r, mask, backend="onnx", scores=raw)
