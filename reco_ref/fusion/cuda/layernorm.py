"""LayerNorm on the GPU, forward and backward, fused with what surrounds it in the fusion layer.

Forward (``LN(z) = γ ⊙ (z−μ)/sqrt(σ²+ε) + β`` over the last axis):

* ``embed_layernorm_forward`` — builds ``X = [q + e_q ; r_i + e_r]`` and normalises every token
  (``LN_1``; all ``T`` tokens are needed because ``K`` and ``V`` are).

  - v1: one thread per row, serial loops over ``D`` (simple; strided, uncoalesced reads).
  - v2: one block per row; threads stride over ``D`` (coalesced) and the mean / variance come from
    a shared-memory tree reduction (:func:`reco_ref.fusion.cuda.reduce.block_sum`).

* ``bias_residual_layernorm_forward`` — ``H0 = X0 + (O0 + b_o)``, ``A2 = LN_2(H0)`` for the query
  token only (v2 layout: one block per row).

Backward (``g = dA ⊙ γ``, ``dz = (g − mean(g) − x̂ ⊙ mean(g ⊙ x̂)) / s``):

* ``layernorm_backward`` — one block per row, optionally adding a residual gradient
  (``dH0 = dY0 + LN_2ᵀ(dA2)``).  ``dγ = Σ dA ⊙ x̂`` and ``dβ = Σ dA`` are column sums done by
  :func:`reco_ref.fusion.cuda.reduce.colsum`.

All statistics accumulate in float64.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda

from .config import KernelConfig, get_config
from .reduce import block_sum

__all__ = ["embed_layernorm_forward", "bias_residual_layernorm_forward", "layernorm_backward"]

_cache: dict = {}


@cuda.jit
def _embed_ln_v1_kernel(query, retrieved, e_q, e_r, gamma, beta, eps, x, xhat, rstd, a1):
    # one thread per token row n = b*T + t
    B, T, D = x.shape
    n = cuda.grid(1)
    if n < B * T:
        b = n // T
        t = n - b * T
        s = 0.0
        for d in range(D):
            if t == 0:
                v = query[b, d] + e_q[d]
            else:
                v = retrieved[b, t - 1, d] + e_r[d]
            x[b, t, d] = v
            s += x[b, t, d]
        mean = s / D
        ss = 0.0
        for d in range(D):
            c = x[b, t, d] - mean
            ss += c * c
        r = 1.0 / math.sqrt(ss / D + eps)
        rstd[b, t] = r
        for d in range(D):
            xh = (x[b, t, d] - mean) * r
            xhat[b, t, d] = xh
            a1[b, t, d] = xh * gamma[d] + beta[d]


def _embed_ln_v2(threads: int):
    key = ("embed_v2", threads)
    if key in _cache:
        return _cache[key]
    NTH = threads

    def kernel(query, retrieved, e_q, e_r, gamma, beta, eps, x, xhat, rstd, a1):
        # one block per token row n = b*T + t
        sh = cuda.shared.array(NTH, np.float64)
        B, T, D = x.shape
        n = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        b = n // T
        t = n - b * T
        s = 0.0
        for d in range(tid, D, NTH):
            if t == 0:
                v = query[b, d] + e_q[d]
            else:
                v = retrieved[b, t - 1, d] + e_r[d]
            x[b, t, d] = v
            s += x[b, t, d]
        mean = block_sum(sh, s) / D
        ss = 0.0
        for d in range(tid, D, NTH):
            c = x[b, t, d] - mean
            ss += c * c
        var = block_sum(sh, ss) / D
        r = 1.0 / math.sqrt(var + eps)
        if tid == 0:
            rstd[b, t] = r
        for d in range(tid, D, NTH):
            xh = (x[b, t, d] - mean) * r
            xhat[b, t, d] = xh
            a1[b, t, d] = xh * gamma[d] + beta[d]

    _cache[key] = cuda.jit(kernel)
    return _cache[key]


def embed_layernorm_forward(query, retrieved, e_q, e_r, gamma, beta, eps, x, xhat, rstd, a1, *,
                            version: int | None = None, cfg: KernelConfig | None = None) -> None:
    """``X = [q + e_q ; r + e_r]``, ``A1 = LN_1(X)``.

    query [B,D], retrieved [B,k,D], e_q/e_r/gamma/beta [D]
    -> x [B,T,D], xhat [B,T,D], rstd [B,T], a1 [B,T,D]  (device arrays, written)
    """
    cfg = cfg or get_config()
    version = version or cfg.ln_version
    B, T, D = x.shape
    if B * T == 0:
        return
    if version == 1:
        n = cfg.threads
        _embed_ln_v1_kernel[math.ceil(B * T / n), n](query, retrieved, e_q, e_r, gamma, beta, eps,
                                                      x, xhat, rstd, a1)
    else:
        _embed_ln_v2(cfg.threads)[B * T, cfg.threads](query, retrieved, e_q, e_r, gamma, beta, eps,
                                                      x, xhat, rstd, a1)


def _bias_residual_ln(threads: int):
    key = ("resid_ln", threads)
    if key in _cache:
        return _cache[key]
    NTH = threads

    def kernel(x0, o, b_o, gamma, beta, eps, h, xhat, rstd, a2):
        # one block per row b:  h = x0 + (o + b_o);  a2 = LN(h)
        sh = cuda.shared.array(NTH, np.float64)
        D = o.shape[1]
        b = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        s = 0.0
        for d in range(tid, D, NTH):
            h[b, d] = x0[b, d] + (o[b, d] + b_o[d])
            s += h[b, d]
        mean = block_sum(sh, s) / D
        ss = 0.0
        for d in range(tid, D, NTH):
            c = h[b, d] - mean
            ss += c * c
        var = block_sum(sh, ss) / D
        r = 1.0 / math.sqrt(var + eps)
        if tid == 0:
            rstd[b] = r
        for d in range(tid, D, NTH):
            xh = (h[b, d] - mean) * r
            xhat[b, d] = xh
            a2[b, d] = xh * gamma[d] + beta[d]

    _cache[key] = cuda.jit(kernel)
    return _cache[key]


def bias_residual_layernorm_forward(x0, o, b_o, gamma, beta, eps, h, xhat, rstd, a2, *,
                                    cfg: KernelConfig | None = None) -> None:
    """``H0 = X0 + (O0 + b_o)``, ``A2 = LN_2(H0)``.

    x0 [B,D] (may be the strided view ``X[:,0,:]``), o [B,D], b_o/gamma/beta [D]
    -> h [B,D], xhat [B,D], rstd [B], a2 [B,D]
    """
    cfg = cfg or get_config()
    B = o.shape[0]
    if B:
        _bias_residual_ln(cfg.threads)[B, cfg.threads](x0, o, b_o, gamma, beta, eps, h, xhat, rstd, a2)


def _ln_backward(threads: int):
    key = ("ln_bwd", threads)
    if key in _cache:
        return _cache[key]
    NTH = threads

    def kernel(da, xhat, rstd, gamma, resid, has_resid, dx):
        # one block per row n:  dx = (g − mean(g) − x̂ mean(g x̂)) · rstd  (+ resid)
        sh = cuda.shared.array(NTH, np.float64)
        D = da.shape[1]
        n = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        sg = 0.0
        sgx = 0.0
        for d in range(tid, D, NTH):
            g = da[n, d] * gamma[d]
            sg += g
            sgx += g * xhat[n, d]
        mg = block_sum(sh, sg) / D
        mgx = block_sum(sh, sgx) / D
        r = rstd[n]
        for d in range(tid, D, NTH):
            v = (da[n, d] * gamma[d] - mg - xhat[n, d] * mgx) * r
            if has_resid:
                v += resid[n, d]
            dx[n, d] = v

    _cache[key] = cuda.jit(kernel)
    return _cache[key]


def layernorm_backward(da, xhat, rstd, gamma, dx, *, resid=None, cfg: KernelConfig | None = None) -> None:
    """``dx = LNᵀ(da) (+ resid)`` row by row.

    da/xhat [N,D], rstd [N], gamma [D], resid [N,D] or None -> dx [N,D]
    (``dγ``, ``dβ`` are ``colsum(da, w=xhat)``, see :mod:`reco_ref.fusion.cuda.reduce`)
    """
    cfg = cfg or get_config()
    N = da.shape[0]
    if N:
        has = resid is not None
        _ln_backward(cfg.threads)[N, cfg.threads](da, xhat, rstd, gamma, resid if has else da, has, dx)
