"""Fusion backend ``"onnx"`` (reco_ref/fusion/onnx_backend.py) against the NumPy reference, through the front door.

Bound (issue 13): max |onnx − numpy| ≤ 1e-5 on the L2-normalised float32 output, on random shapes with
masks, fully masked rows, NaN in masked slots and k = 0. Both sides run in float32 on the same inputs.
"""

from __future__ import annotations

import numpy as np
import pytest
from fusion_testlib import random_inputs, random_params

pytest.importorskip("onnx")  # in-memory export; the edge path without onnx is tested in tests/export

from reco_ref.errors import BackendUnavailableError, ParamsFormatError, RecoError  # noqa: E402
from reco_ref.export.fusion import attach_in_memory, fusion_model_bytes  # noqa: E402
from reco_ref.fusion import fusion_backward, fusion_forward, init_params  # noqa: E402
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
