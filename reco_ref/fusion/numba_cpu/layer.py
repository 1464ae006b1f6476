"""The fusion layer's forward and backward on the CPU: GEMMs on BLAS between the fused numba kernels.

:func:`fusion_forward` / :func:`fusion_backward` have the backend contract's signatures (see
:mod:`reco_ref.fusion.numba_cpu` for how the work is split and which dead work is skipped); each runs its body
under the thread policy of :mod:`.threads` and ticks :mod:`.profile` between stages.
"""

from __future__ import annotations

import math

import numpy as np

from ...errors import ShapeError
from ..constants import GELU_INV_SQRT2 as _INV_SQRT2, GELU_INV_SQRT_2PI as _INV_SQRT2PI, LN_EPS
from .attention import _attention_row0_backward_v2, _attention_row0_forward_v2
from .gelu import _bias_gelu_forward, _bias_gelu_forward_f32, _gelu_backward_colsum_f32, _gelu_backward_inplace
from .gemv import _fold_heads_v1, _heads_view, _mm, _unfold_heads_v1
from .l2norm import _bias_residual_l2norm_forward, _l2norm_backward
from .layernorm import (_bias_residual_layernorm_forward, _embed_layernorm_forward, _layernorm1_backward_v2,
                        _layernorm2_backward)
from .profile import _tick
from .reduce import _colsum_rows
from .threads import _nblk, _threads_for

__all__ = ["fusion_forward", "fusion_backward"]


def fusion_forward(params, query, retrieved, mask=None, *, heads: int, scores=None):
    """Fusion layer forward, token-0 fast path.  Same contract as ``reference.fusion_forward``.

    Parameters
    ----------
    params : mapping of str to ndarray
        The 18 named parameters (row-vector convention, ``W [in,out]``), all one float dtype, plus
        ``rel_beta, rel_gamma [h]`` for the relevance bias (docs/reco.md §2, "Relevance bias").
    query : ndarray [B,D]
    retrieved : ndarray [B,k,D]   (k may be 0)
    mask : ndarray [B,k] bool or None (True = valid neighbour; None = all valid)
    heads : int
        Number of attention heads, dividing D (resolved by the front door).
    scores : ndarray [B,k] or None
        Score features ``(s − center)/width`` (mapped by the front door); required when ``params``
        has the relevance bias, ignored otherwise.  Query-row logits: ``+γ_h`` toward token 0,
        ``+β_h·scores[b,j−1]`` toward neighbour ``j``.

    Returns
    -------
    out : ndarray [B,D]
        ``normalize(Y[:,0])``.
    cache : dict
        Buffers the backward needs (records ``heads`` and ``backend="numba"``).
    """
    B, D = np.shape(query)
    with _threads_for(B * (np.shape(retrieved)[1] + 1) * D):
        return _fusion_forward(params, query, retrieved, mask, heads=heads, scores=scores)


def fusion_backward(params, cache, dout, *, return_input_grads=False):
    """Fusion layer backward for the numba cache.  Same contract as ``reference.fusion_backward``.

    Parameters
    ----------
    params : mapping of str to ndarray
    cache : dict from :func:`fusion_forward` of this module
    dout : ndarray [B,D]
        Gradient of the loss with respect to ``out``.
    return_input_grads : bool
        Also return ``"query"`` [B,D] and ``"retrieved"`` [B,k,D].

    Returns
    -------
    grads : dict
        One array per parameter name (same shape and dtype; ``rel_beta, rel_gamma`` too when the
        params have the relevance bias), plus the input gradients if asked.
    """
    with _threads_for(cache.get("B", 0) * (cache.get("k", 0) + 1) * cache.get("D", 0)):
        return _fusion_backward(params, cache, dout, return_input_grads=return_input_grads)


