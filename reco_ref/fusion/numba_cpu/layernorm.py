"""The LayerNorm kernels: type embeddings + LN_1 (all tokens), bias + residual + LN_2 (query token), backwards.

Long reductions (statistics, parameter-gradient partial sums) accumulate in float64 even for float32 data.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from .jit import PARALLEL_IEEE, PARALLEL_REASSOC


@njit(**PARALLEL_IEEE)
def _embed_layernorm_forward(query, retrieved, e_q, e_r, gamma, beta, eps, x, xhat, rstd, a1):
    """X = [q + e_q ; r_i + e_r];  A1 = LN_1(X), all T tokens (K, V need every token).

    query [B,D], retrieved [B,k,D], e_q/e_r/gamma/beta [D]
    -> x [B,T,D], xhat [B,T,D], rstd [B,T], a1 [B,T,D]  (written)
    """
    B, T, D = x.shape
    for n in prange(B * T):
        b = n // T
        t = n - b * T
        s = 0.0
        if t == 0:
            for d in range(D):
                v = query[b, d] + e_q[d]
                x[b, 0, d] = v
                s += v
        else:
            for d in range(D):
                v = retrieved[b, t - 1, d] + e_r[d]
                x[b, t, d] = v
                s += v
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


@njit(**PARALLEL_IEEE)
def _bias_residual_layernorm_forward(x, o, b_o, gamma, beta, eps, h, xhat, rstd, a2):
    """H0 = X[:,0] + (O0 + b_o);  A2 = LN_2(H0), token 0 only (other tokens are dead).

    x [B,T,D], o [B,D] = ctx W_o, b_o/gamma/beta [D] -> h [B,D], xhat [B,D], rstd [B], a2 [B,D]
    """
    B, D = o.shape
    for b in prange(B):
        s = 0.0
        for d in range(D):
            v = x[b, 0, d] + (o[b, d] + b_o[d])
            h[b, d] = v
            s += v
        mean = s / D
        ss = 0.0
        for d in range(D):
            c = h[b, d] - mean
            ss += c * c
        r = 1.0 / math.sqrt(ss / D + eps)
        rstd[b] = r
        for d in range(D):
            xh = (h[b, d] - mean) * r
            xhat[b, d] = xh
            a2[b, d] = xh * gamma[d] + beta[d]


@njit(**PARALLEL_IEEE)
def _layernorm2_backward(da2, xhat, rstd, gamma, dy, dh, part):
    """dH0 = dY0 + LN_2ᵀ(dA2);  partials of dγ₂ = Σ dA2⊙x̂, dβ₂ = Σ dA2.

    da2/xhat/dy [B,D], rstd [B], gamma [D] -> dh [B,D], part [nblk,2,D]
    g = dA⊙γ;  dz = (g − mean(g) − x̂ ⊙ mean(g⊙x̂)) · rstd
    """
    B, D = da2.shape
    nblk = part.shape[0]
    for blk in prange(nblk):
        r0 = (B * blk) // nblk
        r1 = (B * (blk + 1)) // nblk
        dg = np.zeros(D, np.float64)
        dbt = np.zeros(D, np.float64)
        for b in range(r0, r1):
            sg = 0.0
            sgx = 0.0
            for d in range(D):
                g = da2[b, d] * gamma[d]
                sg += g
                sgx += g * xhat[b, d]
                dg[d] += da2[b, d] * xhat[b, d]
                dbt[d] += da2[b, d]
            mg = sg / D
            mgx = sgx / D
            r = rstd[b]
            for d in range(D):
                g = da2[b, d] * gamma[d]
                dh[b, d] = dy[b, d] + (g - mg - xhat[b, d] * mgx) * r
        for d in range(D):
            part[blk, 0, d] = dg[d]
            part[blk, 1, d] = dbt[d]


@njit(inline="always")
def _ln1_row_backward(dar, xhat, rstd, gamma, dh, b, t, dx, dg, dbt, deq, der):
    """One row of the LN_1 backward (shared with the first-generation kernel in tests/fusion/kernels_v1.py;
    inlined, so it runs under the caller's fastmath flags): dx[b,t] = LN_1ᵀ(dar) (+ dh[b] on token 0), and the row's contributions to the
    partial sums dγ₁ (dg), dβ₁ (dbt), de_q (deq, token 0) and de_r (der, tokens ≥ 1).

    dar [D] float64 (this row's dA1), xhat [B,T,D], rstd [B,T], gamma [D], dh [B,D] -> dx [B,T,D]
    g = dA⊙γ;  dz = (g − mean(g) − x̂ ⊙ mean(g⊙x̂)) · rstd
    """
    D = dar.shape[0]
    sg = 0.0
    sgx = 0.0
    for d in range(D):
        g = dar[d] * gamma[d]
        sg += g
        sgx += g * xhat[b, t, d]
        dg[d] += dar[d] * xhat[b, t, d]
        dbt[d] += dar[d]
    mg = sg / D
    mgx = sgx / D
    r = rstd[b, t]
    if t == 0:
        for d in range(D):
            v = (dar[d] * gamma[d] - mg - xhat[b, t, d] * mgx) * r + dh[b, d]
            dx[b, t, d] = v
            deq[d] += v
    else:
        for d in range(D):
            v = (dar[d] * gamma[d] - mg - xhat[b, t, d] * mgx) * r
            dx[b, t, d] = v
            der[d] += v


@njit(**PARALLEL_REASSOC)
def _layernorm1_backward_v2(ds, p, m, nv, dq_proj, dh, xhat, rstd, gamma, dx, part):
    """dX = LN_1ᵀ(dA1) (+ dH0 on token 0, the residual) with dA1 built on the fly from the attention folds
    (attention.py): dA1_t = Σ_h ds_t M[h,b] + p_t N[h,b] (+ dQ0 W_qᵀ on token 0);  partials of dγ₁, dβ₁, de_q, de_r.

    ds/p [B,h,T], m/nv [h,B,D], dq_proj [B,D] (token 0's extra dA1 = dQ0 W_qᵀ), dh [B,D],
    xhat [B,T,D], rstd [B,T], gamma [D] -> dx [B,T,D], part [nblk,4,D] (dγ₁, dβ₁, de_q, de_r partial sums
    over blocks of rows).  Never writing dA1 [B,T,D] saves one write and one read of it (version 2; version 1,
    reading a written dA1, is kept in tests/fusion/kernels_v1.py).
    """
    B, T, D = xhat.shape
    H = m.shape[0]
    N = B * T
    nblk = part.shape[0]
    for blk in prange(nblk):
        r0 = (N * blk) // nblk
        r1 = (N * (blk + 1)) // nblk
        dg = np.zeros(D, np.float64)
        dbt = np.zeros(D, np.float64)
        deq = np.zeros(D, np.float64)
        der = np.zeros(D, np.float64)
        dar = np.empty(D, np.float64)
        for n in range(r0, r1):
            b = n // T
            t = n - b * T
            if t == 0:
                for d in range(D):
                    dar[d] = dq_proj[b, d]
            else:
                for d in range(D):
                    dar[d] = 0.0
            for hh in range(H):
                w1 = ds[b, hh, t]
                w2 = p[b, hh, t]
                if w2 != 0.0:  # masked key: p = ds = 0, nothing to add
                    for d in range(D):
                        dar[d] += w1 * m[hh, b, d] + w2 * nv[hh, b, d]
            _ln1_row_backward(dar, xhat, rstd, gamma, dh, b, t, dx, dg, dbt, deq, der)
        for d in range(D):
            part[blk, 0, d] = dg[d]
            part[blk, 1, d] = dbt[d]
            part[blk, 2, d] = deq[d]
            part[blk, 3, d] = der[d]
