"""Every step pair of reference.py on its own: float64 central differences of each backward, random shapes.

Checking the steps separately localises a failure (the whole-layer check only says *something* is off)
and covers uses outside the fusion layer: cross-attention with one query token over a different number
of keys (docs/reco.md §5), and a row with no valid key at all (output 0, no NaN).
"""

from __future__ import annotations

import numpy as np
import pytest

from fusion_testlib import central_diff, rel_err, single_blas_thread
from reco_ref.fusion import reference as R

TOL = 1e-6


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    with single_blas_thread():
        yield


def check(f, arrays: dict, grads: dict, rng, max_entries=40):
    """Central differences of scalar f() w.r.t. each named array vs the analytic gradient."""
    scale = max(1.0, abs(f()))
    for name, arr in arrays.items():
        if arr.size == 0:
            continue
        flat = rng.choice(arr.size, size=min(arr.size, max_entries), replace=False)
        idxs = [np.unravel_index(i, arr.shape) for i in flat]
        num = np.array([central_diff(f, arr, i) for i in idxs])
        ana = np.array([grads[name][i] for i in idxs])
        assert grads[name].shape == arr.shape and grads[name].dtype == arr.dtype, name
        err = rel_err(ana, num, scale)
        assert err < TOL, f"{name}: rel err {err:.3g}"


@pytest.mark.parametrize("seed", range(6))
def test_layernorm(seed):
    rng = np.random.default_rng(seed)
    shape = tuple(rng.integers(1, 5, size=int(rng.integers(1, 3)))) + (int(rng.integers(2, 20)),)
    x = rng.standard_normal(shape) * 3 + 1
    g, b = rng.standard_normal(shape[-1]), rng.standard_normal(shape[-1])
    W = rng.standard_normal(shape)
    out, cache = R.layernorm_forward(x, g, b)
    xhat = (out - b) / g
    np.testing.assert_allclose(xhat.mean(-1), 0, atol=1e-12)
    np.testing.assert_allclose((xhat**2).mean(-1), 1, rtol=1e-3)  # = var/(var+eps)
    dx, dg, db = R.layernorm_backward(cache, W)
    check(lambda: float((R.layernorm_forward(x, g, b)[0] * W).sum()), {"x": x, "gamma": g, "beta": b},
          {"x": dx, "gamma": dg, "beta": db}, rng)  # fmt: skip


@pytest.mark.parametrize("seed", range(4))
def test_linear(seed):
    rng = np.random.default_rng(seed)
    N, Din, Dout = (int(v) for v in rng.integers(1, 12, size=3))
    x, w, b = rng.standard_normal((N, Din)), rng.standard_normal((Din, Dout)), rng.standard_normal(Dout)
    W = rng.standard_normal((N, Dout))
    out, cache = R.linear_forward(x, w, b)
    dx, dw, db = R.linear_backward(cache, W)
    check(lambda: float((R.linear_forward(x, w, b)[0] * W).sum()), {"x": x, "w": w, "b": b}, {"x": dx, "w": dw, "b": db}, rng)


@pytest.mark.parametrize("seed", range(8))
def test_attention_self_and_cross(seed):
    rng = np.random.default_rng(seed)
    B, h, T, dh = (int(v) for v in (rng.integers(1, 4), rng.integers(1, 4), rng.integers(1, 9), rng.integers(1, 6)))
    Tq = T if seed % 2 == 0 else 1  # odd seeds: one query token over T keys (docs/reco.md §5)
    q = rng.standard_normal((B, h, Tq, dh)) * 1.5
    k = rng.standard_normal((B, h, T, dh)) * 1.5
    v = rng.standard_normal((B, h, T, dh))
    valid = rng.random((B, T)) < 0.7
    valid[:, 0] = True
    W = rng.standard_normal((B, h, Tq, dh))
    out, cache = R.attention_forward(q, k, v, valid)
    assert out.shape == (B, h, Tq, dh)
    assert np.all(cache["p"][np.broadcast_to(~valid[:, None, None, :], cache["p"].shape)] == 0.0)
    dq, dk, dv = R.attention_backward(cache, W)
    check(lambda: float((R.attention_forward(q, k, v, valid)[0] * W).sum()), {"q": q, "k": k, "v": v},
          {"q": dq, "k": dk, "v": dv}, rng)  # fmt: skip
    assert np.all(dk[np.broadcast_to(~valid[:, None, :, None], dk.shape)] == 0.0)
    assert np.all(dv[np.broadcast_to(~valid[:, None, :, None], dv.shape)] == 0.0)


def test_attention_row_without_valid_key_is_zero_not_nan(rng):
    q = rng.standard_normal((2, 2, 1, 4))
    kv = rng.standard_normal((2, 2, 3, 4))
    valid = np.array([[False, False, False], [True, False, True]])
    out, cache = R.attention_forward(q, kv, kv, valid)
    assert np.all(out[0] == 0.0) and np.isfinite(out).all() and np.abs(out[1]).max() > 0
    dq, dk, dv = R.attention_backward(cache, np.ones_like(out))
    assert np.all(dq[0] == 0) and np.all(dk[0] == 0) and np.all(dv[0] == 0) and np.isfinite(dq).all()


@pytest.mark.parametrize("seed", range(3))
def test_gelu(seed):
    rng = np.random.default_rng(seed)
    u = rng.standard_normal((5, 7)) * 3
    W = rng.standard_normal(u.shape)
    _, cache = R.gelu_forward(u)
    check(lambda: float((R.gelu_forward(u)[0] * W).sum()), {"u": u}, {"u": R.gelu_backward(cache, W)}, rng)


@pytest.mark.parametrize("seed", range(3))
def test_l2normalize(seed):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((int(rng.integers(1, 6)), int(rng.integers(2, 12)))) * 2
    W = rng.standard_normal(z.shape)
    y, cache = R.l2normalize_forward(z)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, atol=1e-15)
    check(lambda: float((R.l2normalize_forward(z)[0] * W).sum()), {"z": z}, {"z": R.l2normalize_backward(cache, W)}, rng)


def test_split_merge_heads_roundtrip(rng):
    x = rng.standard_normal((2, 5, 12))
    hx = R.split_heads(x, 3)
    assert hx.shape == (2, 3, 5, 4)
    np.testing.assert_array_equal(hx[:, 1], x[:, :, 4:8])  # head i holds columns i*dh:(i+1)*dh
    np.testing.assert_array_equal(R.merge_heads(hx), x)
