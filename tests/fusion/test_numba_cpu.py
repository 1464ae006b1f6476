"""Numba CPU backend: the fused kernels one by one against the reference step functions, the dead-work
skipping, float32/float64, and the on-disk kernel cache (the second process must not recompile).
The first-generation kernels that the layer no longer runs live in ``kernels_v1.py`` beside this file and are
held to the same reference here.

Layer-level equivalence (every output and gradient, many shapes) is in test_backends.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import kernels_v1
import numpy as np
import pytest
from fusion_testlib import assert_matches_reference, random_inputs, random_params

from reco_ref.errors import ShapeError
from reco_ref.fusion import RELEVANCE_NAMES, FusionParams, fusion_backward, fusion_forward, init_params
from reco_ref.fusion import numba_cpu as nb
from reco_ref.fusion import reference as ref
from reco_ref.fusion.numba_cpu import layer as nb_layer
from reco_ref.fusion.constants import LN_EPS

DTYPES = [np.float64, np.float32]


_close = assert_matches_reference


def _check_ln1_backward(dx, part, dx_want, dg_want, db_want, dtype):
    """An LN_1 backward kernel's dX and partial sums (dγ₁, dβ₁, de_q, de_r) against the reference."""
    s = part.sum(axis=0)
    _close(dx, dx_want, dtype, "dx")
    _close(s[0], dg_want, dtype, "dgamma")
    _close(s[1], db_want, dtype, "dbeta")
    _close(s[2], dx_want[:, 0].sum(0), dtype, "de_q")
    _close(s[3], dx_want[:, 1:].sum((0, 1)), dtype, "de_r")


