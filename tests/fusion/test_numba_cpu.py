"""Numba CPU backend: the fused kernels one by one against the reference step functions, the dead-work
skipping, float32/float64, and the on-disk kernel cache (the second process must not recompile).

Layer-level equivalence (every output and gradient, many shapes) is in test_backends.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from fusion_testlib import assert_matches_reference, random_inputs, random_params

from reco_ref.fusion import numba_cpu as nb
from reco_ref.fusion import reference as ref
from reco_ref.fusion.constants import LN_EPS

DTYPES = [np.float64, np.float32]


_close = assert_matches_reference


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
    nb._layernorm1_backward(da1, dq_proj, dh, xhat, rstd, gamma, dx, part)
    s = part.sum(axis=0)
    _close(dx, dx_want, dtype, "dx")
    _close(s[0], dg_want, dtype, "dgamma")
    _close(s[1], db_want, dtype, "dbeta")
    _close(s[2], dx_want[:, 0].sum(0), dtype, "de_q")
    _close(s[3], dx_want[:, 1:].sum((0, 1)), dtype, "de_r")


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
    """The cache holds token-0-only buffers for Q, LN_2 and the MLP, and K/V for all tokens."""
    rng = np.random.default_rng(4)
    params = random_params(8, 2, rng)
    q, r, mask = random_inputs(3, 5, 8, rng)
    _, cache = nb.fusion_forward(params, q, r, mask, heads=2)
    assert cache["kv"].shape == (3, 6, 16)
    assert cache["q0"].shape == (3, 8) and cache["a2"].shape == (3, 8) and cache["pre"].shape == (3, 32)


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
    real = nb._layernorm1_backward
    monkeypatch.setattr(nb, "_layernorm1_backward", lambda *a: (seen.append(numba.get_num_threads()), real(*a))[1])
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
