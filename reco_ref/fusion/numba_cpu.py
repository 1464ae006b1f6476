"""Numba CPU backend of the RECO fusion layer and of the symmetric InfoNCE loss.

Same signatures as :mod:`reco_ref.fusion.reference` (the readable NumPy truth, spec §2) and as
:func:`reco_ref.train.losses.infonce_forward` minus ``backend``; the front doors
``reco_ref.fusion.fusion_forward(..., backend="numba")`` and
``reco_ref.train.losses.infonce_forward(..., backend="numba")`` dispatch here.

How the work is split
---------------------
* GEMMs stay on BLAS (``numpy @``, which runs on the BLAS threads): nothing hand-written beats it.
* Everything BLAS does not do well is a fused ``@njit(parallel=True, cache=True, fastmath=False)``
  kernel below: type-embedding add + LayerNorm, masked softmax attention over the short
  ``T = k+1`` sequence, bias + exact GELU, bias + residual + LayerNorm, bias + residual + L2
  normalisation, and the matching backward kernels with the parameter-gradient reductions.
  Long reductions (LayerNorm statistics, softmax scores, L2 norms, bias / LayerNorm-parameter /
  type-embedding gradients, InfoNCE log-sum-exp) accumulate in float64 even for float32 data: cheap
  here and it keeps float32 well within 1e-4 of the reference.  GELU and the short per-head sums
  over the ``T`` tokens run in the data's dtype.
* Small problems (``B·T·D < SMALL_WORK``) run on the calling thread (numba kernels, and the GEMMs
  too when ``threadpoolctl`` is installed): waking worker threads costs more than the work.  Large
  ones keep numba's threads but run the GEMMs on ``STEP_BLAS_THREADS`` (default 1) BLAS threads:
  2-thread OpenBLAS on an oversubscribed machine was measured 4–50× slower (docs/performance.md).

Dead work that is skipped (legal because only ``Y[:, 0]`` is read out, spec §2)
-------------------------------------------------------------------------------
The reference runs the whole layer on all ``T`` tokens.  The output depends on token 0 only:

* forward: ``K`` and ``V`` are needed for all ``T`` tokens (token 0 attends to every neighbour),
  but ``Q``, the attention rows, ``W_o``, LN2, the MLP and the residuals only for token 0;
* backward: the gradient reaches tokens ``1..k`` only through ``K`` and ``V``, so ``dK``/``dV`` are
  needed for all tokens and ``dQ`` for token 0 only; ``dA1`` (and hence ``dX``, ``de_r``, ``dγ₁``,
  ``dβ₁``) is still needed for every token.

That cuts the layer from ``72·B·T·D²`` GEMM FLOPs (spec §7) to ``12·B·T·D² + 60·B·D²``
(ratio 4): at B=256, T=11, D=512 from ≈53 to ≈13 GFLOP.  The results are identical to the
reference up to rounding (the tests check every output and gradient).

Relevance bias (spec §2, optional: params with ``rel_beta, rel_gamma [h]`` and ``scores [B,k]``)
-----------------------------------------------------------------------------------------------
Only the query row's logits are computed, so only they get the bias: ``+γ_h`` toward token 0,
``+β_h·scores[b, j−1]`` toward neighbour ``j`` (inside :func:`_attention_row0_forward_v2`); ``dβ``,
``dγ`` come from that row's ``dS`` (the other rows' ``dS`` is exactly 0).  Without the arrays the
kernel's bias lines are pruned at compile time: the paper's layer runs the same code as before.

Shapes: ``B`` batch, ``k`` neighbours, ``T = k+1``, ``D`` width, ``h`` heads, ``dh = D/h``,
``F = mlp_ratio·D`` hidden width.
"""

from __future__ import annotations

import math
import os
import time

# OpenMP workers that spin-wait after a parallel region steal the (few) cores from the BLAS threads
# that run the GEMMs in between, and vice versa: on 2 cores each of our ~13 kernel launches then cost
# ~25 ms instead of ≲ 1 ms (measured, B=1, other jobs on the machine).  Sleeping workers fix it.  Only a default: an explicit
# OMP_WAIT_POLICY wins, and it has no effect once an OpenMP runtime is already initialised.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
from contextlib import contextmanager  # noqa: E402

from numba import get_num_threads, njit, prange, set_num_threads  # noqa: E402