def _fusion_forward(params, query, retrieved, mask=None, *, heads: int, scores=None):
    """Body of :func:`fusion_forward` (see there)."""
    _tick("start")
    dt = params["w_q"].dtype
    query = np.ascontiguousarray(query, dtype=dt)      # [B,D]
    retrieved = np.ascontiguousarray(retrieved, dtype=dt)  # [B,k,D]
    B, D = query.shape
    k = retrieved.shape[1]
    T = k + 1
    if D % heads:
        # the front door validates; keep a clear message for direct callers too
        raise ShapeError(f"heads={heads} does not divide D={D}")
    dh = D // heads
    valid = np.ones((B, T), dtype=np.bool_)  # [B,T]; token 0 (the query) is always valid
    if mask is not None and k:
        valid[:, 1:] = mask
    eps = LN_EPS
    p = {name: np.ascontiguousarray(params[name]) for name in params}
    rel = "rel_beta" in p  # relevance bias [ours]: β_h·scores toward neighbour j, γ_h toward the query
    if rel:
        if scores is None:
            raise ShapeError("scores: params have the relevance bias (rel_beta, rel_gamma); pass scores [B,k]")
        scores = np.ascontiguousarray(scores, dtype=dt)  # [B,k] score features
        if scores.shape != (B, k) or p["rel_beta"].shape != (heads,):
            raise ShapeError(f"scores {scores.shape} / rel_beta {p['rel_beta'].shape}: "
                             f"expected ({B}, {k}) / ({heads},)")
    else:
        scores = None  # the paper's layer: scores are ignored
    _tick("setup")

    # 1. X = [q + e_q ; r + e_r], A1 = LN_1(X)               all T tokens
    x = np.empty((B, T, D), dt)
    xhat1 = np.empty((B, T, D), dt)
    rstd1 = np.empty((B, T), dt)
    a1 = np.empty((B, T, D), dt)
    _embed_layernorm_forward(query, retrieved, p["e_query"], p["e_neighbor"], p["ln1_gamma"],
                             p["ln1_beta"], eps, x, xhat1, rstd1, a1)
    _tick("embed + LN1 (kernel)")
    # 2. Q for token 0, folded into one key vector per (head, row): M[h,b] = W_k[:, h] q0_h
    a1_0 = np.ascontiguousarray(a1[:, 0, :])              # [B,D]
    q0 = _mm(a1_0, p["w_q"])                              # [B,D] (GEMV at B = 1)
    q0 += p["b_q"]
    if B == 1:
        m = np.empty((heads, 1, D), dt)
        _fold_heads_v1(p["w_k"], q0, m)                   # [h,1,D], W_k streamed once
    else:
        q0h = q0.reshape(B, heads, dh).transpose(1, 0, 2)  # [h,B,dh] view
        m = np.matmul(q0h, _heads_view(p["w_k"], heads).transpose(0, 2, 1))  # [h,B,D]
    _tick("Q, M = W_k q0 (GEMM)")
    # 3. masked softmax of the query row, context folded: C[h,b] = Σ_t p_t A1_t
    prob = np.empty((B, heads, T), dt)
    c = np.empty((heads, B, D), dt)
    sc = np.empty((B, heads, T), np.float64)
    if rel:  # query-row logits + γ_h (token 0) / + β_h scores[b, t−1] (neighbours)
        _attention_row0_forward_v2(a1, m, valid, 1.0 / math.sqrt(dh), prob, c, sc,
                                   scores, p["rel_beta"], p["rel_gamma"])
    else:
        _attention_row0_forward_v2(a1, m, valid, 1.0 / math.sqrt(dh), prob, c, sc)
    _tick("attention row 0 (kernel)")
    if B == 1:
        ctx = np.empty((1, D), dt)
        _unfold_heads_v1(c, p["w_v"], ctx)                # [1,D], W_v streamed once
    else:
        ctx = np.matmul(c, _heads_view(p["w_v"], heads))  # [h,B,dh] = C[h] W_v[:, h]
        ctx = ctx.transpose(1, 0, 2).reshape(B, D)        # [B,D] (copy: B·D)
    ctx += p["b_v"]                                       # Σ_t p_t = 1
    # 4. H0 = X0 + ctx W_o + b_o;  A2 = LN_2(H0)
    o = _mm(ctx, p["w_o"])                                # [B,D]
    _tick("ctx = C W_v, O = ctx W_o (GEMM)")
    h0 = np.empty((B, D), dt)
    xhat2 = np.empty((B, D), dt)
    rstd2 = np.empty(B, dt)
    a2 = np.empty((B, D), dt)
    _bias_residual_layernorm_forward(x, o, p["b_o"], p["ln2_gamma"], p["ln2_beta"], eps,
                                     h0, xhat2, rstd2, a2)
    _tick("bias + residual + LN2 (kernel)")
    # 5. MLP on token 0: pre = A2 W_1 + b_1, U = GELU(pre), Y0 = H0 + U W_2 + b_2
    pre = _mm(a2, p["w_1"])                               # [B,F]
    _tick("A2 W_1 (GEMM)")
    u = np.empty_like(pre)                                # [B,F]
    if dt == np.float32:
        _bias_gelu_forward_f32(pre, p["b_1"], u)         # vectorised Φ (documented error bound)
    else:
        _bias_gelu_forward(pre, p["b_1"], u, dt.type(_INV_SQRT2))  # exact erf
    _tick("bias + GELU (kernel)")
    y0 = _mm(u, p["w_2"])                                 # [B,D]
    _tick("U W_2 (GEMM)")
    # 6. out = normalize(Y0)
    out = np.empty((B, D), dt)
    norm = np.empty(B, dt)
    _bias_residual_l2norm_forward(y0, p["b_2"], h0, out, norm)
    _tick("bias + residual + L2 norm (kernel)")
    cache = dict(backend="numba", heads=heads, B=B, k=k, D=D, valid=valid,
                 xhat1=xhat1, rstd1=rstd1, a1=a1, a1_0=a1_0, q0=q0, m=m, prob=prob, c=c, ctx=ctx,
                 xhat2=xhat2, rstd2=rstd2, a2=a2, pre=pre, u=u, out=out, norm=norm)
    if rel:
        cache["scores"] = scores  # [B,k] for dβ
    return out, cache


