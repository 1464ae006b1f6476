"""Every fast backend against the NumPy reference, through the public front doors.

A new backend is one entry in ``BACKENDS`` (plus its module): the same shapes, masks, dtypes and
tolerances apply to all of them.

Tolerances (issue 3): float64 ≤ 1e-10 absolute; float32 ≤ 1e-4 relative, where a float32 result is
compared with the float64 reference evaluated on the same (float32-rounded) inputs and the error of
each array is ``max|a − r| / max(max|r|, 1e-2·S)``, ``S`` the largest ``max|r|`` over all arrays of
that case.  The ``1e-2·S`` floor only matters for gradients that vanish analytically (``b_k``:
softmax is shift-invariant), whose float32 value is pure round-off.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from fusion_testlib import random_inputs, random_params

from reco_ref.fusion import fusion_backward, fusion_forward
from reco_ref.train.losses import infonce_backward, infonce_forward

# backend name -> (pytest marks, cases).  Each case: (B, k, D, heads, p_valid, seed).
# The CUDA cases are tiny because the CI runs them in the CUDA simulator (one Python thread per
# GPU thread); the numba cases are cheap, so there are more and larger ones.
_SMALL = [
    (3, 4, 8, 2, 0.5, 1),     # masked slots, one fully masked row
    (2, 0, 8, 1, None, 2),    # k = 0 (T = 1)
    (2, 3, 16, 4, None, 3),   # no mask, dh = 4
]
_MORE = _SMALL + [
    (1, 16, 32, 4, 0.3, 4),
    (8, 7, 16, 1, 0.8, 5),
    (5, 11, 32, 2, 0.5, 6),
    (4, 1, 8, 8, 0.5, 7),      # dh = 1
    (6, 5, 24, 3, None, 8),    # D not a power of two
    (100, 10, 16, 2, 0.7, 9),  # B·T ≥ 1024: the other dW_kv GEMM orientation
]
_NO_CUDA = importlib.util.find_spec("numba_cuda") is None and importlib.util.find_spec("numba.cuda") is None
BACKENDS = {
    "numba": ((), _MORE),
    "cuda": ((pytest.mark.cuda, pytest.mark.skipif(_NO_CUDA, reason="numba-cuda not installed")), _SMALL),
}


def _cases():
    for name, (marks, cases) in BACKENDS.items():
        for case in cases:
            for dtype in (np.float64, np.float32):
                yield pytest.param(name, case, dtype, marks=marks,
                                   id=f"{name}-B{case[0]}k{case[1]}D{case[2]}h{case[3]}-{np.dtype(dtype).name}")


def _compare(got: dict, ref: dict, dtype, check_dtype: bool = True) -> dict:
    """Per-array error as defined in the module docstring; returns {name: err}."""
    scale = max(float(np.abs(r).max(initial=0.0)) for r in ref.values())
    errs = {}
    for name, r in ref.items():
        a = got[name]
        assert a.shape == r.shape, f"{name}: shape {a.shape} != {r.shape}"
        assert not check_dtype or a.dtype == np.dtype(dtype), f"{name}: dtype {a.dtype} != {np.dtype(dtype)}"
        diff = float(np.abs(a.astype(np.float64) - r).max(initial=0.0))
        if dtype == np.float64:
            errs[name] = diff
        else:
            errs[name] = diff / max(float(np.abs(r).max(initial=0.0)), 1e-2 * scale)
    return errs


@pytest.mark.parametrize("backend,case,dtype", list(_cases()))
def test_fusion_forward_backward_matches_reference(backend, case, dtype):
    B, k, D, heads, p_valid, seed = case
    rng = np.random.default_rng(seed)
    p64 = random_params(D, heads, rng, dtype=np.float64)
    q, r, mask = random_inputs(B, k, D, rng, dtype=np.float64, p_valid=p_valid)
    dout = rng.standard_normal((B, D))
    # the backend runs in `dtype`; the truth is the float64 reference on the same rounded inputs
    p = {n: a.astype(dtype) for n, a in p64.items()}
    q_, r_, dout_ = q.astype(dtype), r.astype(dtype), dout.astype(dtype)
    p_ref = {n: a.astype(np.float64) for n, a in p.items()}
    out_ref, c_ref = fusion_forward(p_ref, q_.astype(np.float64), r_.astype(np.float64), mask, heads=heads)
    g_ref = fusion_backward(p_ref, c_ref, dout_.astype(np.float64), return_input_grads=True)

    out, cache = fusion_forward(p, q_, r_, mask, heads=heads, backend=backend)
    assert cache["backend"] == backend
    g = fusion_backward(p, cache, dout_, return_input_grads=True)
    assert set(g) == set(g_ref)
    errs = _compare({"out": out, **g}, {"out": out_ref, **g_ref}, dtype)
    tol = 1e-10 if dtype == np.float64 else 1e-4
    worst = max(errs, key=errs.get)
    assert errs[worst] <= tol, f"{backend} {np.dtype(dtype).name}: worst {worst} err {errs[worst]:.3g} > {tol} ({errs})"
    if mask is not None and k:
        # masked neighbour slots get exactly zero input gradient, as in the reference
        assert np.all(g["retrieved"][~mask] == 0)


@pytest.mark.parametrize("backend", [pytest.param(n, marks=m) for n, (m, _) in BACKENDS.items()])
def test_fusion_identity_at_init(backend):
    """Untrained module (W_o, b_o, W_2, b_2, e_q = 0) returns the normalised query exactly."""
    from reco_ref.fusion import init_params

    rng = np.random.default_rng(0)
    params = init_params(16, 2, seed=3, dtype=np.float64)
    q, r, mask = random_inputs(3, 2, 16, rng, p_valid=0.5)
    out, _ = fusion_forward(params, q, r, mask, backend=backend)
    np.testing.assert_allclose(out, q, rtol=0, atol=1e-15)


@pytest.mark.parametrize("backend", [pytest.param(n, marks=m) for n, (m, _) in BACKENDS.items()])
def test_fusion_cache_from_other_backend_is_refused(backend):
    rng = np.random.default_rng(1)
    params = random_params(8, 2, rng)
    q, r, mask = random_inputs(2, 1, 8, rng)
    _, cache = fusion_forward(params, q, r, mask, heads=2)  # numpy cache
    mod = __import__("reco_ref.fusion", fromlist=["get_backend"]).get_backend(backend)
    with pytest.raises(ValueError, match="backend"):
        mod.fusion_backward(params, cache, np.ones_like(q))


_NCE_CASES = [(1, 4, 2.0), (5, 8, np.log(1 / 0.07)), (6, 3, 5.0)]  # (N, D, tau); tau=5 is clamped


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("backend", [pytest.param(n, marks=m) for n, (m, _) in BACKENDS.items()])
def test_infonce_matches_reference(backend, dtype):
    rng = np.random.default_rng(7)
    for N, D, tau in _NCE_CASES:
        a = rng.standard_normal((N, D))
        b = a + 0.5 * rng.standard_normal((N, D))
        a /= np.linalg.norm(a, axis=1, keepdims=True)
        b /= np.linalg.norm(b, axis=1, keepdims=True)
        a_, b_ = a.astype(dtype), b.astype(dtype)
        L_ref, c_ref = infonce_forward(a_.astype(np.float64), b_.astype(np.float64), tau)
        da_ref, db_ref, dt_ref = infonce_backward(c_ref, 1.7)
        L, c = infonce_forward(a_, b_, tau, backend=backend)
        assert c["backend"] == backend
        da, db, dt = infonce_backward(c, 1.7)
        assert da.dtype == np.dtype(dtype) and db.dtype == np.dtype(dtype)
        if tau == 5.0:
            assert dt == 0.0 and dt_ref == 0.0  # exp(5) > 100: clamped, no temperature gradient
        errs = _compare({"loss": np.array([L]), "da": da, "db": db, "dtau": np.array([dt])},
                        {"loss": np.array([L_ref]), "da": da_ref, "db": db_ref, "dtau": np.array([dt_ref])},
                        np.float64, check_dtype=False)
        tol = 1e-10 if dtype == np.float64 else 1e-4 * max(1.0, abs(L_ref))
        assert max(errs.values()) <= tol, (N, D, tau, errs)