__all__ = [
    "fusion_forward",
    "fusion_backward",
    "infonce_forward",
    "infonce_backward",
]

# parallel: prange loops run on numba's threads; cache: the second process does not recompile;
# fastmath off: IEEE semantics so the float64 path matches the reference to ~1e-13.
_JIT = dict(parallel=True, cache=True, fastmath=False, nogil=True)

from .constants import GELU_INV_SQRT2 as _INV_SQRT2, GELU_INV_SQRT_2PI as _INV_SQRT2PI, LN_EPS, MAX_SCALE  # noqa: E402
from ..backends import blas_threads  # noqa: E402


# --------------------------------------------------------------------------------------------
# kernels: forward
# --------------------------------------------------------------------------------------------


@njit(**_JIT)
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


@njit(**_JIT)
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


@njit(**_JIT)
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


@njit(**_JIT)
def _bias_gelu_forward(pre, b, u, inv_sqrt2):
    """pre <- pre + b (in place);  u = GELU(pre) = pre·Φ(pre), exact erf form.

    pre [N,F], b [F] -> u [N,F].  ``inv_sqrt2`` comes in the data's dtype so float32 data use the
    float32 erf (no float64 promotion: the erf is most of this kernel's time).
    """
    N, F = pre.shape
    for i in prange(N):
        for j in range(F):
            v = pre[i, j] + b[j]
            pre[i, j] = v
            u[i, j] = 0.5 * v * (1.0 + math.erf(v * inv_sqrt2))


@njit(**_JIT)
def _bias_residual_l2norm_forward(y, b2, h, out, norm):
    """Y0 = H0 + (y + b_2);  out = Y0 / ‖Y0‖ per row.

    y [B,D] = U W_2, b2 [D], h [B,D] -> out [B,D], norm [B]
    """
    B, D = y.shape
    for b in prange(B):
        for d in range(D):
            y[b, d] = h[b, d] + (y[b, d] + b2[d])
        ss = 0.0
        for d in range(D):
            ss += y[b, d] * y[b, d]
        nr = math.sqrt(ss)
        norm[b] = nr
        for d in range(D):
            out[b, d] = y[b, d] / nr


# --------------------------------------------------------------------------------------------
# kernels: backward
# --------------------------------------------------------------------------------------------


@njit(**_JIT)
def _l2norm_backward(dout, out, norm, dz):
    """dz = (dy − y (yᵀdy)) / ‖z‖ per row.  dout/out [B,D], norm [B] -> dz [B,D]"""
    B, D = out.shape
    for b in prange(B):
        s = 0.0
        for d in range(D):
            s += out[b, d] * dout[b, d]
        inv = 1.0 / norm[b]
        for d in range(D):
            dz[b, d] = (dout[b, d] - out[b, d] * s) * inv


@njit(**_JIT)
def _gelu_backward_inplace(du, pre, inv_sqrt2, inv_sqrt2pi):
    """du <- du ⊙ GELU'(pre),  GELU'(u) = Φ(u) + u·φ(u).  du/pre [N,F]; constants in the data's dtype."""
    N, F = du.shape
    for i in prange(N):
        for j in range(F):
            v = pre[i, j]
            cdf = 0.5 * (1.0 + math.erf(v * inv_sqrt2))
            pdf = inv_sqrt2pi * math.exp(-0.5 * v * v)
            du[i, j] = du[i, j] * (cdf + v * pdf)


@njit(**_JIT)
def _colsum(m, part):
    """Column sums (bias gradients) via per-block partials: part[blk] = Σ_{rows in blk} m.

    m [N,C] -> part [nblk,C]; rows are read contiguously, the final nblk-way sum is tiny.
    """
    N, C = m.shape
    nblk = part.shape[0]
    for blk in prange(nblk):
        r0 = (N * blk) // nblk
        r1 = (N * (blk + 1)) // nblk
        acc = np.zeros(C, np.float64)
        for i in range(r0, r1):
            for c in range(C):
                acc[c] += m[i, c]
        for c in range(C):
            part[blk, c] = acc[c]


@njit(**_JIT)
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


@njit(**_JIT)
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


