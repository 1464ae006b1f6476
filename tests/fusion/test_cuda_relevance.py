"""The CUDA fusion layer with the relevance bias (docs/reco.md §2 "Relevance bias" [ours]) against the NumPy reference.

Through the public front doors (``fusion_forward(..., backend="cuda", scores=raw_cosines)`` vs
``backend="numpy"``): the output and every gradient, ``rel_beta`` / ``rel_gamma`` included, plus the input
gradients.  Masks with invalid slots (NaN raw scores there: the front door maps them to 0, the kernels never
read them), B = 1 and B > 1, heads 1 and 2.  Runs under the CUDA simulator where no GPU driver is present
(tests/conftest.py), so shapes are tiny.

Tolerances as in test_cuda_kernels.py: float64 ≤ 1e-10 absolute; float32 ≤ 1e-4 relative to the largest
reference value of the array, floored at 1e-2 × the largest over all arrays of the case (as test_backends.py)
for gradients that vanish analytically (``b_k``: softmax is shift-invariant), whose float32 value is round-off.
"""

from __future__ import annotations

import numpy as np
import pytest

cuda = pytest.importorskip("numba.cuda", reason="numba-cuda not installed (extra: .[cuda] or .[test])")

from reco_ref.fusion import (
    PARAM_NAMES,
    RELEVANCE_NAMES,
    FusionParams,
    fusion_backward,
    fusion_forward,
    init_params,
)
from reco_ref.fusion import cuda as fc

pytestmark = pytest.mark.cuda

DTYPES = [np.float64, np.float32]

# (B, k, D, heads, mask rows ("1" valid, "0" masked), seed)
CASES = [
    pytest.param(1, 3, 4, 1, ["101"], 1, id="B1-h1"),
    pytest.param(3, 3, 4, 2, ["000", "110", "011"], 2, id="B3-h2"),  # row 0: no valid neighbour
]


def _params(D, heads, dtype, seed):
    """Copy-init module with the relevance pair, every array perturbed (float64 draws, then cast)."""
    base = init_params(D, heads, mlp_ratio=2, relevance=True, init="copy", dtype=dtype, seed=seed)
    rng = np.random.default_rng(100 + seed)
    arrays = {n: (a.astype(np.float64) + 0.3 * rng.standard_normal(a.shape)).astype(dtype) for n, a in base.items()}
    return FusionParams(arrays, base.config)


def _inputs(B, k, D, rows, dtype, seed):
    rng = np.random.default_rng(200 + seed)
    q = rng.standard_normal((B, D))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    r = rng.standard_normal((B, k, D))
    r /= np.linalg.norm(r, axis=2, keepdims=True)
    mask = np.array([[c == "1" for c in row] for row in rows], dtype=bool)
    cos = 0.95 + 0.02 * rng.standard_normal((B, k))  # raw search cosines: features (s − 1)/0.02 ≈ −2.5 ± 1
    cos[~mask] = np.nan  # masked slots may hold anything
    dout = rng.standard_normal((B, D))
    return q.astype(dtype), r.astype(dtype), mask, cos, dout.astype(dtype)


def _errors(got: dict, want: dict, dtype) -> dict:
    scale = max(float(np.abs(w).max(initial=0.0)) for w in want.values())
    errs = {}
    for name, w in want.items():
        a = got[name]
        assert a.shape == w.shape, f"{name}: shape {a.shape} != {w.shape}"
        assert a.dtype == np.dtype(dtype), f"{name}: dtype {a.dtype} != {np.dtype(dtype)}"
        diff = float(np.abs(a.astype(np.float64) - w.astype(np.float64)).max(initial=0.0))
        errs[name] = diff if dtype == np.float64 else diff / max(float(np.abs(w).max(initial=0.0)), 1e-2 * scale)
    return errs


@pytest.mark.parametrize("B,k,D,heads,rows,seed", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_relevance_matches_reference(dtype, B, k, D, heads, rows, seed):
    params = _params(D, heads, dtype, seed)
    q, r, mask, cos, dout = _inputs(B, k, D, rows, dtype, seed)

    out_ref, c_ref = fusion_forward(params, q, r, mask, backend="numpy", scores=cos)
    g_ref = fusion_backward(params, c_ref, dout, return_input_grads=True)
    out, cache = fusion_forward(params, q, r, mask, backend="cuda", scores=cos)
    assert cache["backend"] == "cuda"
    g = fusion_backward(params, cache, dout, return_input_grads=True)

    assert set(g) == set(g_ref) == set(PARAM_NAMES) | set(RELEVANCE_NAMES) | {"query", "retrieved"}
    errs = _errors({"out": out, **g}, {"out": out_ref, **g_ref}, dtype)
    tol = 1e-10 if dtype == np.float64 else 1e-4
    worst = max(errs, key=errs.get)
    assert errs[worst] <= tol, f"{np.dtype(dtype).name}: worst {worst} err {errs[worst]:.3g} > {tol} ({errs})"
    # not vacuous: the bias moves the output and its parameters get gradient
    zero = FusionParams({**params, "rel_beta": np.zeros(heads, dtype), "rel_gamma": np.zeros(heads, dtype)},
                        params.config)
    out0, _ = fusion_forward(zero, q, r, mask, backend="numpy", scores=cos)
    assert np.abs(out0 - out_ref).max() > 1e-3
    assert np.abs(g_ref["rel_beta"]).min() > 1e-4 and np.abs(g_ref["rel_gamma"]).min() > 1e-4
    # masked neighbour slots get exactly zero input gradient, as in the reference
    assert np.all(g["retrieved"][~mask] == 0)


def test_cuda_relevance_device_entry_points():
    """Device API: scores are required with the relevance pair, and params/cache must agree."""
    params = _params(4, 2, np.float64, 3)
    q, r, mask, cos, dout = _inputs(2, 2, 4, ["10", "11"], np.float64, 3)
    dp = fc.params_to_device(params)
    dq, dr = cuda.to_device(q), cuda.to_device(r)
    valid = fc.valid_to_device(mask, 2, 2)
    with pytest.raises(ValueError, match="scores"):
        fc.fusion_forward_device(dp, dq, dr, valid, heads=2)
    with pytest.raises(ValueError, match="scores shape"):
        fc.fusion_forward_device(dp, dq, dr, valid, heads=2, scores=cuda.to_device(np.zeros((2, 3))))
    half = {n: a for n, a in dp.items() if n != "rel_gamma"}
    with pytest.raises(ValueError, match="not both"):
        fc.fusion_forward_device(half, dq, dr, valid, heads=2, scores=cuda.to_device(np.zeros((2, 2))))
    # a cache without the bias cannot be differentiated with relevance parameters
    plain = {n: a for n, a in dp.items() if n not in RELEVANCE_NAMES}
    _, cache = fc.fusion_forward_device(plain, dq, dr, valid, heads=2, scores=cuda.to_device(np.zeros((2, 2))))
    assert cache["scores"] is None  # ignored without the relevance pair, as the reference does
    with pytest.raises(ValueError, match="disagree"):
        fc.fusion_backward_device(dp, cache, cuda.to_device(dout))
