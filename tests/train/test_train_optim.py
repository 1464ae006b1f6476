"""AdamW (decay on matrices only), the warm-up + cosine schedule, resumable state, and toy training
loops that must reduce the loss (InfoNCE on a linear map; the RECO loss through two fusion modules)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from reco_ref.errors import CheckpointError, ShapeError
from reco_ref.fusion import fusion_backward, fusion_forward, init_params, reference
from reco_ref.io import atomic_save_npz, load_npz
from reco_ref.train import (
    DEFAULT_TAU,
    adamw_init,
    adamw_step,
    infonce_backward,
    infonce_forward,
    lr_at,
    reco_loss_backward,
    reco_loss_forward,
)


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    """Tiny matmuls in loops: a threaded BLAS only spins on a loaded machine (see tests/fusion/fusion_testlib.py)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _params(rng):
    return {"w": rng.standard_normal((4, 3)), "b": rng.standard_normal(3), "tau": np.array(2.0)}


def test_adamw_state_layout(rng):
    p = _params(rng)
    s = adamw_init(p)
    assert set(s) == {"step", "m.w", "v.w", "m.b", "v.b", "m.tau", "v.tau"}
    assert s["step"].dtype == np.int64 and s["step"].shape == ()
    assert all(s[k].shape == p[k[2:]].shape and not s[k].any() for k in s if k != "step")


def test_adamw_first_step_by_hand(rng):
    p = {"w": np.array([[1.0, -2.0]]), "b": np.array([0.5])}
    g = {"w": np.array([[0.1, 0.3]]), "b": np.array([-0.2])}
    s = adamw_init(p)
    adamw_step(p, g, s, 0.01, weight_decay=0.5)
    # t = 1: m̂ = g, v̂ = g², update = lr · g / (|g| + ε); decay only on the matrix.
    w_exp = np.array([[1.0, -2.0]]) * (1 - 0.01 * 0.5) - 0.01 * np.array([0.1, 0.3]) / (np.array([0.1, 0.3]) + 1e-6)
    b_exp = 0.5 - 0.01 * (-0.2) / (0.2 + 1e-6)
    np.testing.assert_allclose(p["w"], w_exp, rtol=0, atol=1e-15)
    np.testing.assert_allclose(p["b"], [b_exp], rtol=0, atol=1e-15)
    assert int(s["step"]) == 1


def test_decay_on_matrices_only(rng):
    p = _params(rng)
    before = {k: v.copy() for k, v in p.items()}
    s = adamw_init(p)
    adamw_step(p, {k: np.zeros_like(v) for k, v in p.items()}, s, 0.1, weight_decay=0.2)
    np.testing.assert_allclose(p["w"], before["w"] * (1 - 0.1 * 0.2), rtol=1e-15)
    assert np.array_equal(p["b"], before["b"]) and np.array_equal(p["tau"], before["tau"])
    # explicit decay set / callable
    adamw_step(p, {k: np.zeros_like(v) for k, v in p.items()}, s, 0.1, weight_decay=0.2, decay={"b"})
    np.testing.assert_allclose(p["b"], before["b"] * (1 - 0.02), rtol=1e-15)
    adamw_step(p, {k: np.zeros_like(v) for k, v in p.items()}, s, 0.1, weight_decay=0.2, decay=lambda n, a: n == "tau")
    np.testing.assert_allclose(p["tau"], before["tau"] * (1 - 0.02), rtol=1e-15)


def test_adamw_rejects_bad_grads_without_touching_anything(rng):
    p = _params(rng)
    before = {k: v.copy() for k, v in p.items()}
    s = adamw_init(p)
    g = {k: np.ones_like(v) for k, v in p.items()}
    g["b"] = np.array([1.0, np.nan, 0.0])
    with pytest.raises(ShapeError, match="grads\\['b'\\]: holds NaN"):
        adamw_step(p, g, s, 0.1)
    g["b"] = np.ones(4)
    with pytest.raises(ShapeError, match="shape"):
        adamw_step(p, g, s, 0.1)
    assert all(np.array_equal(p[k], before[k]) for k in p) and int(s["step"]) == 0
    del s["v.w"]
    with pytest.raises(CheckpointError, match="'v.w'"):
        adamw_step(p, {"w": np.ones((4, 3))}, s, 0.1)


