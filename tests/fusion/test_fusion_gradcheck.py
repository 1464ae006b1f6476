"""Float64 central finite differences for every parameter and input gradient of the fusion layer.

24 random configurations (B 1–8, k 0–16, D ∈ {8,16,32}, h ∈ {1,2,4}, random masks incl. a fully masked
row and mask=None), random non-identity weights. For each of the 18 parameter arrays and the two inputs:

* per-entry central differences (h = 1e-5) — every entry for the small configs, a random sample of 32
  entries per array otherwise;
* two whole-array directional derivatives (catches an error spread thinly over all entries).

The relative error is :func:`fusion_testlib.rel_err` (per array, L2 norms); the bound is 1e-6.
``b_k`` is the one exception: the output is exactly invariant to it (softmax shift invariance), so its
analytic gradient is checked to be 0 (≤ 1e-12·|f|) and its central difference to be round-off (≤ 1e-8·|f|).
The largest error seen is recorded in ``MAX_ERR`` and printed when the module's tests end (``-s`` to see it).

Relevance bias (docs/reco.md §2 "Relevance bias" [ours]): the same check, same tolerance, on 16 more random
configurations of the layer *with* the bias — all 20 arrays (the 18 plus ``rel_beta, rel_gamma [h]``,
drawn N(0, 1) per head) and both inputs; score features of order 1 in valid slots and huge finite values
in masked ones (they must not matter). The step pair ``relevance_bias_forward/backward`` (dscores, dβ, dγ)
and the bias path of ``attention_forward/backward`` (dbias for every broadcast shape) are checked entry
by entry on random shapes.
"""

from __future__ import annotations

import numpy as np
import pytest

from fusion_testlib import (
    central_diff,
    directional_diff,
    random_inputs,
    random_params,
    random_rel_params,
    rel_err,
    single_blas_thread,
)
from reco_ref.fusion import PARAM_NAMES, RELEVANCE_NAMES, reference

N_CONFIGS = 24
N_REL_CONFIGS = 16
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


def _fd_check_layer(params, q, r, mask, heads, rng, full, scores=None, what="", tag=""):
    """Central differences for every parameter (18, or 20 with the relevance pair) and both inputs.

    Per-entry differences (every entry when ``full`` or the array has ≤ 32 entries, else 32 random
    ones) plus two whole-array directional derivatives; relative error per array < ``TOL``.
    ``b_k`` is compared to 0 instead (see the module docstring).
    """
    B, D = q.shape
    k = r.shape[1]
    W = rng.standard_normal((B, D))  # f = Σ out ⊙ W, so dout = W
    kw = {} if scores is None else {"scores": scores}

    def f():
        out, _ = reference.fusion_forward(params, q, r, mask, heads=heads, **kw)
        return float((out * W).sum())

    out, cache = reference.fusion_forward(params, q, r, mask, heads=heads, **kw)
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
            # by the same q·b_k, which softmax ignores; the relevance bias does not change that: it is
            # added to the logits, not to the keys), so its true gradient is exactly 0 and the
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
        MAX_ERR[tag + name] = max(MAX_ERR.get(tag + name, 0.0), err)
        assert err < TOL, f"{name}: rel err {err:.3g} ({what} mask={'None' if mask is None else 'random'})"

    # Exact zeros the math guarantees: masked slots get no gradient; e_neighbor has none when k = 0.
    if mask is not None and k:
        assert np.all(grads["retrieved"][~mask] == 0.0)
    if k == 0:
        assert np.all(grads["e_neighbor"] == 0.0)
    return grads


@pytest.mark.parametrize("seed", range(N_CONFIGS))
def test_fd_every_gradient(seed):
    rng, B, k, D, heads, p_valid, full = config(seed)
    params = random_params(D, heads, rng)
    q, r, mask = random_inputs(B, k, D, rng, p_valid=p_valid)
    _fd_check_layer(params, q, r, mask, heads, rng, full, what=f"B={B} k={k} D={D} h={heads}")


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


# ----------------------------------------------------------------------------------------------
# Relevance bias: the whole layer, the step pair, and the bias path of attention
# ----------------------------------------------------------------------------------------------


