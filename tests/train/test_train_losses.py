"""Symmetric InfoNCE and the RECO loss: finite differences (incl. τ), clamp, limits, torch oracle."""

from __future__ import annotations

import math

import numpy as np
import pytest

from reco_ref.errors import ShapeError
from reco_ref.train.losses import (
    DEFAULT_TAU,
    infonce_backward,
    infonce_forward,
    reco_loss_backward,
    reco_loss_forward,
)

H = 1e-6
MAX_REL = {"value": 0.0}


def _unit(rng, N, D, dtype=np.float64):
    x = rng.standard_normal((N, D))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(dtype)


def _rel(a, n):
    a, n = np.ravel(a), np.ravel(n)
    return float(np.linalg.norm(a - n) / max(np.linalg.norm(a) + np.linalg.norm(n), 1e-7))


@pytest.mark.parametrize("seed", range(8))
def test_infonce_fd_including_tau(seed):
    rng = np.random.default_rng(seed)
    N, D = int(rng.integers(1, 12)), int(rng.integers(2, 20))
    a = rng.standard_normal((N, D))  # not normalised: the loss must not rely on it
    b = rng.standard_normal((N, D))
    tau = float(rng.uniform(-1.0, 3.0))  # s = e^τ ∈ (0.37, 20): unclamped
    dloss = float(rng.uniform(0.5, 2.0))
    loss, cache = infonce_forward(a, b, tau)
    da, db, dtau = infonce_backward(cache, dloss)

    def fd(arr):
        g = np.zeros_like(arr)
        for i in np.ndindex(arr.shape):
            old = arr[i]
            arr[i] = old + H
            lp = infonce_forward(a, b, tau)[0]
            arr[i] = old - H
            lm = infonce_forward(a, b, tau)[0]
            arr[i] = old
            g[i] = dloss * (lp - lm) / (2 * H)
        return g

    num_tau = dloss * (infonce_forward(a, b, tau + H)[0] - infonce_forward(a, b, tau - H)[0]) / (2 * H)
    errs = [_rel(da, fd(a)), _rel(db, fd(b)), _rel([dtau], [num_tau])]
    MAX_REL["value"] = max(MAX_REL["value"], *errs)
    assert max(errs) < 1e-6, errs
    if N > 1:
        assert abs(dtau) > 1e-6  # the τ check is not vacuous


def test_infonce_matches_direct_formula(rng):
    """Against a literal, unstabilised transcription of docs/reco.md §3 on small logits."""
    a, b = _unit(rng, 6, 5), _unit(rng, 6, 5)
    tau = 1.3
    s = math.exp(tau)
    Z = s * a @ b.T
    ce_rows = np.mean([-math.log(math.exp(Z[i, i]) / np.exp(Z[i]).sum()) for i in range(6)])
    ce_cols = np.mean([-math.log(math.exp(Z[j, j]) / np.exp(Z[:, j]).sum()) for j in range(6)])
    loss, _ = infonce_forward(a, b, tau)
    assert abs(loss - 0.5 * (ce_rows + ce_cols)) < 1e-13


def test_clamp(rng):
    a, b = _unit(rng, 5, 8), _unit(rng, 5, 8)
    big = math.log(100.0) + 0.5
    loss_c, cache = infonce_forward(a, b, big)
    loss_100, _ = infonce_forward(a, b, math.log(100.0))
    assert cache["clamped"] and cache["s"] == 100.0
    assert abs(loss_c - loss_100) < 1e-12  # the scale is held at max_scale
    _, _, dtau = infonce_backward(cache)
    assert dtau == 0.0  # clamped: τ gets no gradient
    _, c_below = infonce_forward(a, b, math.log(100.0) - 0.01)
    assert infonce_backward(c_below)[2] != 0.0
    # a custom clamp
    _, c = infonce_forward(a, b, 2.0, max_scale=5.0)
    assert c["clamped"] and c["s"] == 5.0
    # huge τ does not overflow
    loss_huge, c = infonce_forward(a, b, 1e4)
    assert math.isfinite(loss_huge) and c["s"] == 100.0


def test_aligned_well_separated_loss_goes_to_zero():
    N = 16
    a = np.eye(N, 32)  # orthonormal rows: cos = 1 on the diagonal, 0 elsewhere
    losses = [infonce_forward(a, a.copy(), math.log(s))[0] for s in (1.0, 10.0, 100.0)]
    assert losses[0] > losses[1] > losses[2]
    assert losses[2] < 1e-40 and losses[2] >= 0.0
    # expected value: log(1 + (N-1) e^{-s})
    assert abs(losses[1] - math.log1p((N - 1) * math.exp(-10.0))) < 1e-12
    # misaligned (rows permuted) is large
    assert infonce_forward(a, a[::-1].copy(), math.log(100.0))[0] > 50.0


def test_large_logits_are_stable():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((8, 4)) * 50  # logits up to ~1e5 without the clamp helping
    loss, cache = infonce_forward(a, a.copy(), math.log(100.0))
    da, db, dtau = infonce_backward(cache)
    assert math.isfinite(loss) and np.isfinite(da).all() and np.isfinite(db).all() and math.isfinite(dtau)