def test_state_save_and_resume(tmp_path, rng):
    p1 = _params(rng)
    p2 = {k: v.copy() for k, v in p1.items()}
    s1 = adamw_init(p1)
    grads = [{k: rng.standard_normal(v.shape) for k, v in p1.items()} for _ in range(6)]
    for g in grads:
        adamw_step(p1, g, s1, 0.05)
    s2 = adamw_init(p2)
    for g in grads[:3]:
        adamw_step(p2, g, s2, 0.05)
    atomic_save_npz(tmp_path / "opt.npz", s2)
    atomic_save_npz(tmp_path / "p.npz", p2)
    s2, p2 = load_npz(tmp_path / "opt.npz"), load_npz(tmp_path / "p.npz")
    assert int(s2["step"]) == 3
    for g in grads[3:]:
        adamw_step(p2, g, s2, 0.05)
    assert all(np.array_equal(p1[k], p2[k]) for k in p1)


@pytest.mark.oracle
def test_adamw_matches_torch(rng):
    torch = pytest.importorskip("torch", reason="PyTorch oracle not installed (pip install -e '.[oracle]')")
    p = _params(rng)
    tp = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in p.items()}
    opt = torch.optim.AdamW(
        [{"params": [tp["w"]], "weight_decay": 0.2}, {"params": [tp["b"], tp["tau"]], "weight_decay": 0.0}],
        lr=1.0, betas=(0.9, 0.98), eps=1e-6,
    )  # fmt: skip
    s = adamw_init(p)
    for step in range(8):
        lr = lr_at(step, base_lr=0.03, warmup_steps=3, total_steps=8)
        g = {k: rng.standard_normal(v.shape) for k, v in p.items()}
        adamw_step(p, g, s, lr)
        for group in opt.param_groups:
            group["lr"] = lr
        for k in tp:
            tp[k].grad = torch.tensor(g[k])
        opt.step()
    for k in p:
        assert np.abs(p[k] - tp[k].detach().numpy()).max() <= 1e-12, k


# ----------------------------------------------------------------------------------------------
# schedule
# ----------------------------------------------------------------------------------------------


def test_lr_schedule():
    kw = dict(base_lr=1e-3, warmup_steps=10, total_steps=110, min_lr=1e-5)
    lrs = [lr_at(t, **kw) for t in range(120)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10]))  # linear warm-up
    assert lrs[10] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:110], lrs[11:111]))  # cosine decreases
    assert lrs[60] == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))  # half-way
    assert lrs[115] == 1e-5
    assert lr_at(0, base_lr=0.1, warmup_steps=0, total_steps=5) == pytest.approx(0.1)
    for bad in (dict(step=-1), dict(warmup_steps=200), dict(min_lr=1.0), dict(step=1.5)):
        with pytest.raises(ValueError):
            lr_at(**{"step": 0, **kw, **bad})


# ----------------------------------------------------------------------------------------------
# toy training loops
# ----------------------------------------------------------------------------------------------