def rel_config(seed: int):
    rng = np.random.default_rng(3000 + seed)
    D = [8, 16, 24, 32][seed % 4]
    heads = {8: [1, 2, 4], 16: [2, 4, 8], 24: [1, 3, 6], 32: [2, 4, 8]}[D][(seed // 4) % 3]
    B = int(rng.integers(1, 9))
    k = 0 if seed % 8 == 6 else int(rng.integers(1, 17))
    p_valid = None if seed % 5 == 3 else float(rng.uniform(0.2, 0.9))
    full = D == 8 and B <= 4 and k <= 6
    return rng, B, k, D, heads, p_valid, full


def rel_features(B: int, k: int, mask, rng) -> np.ndarray:
    """Score features [B, k] as the reference receives them, ``(s − 1)/0.02`` of close neighbours: centred at −2,
    spread 1.5 (order 1, so the bias moves attention without saturating the softmax). Masked slots hold ±1e3."""
    s = rng.normal(-2.0, 1.5, size=(B, k))
    if mask is not None:
        s[~mask] = 1e3 * rng.choice([-1.0, 1.0], size=int((~mask).sum()))
    return s


@pytest.mark.parametrize("seed", range(N_REL_CONFIGS))
def test_fd_every_gradient_with_relevance(seed):
    rng, B, k, D, heads, p_valid, full = rel_config(seed)
    params = random_rel_params(D, heads, rng)
    q, r, mask = random_inputs(B, k, D, rng, p_valid=p_valid)
    s = rel_features(B, k, mask, rng)
    grads = _fd_check_layer(params, q, r, mask, heads, rng, full, scores=s,
                            what=f"relevance B={B} k={k} D={D} h={heads}", tag="relevance:")  # fmt: skip
    assert set(RELEVANCE_NAMES) <= set(grads)
    if k == 0 or (mask is not None and not mask.any()):
        # No neighbour token anywhere: one valid logit per row, softmax ≡ 1, the bias cannot matter.
        assert np.all(grads["rel_beta"] == 0.0) and np.all(grads["rel_gamma"] == 0.0)


def test_relevance_gradients_are_not_vacuous():
    """dβ, dγ are large in these configurations and a 0.1 % error in either is caught by the same check."""
    rng, B, k, D, heads, p_valid, _ = rel_config(5)  # B=5, k=2, D=16, 4 heads
    assert k > 0 and heads > 1
    params = random_rel_params(D, heads, rng)
    q, r, mask = random_inputs(B, k, D, rng, p_valid=p_valid)
    s = rel_features(B, k, mask, rng)
    W = rng.standard_normal((B, D))
    _, cache = reference.fusion_forward(params, q, r, mask, heads=heads, scores=s)
    grads = reference.fusion_backward(params, cache, W)

    def f():
        o, _ = reference.fusion_forward(params, q, r, mask, heads=heads, scores=s)
        return float((o * W).sum())

    for name in RELEVANCE_NAMES:
        for h in range(heads):
            assert abs(grads[name][h]) > 1e-4, f"{name}[{h}]: gradient vanishes, the check would be vacuous"
            num = central_diff(f, params[name], (h,))
            assert rel_err(np.array([grads[name][h]]), np.array([num])) < TOL
            assert rel_err(np.array([grads[name][h] * 1.001]), np.array([num])) > TOL


@pytest.mark.parametrize("seed", range(12))
def test_fd_relevance_bias_step(seed):
    """relevance_bias_forward/backward on its own: every entry of dscores, dβ, dγ by central differences.

    f = Σ bias ⊙ W is bilinear in (scores, β), so the difference quotient is exact up to round-off; the bound is
    the same 1e-6. The forward is also checked against its definition (B[:, h, 0, 0] = γ_h, B[:, h, 0, j] = β_h s_j).
    """
    rng = np.random.default_rng(7000 + seed)
    B, k, h = int(rng.integers(1, 7)), (0 if seed == 5 else int(rng.integers(1, 10))), int(rng.integers(1, 9))
    scores = rng.standard_normal((B, k))
    beta, gamma = rng.standard_normal(h), rng.standard_normal(h)
    bias, cache = reference.relevance_bias_forward(scores, beta, gamma)
    assert bias.shape == (B, h, 1, k + 1) and bias.dtype == np.float64
    for b in range(B):
        for hh in range(h):
            assert bias[b, hh, 0, 0] == gamma[hh]
            for j in range(k):
                assert bias[b, hh, 0, j + 1] == beta[hh] * scores[b, j]
    W = rng.standard_normal(bias.shape)
    dscores, dbeta, dgamma = reference.relevance_bias_backward(cache, W)

    def f():
        return float((reference.relevance_bias_forward(scores, beta, gamma)[0] * W).sum())

    scale = max(1.0, abs(f()))
    for name, arr, g in (("scores", scores, dscores), ("beta", beta, dbeta), ("gamma", gamma, dgamma)):
        assert g.shape == arr.shape and g.dtype == np.float64, name
        if not arr.size:
            continue
        num = np.array([central_diff(f, arr, i) for i in np.ndindex(arr.shape)])
        ana = np.array([g[i] for i in np.ndindex(arr.shape)])
        err = rel_err(ana, num, scale)
        MAX_ERR["step:relevance_" + name] = max(MAX_ERR.get("step:relevance_" + name, 0.0), err)
        assert err < TOL, f"d{name}: rel err {err:.3g} (B={B} k={k} h={h})"
    if k == 0:
        assert np.all(dbeta == 0.0)


@pytest.mark.parametrize("bias_shape", ["B,h,1,T", "B,h,Tq,T", "1,h,1,T", "B,1,1,T", "h,Tq,T"])
@pytest.mark.parametrize("seed", range(3))
def test_fd_attention_bias_path(seed, bias_shape):
    """attention_forward/backward with an additive bias: dq, dk, dv and dbias (the adjoint of the broadcast,
    summed over the broadcast axes) by central differences, with invalid key slots. A masked key's bias
    column gets exactly zero gradient."""
    rng = np.random.default_rng(9000 + seed)
    B, h, T, dh = int(rng.integers(1, 5)), int(rng.integers(1, 4)), int(rng.integers(2, 7)), int(rng.integers(1, 5))
    Tq = T
    q, k_, v = (rng.standard_normal((B, h, n, dh)) for n in (Tq, T, T))
    valid = rng.random((B, T)) < 0.6
    valid[:, 0] = True
    sizes = {"B": B, "h": h, "1": 1, "T": T, "Tq": Tq}
    bias = rng.standard_normal(tuple(sizes[c] for c in bias_shape.split(",")))
    W = rng.standard_normal((B, h, Tq, dh))
    out, cache = reference.attention_forward(q, k_, v, valid, bias)
    dq, dk, dv, dbias = reference.attention_backward(cache, W)

    def f():
        return float((reference.attention_forward(q, k_, v, valid, bias)[0] * W).sum())

    scale = max(1.0, abs(f()))
    for name, arr, g in (("q", q, dq), ("k", k_, dk), ("v", v, dv), ("bias", bias, dbias)):
        assert g.shape == arr.shape, name
        num = np.array([central_diff(f, arr, i) for i in np.ndindex(arr.shape)])
        ana = np.array([g[i] for i in np.ndindex(arr.shape)])
        err = rel_err(ana, num, scale)
        MAX_ERR["step:attention_d" + name] = max(MAX_ERR.get("step:attention_d" + name, 0.0), err)
        assert err < TOL, f"d{name}: rel err {err:.3g} (bias {bias_shape})"
    if bias_shape == "B,h,1,T":
        for b in range(B):
            assert np.all(dbias[b, :, :, ~valid[b]] == 0.0)


@pytest.fixture(autouse=True, scope="module")
def _report_max_errors():
    """After the module's tests, print the worst relative error per array they saw (``-s`` to see it). A fixture,
    not a test: every recorded error was asserted below TOL where it was measured."""
    yield
    if not MAX_ERR:
        return
    worst = max(MAX_ERR.values())
    print("\nfinite-difference max rel err per array:", {k: f"{v:.1e}" for k, v in sorted(MAX_ERR.items())})
    for group, prefix in (("paper layer", ""), ("layer with relevance bias", "relevance:"), ("steps", "step:")):
        errs = {k: v for k, v in MAX_ERR.items() if (k.startswith(prefix) if prefix else ":" not in k)}
        if errs:
            name = max(errs, key=errs.get)
            print(f"finite-difference max rel err, {group}: {errs[name]:.2e} ({name})")
    print(f"finite-difference max rel err overall: {worst:.2e}")
