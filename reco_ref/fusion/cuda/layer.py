"""The fusion layer on the GPU from the step kernels, device-resident (docs/reco.md §2).

:func:`fusion_forward_device` / :func:`fusion_backward_device` take and return numba device
arrays, so a training step (forward → loss → backward → AdamW) never copies to the host.  The
host-array contract functions in :mod:`reco_ref.fusion.cuda` wrap them.

Like the Numba CPU backend, only what the read-out ``Y[:,0]`` depends on is computed: ``K``, ``V``,
``LN_1`` and their gradients for all ``T`` tokens; ``Q``, the attention row, ``W_o``, ``LN_2`` and
the MLP for the query token only.  Kernel sequence (shapes; ``F = mlp_ratio·D``)::

    forward                                             backward
    embed_layernorm_forward  X, A1      [B,T,D]         l2norm_backward       dY0        [B,D]
    gemm NN  K = A1 W_k, V = A1 W_v     [B*T,2D]        colsum / gemm TN / NT db2, dW2, dU
    gemm NN  Q0 = A1[:,0] W_q           [B,D]           gelu_backward         dpre       [B,F]
    attention_row0_forward  P0, ctx     [B,h,T],[B,D]   colsum / gemm TN / NT db1, dW1, dA2
    gemm NN  O0 = ctx W_o               [B,D]           layernorm_backward    dH0 (+dY0), colsum dγ2 dβ2
    bias_residual_layernorm_forward H0, A2              colsum / gemm TN / NT dbo, dWo, dctx
    gemm NN  pre = A2 W_1               [B,F]           attention_row0_backward dQ0, dK, dV
    bias_gelu_forward  U                [B,F]           colsum / gemm TN      db{q,k,v}, dW{q,k,v}
    gemm NN  Y0 = U W_2                 [B,D]           gemm NT (+acc)        dA1 = dK W_kᵀ + dV W_vᵀ (+ dQ0 W_qᵀ on token 0)
    bias_residual_l2norm_forward  out   [B,D]           layernorm_backward    dX; add_ dH0 on token 0; colsum dγ1 dβ1 de_q de_r

With the relevance bias (docs/reco.md §2 "Relevance bias" [ours]: ``rel_beta, rel_gamma [h]`` in the
parameters, score features ``s [B,k]`` given to the forward), ``attention_row0_forward`` adds
``γ_h`` to the query row's logit toward token 0 and ``β_h·s[b,j-1]`` toward neighbour ``j`` before
the mask; ``attention_row0_backward`` also writes that row's ``dS [B,h,T]`` and
``relevance_bias_backward`` reduces it to ``dβ_h = Σ_{b,j≥1} dS·s``, ``dγ_h = Σ_b dS[:,:,0]``.
Without them nothing of this runs (the kernels are separate specialisations).
"""

from __future__ import annotations

import numpy as np
from numba import cuda

from ..constants import LN_EPS
from ..params import PARAM_NAMES, RELEVANCE_NAMES
from .attention import attention_row0_backward, attention_row0_forward, relevance_bias_backward
from .config import KernelConfig, get_config
from .gelu import bias_gelu_forward, gelu_backward
from .gemm import gemm
from .l2norm import bias_residual_l2norm_forward, l2norm_backward
from .layernorm import bias_residual_layernorm_forward, embed_layernorm_forward, layernorm_backward
from .reduce import add_, colsum

__all__ = [
    "params_to_device",
    "params_to_host",
    "valid_to_device",
    "fusion_forward_device",
    "fusion_backward_device",
]

def params_to_device(params) -> dict:
    """Host parameter dict → dict of contiguous device arrays (same names)."""
    return {name: cuda.to_device(np.ascontiguousarray(params[name])) for name in params}


def params_to_host(dparams) -> dict:
    """Device parameter (or gradient) dict → dict of NumPy arrays."""
    return {name: d.copy_to_host() for name, d in dparams.items()}


def valid_to_device(mask, B: int, k: int):
    """``valid [B,T]`` bool on the device: token 0 (the query) always valid, then ``mask [B,k]``."""
    valid = np.ones((B, k + 1), dtype=np.bool_)
    if mask is not None and k:
        valid[:, 1:] = np.asarray(mask, dtype=np.bool_)
    return cuda.to_device(valid)


def _empty(shape, dtype):
    return cuda.device_array(shape, dtype=dtype)


def _has_relevance(dparams) -> bool:
    """The parameters carry the relevance bias (both of :data:`RELEVANCE_NAMES`; one alone is an error)."""
    has = [n in dparams for n in RELEVANCE_NAMES]
    if any(has) and not all(has):
        raise ValueError(f"params: has one of {list(RELEVANCE_NAMES)} but not both")
    return all(has)