def test_infonce_learns_a_linear_map():
    """Learn W so that normalize(x W) matches y = normalize(x A) for a hidden A, with τ learned too."""
    rng = np.random.default_rng(0)
    N, Din, D = 64, 12, 8
    x = rng.standard_normal((N, Din))
    y = x @ rng.standard_normal((Din, D))
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    params = {"W": rng.standard_normal((Din, D)) * 0.1, "tau": np.array(math.log(1 / 0.07))}
    state = adamw_init(params)
    losses = []
    for step in range(150):
        z = x @ params["W"]
        a, ncache = reference.l2normalize_forward(z)
        loss, cache = infonce_forward(a, y, float(params["tau"]))
        da, _, dtau = infonce_backward(cache)
        dW = x.T @ reference.l2normalize_backward(ncache, da)
        adamw_step(params, {"W": dW, "tau": np.array(dtau)}, state,
                   lr_at(step, base_lr=0.05, warmup_steps=10, total_steps=150), weight_decay=0.0)  # fmt: skip
        losses.append(loss)
    print(f"\nlinear-map toy: InfoNCE {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < 0.3 * losses[0], (losses[0], losses[-1])
    assert float(params["tau"]) != math.log(1 / 0.07)  # τ was trained


def test_reco_loss_trains_two_fusion_modules():
    """RECO end to end on synthetic data: noisy image/text views of classes, neighbours from the other
    modality of the same class. φ_I, φ_T and τ train with the three-term loss; the loss must drop and
    refined embeddings must align better than the frozen ones."""
    rng = np.random.default_rng(3)
    C, N, k, D, h = 8, 48, 4, 16, 2
    centers = rng.standard_normal((C, D))

    def noisy(labels, s):
        e = centers[labels] + s * rng.standard_normal((len(labels), D))
        return e / np.linalg.norm(e, axis=-1, keepdims=True)

    def batch():
        lab = rng.integers(0, C, N)
        v, t = noisy(lab, 1.2), noisy(lab, 1.2)  # weakly aligned frozen pair
        nbr_lab = np.repeat(lab[:, None], k, axis=1)
        r_img = noisy(nbr_lab.ravel(), 0.3).reshape(N, k, D)  # image query is fed texts of its class
        r_txt = noisy(nbr_lab.ravel(), 0.3).reshape(N, k, D)
        mask = rng.random((N, k)) < 0.8
        return v, t, r_img, r_txt, mask

    phi_i = init_params(D, h, seed=1, dtype=np.float64)
    phi_t = init_params(D, h, seed=2, dtype=np.float64)
    params = {**{"image." + n: a for n, a in phi_i.items()}, **{"text." + n: a for n, a in phi_t.items()},
              "tau": np.array(DEFAULT_TAU)}  # fmt: skip
    state = adamw_init(params)
    eval_batch = batch()

    def eval_loss():
        v, t, ri, rt, m = eval_batch
        vb, _ = fusion_forward(phi_i, v, ri, m)
        tb, _ = fusion_forward(phi_t, t, rt, m)
        return reco_loss_forward(vb, tb, v, t, float(params["tau"]))[0], infonce_forward(v, t, float(params["tau"]))[0]

    start, frozen = eval_loss()
    assert abs(start - 3 * frozen) < 1e-12  # identity at init: all three terms equal ℓ(v, t)
    steps = 80
    for step in range(steps):
        v, t, ri, rt, m = batch()
        vb, ci = fusion_forward(phi_i, v, ri, m)
        tb, ct = fusion_forward(phi_t, t, rt, m)
        loss, cache = reco_loss_forward(vb, tb, v, t, float(params["tau"]))
        dvb, dtb, dtau = reco_loss_backward(cache)
        gi = fusion_backward(phi_i, ci, dvb)
        gt = fusion_backward(phi_t, ct, dtb)
        grads = {**{"image." + n: g for n, g in gi.items()}, **{"text." + n: g for n, g in gt.items()},
                 "tau": np.array(dtau)}  # fmt: skip
        adamw_step(params, grads, state, lr_at(step, base_lr=1e-2, warmup_steps=8, total_steps=steps))
    end, _ = eval_loss()
    assert np.shares_memory(params["image.w_q"], phi_i["w_q"])  # the optimiser updated the modules in place
    print(f"\nRECO toy: loss {start:.3f} -> {end:.3f}")
    assert end < 0.7 * start, (start, end)
