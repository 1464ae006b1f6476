"""The equal-parameter-count MLP control: count, identity at init, hand-written backward vs finite differences."""

from __future__ import annotations

import numpy as np
import pytest

from reco_ref.fusion import count_params, init_params
from reco_ref.train.mlp import mlp_backward, mlp_forward, mlp_hidden_for, mlp_init


@pytest.mark.parametrize("dim, heads", [(512, 8), (768, 8), (32, 4)])
def test_parameter_count_matches_fusion(dim, heads):
    target = count_params(init_params(dim, heads, seed=0))
    got = count_params(mlp_init(dim, mlp_hidden_for(dim, heads)))
    assert got <= target < got + 3 * dim + 1


def test_identity_at_init_and_mask():
    rng = np.random.default_rng(0)
    p = mlp_init(8, 20, seed=1)
    q = rng.standard_normal((3, 8)).astype(np.float32)
    r = rng.standard_normal((3, 4, 8)).astype(np.float32)
    out, _ = mlp_forward(p, q, r)
    np.testing.assert_allclose(out, q / np.linalg.norm(q, axis=1, keepdims=True), atol=1e-6)
    p["w_2"][...] = rng.standard_normal(p["w_2"].shape)
    mask = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]], bool)
    r2 = r.copy()
    r2[~mask] = np.nan  # masked slots never matter
    a, _ = mlp_forward(p, q, r2, mask)
    b, _ = mlp_forward(p, q, np.where(mask[..., None], r, 0).astype(np.float32), mask)
    np.testing.assert_array_equal(a, b)


def test_backward_matches_finite_differences():
    rng = np.random.default_rng(2)
    D, H, B, k = 6, 7, 4, 3
    p = {n: a.astype(np.float64) for n, a in mlp_init(D, H, seed=3, dtype=np.float64).items()}
    for n in p:
        p[n] = p[n] + 0.3 * rng.standard_normal(p[n].shape)
    q = rng.standard_normal((B, D))
    r = rng.standard_normal((B, k, D))
    mask = rng.random((B, k)) > 0.3
    dout = rng.standard_normal((B, D))
    _, cache = mlp_forward(p, q, r, mask)
    grads = mlp_backward(p, cache, dout)
    eps = 1e-6
    for name, a in p.items():
        num = np.zeros_like(a)
        for i in np.ndindex(a.shape):
            old = a[i]
            a[i] = old + eps
            fp = (mlp_forward(p, q, r, mask)[0] * dout).sum()
            a[i] = old - eps
            fm = (mlp_forward(p, q, r, mask)[0] * dout).sum()
            a[i] = old
            num[i] = (fp - fm) / (2 * eps)
        np.testing.assert_allclose(grads[name], num, rtol=1e-6, atol=1e-8, err_msg=name)