@njit(inline="always")
def _ln1_row_backward(dar, xhat, rstd, gamma, dh, b, t, dx, dg, dbt, deq, der):
    """One row of the LN_1 backward (shared by v1 and v2; inlined, so it runs under the caller's
    fastmath flags): dx[b,t] = LN_1ᵀ(dar) (+ dh[b] on token 0), and the row's contributions to the
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


@njit(**_JIT)
def _layernorm1_backward(da1, dq_proj, dh, xhat, rstd, gamma, dx, part):
    """dX = LN_1ᵀ(dA1) (+ dH0 on token 0, the residual);  partials of dγ₁, dβ₁, de_q, de_r.

    da1 [B,T,D] = [dK|dV] [W_k|W_v]ᵀ, dq_proj [B,D] = dQ0 W_qᵀ (token 0's extra dA1),
    dh [B,D], xhat [B,T,D], rstd [B,T], gamma [D]
    -> dx [B,T,D], part [nblk,4,D] (dγ₁, dβ₁, de_q, de_r partial sums over blocks of rows)
    """
    B, T, D = da1.shape
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
                    dar[d] = da1[b, 0, d] + dq_proj[b, d]
            else:
                for d in range(D):
                    dar[d] = da1[b, t, d]
            _ln1_row_backward(dar, xhat, rstd, gamma, dh, b, t, dx, dg, dbt, deq, der)
        for d in range(D):
            part[blk, 0, d] = dg[d]
            part[blk, 1, d] = dbt[d]
            part[blk, 2, d] = deq[d]
            part[blk, 3, d] = der[d]


# --------------------------------------------------------------------------------------------
# kernels v2: the low-rank row-0 attention and the vectorised float32 GELU (what the layer runs)
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
# The optional relevance bias (spec §2) only adds to the query row's logits: s_0 += γ_h, s_t += β_h·sc_{t−1}
# (sc the score features [B,k]); it changes P, not the folds.  Its gradients come from the same dS:
#            dβ_h = Σ_b Σ_{t≥1} dS_t sc_{t−1},  dγ_h = Σ_b dS_0   (dS = dS'·√dh; rows 1..k have dS = 0)
#
# fastmath: "reassoc" lets LLVM vectorise the dot products and sums (changes rounding at the 1e-16
# relative level only), "contract" allows FMAs; no nnan/ninf: masking relies on IEEE -inf / 0.
_JIT2 = dict(parallel=True, cache=True, fastmath={"reassoc", "contract"}, nogil=True)


@njit(**_JIT2)
def _attention_row0_forward_v2(a1, m, valid, scale, p, c, sc, scores=None, beta=None, gamma=None):
    """Softmax of the query row from the folded key vectors; context folded the same way.

    a1 [B,T,D] = LN_1(X), m [h,B,D] (M above), valid [B,T] bool, scale = 1/√dh
    -> p [B,h,T] (exact 0 on masked keys), c [h,B,D] = Σ_t p_t A1_t;  sc [B,h,T] float64 scratch.

    Relevance bias (spec §2, optional): with scores [B,k], beta [h], gamma [h] the logits of the query
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


@njit(**_JIT2)
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


@njit(**_JIT2)
def _layernorm1_backward_v2(ds, p, m, nv, dq_proj, dh, xhat, rstd, gamma, dx, part):
    """_layernorm1_backward with dA1 built on the fly: dA1_t = Σ_h ds_t M[h,b] + p_t N[h,b].

    ds/p [B,h,T], m/nv [h,B,D], dq_proj [B,D] (token 0's extra dA1 = dQ0 W_qᵀ), dh [B,D],
    xhat [B,T,D], rstd [B,T], gamma [D] -> dx [B,T,D], part [nblk,4,D] (dγ₁, dβ₁, de_q, de_r).
    Never writing dA1 [B,T,D] saves one write and one read of it.
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


# Batch-1 GEMVs.  One query reads every weight once and does 2 FLOPs per weight: the time is the
# weight read.  These stream each weight matrix row by row, contiguously, with the (≤ 12 KiB) output
# row in L1; single-threaded like every batch-1 step (SMALL_WORK).  No prange: nothing to split.
_JIT1 = dict(cache=True, fastmath={"reassoc", "contract"}, nogil=True)


@njit(**_JIT1)
def _gemv_v1(x, w, y):
    """y = x @ w for one row.  x [1,Din], w [Din,Dout] (row-major, read once) -> y [1,Dout].

    Plain axpy per weight row: the output row is loaded and stored once per weight row, which makes
    it L1-bound (measured 1.7× slower than v2 at 768×3072).
    """
    Din, Dout = w.shape
    for j in range(Dout):
        y[0, j] = 0.0
    for i in range(Din):
        xi = x[0, i]
        for j in range(Dout):
            y[0, j] += xi * w[i, j]


@njit(**_JIT1)
def _gemv_v2(x, w, y):
    """_gemv_v1 with four weight rows per pass over y: a quarter of the L1 traffic on y.

    x [1,Din], w [Din,Dout] -> y [1,Dout]
    """
    Din, Dout = w.shape
    for j in range(Dout):
        y[0, j] = 0.0
    i = 0
    while i + 4 <= Din:
        x0, x1, x2, x3 = x[0, i], x[0, i + 1], x[0, i + 2], x[0, i + 3]
        for j in range(Dout):
            y[0, j] += x0 * w[i, j] + x1 * w[i + 1, j] + x2 * w[i + 2, j] + x3 * w[i + 3, j]
        i += 4
    while i < Din:
        xi = x[0, i]
        for j in range(Dout):
            y[0, j] += xi * w[i, j]
        i += 1


@njit(**_JIT1)
def _fold_heads_v1(w, v, m):
    """m[h, 0, i] = Σ_{j in head h} w[i, j] v[0, j]  (M = W_k[:, h] q0_h for one row, W read once).

    w [Din,D], v [1,D] -> m [h,1,Din]
    """
    Din, D = w.shape
    H = m.shape[0]
    dh = D // H
    for i in range(Din):
        for hh in range(H):
            o = hh * dh
            acc = 0.0
            for d in range(dh):
                acc += w[i, o + d] * v[0, o + d]
            m[hh, 0, i] = acc


@njit(**_JIT1)
def _unfold_heads_v1(c, w, y):
    """y[0, j] = Σ_i c[h(j), 0, i] w[i, j]  (ctx_h = C[h] W_v[:, h] for one row, W read once).

    c [h,1,Din], w [Din,D] -> y [1,D]; four weight rows per pass over y, as _gemv_v2.
    """
    Din, D = w.shape
    H = c.shape[0]
    dh = D // H
    for j in range(D):
        y[0, j] = 0.0
    i = 0
    while i + 4 <= Din:
        for hh in range(H):
            o = hh * dh
            c0, c1, c2, c3 = c[hh, 0, i], c[hh, 0, i + 1], c[hh, 0, i + 2], c[hh, 0, i + 3]
            for d in range(dh):
                y[0, o + d] += c0 * w[i, o + d] + c1 * w[i + 1, o + d] + c2 * w[i + 2, o + d] + c3 * w[i + 3, o + d]
        i += 4
    while i < Din:
        for hh in range(H):
            o = hh * dh
            ci = c[hh, 0, i]
            for d in range(dh):
                y[0, o + d] += ci * w[i, o + d]
        i += 1


def _mm(x, w):
    """x @ w: the streaming GEMV kernel for one row, BLAS otherwise.  x [B,Din], w [Din,Dout]"""
    if x.shape[0] != 1:
        return x @ w
    y = np.empty((1, w.shape[1]), np.result_type(x, w))
    _gemv_v2(x, w, y)
    return y


# float32 GELU without scalar libm calls, so the loops vectorise (numba has no SVML here).
#   Φ(x) = ½·erfc(−x/√2);  erfc(z) ≈ (a₁t + a₂t² + a₃t³ + a₄t⁴ + a₅t⁵)·e^{−z²},  t = 1/(1 + p z), z ≥ 0
# (Abramowitz & Stegun 7.1.26, |error| ≤ 1.5e-7 on erf), e^{−z²} = e^{−x²/2} by scaling and squaring
# (Taylor to degree 11 at y/128, then 7 squarings: ~1e-11 relative), all in float64 registers.
# |x| > 10.95 (x²/2 > 60) is exact: Φ = 1 or 0, φ = 0.  Measured max |GELU_v2 − GELU| ≤ GELU_MAX_ABS_ERR
# (tests/fusion/test_numba_cpu.py checks it on a dense grid); float64 data keep the exact erf kernels.
_AS_P = 0.3275911
_AS_A1, _AS_A2, _AS_A3, _AS_A4, _AS_A5 = 0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429
#: Documented and tested bound of the float32 GELU approximation: |GELU_v2(x) − x·Φ(x)| ≤ this·max(1, |x|)
#: before the float32 rounding of the stored result.
GELU_MAX_ABS_ERR = 1e-7


@njit(inline="always", fastmath={"contract"})
def _exp_neg_half_sq(x2):
    """e^{−x2/2} for 0 ≤ x2 ≤ 120 without libm: (Taylor at −x2/256)^(2^7)."""
    r = x2 * (-1.0 / 256.0)
    e = 1.0 + r * (1.0 + r * (1.0 / 2.0 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (
        1.0 / 720.0 + r * (1.0 / 5040.0 + r * (1.0 / 40320.0 + r * (1.0 / 362880.0 + r * (
            1.0 / 3628800.0 + r * (1.0 / 39916800.0)))))))))))
    for _ in range(7):
        e = e * e
    return e


@njit(inline="always", fastmath={"contract"})
def _gelu_cdf_pdf(x):
    """(Φ(x), φ(x)) in float64 for the float32 kernels (see the block comment above)."""
    ax = abs(x)
    x2 = min(x * x, 120.0)
    ex = _exp_neg_half_sq(x2)                       # e^{−x²/2}
    t = 1.0 / (1.0 + _AS_P * ax * 0.7071067811865476)
    half_erfc = 0.5 * t * (_AS_A1 + t * (_AS_A2 + t * (_AS_A3 + t * (_AS_A4 + t * _AS_A5)))) * ex
    if x2 >= 120.0:
        half_erfc = 0.0
        ex = 0.0
    cdf = 1.0 - half_erfc if x >= 0.0 else half_erfc
    return cdf, ex * 0.3989422804014327              # φ = e^{−x²/2}/√(2π)


@njit(**_JIT2)
def _bias_gelu_forward_f32(pre, b, u):
    """pre <- pre + b (in place);  u = GELU(pre) with the vectorised Φ (float32 data only).

    pre [N,F], b [F] -> u [N,F]
    """
    N, F = pre.shape
    for i in prange(N):
        for j in range(F):
            v = pre[i, j] + b[j]
            pre[i, j] = v
            cdf, _ = _gelu_cdf_pdf(float(v))
            u[i, j] = v * cdf


@njit(**_JIT2)
def _gelu_backward_colsum_f32(du, pre, part):
    """du <- du ⊙ GELU'(pre) with the vectorised Φ, φ;  part[blk] = Σ_{rows in blk} du (for db_1).

    du/pre [N,F] float32 -> part [nblk,F]; fusing the bias-gradient sum saves a re-read of du.
    """
    N, F = du.shape
    nblk = part.shape[0]
    for blk in prange(nblk):
        r0 = (N * blk) // nblk
        r1 = (N * (blk + 1)) // nblk
        acc = np.zeros(F, np.float64)
        for i in range(r0, r1):
            for j in range(F):
                x = float(pre[i, j])
                cdf, pdf = _gelu_cdf_pdf(x)
                g = du[i, j] * (cdf + x * pdf)
                du[i, j] = g
                acc[j] += du[i, j]
        for j in range(F):
            part[blk, j] = acc[j]


# --------------------------------------------------------------------------------------------
# kernels: InfoNCE
# --------------------------------------------------------------------------------------------


@njit(**_JIT)
def _infonce_lse(z, lse_r, lse_c):
    """Row and column log-sum-exp of the logits.  z [N,N] -> lse_r [N], lse_c [N] (float64).

    Columns are processed in chunks of 16 so each thread still reads z row-contiguously.
    """
    N = z.shape[0]
    for i in prange(N):
        m = -np.inf
        for j in range(N):
            if z[i, j] > m:
                m = z[i, j]
        s = 0.0
        for j in range(N):
            s += math.exp(z[i, j] - m)
        lse_r[i] = m + math.log(s)
    W = 16
    nch = (N + W - 1) // W
    for c in prange(nch):
        j0 = c * W
        j1 = min(N, j0 + W)
        m = np.full(W, -np.inf)
        s = np.zeros(W, np.float64)
        for i in range(N):
            for j in range(j0, j1):
                if z[i, j] > m[j - j0]:
                    m[j - j0] = z[i, j]
        for i in range(N):
            for j in range(j0, j1):
                s[j - j0] += math.exp(z[i, j] - m[j - j0])
        for j in range(j0, j1):
            lse_c[j] = m[j - j0] + math.log(s[j - j0])


@njit(**_JIT)
def _infonce_dz(z, lse_r, lse_c, coef, dz, ds_part):
    """dZ = coef·[(softmax_rows(Z) − I) + (softmax_cols(Z) − I)];  ds_part[i] = Σ_j dZ_ij Z_ij.

    z [N,N], lse_r/lse_c [N] -> dz [N,N], ds_part [N]  (coef = dloss / (2N))
    """
    N = z.shape[0]
    for i in prange(N):
        acc = 0.0
        for j in range(N):
            zij = float(z[i, j])
            g = math.exp(zij - lse_r[i]) + math.exp(zij - lse_c[j])
            if i == j:
                g -= 2.0
            g *= coef
            dz[i, j] = g
            acc += g * zij
        ds_part[i] = acc


# --------------------------------------------------------------------------------------------
# layer: forward / backward (the contract's signatures)
# --------------------------------------------------------------------------------------------


#: Below this many activation elements (B·T·D; B ≤ 11 at k=10, D=512) a step runs on the calling
#: thread only — numba kernels and, when threadpoolctl is installed, the BLAS GEMMs too: waking worker
#: threads costs more than the work.  Measured on the shared 2-core machine at B=1: ~1 ms per numba
#: launch, and 0.1 ms GEMMs taking milliseconds while OpenBLAS's threads were woken between kernels
#: (a whole step ≈ 130 ms with 2 BLAS threads vs ≈ 9 ms with 1).
SMALL_WORK = 1 << 16

#: BLAS threads for the GEMMs of a large step (``B·T·D ≥ SMALL_WORK``); ``None`` leaves BLAS as
#: configured.  Default 1: on a machine with more runnable threads than cores, 2-thread OpenBLAS
#: calls wait for descheduled workers — measured at load ≈ 8 on 2 cores, a B=32 step took 43–340 ms
#: with 2 BLAS threads vs 41–47 ms with one (numba on 2 threads either way), B=256 594–870 vs
#: 165–182 ms (docs/performance.md).  On a dedicated multi-core machine set it to None (or a count).
#: Needs threadpoolctl (optional); without it BLAS keeps its own threading.
STEP_BLAS_THREADS = 1


_blas_threads = blas_threads  # threadpoolctl-backed, optional (reco_ref.backends)


@contextmanager
def _threads_for(n_elements: int):
    """Run the enclosed step single-threaded (numba kernels and BLAS) when the problem is small;
    a large step keeps numba's threads and runs BLAS on :data:`STEP_BLAS_THREADS`."""
    if n_elements >= SMALL_WORK:
        with _blas_threads(STEP_BLAS_THREADS):
            yield
        return
    old = get_num_threads()
    set_num_threads(1)
    try:
        with _blas_threads(1):
            yield
    finally:
        set_num_threads(old)


def _nblk(n: int) -> int:
    """Number of row blocks for partial reductions: a few per thread, never more than rows."""
    return max(1, min(n, 4 * get_num_threads()))


def _colsum_rows(m2: np.ndarray) -> np.ndarray:
    """Σ over rows of m2 [N,C] in m2's dtype (bias gradients)."""
    part = np.empty((_nblk(m2.shape[0]), m2.shape[1]), dtype=m2.dtype)
    if m2.shape[0] == 0:
        return np.zeros(m2.shape[1], dtype=m2.dtype)
    _colsum(m2, part)
    return part.sum(axis=0, dtype=np.float64).astype(m2.dtype)


def fusion_forward(params, query, retrieved, mask=None, *, heads: int, scores=None):
    """Fusion layer forward, token-0 fast path.  Same contract as ``reference.fusion_forward``.

    Parameters
    ----------
    params : mapping of str to ndarray
        The 18 named parameters (row-vector convention, ``W [in,out]``), all one float dtype, plus
        ``rel_beta, rel_gamma [h]`` for the relevance bias (spec §2 "Relevance bias").
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


#: Stage timings of the last steps when a list (see :func:`profile_steps`); None = off (one
#: ``is None`` test per stage, ~50 ns).
_PROFILE = None


def _tick(stage: str) -> None:
    """Close the stage that ran since the previous tick (profiling only)."""
    if _PROFILE is not None:
        _PROFILE.append((stage, time.perf_counter()))


@contextmanager
def profile_steps():
    """Record per-stage wall times of the forward/backward steps run inside the block.

    Yields a list of ``(stage, seconds)``; a stage's time is from the previous tick to its own
    (GEMMs and kernels are synchronous, so this is exact up to ~1 µs of Python per stage).
    Used by ``benchmarks/bench_fusion_query.py`` for the profile table.
    """
    global _PROFILE
    raw, out = [], []
    _PROFILE = raw
    try:
        yield out
    finally:
        _PROFILE = None
        for (_, t0), (name, t1) in zip(raw, raw[1:]):
            if name != "start":
                out.append((name, t1 - t0))


def _heads_view(w, heads: int):
    """W [D_in, D] -> [h, D_in, dh] view: head i's output columns, no copy (BLAS reads it with lda=D)."""
    Din, D = w.shape
    return w.reshape(Din, heads, D // heads).transpose(1, 0, 2)


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
        from ..errors import ShapeError

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
            from ..errors import ShapeError

            raise ShapeError("scores: params have the relevance bias (rel_beta, rel_gamma); pass scores [B,k]")
        scores = np.ascontiguousarray(scores, dtype=dt)  # [B,k] score features
        if scores.shape != (B, k) or p["rel_beta"].shape != (heads,):
            from ..errors import ShapeError

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
    # 3. attention (query row only), through the folded vectors (see the kernels v2 comment)
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


# --------------------------------------------------------------------------------------------
# InfoNCE (spec §3), same contract as reco_ref.train.losses minus ``backend``
# --------------------------------------------------------------------------------------------


def infonce_forward(a, b, tau, *, max_scale=MAX_SCALE):
    """Symmetric InfoNCE ``ℓ(a,b) = ½[CE_rows(Z,I) + CE_rows(Zᵀ,I)]``, ``Z = s a bᵀ``.

    Parameters
    ----------
    a, b : ndarray [N,D]
        Row i of ``a`` matches row i of ``b``.
    tau : float
        Log-scale; ``s = min(exp(tau), max_scale)``.
    max_scale : float

    Returns
    -------
    loss : float
    cache : dict
    """
    dt = np.result_type(a.dtype, b.dtype)
    a = np.ascontiguousarray(a, dtype=dt)
    b = np.ascontiguousarray(b, dtype=dt)
    N = a.shape[0]
    tau = float(tau)
    raw = math.exp(tau) if tau < 709.0 else math.inf  # exp overflows float64 beyond ~709.78
    clamped = raw > max_scale  # strict, as the reference: at exactly max_scale the gradient flows
    s = float(max_scale) if clamped else raw
    z = (a @ b.T) * dt.type(s)                            # [N,N] logits, BLAS
    lse_r = np.empty(N, np.float64)
    lse_c = np.empty(N, np.float64)
    _infonce_lse(z, lse_r, lse_c)
    diag = np.diagonal(z).astype(np.float64)
    loss = 0.5 * (float(np.mean(lse_r - diag)) + float(np.mean(lse_c - diag)))
    cache = dict(backend="numba", a=a, b=b, z=z, lse_r=lse_r, lse_c=lse_c, s=s, clamped=clamped)
    return loss, cache


def infonce_backward(cache, dloss=1.0):
    """Gradients of :func:`infonce_forward`: ``(da [N,D], db [N,D], dtau: float)``.

    ``dZ = ½[(softmax_rows(Z) − I) + (softmax_cols(Z) − I)]/N``, ``da = s dZ b``, ``db = s dZᵀ a``,
    ``ds = Σ dZ ⊙ a bᵀ = Σ dZ ⊙ Z / s``, ``dtau = s·ds`` (0 when the scale is clamped).
    """
    z, a, b, s = cache["z"], cache["a"], cache["b"], cache["s"]
    N = z.shape[0]
    dz = np.empty_like(z)
    ds_part = np.empty(N, np.float64)
    _infonce_dz(z, cache["lse_r"], cache["lse_c"], float(dloss) / (2.0 * N), dz, ds_part)
    sd = z.dtype.type(s)
    da = (dz @ b) * sd
    db = (dz.T @ a) * sd
    dtau = 0.0 if cache["clamped"] else float(ds_part.sum())  # s·ds = s·Σ dZ⊙Z/s
    return da, db, dtau