def _fusion_backward(params, cache, dout, *, return_input_grads=False):
    """Body of :func:`fusion_backward` (see there)."""
    _tick("start")
    if cache.get("backend") != "numba":
        raise ValueError(
            f"cache was produced by backend {cache.get('backend', 'numpy')!r}; "
            "pass it to the same backend's fusion_backward"
        )
    p = params
    dt = p["w_q"].dtype
    B, k, D, heads = cache["B"], cache["k"], cache["D"], cache["heads"]
    T = k + 1
    dh = D // heads
    dout = np.ascontiguousarray(dout, dtype=dt)          # [B,D]
    g = {}
    # 6. normalisation
    dy = np.empty((B, D), dt)
    _l2norm_backward(dout, cache["out"], cache["norm"], dy)
    # 5. MLP (token 0 only)
    g["b_2"] = _colsum_rows(dy)
    _tick("L2 norm backward, db_2 (kernels)")
    g["w_2"] = cache["u"].T @ dy                          # [F,D]
    dpre = dy @ p["w_2"].T                                # [B,F]
    _tick("dW_2, dU (GEMM)")
    if dt == np.float32:
        part = np.empty((_nblk(B), dpre.shape[1]), dt)
        _gelu_backward_colsum_f32(dpre, cache["pre"], part)  # GELU' and db_1 in one pass
        g["b_1"] = part.sum(axis=0, dtype=np.float64).astype(dt)
    else:
        _gelu_backward_inplace(dpre, cache["pre"], dt.type(_INV_SQRT2), dt.type(_INV_SQRT2PI))
        g["b_1"] = _colsum_rows(dpre)
    _tick("GELU backward + db_1 (kernel)")
    g["w_1"] = cache["a2"].T @ dpre                       # [D,F]
    da2 = dpre @ p["w_1"].T                               # [B,D]
    _tick("dW_1, dA2 (GEMM)")
    # 4. LN_2 + residual: dH0 = dY0 + LN_2ᵀ(dA2)
    dh0 = np.empty((B, D), dt)
    part2 = np.empty((_nblk(B), 2, D), dt)
    _layernorm2_backward(da2, cache["xhat2"], cache["rstd2"], p["ln2_gamma"], dy, dh0, part2)
    s2 = part2.sum(axis=0, dtype=np.float64).astype(dt)
    g["ln2_gamma"], g["ln2_beta"] = s2[0], s2[1]
    g["b_o"] = _colsum_rows(dh0)
    _tick("LN2 backward, db_o (kernels)")
    g["w_o"] = cache["ctx"].T @ dh0                       # [D,D]
    dctx = dh0 @ p["w_o"].T                               # [B,D]
    # 3. attention (query row only), through the folded vectors (the derivation: attention.py)
    dctxh = dctx.reshape(B, heads, dh).transpose(1, 0, 2)  # [h,B,dh] view
    wk_h, wv_h = _heads_view(p["w_k"], heads), _heads_view(p["w_v"], heads)  # [h,D,dh] views
    nv = np.matmul(dctxh, wv_h.transpose(0, 2, 1))        # [h,B,D]  N[h,b] = W_v[:, h] dctx_h
    _tick("dW_o, dctx, N = W_v dctx (GEMM)")
    ds = np.empty((B, heads, T), dt)
    gk = np.empty((heads, B, D), dt)
    dsum = np.empty((B, heads), dt)
    _attention_row0_backward_v2(cache["a1"], cache["prob"], nv, cache["valid"], 1.0 / math.sqrt(dh),
                                ds, gk, dsum, np.empty((B, heads, T), np.float64))
    if "rel_beta" in p:  # relevance bias: dβ_h = Σ_b Σ_{t≥1} dS_t scores_{t−1}, dγ_h = Σ_b dS_0
        dS = ds.astype(np.float64) * math.sqrt(dh)        # [B,h,T] query-row dS (masked keys: 0)
        g["rel_beta"] = np.einsum("bht,bt->h", dS[:, :, 1:], cache["scores"].astype(np.float64)).astype(dt)
        g["rel_gamma"] = dS[:, :, 0].sum(axis=0).astype(dt)
    _tick("attention row 0 backward (kernel)")
    q0h = cache["q0"].reshape(B, heads, dh).transpose(1, 0, 2)  # [h,B,dh] view
    dq0 = np.matmul(gk, wk_h).transpose(1, 0, 2).reshape(B, D)  # [B,D]  dq0_h = G[h] W_k[:, h]
    # dW_k[:, h] = G[h]ᵀ q0_h,  dW_v[:, h] = C[h]ᵀ dctx_h   (one batched GEMM each)
    g["w_k"] = np.matmul(gk.transpose(0, 2, 1), q0h).transpose(1, 0, 2).reshape(D, D)
    g["w_v"] = np.matmul(cache["c"].transpose(0, 2, 1), dctxh).transpose(1, 0, 2).reshape(D, D)
    g["b_k"] = (dsum[:, :, None] * q0h.transpose(1, 0, 2)).sum(axis=0, dtype=np.float64).reshape(D).astype(dt)
    g["b_v"] = _colsum_rows(dctx)                         # Σ_t p_t = 1
    g["b_q"] = _colsum_rows(dq0)
    g["w_q"] = cache["a1_0"].T @ dq0                      # [D,D]
    dq_proj = dq0 @ p["w_q"].T                            # [B,D], token 0's extra dA1
    _tick("dq0, dW_k, dW_v, dW_q, dQ W_qᵀ (GEMM)")
    # 1. LN_1 + residual + type embeddings (dA1 assembled inside the kernel)
    dx = np.empty((B, T, D), dt)
    part1 = np.empty((_nblk(B * T), 4, D), dt)
    _layernorm1_backward_v2(ds, cache["prob"], cache["m"], nv, dq_proj, dh0, cache["xhat1"],
                            cache["rstd1"], p["ln1_gamma"], dx, part1)
    s1 = part1.sum(axis=0, dtype=np.float64).astype(dt)
    g["ln1_gamma"], g["ln1_beta"], g["e_query"], g["e_neighbor"] = s1[0], s1[1], s1[2], s1[3]
    _tick("dA1 + LN1 backward (kernel)")
    grads = {name: np.ascontiguousarray(g[name], dtype=dt) for name in params}
    if return_input_grads:
        grads["query"] = np.ascontiguousarray(dx[:, 0, :])
        grads["retrieved"] = np.ascontiguousarray(dx[:, 1:, :])
    _tick("gather gradients")
    return grads