@pytest.mark.parametrize("dtype", DTYPES)
def test_embed_layernorm_and_backward_kernels(dtype):
    rng = np.random.default_rng(1)
    B, k, D = 3, 4, 13
    T = k + 1
    q, r = rng.standard_normal((B, D)).astype(dtype), rng.standard_normal((B, k, D)).astype(dtype)
    e_q, e_r, gamma, beta = (rng.standard_normal(D).astype(dtype) for _ in range(4))
    X = np.concatenate([(q + e_q)[:, None], r + e_r], axis=1)
    want, cache = ref.layernorm_forward(X, gamma, beta)
    x, xhat, a1 = (np.empty((B, T, D), dtype) for _ in range(3))
    rstd = np.empty((B, T), dtype)
    nb._embed_layernorm_forward(q, r, e_q, e_r, gamma, beta, LN_EPS, x, xhat, rstd, a1)
    _close(a1, want, dtype, "a1")
    _close(rstd, cache["rstd"][..., 0], dtype, "rstd")
    # LN_1 backward: dA1 (+ the Q path's extra on token 0), residual dH0 on token 0, and the sums
    da1 = rng.standard_normal((B, T, D)).astype(dtype)
    dq_proj, dh = rng.standard_normal((B, D)).astype(dtype), rng.standard_normal((B, D)).astype(dtype)
    da_tot = da1.copy()
    da_tot[:, 0] += dq_proj
    dx_want, dg_want, db_want = ref.layernorm_backward(cache, da_tot)
    dx_want[:, 0] += dh
    dx = np.empty((B, T, D), dtype)
    part = np.empty((nb._nblk(B * T), 4, D), dtype)
    kernels_v1._layernorm1_backward(da1, dq_proj, dh, xhat, rstd, gamma, dx, part)
    _check_ln1_backward(dx, part, dx_want, dg_want, db_want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_row0_kernels(dtype):
    rng = np.random.default_rng(2)
    B, H, T, dh = 3, 2, 6, 4
    D = H * dh
    q, k, v, dout = (rng.standard_normal((B, T, D)).astype(dtype) for _ in range(4))
    b_q, b_k, b_v = (rng.standard_normal(D).astype(dtype) for _ in range(3))
    valid = rng.random((B, T)) < 0.5
    valid[:, 0] = True
    valid[1, 1:] = False
    sh = lambda a: ref.split_heads(a, H)  # noqa: E731
    want, cache = ref.attention_forward(sh(q + b_q), sh(k + b_k), sh(v + b_v), valid)
    q0 = np.ascontiguousarray(q[:, 0])
    kv = np.concatenate([k, v], axis=2)
    p = np.empty((B, H, T), dtype)
    ctx = np.empty((B, D), dtype)
    nb._attention_row0_forward(q0, b_q, kv, np.concatenate([b_k, b_v]), valid, H, p, ctx, np.empty((B, H, T)))
    _close(ctx, ref.merge_heads(want)[:, 0], dtype, "ctx")
    _close(p, cache["p"][:, :, 0], dtype, "p")
    assert np.all(p[~np.broadcast_to(valid[:, None, :], p.shape)] == 0)
    d0 = np.zeros((B, T, D), dtype)
    d0[:, 0] = dout[:, 0]
    gq, gk, gv = (ref.merge_heads(g) for g in ref.attention_backward(cache, sh(d0)))
    dq0 = np.empty((B, D), dtype)
    dkv = np.empty((B, T, 2 * D), dtype)
    nb._attention_row0_backward(np.ascontiguousarray(d0[:, 0]), p, q0, kv, valid, H, dq0, dkv, np.empty((B, H, T)))
    _close(dq0, gq[:, 0], dtype, "dq0")
    _close(dkv, np.concatenate([gk, gv], axis=2), dtype, "dkv")


@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu_l2norm_colsum_kernels(dtype):
    rng = np.random.default_rng(3)
    u = (3 * rng.standard_normal((5, 9))).astype(dtype)
    b = rng.standard_normal(9).astype(dtype)
    pre, out = u.copy(), np.empty_like(u)
    nb._bias_gelu_forward(pre, b, out, dtype(nb._INV_SQRT2))
    want, gcache = ref.gelu_forward(u + b)
    _close(out, want, dtype, "gelu")
    du = rng.standard_normal(u.shape).astype(dtype)
    want = ref.gelu_backward(gcache, du)
    nb._gelu_backward_inplace(du, pre, dtype(nb._INV_SQRT2), dtype(nb._INV_SQRT2PI))
    _close(du, want, dtype, "gelu backward")
    y, h, dout = (rng.standard_normal((4, 7)).astype(dtype) for _ in range(3))
    b2 = rng.standard_normal(7).astype(dtype)
    Y = h + (y + b2)
    want, c = ref.l2normalize_forward(Y)
    o, nrm = np.empty_like(y), np.empty(4, dtype)
    nb._bias_residual_l2norm_forward(y, b2, h, o, nrm)
    _close(o, want, dtype, "l2")
    dz = np.empty_like(y)
    nb._l2norm_backward(dout, o, nrm, dz)
    _close(dz, ref.l2normalize_backward(c, dout), dtype, "l2 backward")
    m = rng.standard_normal((37, 5)).astype(dtype)
    _close(nb._colsum_rows(m), m.sum(0), dtype, "colsum")
    assert nb._colsum_rows(np.zeros((0, 3), dtype)).tolist() == [0, 0, 0]


def test_fast_path_skips_dead_tokens():
    """The cache holds token-0-only buffers for Q, LN_2 and the MLP; K and V are never built: one
    folded D-vector per (head, row) stands for them (M = W_k q0, C = Σ_t p_t A1_t)."""
    rng = np.random.default_rng(4)
    params = random_params(8, 2, rng)
    q, r, mask = random_inputs(3, 5, 8, rng)
    _, cache = nb.fusion_forward(params, q, r, mask, heads=2)
    assert "kv" not in cache and cache["m"].shape == (2, 3, 8) and cache["c"].shape == (2, 3, 8)
    assert cache["a1"].shape == (3, 6, 8)  # LN_1 for all tokens (the keys/values depend on them)
    assert cache["q0"].shape == (3, 8) and cache["a2"].shape == (3, 8) and cache["pre"].shape == (3, 32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lowrank_attention_kernels_v2(dtype):
    """v2 row-0 attention (keys/values folded into M, C, N, G) against the reference's full attention,
    and the fused dA1 + LN_1 backward against the reference's LN backward."""
    rng = np.random.default_rng(12)
    B, H, T, dh = 3, 2, 6, 4
    D = H * dh
    a1 = rng.standard_normal((B, T, D)).astype(dtype)
    w_q, w_k, w_v = (rng.standard_normal((D, D)).astype(dtype) for _ in range(3))
    b_q, b_k, b_v = (rng.standard_normal(D).astype(dtype) for _ in range(3))
    valid = rng.random((B, T)) < 0.5
    valid[:, 0] = True
    valid[1, 1:] = False
    sh = lambda a: ref.split_heads(a, H)  # noqa: E731
    Q, K, V = a1 @ w_q + b_q, a1 @ w_k + b_k, a1 @ w_v + b_v
    want, cache = ref.attention_forward(sh(Q), sh(K), sh(V), valid)
    q0 = np.ascontiguousarray(Q[:, 0])
    q0h = q0.reshape(B, H, dh).transpose(1, 0, 2)
    m = np.matmul(q0h, nb._heads_view(w_k, H).transpose(0, 2, 1))
    p, c = np.empty((B, H, T), dtype), np.empty((H, B, D), dtype)
    nb._attention_row0_forward_v2(a1, m, valid, 1.0 / np.sqrt(dh), p, c, np.empty((B, H, T)))
    ctx = np.matmul(c, nb._heads_view(w_v, H)).transpose(1, 0, 2).reshape(B, D) + b_v
    _close(p, cache["p"][:, :, 0], dtype, "p")
    _close(ctx, ref.merge_heads(want)[:, 0], dtype, "ctx")
    assert np.all(p[~np.broadcast_to(valid[:, None, :], p.shape)] == 0)
    # backward: dctx on token 0 only -> dQ0, dK, dV through the reference, then dA1 and LN_1
    dctx = rng.standard_normal((B, D)).astype(dtype)
    d0 = np.zeros((B, T, D), dtype)
    d0[:, 0] = dctx
    gq, gk, gv = (ref.merge_heads(g) for g in ref.attention_backward(cache, sh(d0)))
    dctxh = dctx.reshape(B, H, dh).transpose(1, 0, 2)
    nv = np.matmul(dctxh, nb._heads_view(w_v, H).transpose(0, 2, 1))
    ds, g, dsum = np.empty((B, H, T), dtype), np.empty((H, B, D), dtype), np.empty((B, H), dtype)
    nb._attention_row0_backward_v2(a1, p, nv, valid, 1.0 / np.sqrt(dh), ds, g, dsum, np.empty((B, H, T)))
    dq0 = np.matmul(g, nb._heads_view(w_k, H)).transpose(1, 0, 2).reshape(B, D)
    _close(dq0, gq[:, 0], dtype, "dq0")
    dwk = np.matmul(g.transpose(0, 2, 1), q0h).transpose(1, 0, 2).reshape(D, D)
    _close(dwk, a1.reshape(-1, D).T @ gk.reshape(-1, D), dtype, "dW_k")
    dwv = np.matmul(c.transpose(0, 2, 1), dctxh).transpose(1, 0, 2).reshape(D, D)
    _close(dwv, a1.reshape(-1, D).T @ gv.reshape(-1, D), dtype, "dW_v")
    # db_k vanishes analytically (softmax is shift-invariant): both sides are round-off, so it is held
    # to the dW_k scale, as in test_backends.py
    dbk_err = np.abs((dsum[:, :, None] * q0.reshape(B, H, dh)).sum(0).reshape(D) - gk.sum((0, 1))).max()
    assert dbk_err <= (1e-10 if dtype == np.float64 else 1e-4 * np.abs(dwk).max()), dbk_err
    xhat = rng.standard_normal((B, T, D)).astype(dtype)
    rstd, gamma = rng.random((B, T)).astype(dtype) + 0.5, rng.standard_normal(D).astype(dtype)
    dq_proj, dh = rng.standard_normal((B, D)).astype(dtype), rng.standard_normal((B, D)).astype(dtype)
    da1 = gk @ w_k.T + gv @ w_v.T  # the reference's dA1 from K and V (Q's part enters as dq_proj)
    da1[:, 0] += dq_proj
    dx_want, dg_want, db_want = ref.layernorm_backward({"xhat": xhat, "rstd": rstd[..., None], "gamma": gamma}, da1)
    dx_want[:, 0] += dh
    dx, part = np.empty((B, T, D), dtype), np.empty((nb._nblk(B * T), 4, D), dtype)
    nb._layernorm1_backward_v2(ds, p, m, nv, dq_proj, dh, xhat, rstd, gamma, dx, part)
    _check_ln1_backward(dx, part, dx_want, dg_want, db_want, dtype)
    assert np.all(dx[~valid] == 0)  # a masked slot gets exactly zero input gradient


def test_gelu_f32_kernels_error_bound():
    """The vectorised float32 GELU (v2) stays within its documented bound of the exact erf GELU on a
    dense grid and at extremes; GELU' and the fused db_1 sum likewise."""
    from scipy.special import erf

    x64 = np.concatenate([np.linspace(-12, 12, 480_001), [-3e38, -1e30, -100, -10.95, 10.95, 100, 1e30, 3e38, 0]])
    x = x64.astype(np.float32)
    xe = x.astype(np.float64)
    cdf = 0.5 * (1 + erf(xe / np.sqrt(2)))
    pdf = np.exp(-0.5 * xe * xe) / np.sqrt(2 * np.pi)
    pre, u = x[None].copy(), np.empty((1, x.size), np.float32)
    nb._bias_gelu_forward_f32(pre, np.zeros(x.size, np.float32), u)
    scale = np.maximum(1.0, np.abs(xe))
    err = np.abs(u[0] - xe * cdf) / scale
    # bound before rounding + one float32 rounding of the stored value (2^-24 relative)
    assert err.max() <= nb.GELU_MAX_ABS_ERR + 2.0**-24 * 2, err.max()
    tail = dict(zip(x[-9:].tolist(), u[0, -9:].tolist()))  # far tails are exact: x·1 or 0
    assert [tail[v] for v in (100.0, float(np.float32(1e30)), float(np.float32(3e38)))] == [100.0, float(np.float32(1e30)), float(np.float32(3e38))]
    assert [tail[v] for v in (-100.0, float(np.float32(-1e30)), float(np.float32(-3e38)), 0.0)] == [0.0, 0.0, 0.0, 0.0]
    du = np.linspace(-2, 2, x.size).astype(np.float32)[None]
    want = du[0].astype(np.float64) * (cdf + xe * pdf)
    part = np.empty((1, x.size), np.float32)
    got = du.copy()
    nb._gelu_backward_colsum_f32(got, x[None], part)
    assert np.abs(got[0] - want).max() <= 2 * (nb.GELU_MAX_ABS_ERR + 2.0**-24 * 2)
    np.testing.assert_array_equal(part[0], got[0])  # one row: the column sum is the row
    # the fused column sums over several blocks of rows equal numpy's sum of the same float32 values
    rng = np.random.default_rng(5)
    pre2 = (3 * rng.standard_normal((37, 50))).astype(np.float32)
    du2 = rng.standard_normal((37, 50)).astype(np.float32)
    part2 = np.empty((nb._nblk(37), 50), np.float32)
    nb._gelu_backward_colsum_f32(du2, pre2, part2)
    np.testing.assert_allclose(part2.sum(0), du2.sum(0, dtype=np.float64), rtol=0, atol=1e-5)


def test_kernel_cache_second_process_does_not_recompile(tmp_path):
    """cache=True: a second interpreter loads every kernel from the on-disk cache (no compile)."""
    script = textwrap.dedent("""
        import json, numpy as np
        from reco_ref.fusion import numba_cpu as nb
        from reco_ref.fusion.params import init_params
        for dt in (np.float32, np.float64):
            p = init_params(8, 2, dtype=dt)
            q = np.ones((2, 8), dt); r = np.ones((2, 3, 8), dt)
            out, c = nb.fusion_forward(p, q, r, None, heads=2)
            nb.fusion_backward(p, c, np.ones_like(q))
            p = init_params(8, 2, dtype=dt, relevance=True)  # the relevance-bias specialisation too
            out, c = nb.fusion_forward(p, q, r, None, heads=2, scores=np.zeros((2, 3), dt))
            nb.fusion_backward(p, c, np.ones_like(q))
            L, c = nb.infonce_forward(q, q, 1.0)
            nb.infonce_backward(c)
        misses = {name: sum(d.stats.cache_misses.values()) for name, d in vars(nb).items()
                  if hasattr(d, "stats") and name.startswith("_")}
        print(json.dumps(misses))
    """)
    runs = []
    for _ in range(2):
        res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-2000:]
        runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
    assert len(runs[1]) >= 12, runs[1]  # every kernel was seen
    assert sum(runs[1].values()) == 0, f"recompiled in the second process: {runs[1]}"


def test_small_problems_run_single_threaded_and_restore_settings(monkeypatch):
    """B·T·D < SMALL_WORK: the step runs with one numba thread (and one BLAS thread where
    threadpoolctl is installed); the caller's settings are restored afterwards, also on error."""
    import numba

    seen = []
    real = nb._layernorm1_backward_v2
    monkeypatch.setattr(nb_layer, "_layernorm1_backward_v2", lambda *a: (seen.append(numba.get_num_threads()), real(*a))[1])
    before = numba.get_num_threads()
    rng = np.random.default_rng(6)
    params = random_params(8, 2, rng)
    q, r, mask = random_inputs(2, 3, 8, rng)
    out, cache = nb.fusion_forward(params, q, r, mask, heads=2)
    nb.fusion_backward(params, cache, np.ones_like(q))
    assert seen == [1] and numba.get_num_threads() == before
    with pytest.raises(ValueError, match="backend"):
        nb.fusion_backward(params, {"backend": "numpy", "B": 2, "k": 3, "D": 8}, np.ones_like(q))
    assert numba.get_num_threads() == before


@pytest.mark.parametrize("dtype", DTYPES)
def test_batch1_gemv_kernels(dtype):
    """The one-row GEMV kernels (plain, 4-row blocked, per-head fold/unfold) against numpy."""
    rng = np.random.default_rng(13)
    H, dh, Din = 3, 5, 18  # Din not a multiple of 4: the blocked kernels' remainder rows run too
    D = H * dh
    w = rng.standard_normal((Din, D)).astype(dtype)
    x = rng.standard_normal((1, Din)).astype(dtype)
    for kern in (kernels_v1._gemv_v1, nb._gemv_v2):
        y = np.empty((1, D), dtype)
        kern(x, w, y)
        _close(y, x @ w, dtype, kern.__name__)
    _close(nb._mm(x, w), x @ w, dtype, "_mm one row")
    _close(nb._mm(np.vstack([x, x]), w), np.vstack([x, x]) @ w, dtype, "_mm two rows")
    wk = rng.standard_normal((Din, D)).astype(dtype)
    v = rng.standard_normal((1, D)).astype(dtype)
    m = np.empty((H, 1, Din), dtype)
    nb._fold_heads_v1(wk, v, m)
    _close(m, np.matmul(v.reshape(1, H, dh).transpose(1, 0, 2), nb._heads_view(wk, H).transpose(0, 2, 1)), dtype, "fold")
    c = rng.standard_normal((H, 1, Din)).astype(dtype)
    y = np.empty((1, D), dtype)
    nb._unfold_heads_v1(c, w, y)
    _close(y, np.matmul(c, nb._heads_view(w, H)).transpose(1, 0, 2).reshape(1, D), dtype, "unfold")


def test_large_steps_pin_blas_threads_and_keep_numba_threads(monkeypatch):
    """B·T·D ≥ SMALL_WORK: numba keeps its threads, BLAS runs on STEP_BLAS_THREADS (when threadpoolctl
    is installed); None leaves BLAS alone.  Settings are restored afterwards."""
    import numba

    threadpoolctl = pytest.importorskip("threadpoolctl")
    seen = []
    real = nb._layernorm1_backward_v2

    def numpy_blas():  # the BLAS numpy's matmul calls (other BLAS libraries loaded later do not matter)
        return [p["num_threads"] for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas" and "numpy" in p["filepath"]]

    def spy(*a):
        seen.append((numba.get_num_threads(), numpy_blas()))
        return real(*a)

    monkeypatch.setattr(nb_layer, "_layernorm1_backward_v2", spy)
    before_numba = numba.get_num_threads()
    before_blas = numpy_blas()
    rng = np.random.default_rng(7)
    params = random_params(64, 2, rng, dtype=np.float32)
    q, r, mask = random_inputs(100, 10, 64, rng, dtype=np.float32)  # 100·11·64 = 70400 ≥ SMALL_WORK
    for setting in (1, None):
        monkeypatch.setattr(nb.threads, "STEP_BLAS_THREADS", setting)  # where the knob lives (the package forwards)
        out, cache = nb.fusion_forward(params, q, r, mask, heads=2)
        nb.fusion_backward(params, cache, np.ones_like(q))
    assert seen[0] == (before_numba, [1] * len(before_blas))
    assert seen[1] == (before_numba, before_blas)
    assert numba.get_num_threads() == before_numba
    assert numpy_blas() == before_blas


def test_thread_knobs_set_on_the_package_reach_the_step():
    """``numba_cpu.STEP_BLAS_THREADS = ...`` (docs/performance.md) and ``SMALL_WORK`` are set on the package but
    read by the step in ``numba_cpu.threads``: the package forwards reads and writes there. (Set by hand, not with
    ``monkeypatch``: pytest ≥ 9.2 sees a forwarded name as absent from the module and would delete it on undo.)"""
    old = (nb.threads.STEP_BLAS_THREADS, nb.threads.SMALL_WORK)
    try:
        nb.STEP_BLAS_THREADS = None
        nb.SMALL_WORK = 7
        assert nb.threads.STEP_BLAS_THREADS is None and nb.threads.SMALL_WORK == 7
        assert nb.STEP_BLAS_THREADS is None and nb.SMALL_WORK == 7
        assert "STEP_BLAS_THREADS" not in vars(nb)  # one place holds the value
    finally:
        nb.STEP_BLAS_THREADS, nb.SMALL_WORK = old
    assert nb.threads.STEP_BLAS_THREADS == 1 and nb.threads.SMALL_WORK == 1 << 16


# --------------------------------------------------------------------------------------------
# relevance bias (docs/reco.md §2 "Relevance bias"): query-row logits + γ_h (token 0), + β_h·s_j (neighbour j)
# --------------------------------------------------------------------------------------------


def _relevance_params(D, heads, init, seed, rng, dtype=np.float64):
    """init_params(relevance=True) moved off the init: every array perturbed (under the identity init
    W_o = 0 cuts the attention path and β would get no gradient), β ≈ 0.5, γ ≈ 0 per head."""
    p = init_params(D, heads, relevance=True, init=init, dtype=np.float64, seed=seed)
    arrays = {}
    for name, a in p.items():
        if name == "rel_beta":
            a = 0.5 + 0.3 * rng.standard_normal(a.shape)
        elif name == "rel_gamma":
            a = 0.5 * rng.standard_normal(a.shape)
        elif a.ndim == 2:
            a = a + rng.standard_normal(a.shape) / np.sqrt(a.shape[0])
        else:
            a = a + 0.3 * rng.standard_normal(a.shape)
        arrays[name] = a.astype(dtype)
    return FusionParams(arrays, p.config)


def _raw_scores(B, k, rng, mask):
    """Raw cosines of close neighbours (features (s − 1)/0.02 in [−7.5, −0.5]); NaN in masked slots
    (the front door maps those to 0)."""
    s = rng.uniform(0.85, 0.99, (B, k))
    if mask is not None:
        s[~mask] = np.nan
    return s


# (B, k, D, heads, p_valid, init, seed)
_REL_CASES = [
    (3, 4, 16, 2, 0.5, "identity", 1),  # masked slots, row 0 fully masked
    (1, 10, 32, 4, None, "copy", 2),    # B = 1, no mask
    (1, 6, 24, 1, 0.5, "identity", 3),  # B = 1 with masked slots, one head
    (2, 0, 8, 1, None, "copy", 4),      # k = 0: scores [B,0], only γ acts (and has zero gradient)
    (4, 0, 8, 2, 0.5, "identity", 5),   # k = 0 with a [B,0] mask
    (5, 7, 32, 4, 0.6, "copy", 6),
    (100, 10, 64, 4, 0.7, "copy", 7),   # B·T·D ≥ SMALL_WORK: numba's threads
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", _REL_CASES, ids=lambda c: f"B{c[0]}k{c[1]}D{c[2]}h{c[3]}-{c[5]}")
def test_relevance_bias_matches_reference(case, dtype):
    """numba with the relevance bias against the float64 reference on the same (dtype-rounded) inputs,
    through the front door: the output and every gradient, rel_beta and rel_gamma included."""
    B, k, D, heads, p_valid, init, seed = case
    rng = np.random.default_rng(seed)
    p = _relevance_params(D, heads, init, seed, rng, dtype)
    q, r, mask = random_inputs(B, k, D, rng, dtype=dtype, p_valid=p_valid)
    scores = _raw_scores(B, k, rng, mask)
    dout = rng.standard_normal((B, D)).astype(dtype)
    p64 = FusionParams({n: a.astype(np.float64) for n, a in p.items()}, p.config)
    out_ref, c_ref = fusion_forward(p64, q.astype(np.float64), r.astype(np.float64), mask, scores=scores)
    g_ref = fusion_backward(p64, c_ref, dout.astype(np.float64), return_input_grads=True)
    out, cache = fusion_forward(p, q, r, mask, backend="numba", scores=scores)
    g = fusion_backward(p, cache, dout, return_input_grads=True)
    assert set(g) == set(g_ref) and set(RELEVANCE_NAMES) <= set(g)
    assert all(g[n].dtype == np.dtype(dtype) and g[n].shape == g_ref[n].shape for n in g)
    _close(out, out_ref, dtype, "out")
    for name in g_ref:
        if name != "b_k":
            _close(g[name], g_ref[name], dtype, name)
    # db_k vanishes analytically (softmax is shift-invariant; the bias does not depend on K): round-off
    # on both sides, held to the dW_k scale as in test_lowrank_attention_kernels_v2
    dbk_err = np.abs(g["b_k"].astype(np.float64) - g_ref["b_k"]).max()
    assert dbk_err <= (1e-10 if dtype == np.float64 else 1e-4 * np.abs(g_ref["w_k"]).max()), dbk_err
    if k == 0:  # one token: softmax ≡ 1, the bias has no effect and no gradient
        assert np.all(g["rel_gamma"] == 0) and np.all(g["rel_beta"] == 0)
    else:
        assert np.abs(g_ref["rel_beta"]).max() > 1e-3  # the check is not vacuous
    if mask is not None and k:
        assert np.all(g["retrieved"][~mask] == 0)  # a masked slot still gets exactly zero gradient


@pytest.mark.parametrize("dtype", DTYPES)
def test_relevance_bias_zero_is_the_paper_layer_bit_for_bit(dtype):
    """β = γ = 0 on numba reproduces the paper's layer (the same arrays minus rel_*) bit for bit: the
    output and every shared gradient."""
    for B, k, D, heads, p_valid, init, seed in _REL_CASES:
        rng = np.random.default_rng(seed)
        p = _relevance_params(D, heads, init, seed, rng, dtype)
        p["rel_beta"][...] = 0
        p["rel_gamma"][...] = 0
        paper = {n: a for n, a in p.items() if n not in RELEVANCE_NAMES}  # plain dict: heads= below
        q, r, mask = random_inputs(B, k, D, rng, dtype=dtype, p_valid=p_valid)
        scores = _raw_scores(B, k, rng, mask)
        dout = rng.standard_normal((B, D)).astype(dtype)
        out_rel, c_rel = fusion_forward(p, q, r, mask, backend="numba", scores=scores)
        out_paper, c_paper = fusion_forward(paper, q, r, mask, heads=heads, backend="numba")
        np.testing.assert_array_equal(out_rel, out_paper)
        np.testing.assert_array_equal(c_rel["prob"], c_paper["prob"])
        g_rel = fusion_backward(p, c_rel, dout, return_input_grads=True)
        g_paper = fusion_backward(paper, c_paper, dout, return_input_grads=True)
        assert set(g_rel) - set(g_paper) == set(RELEVANCE_NAMES)
        for name, a in g_paper.items():
            np.testing.assert_array_equal(g_rel[name], a, err_msg=name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lowrank_attention_kernel_v2_relevance_bias(dtype):
    """The v2 row-0 attention with the bias (scores, β, γ) against the reference attention given the
    reference's relevance_bias_forward; without them it is the plain kernel."""
    rng = np.random.default_rng(14)
    B, H, T, dh = 4, 2, 6, 4
    D = H * dh
    a1 = rng.standard_normal((B, T, D)).astype(dtype)
    w_q, w_k, w_v = (rng.standard_normal((D, D)).astype(dtype) for _ in range(3))
    scores = (2 * rng.standard_normal((B, T - 1))).astype(dtype)
    beta, gamma = rng.standard_normal(H).astype(dtype), rng.standard_normal(H).astype(dtype)
    valid = rng.random((B, T)) < 0.6
    valid[:, 0] = True
    valid[1, 1:] = False
    sh = lambda a: ref.split_heads(a, H)  # noqa: E731
    Q, K, V = a1 @ w_q, a1 @ w_k, a1 @ w_v
    bias, _ = ref.relevance_bias_forward(scores, beta, gamma)  # [B,h,1,T]
    want, cache = ref.attention_forward(sh(Q), sh(K), sh(V), valid, bias)
    q0h = np.ascontiguousarray(Q[:, 0]).reshape(B, H, dh).transpose(1, 0, 2)
    m = np.matmul(q0h, nb._heads_view(w_k, H).transpose(0, 2, 1))
    p, c = np.empty((B, H, T), dtype), np.empty((H, B, D), dtype)
    nb._attention_row0_forward_v2(a1, m, valid, 1.0 / np.sqrt(dh), p, c, np.empty((B, H, T)),
                                  scores, beta, gamma)
    _close(p, cache["p"][:, :, 0], dtype, "p")
    _close(np.matmul(c, nb._heads_view(w_v, H)).transpose(1, 0, 2).reshape(B, D), ref.merge_heads(want)[:, 0], dtype, "ctx")
    assert np.all(p[~np.broadcast_to(valid[:, None, :], p.shape)] == 0)
    p0 = np.empty_like(p)
    nb._attention_row0_forward_v2(a1, m, valid, 1.0 / np.sqrt(dh), p0, np.empty_like(c), np.empty((B, H, T)))
    assert not np.allclose(p0, p)  # the bias moved the probabilities


def test_relevance_bias_direct_call_needs_scores():
    """Called directly (not through the front door), a module with the bias refuses missing scores; the
    paper's layer ignores them."""
    rng = np.random.default_rng(15)
    p = _relevance_params(8, 2, "copy", 0, rng)
    q, r, mask = random_inputs(2, 3, 8, rng)
    with pytest.raises(ShapeError, match="scores"):
        nb.fusion_forward(p, q, r, mask, heads=2)
    with pytest.raises(ShapeError, match="scores"):
        nb.fusion_forward(p, q, r, mask, heads=2, scores=np.zeros((2, 4)))
    paper = {n: a for n, a in p.items() if n not in RELEVANCE_NAMES}
    out, cache = nb.fusion_forward(paper, q, r, mask, heads=2, scores=np.zeros((2, 3)))
    np.testing.assert_array_equal(out, nb.fusion_forward(paper, q, r, mask, heads=2)[0])
    assert "scores" not in cache and set(nb.fusion_backward(paper, cache, np.ones_like(q))) == set(paper)
