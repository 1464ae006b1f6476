"""Numba CPU backend of the memory-attention classifier: same signatures as :mod:`reco_ref.classify.reference`.

GEMMs stay on BLAS (``numpy @``); the row-wise work BLAS does badly runs in ``@njit(parallel=True)`` kernels:
LayerNorm forward/backward over rows (statistics accumulated in float64, here), and the single-query masked
multi-head attention, forward and backward — the fusion layer's own query-row kernels
(:func:`reco_ref.fusion.numba_cpu._attention_row0_forward` / ``_backward``: one query token over ``T`` tokens
with ``[K | V]`` packed side by side and the biases added in place), which are exactly this module's attention.
Results equal the reference up to rounding (tests/classify).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ..fusion.constants import LN_EPS
from ..fusion.numba_cpu import _attention_row0_backward, _attention_row0_forward
from .reference import add_input_grads, cross_entropy_backward, cross_entropy_forward, uniform_attention_backward, \
    uniform_attention_forward

__all__ = ["classify_forward", "classify_backward", "cross_entropy_forward", "cross_entropy_backward"]

_JIT = dict(parallel=True, cache=True, fastmath=False, nogil=True)


@njit(**_JIT)
def _ln_forward(x, gamma, beta, eps, out, xhat, rstd):
    """x [N, D] -> out, xhat [N, D], rstd [N]: LayerNorm over each row."""
    N, D = x.shape
    for i in prange(N):
        mu = 0.0
        for j in range(D):
            mu += x[i, j]
        mu /= D
        var = 0.0
        for j in range(D):
            d = x[i, j] - mu
            var += d * d
        r = 1.0 / math.sqrt(var / D + eps)
        rstd[i] = r
        for j in range(D):
            xh = (x[i, j] - mu) * r
            xhat[i, j] = xh
            out[i, j] = xh * gamma[j] + beta[j]


@njit(**_JIT)
def _ln_backward(dout, xhat, rstd, gamma, dx):
    """dx = rstd (g - mean(g) - xhat mean(g xhat)), g = dout * gamma, per row."""
    N, D = dout.shape
    for i in prange(N):
        s1 = 0.0
        s2 = 0.0
        for j in range(D):
            g = dout[i, j] * gamma[j]
            s1 += g
            s2 += g * xhat[i, j]
        s1 /= D
        s2 /= D
        for j in range(D):
            dx[i, j] = (dout[i, j] * gamma[j] - s1 - xhat[i, j] * s2) * rstd[i]


def _layernorm_forward(x, gamma, beta):
    shape = x.shape
    x2 = np.ascontiguousarray(x.reshape(-1, shape[-1]))  # [N, D]
    out = np.empty_like(x2)
    xhat = np.empty_like(x2)
    rstd = np.empty(x2.shape[0], x2.dtype)
    _ln_forward(x2, gamma, beta, LN_EPS, out, xhat, rstd)
    return out.reshape(shape), {"xhat": xhat, "rstd": rstd, "gamma": gamma, "shape": shape}


def _layernorm_backward(cache, dout):
    d2 = np.ascontiguousarray(dout.reshape(cache["xhat"].shape))  # [N, D]
    dx = np.empty_like(d2)
    _ln_backward(d2, cache["xhat"], cache["rstd"], cache["gamma"], dx)
    return dx.reshape(cache["shape"]), (d2 * cache["xhat"]).sum(axis=0), d2.sum(axis=0)


def classify_forward(params, query, keys=None, values=None, valid=None, *, heads=1, attention="softmax",
                     logit_scale=1.0):
    """Same contract as :func:`reco_ref.classify.reference.classify_forward`."""
    p = params
    cache = {"memory": "w_v" in p and keys is not None, "attention": attention, "heads": int(heads),
             "scale": logit_scale}
    z = query  # [B, D]
    if cache["memory"]:
        B, n, Dk = keys.shape
        cache["keys_shape"] = keys.shape
        Wd = p["w_v"].shape[1]
        if valid is None:
            valid = np.ones((B, n), dtype=bool)
        Av, cache["lnv"] = _layernorm_forward(values, p["lnv_gamma"], p["lnv_beta"])  # [B, n, Dv]
        cache["Av"] = Av
        if attention == "uniform":
            c, cache["att"] = uniform_attention_forward(Av @ p["w_v"] + p["b_v"], valid)  # [B, W]
        else:
            Aq, cache["lnq"] = _layernorm_forward(query, p["lnq_gamma"], p["lnq_beta"])  # [B, D]
            Ak, cache["lnk"] = _layernorm_forward(keys, p["lnk_gamma"], p["lnk_beta"])  # [B, n, Dk]
            Q = Aq @ p["w_q"]  # [B, W]; the kernel adds b_q (and b_k, b_v) in place
            KV = np.concatenate([Ak @ p["w_k"], Av @ p["w_v"]], axis=-1)  # [B, n, 2W] = [K | V] before biases
            P = np.empty((B, heads, n), query.dtype)  # [B, h, n]
            c = np.empty((B, Wd), query.dtype)  # [B, W]
            scratch = np.empty((B, heads, n), np.float64)  # [B, h, n]
            _attention_row0_forward(Q, p["b_q"], KV, np.concatenate([p["b_k"], p["b_v"]]),
                                    np.ascontiguousarray(valid), heads, P, c, scratch)
            cache.update(Aq=Aq, Ak=Ak, Q=Q, KV=KV, P=P, valid=np.ascontiguousarray(valid))
        cache["ctx"] = c
        z = query + c @ p["w_o"] + p["b_o"]  # [B, D]
    cache["z"] = z * z.dtype.type(logit_scale)  # [B, D] s·z
    return cache["z"] @ p["w_c"] + p["b_c"], cache  # [B, C]


def classify_backward(params, cache, dlogits, *, return_input_grads=False):
    """Same contract as :func:`reco_ref.classify.reference.classify_backward`."""
    p = params
    z = cache["z"]
    grads = {"w_c": z.T @ dlogits, "b_c": dlogits.sum(axis=0)}
    dz = (dlogits @ p["w_c"].T) * dlogits.dtype.type(cache["scale"])  # [B, D]
    dq = dz
    dkeys = dvalues = None  # input gradients, set on the memory path
    if cache["memory"]:
        c = cache["ctx"]
        grads["w_o"], grads["b_o"] = c.T @ dz, dz.sum(axis=0)
        dc = dz @ p["w_o"].T  # [B, W]
        if cache["attention"] == "uniform":
            dV = uniform_attention_backward(cache["att"], dc)  # [B, n, W]
        else:
            KV, Wd = cache["KV"], dc.shape[1]
            dQ, dKV = np.empty_like(cache["Q"]), np.empty_like(KV)  # [B, W], [B, n, 2W]
            scratch = np.empty(cache["P"].shape, np.float64)
            _attention_row0_backward(np.ascontiguousarray(dc), cache["P"], cache["Q"], KV, cache["valid"],
                                     cache["heads"], dQ, dKV, scratch)
            dK, dV = dKV[..., :Wd], dKV[..., Wd:]  # [B, n, W] each
            Aq, Ak = cache["Aq"], cache["Ak"]
            grads["w_q"], grads["b_q"] = Aq.T @ dQ, dQ.sum(axis=0)
            dq_ln, grads["lnq_gamma"], grads["lnq_beta"] = _layernorm_backward(cache["lnq"], dQ @ p["w_q"].T)
            dq = dz + dq_ln
            dK2 = dK.reshape(-1, dK.shape[-1])
            grads["w_k"], grads["b_k"] = Ak.reshape(-1, Ak.shape[-1]).T @ dK2, dK2.sum(axis=0)
            dkeys, grads["lnk_gamma"], grads["lnk_beta"] = _layernorm_backward(cache["lnk"], dK @ p["w_k"].T)
        Av = cache["Av"]
        dV2 = dV.reshape(-1, dV.shape[-1])
        grads["w_v"], grads["b_v"] = Av.reshape(-1, Av.shape[-1]).T @ dV2, dV2.sum(axis=0)
        dvalues, grads["lnv_gamma"], grads["lnv_beta"] = _layernorm_backward(cache["lnv"], dV @ p["w_v"].T)
    if return_input_grads:
        add_input_grads(grads, cache, dq, dkeys, dvalues)
    return grads
