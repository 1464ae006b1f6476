"""Numba CPU backend of the memory-attention classifier: same signatures as :mod:`reco_ref.classify.reference`.

GEMMs stay on BLAS (``numpy @``); the row-wise work BLAS does badly runs in the fusion layer's own
``@njit(parallel=True)`` kernels (:mod:`reco_ref.fusion.numba_cpu`), no new kernel here: LayerNorm over rows
is its LN_2 pair (``_bias_residual_layernorm_forward`` with a zero residual and bias, ``_layernorm2_backward``
with a zero residual gradient), and the single-query masked multi-head attention is its query-row pair
(``_attention_row0_forward`` / ``_backward``: one query token over ``T`` tokens, ``[K | V]`` packed side by
side, biases added in place).
Results equal the reference up to rounding (tests/classify).
"""

from __future__ import annotations

import numpy as np

from ..fusion.constants import LN_EPS
from ..fusion.numba_cpu import _attention_row0_backward, _attention_row0_forward, \
    _bias_residual_layernorm_forward, _layernorm2_backward, _nblk
from .reference import add_input_grads, cross_entropy_backward, cross_entropy_forward, uniform_attention_backward, \
    uniform_attention_forward

__all__ = ["classify_forward", "classify_backward", "cross_entropy_forward", "cross_entropy_backward"]


def _layernorm_forward(x, gamma, beta):
    """LayerNorm over the last axis of ``x [..., D]`` with the fusion layer's LN_2 kernel (zero residual, bias)."""
    shape = x.shape
    x3 = np.ascontiguousarray(x.reshape(-1, 1, shape[-1]))  # [N, 1, D]: the kernel reads token 0
    N, D = x3.shape[0], x3.shape[2]
    zero = np.zeros((N, D), x.dtype)  # the kernel's residual O and bias b_o, here absent
    h, xhat, out = np.empty((N, D), x.dtype), np.empty((N, D), x.dtype), np.empty((N, D), x.dtype)
    rstd = np.empty(N, x.dtype)
    _bias_residual_layernorm_forward(x3, zero, zero[0], gamma, beta, x.dtype.type(LN_EPS), h, xhat, rstd, out)
    return out.reshape(shape), {"xhat": xhat, "rstd": rstd, "gamma": gamma, "shape": shape}


def _layernorm_backward(cache, dout):
    """dx, dγ, dβ with the fusion layer's LN_2 backward kernel (zero residual gradient)."""
    xhat = cache["xhat"]  # [N, D]
    d2 = np.ascontiguousarray(dout.reshape(xhat.shape))  # [N, D]
    dx = np.empty_like(d2)
    part = np.empty((_nblk(d2.shape[0]), 2, d2.shape[1]), d2.dtype)  # per-block partial dγ, dβ
    _layernorm2_backward(d2, xhat, cache["rstd"], cache["gamma"], np.zeros_like(d2), dx, part)
    s = part.sum(axis=0, dtype=np.float64).astype(d2.dtype)
    return dx.reshape(cache["shape"]), s[0], s[1]


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
