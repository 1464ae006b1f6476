"""Every CUDA kernel (every kept version) against NumPy / the reference step functions.

Runs under the CUDA simulator when no GPU driver is present (tests/conftest.py sets
``NUMBA_ENABLE_CUDASIM=1``), unchanged on a real GPU (``RECO_REF_REAL_CUDA=1``).  Shapes are tiny
and deliberately not multiples of the tile sizes, so every edge/guard path runs.
Tolerances: float64 ≤ 1e-10 absolute, float32 ≤ 1e-4 relative to the largest reference value.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

cuda = pytest.importorskip("numba.cuda", reason="numba-cuda not installed (extra: .[cuda] or .[test])")

from fusion_testlib import assert_matches_reference

from reco_ref.fusion import reference as ref
from reco_ref.fusion.constants import LN_EPS
from reco_ref.fusion.cuda import KernelConfig, attention, gelu, gemm, l2norm, layernorm, reduce
from reco_ref.fusion.cuda.config import get_config

pytestmark = pytest.mark.cuda

DTYPES = [np.float64, np.float32]


_close = assert_matches_reference


def _dev(a):
    return cuda.to_device(np.ascontiguousarray(a))


# ------------------------------------------------------------------------------------------------
# GEMM: three versions × NN / NT / TN × overwrite / accumulate, into a strided output view
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [1, 2, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gemm_versions(version, dtype):
    rng = np.random.default_rng(version)
    M, K, N = 7, 9, 5  # no multiples of the tile (4) or the register block (8)
    cfg = get_config()
    for ta in (False, True):
        for tb in (False, True):
            A = rng.standard_normal((K, M) if ta else (M, K)).astype(dtype)
            B = rng.standard_normal((N, K) if tb else (K, N)).astype(dtype)
            want = (A.T if ta else A) @ (B.T if tb else B)
            C = _dev(np.zeros((M, N), dtype))
            gemm.gemm(_dev(A), _dev(B), C, ta=ta, tb=tb, version=version, cfg=cfg)
            _close(C.copy_to_host(), want, dtype, f"v{version} ta={ta} tb={tb}")
    # accumulate into the right half of a wider buffer (a strided view, as the layer's K|V buffer)
    A = rng.standard_normal((M, K)).astype(dtype)
    B = rng.standard_normal((K, N)).astype(dtype)
    base = rng.standard_normal((M, 2 * N)).astype(dtype)
    buf = _dev(base)
    gemm.gemm(_dev(A), _dev(B), buf[:, N:], accumulate=True, version=version, cfg=cfg)
    want = base.copy()
    want[:, N:] += A @ B
    _close(buf.copy_to_host(), want, dtype, f"v{version} accumulate into view")


def test_gemm_larger_tiles_and_errors():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((13, 17))
    B = rng.standard_normal((17, 11))
    C = _dev(np.zeros((13, 11)))
    gemm.gemm(_dev(A), _dev(B), C, cfg=KernelConfig(tile=8, reg=2, threads=8, gemm_version=3))
    _close(C.copy_to_host(), A @ B, np.float64, "tile 8")
    with pytest.raises(ValueError, match="does not give"):
        gemm.gemm(_dev(A), _dev(B), _dev(np.zeros((13, 12))))
    C0 = _dev(np.ones((3, 2)))
    gemm.gemm(_dev(np.zeros((3, 0))), _dev(np.zeros((0, 2))), C0)  # empty inner dimension → zeros
    assert np.all(C0.copy_to_host() == 0)


def test_kernel_config_validation():
    with pytest.raises(ValueError, match="power of two"):
        KernelConfig(threads=12)
    with pytest.raises(ValueError, match="1024"):
        KernelConfig(tile=64)
    with pytest.raises(ValueError, match="gemm_version"):
        KernelConfig(gemm_version=4)


# ------------------------------------------------------------------------------------------------
# LayerNorm
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
def test_embed_layernorm_forward(version, dtype):
    rng = np.random.default_rng(10 + version)
    B, k, D = 2, 2, 11
    T = k + 1
    q, r = rng.standard_normal((B, D)).astype(dtype), rng.standard_normal((B, k, D)).astype(dtype)
    e_q, e_r, gamma, beta = (rng.standard_normal(D).astype(dtype) for _ in range(4))
    X = np.concatenate([(q + e_q)[:, None], r + e_r], axis=1)
    want, cache = ref.layernorm_forward(X, gamma, beta)
    xhat, rstd = cache["xhat"], cache["rstd"]
    bufs = [cuda.device_array(s, dtype) for s in [(B, T, D), (B, T, D), (B, T), (B, T, D)]]
    layernorm.embed_layernorm_forward(_dev(q), _dev(r), _dev(e_q), _dev(e_r), _dev(gamma), _dev(beta),
                                      LN_EPS, *bufs, version=version)
    x, xh, rs, a1 = (b.copy_to_host() for b in bufs)
    _close(x, X, dtype, "x")
    _close(xh, xhat, dtype, "xhat")
    _close(rs, rstd[..., 0], dtype, "rstd")
    _close(a1, want, dtype, "a1")


@pytest.mark.parametrize("dtype", DTYPES)
def test_residual_layernorm_and_backward(dtype):
    rng = np.random.default_rng(20)
    B, D = 3, 10
    x0, o, dy, da = (rng.standard_normal((B, D)).astype(dtype) for _ in range(4))
    b_o, gamma, beta = (rng.standard_normal(D).astype(dtype) for _ in range(3))
    H = x0 + (o + b_o)
    want, cache = ref.layernorm_forward(H, gamma, beta)
    h, xh, a2 = (cuda.device_array((B, D), dtype) for _ in range(3))
    rs = cuda.device_array(B, dtype)
    layernorm.bias_residual_layernorm_forward(_dev(x0), _dev(o), _dev(b_o), _dev(gamma), _dev(beta), LN_EPS,
                                              h, xh, rs, a2)
    _close(h.copy_to_host(), H, dtype, "h")
    _close(a2.copy_to_host(), want, dtype, "a2")
    # backward with the residual gradient added, and the parameter sums
    dx_want, dg_want, db_want = ref.layernorm_backward(cache, da)
    dx = cuda.device_array((B, D), dtype)
    layernorm.layernorm_backward(_dev(da), xh, rs, _dev(gamma), dx, resid=_dev(dy))
    _close(dx.copy_to_host(), dx_want + dy, dtype, "dx")
    dg, dbt = cuda.device_array(D, dtype), cuda.device_array(D, dtype)
    reduce.colsum(_dev(da).reshape(B, 1, D), dbt, w=xh.reshape(B, 1, D), out_w=dg)
    _close(dg.copy_to_host(), dg_want, dtype, "dgamma")
    _close(dbt.copy_to_host(), db_want, dtype, "dbeta")


# ------------------------------------------------------------------------------------------------
# Attention: v1 (all rows) and v2 (query row, fused layout), forward and backward, with masks;
# v2 also with the relevance bias (docs/reco.md §2) and its dβ, dγ reduction
# ------------------------------------------------------------------------------------------------


def _attn_inputs(rng, B, H, T, dh, dtype):
    q, k, v, dout = (rng.standard_normal((B, H, T, dh)).astype(dtype) for _ in range(4))
    valid = rng.random((B, T)) < 0.5
    valid[:, 0] = True
    if B > 1:
        valid[1, 1:] = False  # a row whose only valid key is the query token
    return q, k, v, dout, valid


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_v1_full(dtype):
    rng = np.random.default_rng(30)
    B, H, T, dh = 2, 2, 5, 3
    q, k, v, dout, valid = _attn_inputs(rng, B, H, T, dh, dtype)
    want, cache = ref.attention_forward(q, k, v, valid)
    out = cuda.device_array((B, H, T, dh), dtype)
    p = cuda.device_array((B, H, T, T), dtype)
    dq_, dk_, dv_ = (_dev(a) for a in (q, k, v))
    attention.attention_full_forward(dq_, dk_, dv_, _dev(valid), out, p)
    _close(out.copy_to_host(), want, dtype, "out")
    P = p.copy_to_host()
    _close(P, cache["p"], dtype, "p")
    assert np.all(P[~np.broadcast_to(valid[:, None, None, :], P.shape)] == 0)  # masked: exactly 0
    gq, gk, gv = ref.attention_backward(cache, dout)
    dq, dk, dv = (cuda.device_array((B, H, T, dh), dtype) for _ in range(3))
    attention.attention_full_backward(_dev(dout), dq_, dk_, dv_, p, dq, dk, dv)
    for name, got, w in (("dq", dq, gq), ("dk", dk, gk), ("dv", dv, gv)):
        _close(got.copy_to_host(), w, dtype, name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_v2_row0(dtype):
    rng = np.random.default_rng(31)
    B, H, T, dh = 2, 2, 5, 3
    D = H * dh
    q, k, v, dout, valid = _attn_inputs(rng, B, H, T, dh, dtype)
    b_q, b_k, b_v = (rng.standard_normal(D).astype(dtype) for _ in range(3))
    # the reference on biased, head-split tensors; only query row 0 is compared
    merge = ref.merge_heads
    Qb = ref.split_heads(merge(q) + b_q, H)
    Kb = ref.split_heads(merge(k) + b_k, H)
    Vb = ref.split_heads(merge(v) + b_v, H)
    want, cache = ref.attention_forward(Qb, Kb, Vb, valid)
    q0 = _dev(merge(q)[:, 0])                                  # [B,D] raw
    kv = _dev(np.concatenate([merge(k), merge(v)], axis=2))    # [B,T,2D] raw
    p = cuda.device_array((B, H, T), dtype)
    ctx = cuda.device_array((B, D), dtype)
    attention.attention_row0_forward(q0, _dev(b_q), kv, _dev(b_k), _dev(b_v), _dev(valid), H, p, ctx)
    _close(ctx.copy_to_host(), merge(want)[:, 0], dtype, "ctx")
    _close(p.copy_to_host(), cache["p"][:, :, 0], dtype, "p row 0")
    _close(kv.copy_to_host(), np.concatenate([merge(Kb), merge(Vb)], axis=2), dtype, "biased kv")
    # backward: gradient only on row 0 of the output
    d0 = np.zeros_like(dout)
    d0[:, :, 0] = dout[:, :, 0]
    gq, gk, gv = ref.attention_backward(cache, d0)
    dq0 = cuda.device_array((B, D), dtype)
    dkv = cuda.device_array((B, T, 2 * D), dtype)
    attention.attention_row0_backward(_dev(merge(d0)[:, 0]), p, q0, kv, _dev(valid), H, dq0, dkv)
    _close(dq0.copy_to_host(), merge(gq)[:, 0], dtype, "dq0")
    _close(dkv.copy_to_host(), np.concatenate([merge(gk), merge(gv)], axis=2), dtype, "dkv")


@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_v2_row0_relevance_bias(dtype, heads):
    """Row-0 kernels with the relevance bias (γ_h toward token 0, β_h·s_j toward neighbour j) against
    ref.attention_forward/backward given ref.relevance_bias_forward's bias, then dβ, dγ against
    ref.relevance_bias_backward.  Masked score slots hold NaN on the GPU (never read) and 0 in the reference."""
    rng = np.random.default_rng(32 + heads)
    B, T, dh = 3, 5, 2
    D = heads * dh
    q, k, v, dout, valid = _attn_inputs(rng, B, heads, T, dh, dtype)
    b_q, b_k, b_v = (rng.standard_normal(D).astype(dtype) for _ in range(3))
    scores = rng.standard_normal((B, T - 1)).astype(dtype)
    beta, gamma = rng.standard_normal(heads).astype(dtype), rng.standard_normal(heads).astype(dtype)
    scores_ref = np.where(valid[:, 1:], scores, 0).astype(dtype)
    scores_gpu = np.where(valid[:, 1:], scores, np.nan).astype(dtype)
    merge = ref.merge_heads
    Qb = ref.split_heads(merge(q) + b_q, heads)
    Kb = ref.split_heads(merge(k) + b_k, heads)
    Vb = ref.split_heads(merge(v) + b_v, heads)
    bias, rcache = ref.relevance_bias_forward(scores_ref, beta, gamma)  # [B,h,1,T]
    want, cache = ref.attention_forward(Qb, Kb, Vb, valid, bias)
    q0 = _dev(merge(q)[:, 0])
    kv = _dev(np.concatenate([merge(k), merge(v)], axis=2))
    dsc, dbeta_in, dgamma_in, dvalid = _dev(scores_gpu), _dev(beta), _dev(gamma), _dev(valid)
    p = cuda.device_array((B, heads, T), dtype)
    ctx = cuda.device_array((B, D), dtype)
    attention.attention_row0_forward(q0, _dev(b_q), kv, _dev(b_k), _dev(b_v), dvalid, heads, p, ctx,
                                      scores=dsc, rel_beta=dbeta_in, rel_gamma=dgamma_in)
    _close(ctx.copy_to_host(), merge(want)[:, 0], dtype, "ctx")
    _close(p.copy_to_host(), cache["p"][:, :, 0], dtype, "p row 0")
    # the bias matters here: without it row 0's probabilities differ
    _, cache0 = ref.attention_forward(Qb, Kb, Vb, valid)
    assert np.abs(cache0["p"][:, :, 0] - cache["p"][:, :, 0]).max() > 1e-2
    d0 = np.zeros_like(dout)
    d0[:, :, 0] = dout[:, :, 0]
    gq, gk, gv, gbias = ref.attention_backward(cache, d0)
    dq0 = cuda.device_array((B, D), dtype)
    dkv = cuda.device_array((B, T, 2 * D), dtype)
    ds = cuda.device_array((B, heads, T), dtype)
    attention.attention_row0_backward(_dev(merge(d0)[:, 0]), p, q0, kv, dvalid, heads, dq0, dkv, ds=ds)
    _close(dq0.copy_to_host(), merge(gq)[:, 0], dtype, "dq0")
    _close(dkv.copy_to_host(), np.concatenate([merge(gk), merge(gv)], axis=2), dtype, "dkv")
    _close(ds.copy_to_host(), gbias[:, :, 0], dtype, "dS row 0 (= dbias)")
    _, dbeta_want, dgamma_want = ref.relevance_bias_backward(rcache, gbias)
    dbeta, dgamma = cuda.device_array(heads, dtype), cuda.device_array(heads, dtype)
    attention.relevance_bias_backward(ds, dsc, dvalid, dbeta, dgamma)
    _close(dbeta.copy_to_host(), dbeta_want, dtype, "dbeta")
    _close(dgamma.copy_to_host(), dgamma_want, dtype, "dgamma")
    assert np.all(np.isfinite(dbeta.copy_to_host()))  # NaN scores in masked slots were never read


def test_attention_relevance_arguments_are_checked():
    B, T, D, heads = 1, 3, 4, 2
    kv = cuda.device_array((B, T, 2 * D), np.float64)
    args = (cuda.device_array((B, D)), kv[0, 0, :D], kv, kv[0, 0, :D], kv[0, 0, :D], _dev(np.ones((B, T), bool)),
            heads, cuda.device_array((B, heads, T)), cuda.device_array((B, D)))
    with pytest.raises(ValueError, match="together"):
        attention.attention_row0_forward(*args, scores=_dev(np.zeros((B, T - 1))))
    with pytest.raises(ValueError, match="shapes"):
        attention.attention_row0_forward(*args, scores=_dev(np.zeros((B, T))), rel_beta=_dev(np.zeros(heads)),
                                          rel_gamma=_dev(np.zeros(heads)))
    with pytest.raises(ValueError, match="dtype"):
        attention.attention_row0_forward(*args, scores=_dev(np.zeros((B, T - 1), np.float32)),
                                          rel_beta=_dev(np.zeros(heads)), rel_gamma=_dev(np.zeros(heads)))


def test_attention_shared_memory_limit_is_reported():
    valid = _dev(np.ones((1, 200), bool))
    kv = cuda.device_array((1, 200, 2 * 64), np.float64)
    with pytest.raises(ValueError, match="shared memory"):
        attention.attention_row0_forward(cuda.device_array((1, 64)), kv[0, 0, :64], kv, kv[0, 0, :64],
                                         kv[0, 0, :64], valid, 1, cuda.device_array((1, 1, 200)),
                                         cuda.device_array((1, 64)))


# ------------------------------------------------------------------------------------------------
# GELU, L2 normalisation, reductions
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu_versions_and_backward(dtype):
    rng = np.random.default_rng(40)
    N, F = 3, 7
    u = (3 * rng.standard_normal((N, F))).astype(dtype)
    bias = rng.standard_normal(F).astype(dtype)
    du = rng.standard_normal((N, F)).astype(dtype)
    out = cuda.device_array((N, F), dtype)
    gelu.gelu_forward(_dev(u), out)                                   # v1
    _close(out.copy_to_host(), ref.gelu_forward(u)[0], dtype, "v1")
    pre = _dev(u)
    gelu.bias_gelu_forward(pre, _dev(bias), out)                      # v2 (bias fused, pre in place)
    _close(pre.copy_to_host(), u + bias, dtype, "pre")
    want, gcache = ref.gelu_forward(u + bias)
    _close(out.copy_to_host(), want, dtype, "v2")
    g = _dev(du)
    gelu.gelu_backward(g, pre)
    _close(g.copy_to_host(), ref.gelu_backward(gcache, du), dtype, "backward")


@pytest.mark.parametrize("dtype", DTYPES)
def test_l2norm_forward_backward(dtype):
    rng = np.random.default_rng(50)
    B, D = 3, 9
    y, h, dout = (rng.standard_normal((B, D)).astype(dtype) for _ in range(3))
    b2 = rng.standard_normal(D).astype(dtype)
    Y = h + (y + b2)
    want, cache = ref.l2normalize_forward(Y)
    dy = _dev(y)
    out, norm = cuda.device_array((B, D), dtype), cuda.device_array(B, dtype)
    l2norm.bias_residual_l2norm_forward(dy, _dev(b2), _dev(h), out, norm)
    _close(out.copy_to_host(), want, dtype, "out")
    _close(norm.copy_to_host(), cache["norm"][:, 0], dtype, "norm")
    l2norm.l2norm_forward(_dev(Y), out, norm)
    _close(out.copy_to_host(), want, dtype, "plain")
    dz = cuda.device_array((B, D), dtype)
    l2norm.l2norm_backward(_dev(dout), out, norm, dz)
    _close(dz.copy_to_host(), ref.l2normalize_backward(cache, dout), dtype, "backward")


@pytest.mark.parametrize("dtype", DTYPES)
def test_colsum_versions_token_ranges(dtype):
    rng = np.random.default_rng(60)
    B, T, C = 3, 4, 10
    a = rng.standard_normal((B, T, C)).astype(dtype)
    w = rng.standard_normal((B, T, C)).astype(dtype)
    da, dw = _dev(a), _dev(w)
    out, out_w = cuda.device_array(C, dtype), cuda.device_array(C, dtype)
    for t0, t1 in ((0, T), (0, 1), (1, T), (2, 2)):
        reduce.colsum_v1(da, out, t0=t0, t1=t1)
        _close(out.copy_to_host(), a[:, t0:t1].sum(axis=(0, 1)), dtype, f"v1 [{t0},{t1})")
        reduce.colsum(da, out, w=dw, out_w=out_w, t0=t0, t1=t1)
        _close(out.copy_to_host(), a[:, t0:t1].sum(axis=(0, 1)), dtype, f"v2 [{t0},{t1})")
        _close(out_w.copy_to_host(), (a * w)[:, t0:t1].sum(axis=(0, 1)), dtype, f"v2 prod [{t0},{t1})")
    reduce.colsum(da[:, :, 3:], out[:7])  # a strided column slice, as the layer's dK / dV halves
    _close(out.copy_to_host()[:7], a[:, :, 3:].sum(axis=(0, 1)), dtype, "strided")
    with pytest.raises(ValueError, match="token range"):
        reduce.colsum(da, out, t0=3, t1=2)


def test_fill_add_sum_all():
    x = _dev(np.arange(12.0).reshape(3, 4))
    reduce.add_(x[:, 1:3], _dev(np.ones((3, 2))))
    want = np.arange(12.0).reshape(3, 4)
    want[:, 1:3] += 1
    np.testing.assert_array_equal(x.copy_to_host(), want)
    out = cuda.device_array(1, np.float64)
    reduce.sum_all(_dev(np.arange(13.0)), out, scale=0.5)
    assert out.copy_to_host()[0] == 0.5 * 78
    reduce.fill(x, 2.5)
    assert np.all(x.copy_to_host() == 2.5)


# ------------------------------------------------------------------------------------------------
# InfoNCE (device τ) and AdamW (device state) against the NumPy implementations
# ------------------------------------------------------------------------------------------------


def test_infonce_device_temperature_and_clamp():
    from reco_ref.fusion.cuda import infonce_backward_device, infonce_forward_device
    from reco_ref.train.losses import infonce_backward, infonce_forward

    rng = np.random.default_rng(70)
    a, b = rng.standard_normal((5, 3)), rng.standard_normal((5, 3))
    for tau in (1.0, math.log(100.0), 4.7):  # below, exactly at (gradient flows), above the clamp
        L_ref, c = infonce_forward(a, b, tau)
        da_r, db_r, dt_r = infonce_backward(c, 0.5)
        loss, cache = infonce_forward_device(_dev(a), _dev(b), _dev(np.array([tau])))
        da, db, dt = infonce_backward_device(cache, _dev(np.array([0.5])))
        _close(loss.copy_to_host()[0], L_ref, np.float64, f"loss tau={tau}")
        _close(da.copy_to_host(), da_r, np.float64, "da")
        _close(db.copy_to_host(), db_r, np.float64, "db")
        _close(dt.copy_to_host()[0], dt_r, np.float64, "dtau")
    assert dt.copy_to_host()[0] == 0.0


@pytest.mark.parametrize("dtype", DTYPES)
def test_adamw_device_matches_numpy(dtype):
    from reco_ref.fusion.cuda import adamw_init_device, adamw_step_device, state_to_host
    from reco_ref.train.optim import adamw_init, adamw_step

    rng = np.random.default_rng(80)
    params = {"w": rng.standard_normal((3, 4)).astype(dtype), "b": rng.standard_normal(5).astype(dtype)}
    dparams = {n: _dev(p) for n, p in params.items()}
    state, dstate = adamw_init(params), adamw_init_device(dparams)
    for step in range(3):
        grads = {n: rng.standard_normal(p.shape).astype(dtype) for n, p in params.items()}
        adamw_step(params, grads, state, 1e-2 * (step + 1))
        adamw_step_device(dparams, {n: _dev(g) for n, g in grads.items()}, dstate, 1e-2 * (step + 1))
    host_state = state_to_host(dstate)
    assert int(host_state["step"]) == 3
    for n in params:
        _close(dparams[n].copy_to_host(), params[n], dtype, n)
        _close(host_state["m." + n], state["m." + n], dtype, "m." + n)
        _close(host_state["v." + n], state["v." + n], dtype, "v." + n)
