"""Masked softmax attention of the query token (row 0), the only row the layer's output reads.

Two kernel pairs:

* the **low-rank pair** ``_attention_row0_forward_v2`` / ``_attention_row0_backward_v2``, which the layer runs:
  ``K`` and ``V`` are never built, every use of them goes through one folded D-vector per (head, row) — the
  derivation is the comment above the pair; the LN_1 backward that consumes the folds is
  :func:`reco_ref.fusion.numba_cpu.layernorm._layernorm1_backward_v2`;
* the **packed pair** ``_attention_row0_forward`` / ``_attention_row0_backward`` over materialised ``[K | V]``
  (the layer's first generation).  The memory-attention classifier (:mod:`reco_ref.classify.numba_cpu`) runs it,
  where the keys and values are its own projections; the tests hold both pairs to the reference.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from .jit import PARALLEL_IEEE, PARALLEL_REASSOC


# --------------------------------------------------------------------------------------------
# the packed pair: K and V materialised side by side as [K | V]
# --------------------------------------------------------------------------------------------


@njit(**PARALLEL_IEEE)
def _attention_row0_forward(q0, b_q, kv, b_kv, valid, heads, p, ctx, sc):
    """Masked softmax attention of the query token (row 0) over all T tokens, per (b, head).

    q0 [B,D]   = A1[:,0] W_q   (bias added here, in place: q0 <- q0 + b_q)
    kv [B,T,2D] = A1 [W_k|W_v] (bias added here, in place; each (b, head) owns its slice)
    valid [B,T] bool (valid[:,0] is True)
    -> p [B,h,T] softmax probabilities (exact 0 on masked keys), ctx [B,D] = concat_h(P V)
    sc [B,h,T] float64 scratch (scores / exponentials): preallocated, because heap allocations
    inside a prange body serialise the threads on the allocator.

    Rows 1..T-1 of the attention matrix are dead (their output is never read) and skipped.
    """
    B, T, D2 = kv.shape
    D = D2 // 2
    dh = D // heads
    scale = 1.0 / math.sqrt(dh)
    for n in prange(B * heads):
        b = n // heads
        hh = n - b * heads
        o = hh * dh
        for d in range(dh):
            q0[b, o + d] += b_q[o + d]
        for t in range(T):
            for d in range(dh):
                kv[b, t, o + d] += b_kv[o + d]
                kv[b, t, D + o + d] += b_kv[D + o + d]
        m = -np.inf
        for t in range(T):
            if valid[b, t]:
                acc = 0.0
                for d in range(dh):
                    acc += q0[b, o + d] * kv[b, t, o + d]
                acc *= scale
                sc[b, hh, t] = acc
                if acc > m:
                    m = acc
        z = 0.0
        for t in range(T):
            if valid[b, t]:
                e = math.exp(sc[b, hh, t] - m)
                sc[b, hh, t] = e
                z += e
        for d in range(dh):
            ctx[b, o + d] = 0.0
        for t in range(T):
            if valid[b, t]:
                pt = sc[b, hh, t] / z
                p[b, hh, t] = pt
                for d in range(dh):
                    ctx[b, o + d] += pt * kv[b, t, D + o + d]
            else:
                p[b, hh, t] = 0.0  # masked key: probability exactly 0


@njit(**PARALLEL_IEEE)
def _attention_row0_backward(dctx, p, q0, kv, valid, heads, dq0, dkv, dp):
    """Backward of the query-row attention, per (b, head).

    dctx [B,D], p [B,h,T], q0 [B,D] (biased), kv [B,T,2D] (biased), valid [B,T]
    -> dq0 [B,D], dkv [B,T,2D] (written in full; zero on masked tokens); dp [B,h,T] float64 scratch
    dP_t = dctx·V_t;  dV_t = P_t dctx;  dS_t = P_t (dP_t − Σ_s P_s dP_s)
    dQ0 = Σ_t dS_t K_t / sqrt(dh);  dK_t = dS_t Q0 / sqrt(dh)
    Only the query row has a gradient (rows 1..T-1 of P are dead), so dK/dV are rank-one per head.
    """
    B, T, D2 = kv.shape
    D = D2 // 2
    dh = D // heads
    scale = 1.0 / math.sqrt(dh)
    for n in prange(B * heads):
        b = n // heads
        hh = n - b * heads
        o = hh * dh
        sdp = 0.0
        for t in range(T):
            if valid[b, t]:
                acc = 0.0
                for d in range(dh):
                    acc += dctx[b, o + d] * kv[b, t, D + o + d]
                dp[b, hh, t] = acc
                sdp += p[b, hh, t] * acc
        for d in range(dh):
            dq0[b, o + d] = 0.0
        for t in range(T):
            if valid[b, t]:
                pt = p[b, hh, t]
                ds = pt * (dp[b, hh, t] - sdp) * scale
                for d in range(dh):
                    dq0[b, o + d] += ds * kv[b, t, o + d]
                    dkv[b, t, o + d] = ds * q0[b, o + d]
                    dkv[b, t, D + o + d] = pt * dctx[b, o + d]
            else:
                for d in range(dh):
                    dkv[b, t, o + d] = 0.0
                    dkv[b, t, D + o + d] = 0.0


# --------------------------------------------------------------------------------------------
# the low-rank pair (what the layer runs)
# --------------------------------------------------------------------------------------------
#
# Why K and V are never materialised: only token 0's attention row is read out, so per (row b,
# head h) every use of K_t = A1_t W_k + b_k and V_t = A1_t W_v + b_v goes through one D-vector:
#
#   scores   s_t  = q0_h · K_t,h / √dh = A1_t · M[h,b] / √dh  (+ q0_h·b_k,h, the same for every t:
#                   softmax drops it),                       M[h,b] = W_k[:, h] q0_h     [D]
#   context  ctx_h = Σ_t p_t V_t,h = C[h,b] W_v[:, h] + b_v,h (Σ_t p_t = 1),  C[h,b] = Σ_t p_t A1_t
#   backward dp_t = dctx_h · V_t,h = A1_t · N[h,b] (+ a constant, dropped by dS), N[h,b] = W_v[:, h] dctx_h
#            dA1_t = Σ_h dS'_t M[h,b] + p_t N[h,b],  G[h,b] = Σ_t dS'_t A1_t  (dS' = dS/√dh)
#            dW_k[:, h] = Σ_b G[h,b] ⊗ q0_h,  dW_v[:, h] = Σ_b C[h,b] ⊗ dctx_h,  dq0_h = G[h,b] W_k[:, h]
#
# so the K/V GEMMs (4·B·T·D² FLOPs forward, 8·B·T·D² backward) become per-head GEMMs of 2·B·D² each
# and every weight matrix is read once per pass (a GEMV at B = 1).  Exact in exact arithmetic; the
# tests hold it to the reference's tolerances.  M, N, C, G are [h, B, D]: each (head, row) owns one
# contiguous D-vector, which is what the kernels below stream over.
#
# The optional relevance bias (docs/reco.md §2) only adds to the query row's logits: s_0 += γ_h, s_t += β_h·sc_{t−1}
# (sc the score features [B,k]); it changes P, not the folds.  Its gradients come from the same dS:
#            dβ_h = Σ_b Σ_{t≥1} dS_t sc_{t−1},  dγ_h = Σ_b dS_0   (dS = dS'·√dh; rows 1..k have dS = 0)


@njit(**PARALLEL_REASSOC)
def _attention_row0_forward_v2(a1, m, valid, scale, p, c, sc, scores=None, beta=None, gamma=None):
    """Softmax of the query row from the folded key vectors; context folded the same way.

    a1 [B,T,D] = LN_1(X), m [h,B,D] (M above), valid [B,T] bool, scale = 1/√dh
    -> p [B,h,T] (exact 0 on masked keys), c [h,B,D] = Σ_t p_t A1_t;  sc [B,h,T] float64 scratch.

    Relevance bias (docs/reco.md §2, optional): with scores [B,k], beta [h], gamma [h] the logits of the query
    row are  S_0 = A1_0·M/√dh + γ_h  and  S_t = A1_t·M/√dh + β_h s_{t−1}  (t = 1..k), the bias added in
    float64 before the mask and the softmax.  Called without them (``None``) the bias lines are pruned
    at compile time: that specialisation is the paper's layer, bit for bit.
    """
    B, T, D = a1.shape
    H = m.shape[0]
    for n in prange(B * H):
        b = n // H
        hh = n - b * H
        mx = -np.inf
        for t in range(T):
            if valid[b, t]:
                acc = 0.0
                for d in range(D):
                    acc += a1[b, t, d] * m[hh, b, d]
                acc *= scale
                if scores is not None:  # relevance bias: γ_h toward the query, β_h s_{t−1} toward neighbour t
                    if t == 0:
                        acc += float(gamma[hh])
                    else:
                        acc += float(beta[hh]) * float(scores[b, t - 1])
                sc[b, hh, t] = acc
                if acc > mx:
                    mx = acc
        z = 0.0
        for t in range(T):
            if valid[b, t]:
                e = math.exp(sc[b, hh, t] - mx)
                sc[b, hh, t] = e
                z += e
        for d in range(D):
            c[hh, b, d] = 0.0
        for t in range(T):
            if valid[b, t]:
                pt = sc[b, hh, t] / z
                p[b, hh, t] = pt
                for d in range(D):
                    c[hh, b, d] += pt * a1[b, t, d]
            else:
                p[b, hh, t] = 0.0  # masked key: probability exactly 0


@njit(**PARALLEL_REASSOC)
def _attention_row0_backward_v2(a1, p, nv, valid, scale, ds, g, dsum, dp):
    """dS of the query row and its fold into D-vectors.

    a1 [B,T,D], p [B,h,T], nv [h,B,D] (N above), valid [B,T], scale = 1/√dh
    -> ds [B,h,T] = p_t (dp_t − Σ_s p_s dp_s)/√dh (0 on masked keys), g [h,B,D] = Σ_t ds_t A1_t,
       dsum [B,h] = Σ_t ds_t (≈ 0: it only feeds db_k);  dp [B,h,T] float64 scratch.
    """
    B, T, D = a1.shape
    H = nv.shape[0]
    for n in prange(B * H):
        b = n // H
        hh = n - b * H
        sdp = 0.0
        for t in range(T):
            if valid[b, t]:
                acc = 0.0
                for d in range(D):
                    acc += a1[b, t, d] * nv[hh, b, d]
                dp[b, hh, t] = acc
                sdp += p[b, hh, t] * acc
        for d in range(D):
            g[hh, b, d] = 0.0
        s = 0.0
        for t in range(T):
            if valid[b, t]:
                v = p[b, hh, t] * (dp[b, hh, t] - sdp) * scale
                ds[b, hh, t] = v
                s += v
                for d in range(D):
                    g[hh, b, d] += v * a1[b, t, d]
            else:
                ds[b, hh, t] = 0.0
        dsum[b, hh] = s