def test_float32(rng):
    a, b = _unit(rng, 10, 16), _unit(rng, 10, 16)
    l64, c64 = infonce_forward(a, b, DEFAULT_TAU)
    l32, c32 = infonce_forward(a.astype(np.float32), b.astype(np.float32), DEFAULT_TAU)
    assert abs(l32 - l64) < 1e-5
    g64, g32 = infonce_backward(c64), infonce_backward(c32)
    assert g32[0].dtype == np.float32 and g32[1].dtype == np.float32
    np.testing.assert_allclose(g32[0], g64[0], atol=1e-5)
    assert abs(g32[2] - g64[2]) < 1e-4


@pytest.mark.parametrize(
    "args, match",
    [
        ((np.zeros((3, 4)), np.zeros((3, 5)), 1.0), "shape"),
        ((np.zeros((3, 4)), np.zeros((3, 4), np.float32), 1.0), "dtype"),
        ((np.zeros((0, 4)), np.zeros((0, 4)), 1.0), "N is 0"),
        ((np.full((2, 4), np.nan), np.zeros((2, 4)), 1.0), "NaN"),
        ((np.zeros((2, 4)), np.zeros((2, 4)), float("nan")), "tau"),
        ((np.zeros((2, 4)), np.zeros((2, 4)), np.zeros(3)), "tau"),
    ],
)
def test_infonce_errors(args, match):
    with pytest.raises(ShapeError, match=match):
        infonce_forward(*args)


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown"):
        infonce_forward(np.eye(2), np.eye(2), 1.0, backend="tpu")


# ----------------------------------------------------------------------------------------------
# RECO loss
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0), (0.5, 2.0, 0.0)])
def test_reco_loss_fd(weights, rng):
    N, D = 6, 8
    vb, tb, v, t = (_unit(rng, N, D) for _ in range(4))
    tau = 1.7
    loss, cache = reco_loss_forward(vb, tb, v, t, tau, weights=weights)
    l1, l2, l3 = cache["terms"]
    assert abs(loss - (weights[0] * l1 + weights[1] * l2 + weights[2] * l3)) < 1e-14
    assert abs(l2 - infonce_forward(vb, t, tau)[0]) < 1e-14
    dvb, dtb, dtau = reco_loss_backward(cache)

    def f():
        return reco_loss_forward(vb, tb, v, t, tau, weights=weights)[0]

    for arr, g in ((vb, dvb), (tb, dtb)):
        num = np.zeros_like(arr)
        for i in np.ndindex(arr.shape):
            old = arr[i]
            arr[i] = old + H
            lp = f()
            arr[i] = old - H
            lm = f()
            arr[i] = old
            num[i] = (lp - lm) / (2 * H)
        assert _rel(g, num) < 1e-6
    num_tau = (reco_loss_forward(vb, tb, v, t, tau + H, weights=weights)[0]
               - reco_loss_forward(vb, tb, v, t, tau - H, weights=weights)[0]) / (2 * H)  # fmt: skip
    assert _rel([dtau], [num_tau]) < 1e-6


def test_reco_loss_bad_weights(rng):
    x = _unit(rng, 3, 4)
    with pytest.raises(ShapeError, match="weights"):
        reco_loss_forward(x, x, x, x, 1.0, weights=(1.0, -1.0, 1.0))


# ----------------------------------------------------------------------------------------------
# torch oracle
# ----------------------------------------------------------------------------------------------


@pytest.mark.oracle
@pytest.mark.parametrize("tau", [0.3, DEFAULT_TAU, math.log(100.0) + 0.2])
def test_infonce_matches_torch(tau):
    torch = pytest.importorskip("torch", reason="PyTorch oracle not installed (pip install -e '.[oracle]')")
    F = torch.nn.functional
    rng = np.random.default_rng(7)
    N, D = 12, 16
    a, b = _unit(rng, N, D), _unit(rng, N, D)
    loss, cache = infonce_forward(a, b, tau)
    da, db, dtau = infonce_backward(cache, 1.0)

    at = torch.tensor(a, requires_grad=True)
    bt = torch.tensor(b, requires_grad=True)
    tt = torch.tensor(tau, dtype=torch.float64, requires_grad=True)
    s = torch.clamp(tt.exp(), max=100.0)
    Z = s * at @ bt.T
    labels = torch.arange(N)
    lt = 0.5 * (F.cross_entropy(Z, labels) + F.cross_entropy(Z.T, labels))
    lt.backward()
    assert abs(loss - lt.item()) <= 1e-10
    assert np.abs(da - at.grad.numpy()).max() <= 1e-10
    assert np.abs(db - bt.grad.numpy()).max() <= 1e-10
    assert abs(dtau - tt.grad.item()) <= 1e-10
    if tau > math.log(100.0):
        assert dtau == 0.0 and tt.grad.item() == 0.0


@pytest.fixture(autouse=True, scope="module")
def _report_max_rel():
    """After the module's tests, print the largest finite-difference error they saw (``-s`` to see it). A fixture,
    not a test: test_infonce_fd_including_tau asserts the bound on every case."""
    yield
    if MAX_REL["value"]:
        print(f"\nInfoNCE finite-difference max rel err (a, b, tau): {MAX_REL['value']:.2e}")