def fusion_forward_device(dparams, query, retrieved, valid, *, heads: int, scores=None,
                          cfg: KernelConfig | None = None):
    """Forward on device arrays.

    Parameters
    ----------
    dparams : dict of device arrays (see :func:`params_to_device`)
    query : device array [B,D]
    retrieved : device array [B,k,D]
    valid : device array [B,T] bool (:func:`valid_to_device`)
    heads : int
    scores : device array [B,k], or None
        The neighbours' score features ``(cosine − center)/width`` (same dtype as the parameters;
        masked slots are never read). Required when ``dparams`` holds ``rel_beta, rel_gamma`` [h]
        (the relevance bias, docs/reco.md §2), ignored otherwise.

    Returns
    -------
    out : device array [B,D]
    cache : dict of device arrays (and ``heads``, ``backend="cuda"``)
    """
    cfg = cfg or get_config()
    p = dparams
    dt = p["w_q"].dtype
    B, D = query.shape
    T = retrieved.shape[1] + 1
    F = p["w_1"].shape[1]
    rel = _has_relevance(p)
    if rel:
        if scores is None:
            raise ValueError("fusion_forward_device: the parameters have the relevance bias (rel_beta, rel_gamma) "
                             "and need scores [B,k]; got None")
        if tuple(scores.shape) != (B, T - 1):
            raise ValueError(f"fusion_forward_device: scores shape {tuple(scores.shape)}, expected ({B}, {T - 1})")
    else:
        scores = None
    x = _empty((B, T, D), dt)
    xhat1 = _empty((B, T, D), dt)
    rstd1 = _empty((B, T), dt)
    a1 = _empty((B, T, D), dt)
    embed_layernorm_forward(query, retrieved, p["e_query"], p["e_neighbor"], p["ln1_gamma"], p["ln1_beta"],
                            LN_EPS, x, xhat1, rstd1, a1, cfg=cfg)
    a1f = a1.reshape(B * T, D)                                 # [B*T,D]
    kv = _empty((B, T, 2 * D), dt)                             # [B,T,2D]: K | V
    kvf = kv.reshape(B * T, 2 * D)
    gemm(a1f, p["w_k"], kvf[:, :D], cfg=cfg)
    gemm(a1f, p["w_v"], kvf[:, D:], cfg=cfg)
    q0 = _empty((B, D), dt)
    gemm(a1[:, 0, :], p["w_q"], q0, cfg=cfg)                   # token 0 only
    prob = _empty((B, heads, T), dt)
    ctx = _empty((B, D), dt)
    rel_kw = dict(scores=scores, rel_beta=p["rel_beta"], rel_gamma=p["rel_gamma"]) if rel else {}
    attention_row0_forward(q0, p["b_q"], kv, p["b_k"], p["b_v"], valid, heads, prob, ctx, cfg=cfg,
                           **rel_kw)                           # (+ γ_h, β_h·s_j on the logits)
    o = _empty((B, D), dt)
    gemm(ctx, p["w_o"], o, cfg=cfg)
    h0 = _empty((B, D), dt)
    xhat2 = _empty((B, D), dt)
    rstd2 = _empty((B,), dt)
    a2 = _empty((B, D), dt)
    bias_residual_layernorm_forward(x[:, 0, :], o, p["b_o"], p["ln2_gamma"], p["ln2_beta"], LN_EPS,
                                    h0, xhat2, rstd2, a2, cfg=cfg)
    pre = _empty((B, F), dt)
    gemm(a2, p["w_1"], pre, cfg=cfg)
    u = _empty((B, F), dt)
    bias_gelu_forward(pre, p["b_1"], u, cfg=cfg)
    y = _empty((B, D), dt)
    gemm(u, p["w_2"], y, cfg=cfg)
    out = _empty((B, D), dt)
    norm = _empty((B,), dt)
    bias_residual_l2norm_forward(y, p["b_2"], h0, out, norm, cfg=cfg)
    cache = dict(backend="cuda", heads=int(heads), B=B, T=T, D=D, F=F, valid=valid, xhat1=xhat1,
                 rstd1=rstd1, a1=a1, kv=kv, q0=q0, prob=prob, ctx=ctx, xhat2=xhat2, rstd2=rstd2, a2=a2,
                 pre=pre, u=u, out=out, norm=norm, scores=scores)
    return out, cache


