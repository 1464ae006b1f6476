"""Float64 central finite differences for every parameter and input gradient of the fusion layer.

24 random configurations (B 1–8, k 0–16, D ∈ {8,16,32}, h ∈ {1,2,4}, random masks incl. a fully masked
row and mask=None), random non-identity weights. For each of the 18 parameter arrays and the two inputs:

* per-entry central differences (h = 1e-5) — every entry for the small configs, a random sample of 32
  entries per array otherwise;
* two whole-array directional derivatives (catches an error spread thinly over all entries).

The relative error is :func:`fusion_testlib.rel_err` (per array, L2 norms); the bound is 1e-6.
``b_k`` is the one exception: the output is exactly invariant to it (softmax shift invariance), so its
analytic gradient is checked to be 0 (≤ 1e-12·|f|) and its central difference to be round-off (≤ 1e-8·|f|).
The largest error seen is recorded in ``MAX_ERR`` and printed by the last test (``-s`` to see it).
"""

from __future__ import annotations

import numpy as np
import pytest

from fusion_testlib import central_diff, directional_diff, random_inputs, random_params, rel_err, single_blas_thread
from reco_ref.fusion import PARAM_NAMES, reference

N_CONFIGS = 24
TOL = 1e-6
MAX_ERR: dict[str, float] = {}


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    with single_blas_thread():
        yield


def config(seed: int):
    rng = np.random.default_rng(1000 + seed)
    D = [8, 16, 32][seed % 3]
    heads = [1, 2, 4][(seed // 3) % 3]
    B = int(rng.integers(1, 9))
    k = 0 if seed % 8 == 5 else int(rng.integers(0, 17))
    p_valid = None if seed % 6 == 4 else float(rng.uniform(0.2, 0.9))
    full = D == 8 and B <= 4 and k <= 6  # small enough to check every entry
    return rng, B, k, D, heads, p_valid, full


@pytest.mark.parametrize("seed", range(N_CONFIGS))
def test_fd_every_gradient(seed):
    rng, B, k, D, heads, p_valid, full = config(seed)
    params = random_params(D, heads, rng)
    q, r, mask = random_inputs(B, k, D, rng, p_valid=p_valid)
    W = rng.standard_normal((B, D))  # f = Σ out ⊙ W, so dout = W

    def f():
        out, _ = reference.fusion_forward(params, q, r, mask, heads=heads)
        return float((out * W).sum())

    out, cache = reference.fusion_forward(params, q, r, mask, heads=heads)
    grads = reference.fusion_backward(params, cache, W.copy(), return_input_grads=True)
    scale = max(1.0, abs(f()))

    arrays = dict(params)
    arrays["query"], arrays["retrieved"] = q, r
    assert set(grads) == set(arrays)
    for name, arr in arrays.items():
        g = grads[name]
        assert g.shape == arr.shape and g.dtype == np.float64, name
        if arr.size == 0:
            continue
        if full or arr.size <= 32:
            idxs = list(np.ndindex(arr.shape))
        else:
            flat = rng.choice(arr.size, size=32, replace=False)
            idxs = [np.unravel_index(i, arr.shape) for i in flat]
        num = np.array([central_diff(f, arr, i) for i in idxs])
        ana = np.array([g[i] for i in idxs])
        if name == "b_k":
            # The output does not depend on b_k at all (a shared key bias shifts every score of a row
            # by the same q·b_k, which softmax ignores), so its true gradient is exactly 0 and the
            # central difference is pure round-off: compare both to 0 absolutely instead.
            assert np.abs(grads[name]).max() <= 1e-12 * scale, "db_k must vanish"
            assert np.abs(num).max() <= 1e-8 * scale, "f must not depend on b_k"
            continue
        err = rel_err(ana, num, scale)
        # Directional derivatives over the whole array.
        dana, dnum = [], []
        for _ in range(2):
            u = rng.standard_normal(arr.shape)
            dana.append(float((g * u).sum()))
            dnum.append(directional_diff(f, arr, u))
        err = max(err, rel_err(np.array(dana), np.array(dnum), scale))
        MAX_ERR[name] = max(MAX_ERR.get(name, 0.0), err)
        assert err < TOL, f"{name}: rel err {err:.3g} (B={B} k={k} D={D} h={heads} mask={'None' if mask is None else 'random'})"

    # Exact zeros the math guarantees: masked slots get no gradient; e_neighbor has none when k = 0.
    if mask is not None and k:
        assert np.all(grads["retrieved"][~mask] == 0.0)
    if k == 0:
        assert np.all(grads["e_neighbor"] == 0.0)


def test_gradients_are_not_vacuous():
    """The check above must be able to fail: a perturbed gradient is caught."""
    rng, B, k, D, heads, p_valid, _ = config(1)
    params = random_params(D, heads, rng)
    q, r, mask = random_inputs(B, k, D, rng, p_valid=p_valid)
    W = rng.standard_normal((B, D))
    out, cache = reference.fusion_forward(params, q, r, mask, heads=heads)
    grads = reference.fusion_backward(params, cache, W, return_input_grads=True)

    def f():
        o, _ = reference.fusion_forward(params, q, r, mask, heads=heads)
        return float((o * W).sum())

    for name in PARAM_NAMES:
        if name == "b_k":  # its true gradient is ~0 (softmax shift invariance), see below
            continue
        idx = np.unravel_index(int(np.argmax(np.abs(grads[name]))), grads[name].shape)
        num = central_diff(f, params[name], idx)
        assert abs(grads[name][idx]) > 1e-4, f"{name}: gradient vanishes, the check would be vacuous"
        assert rel_err(np.array([grads[name][idx] * 1.001]), np.array([num])) > TOL


def test_bk_gradient_vanishes():
    """Adding a bias to every key shifts each score row by a constant: softmax ignores it, db_k = 0."""
    rng, B, k, D, heads, p_valid, _ = config(2)
    params = random_params(D, heads, rng)
    q, r, mask = random_inputs(B, k, D, rng, p_valid=p_valid)
    out, cache = reference.fusion_forward(params, q, r, mask, heads=heads)
    grads = reference.fusion_backward(params, cache, rng.standard_normal((B, D)))
    assert np.abs(grads["b_k"]).max() < 1e-13
    assert np.abs(grads["b_q"]).max() > 1e-4


def test_report_max_errors():
    """Print the worst relative error per array seen by test_fd_every_gradient (run with -s)."""
    if not MAX_ERR:
        pytest.skip("run together with test_fd_every_gradient")
    worst = max(MAX_ERR.values())
    print("\nfinite-difference max rel err per array:", {k: f"{v:.1e}" for k, v in sorted(MAX_ERR.items())})
    print(f"finite-difference max rel err overall: {worst:.2e}")
    assert worst < TOL