def fusion_backward_device(dparams, cache, dout, *, return_input_grads: bool = False,
                           cfg: KernelConfig | None = None) -> dict:
    """Backward on device arrays: ``dout [B,D]`` → dict of device gradients (parameter names, plus
    ``"query" [B,D]`` and ``"retrieved" [B,k,D]`` views when asked)."""
    cfg = cfg or get_config()
    p = dparams
    dt = p["w_q"].dtype
    B, T, D, F, heads = cache["B"], cache["T"], cache["D"], cache["F"], cache["heads"]
    rel = cache.get("scores") is not None
    if rel != _has_relevance(p):
        raise ValueError("fusion_backward_device: the parameters and the forward's cache disagree on the "
                         "relevance bias (rel_beta, rel_gamma)")
    names = PARAM_NAMES + RELEVANCE_NAMES if rel else PARAM_NAMES
    g = {name: _empty(p[name].shape, dt) for name in names}
    b3 = lambda a: a.reshape(a.shape[0], 1, a.shape[1])  # noqa: E731  [N,C] → [N,1,C] for colsum
    # read-out and MLP (token 0)
    dy = _empty((B, D), dt)
    l2norm_backward(dout, cache["out"], cache["norm"], dy, cfg=cfg)
    colsum(b3(dy), g["b_2"], cfg=cfg)
    gemm(cache["u"], dy, g["w_2"], ta=True, cfg=cfg)          # dW2 = Uᵀ dY       [F,D]
    dpre = _empty((B, F), dt)
    gemm(dy, p["w_2"], dpre, tb=True, cfg=cfg)                # dU = dY W2ᵀ      [B,F]
    gelu_backward(dpre, cache["pre"], cfg=cfg)
    colsum(b3(dpre), g["b_1"], cfg=cfg)
    gemm(cache["a2"], dpre, g["w_1"], ta=True, cfg=cfg)       # dW1 = A2ᵀ dpre   [D,F]
    da2 = _empty((B, D), dt)
    gemm(dpre, p["w_1"], da2, tb=True, cfg=cfg)               # dA2 = dpre W1ᵀ   [B,D]
    # LN_2 + residual
    dh0 = _empty((B, D), dt)
    layernorm_backward(da2, cache["xhat2"], cache["rstd2"], p["ln2_gamma"], dh0, resid=dy, cfg=cfg)
    colsum(b3(da2), g["ln2_beta"], w=b3(cache["xhat2"]), out_w=g["ln2_gamma"], cfg=cfg)
    # output projection
    colsum(b3(dh0), g["b_o"], cfg=cfg)
    gemm(cache["ctx"], dh0, g["w_o"], ta=True, cfg=cfg)
    dctx = _empty((B, D), dt)
    gemm(dh0, p["w_o"], dctx, tb=True, cfg=cfg)
    # attention (query row)
    dq0 = _empty((B, D), dt)
    dkv = _empty((B, T, 2 * D), dt)
    ds = _empty((B, heads, T), dt) if rel else None            # query row's dS [B,h,T] (relevance only)
    attention_row0_backward(dctx, cache["prob"], cache["q0"], cache["kv"], cache["valid"], heads, dq0, dkv,
                            ds=ds, cfg=cfg)
    if rel:  # dβ_h = Σ_{b,j≥1} dS[b,h,j]·s[b,j-1],  dγ_h = Σ_b dS[b,h,0]
        relevance_bias_backward(ds, cache["scores"], cache["valid"], g["rel_beta"], g["rel_gamma"], cfg=cfg)
    dkvf = dkv.reshape(B * T, 2 * D)
    a1 = cache["a1"]
    a1f = a1.reshape(B * T, D)
    colsum(dkv[:, :, :D], g["b_k"], cfg=cfg)
    colsum(dkv[:, :, D:], g["b_v"], cfg=cfg)
    gemm(a1f, dkvf[:, :D], g["w_k"], ta=True, cfg=cfg)
    gemm(a1f, dkvf[:, D:], g["w_v"], ta=True, cfg=cfg)
    colsum(b3(dq0), g["b_q"], cfg=cfg)
    gemm(a1[:, 0, :], dq0, g["w_q"], ta=True, cfg=cfg)
    da1 = _empty((B, T, D), dt)
    da1f = da1.reshape(B * T, D)
    gemm(dkvf[:, :D], p["w_k"], da1f, tb=True, cfg=cfg)
    gemm(dkvf[:, D:], p["w_v"], da1f, tb=True, accumulate=True, cfg=cfg)
    gemm(dq0, p["w_q"], da1[:, 0, :], tb=True, accumulate=True, cfg=cfg)  # token 0's Q path
    # LN_1, residual, type embeddings
    dx = _empty((B, T, D), dt)
    layernorm_backward(da1f, cache["xhat1"].reshape(B * T, D), cache["rstd1"].reshape(B * T), p["ln1_gamma"],
                       dx.reshape(B * T, D), cfg=cfg)
    colsum(da1, g["ln1_beta"], w=cache["xhat1"], out_w=g["ln1_gamma"], cfg=cfg)
    add_(dx[:, 0, :], dh0, cfg=cfg)                            # residual H = X + O on token 0
    colsum(dx, g["e_query"], t0=0, t1=1, cfg=cfg)
    colsum(dx, g["e_neighbor"], t0=1, t1=T, cfg=cfg)
    if return_input_grads:
        g["query"] = dx[:, 0, :]
        g["retrieved"] = dx[:, 1:, :]
    return g
