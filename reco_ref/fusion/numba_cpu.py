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
  too when ``threadpoolctl`` is installed): waking worker threads costs more than the work.

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

Shapes: ``B`` batch, ``k`` neighbours, ``T = k+1``, ``D`` width, ``h`` heads, ``dh = D/h``,
``F = mlp_ratio·D`` hidden width.
"""

from __future__ import annotations

import math
import os

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
        for d in range(D):
            part[blk, 0, d] = dg[d]
            part[blk, 1, d] = dbt[d]
            part[blk, 2, d] = deq[d]
            part[blk, 3, d] = der[d]


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

try:  # optional: not a runtime dependency; without it small problems keep BLAS's own threading
    from threadpoolctl import ThreadpoolController

    _BLAS_POOLS = ThreadpoolController()
except Exception:  # noqa: BLE001  (absent, or fails to inspect the loaded libraries)
    _BLAS_POOLS = None


@contextmanager
def _threads_for(n_elements: int):
    """Run the enclosed step single-threaded (numba kernels and BLAS) when the problem is small."""
    if n_elements >= SMALL_WORK:
        yield
        return
    old = get_num_threads()
    set_num_threads(1)
    try:
        if _BLAS_POOLS is not None:
            with _BLAS_POOLS.limit(limits=1, user_api="blas"):
                yield
        else:
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


def fusion_forward(params, query, retrieved, mask=None, *, heads: int):
    """Fusion layer forward, token-0 fast path.  Same contract as ``reference.fusion_forward``.

    Parameters
    ----------
    params : mapping of str to ndarray
        The 18 named parameters (row-vector convention, ``W [in,out]``), all one float dtype.
    query : ndarray [B,D]
    retrieved : ndarray [B,k,D]   (k may be 0)
    mask : ndarray [B,k] bool or None (True = valid neighbour; None = all valid)
    heads : int
        Number of attention heads, dividing D (resolved by the front door).

    Returns
    -------
    out : ndarray [B,D]
        ``normalize(Y[:,0])``.
    cache : dict
        Buffers the backward needs (records ``heads`` and ``backend="numba"``).
    """
    B, D = np.shape(query)
    with _threads_for(B * (np.shape(retrieved)[1] + 1) * D):
        return _fusion_forward(params, query, retrieved, mask, heads=heads)


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
        One array per parameter name (same shape and dtype), plus the input gradients if asked.
    """
    with _threads_for(cache.get("B", 0) * (cache.get("k", 0) + 1) * cache.get("D", 0)):
        return _fusion_backward(params, cache, dout, return_input_grads=return_input_grads)


def _fusion_forward(params, query, retrieved, mask=None, *, heads: int):
    """Body of :func:`fusion_forward` (see there)."""
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
    valid = np.ones((B, T), dtype=np.bool_)  # [B,T]; token 0 (the query) is always valid
    if mask is not None and k:
        valid[:, 1:] = mask
    eps = LN_EPS
    p = {name: np.ascontiguousarray(params[name]) for name in params}

    # 1. X = [q + e_q ; r + e_r], A1 = LN_1(X)               all T tokens
    x = np.empty((B, T, D), dt)
    xhat1 = np.empty((B, T, D), dt)
    rstd1 = np.empty((B, T), dt)
    a1 = np.empty((B, T, D), dt)
    _embed_layernorm_forward(query, retrieved, p["e_query"], p["e_neighbor"], p["ln1_gamma"],
                             p["ln1_beta"], eps, x, xhat1, rstd1, a1)
    # 2. [K|V] = A1 [W_k|W_v] for all tokens (one BLAS call); Q only for token 0
    w_kv = np.concatenate([p["w_k"], p["w_v"]], axis=1)   # [D,2D]
    b_kv = np.concatenate([p["b_k"], p["b_v"]])           # [2D]
    kv = (a1.reshape(B * T, D) @ w_kv).reshape(B, T, 2 * D)  # [B,T,2D] (bias added in 3.)
    a1_0 = np.ascontiguousarray(a1[:, 0, :])              # [B,D]
    q0 = a1_0 @ p["w_q"]                                  # [B,D]
    # 3. masked softmax attention of the query row             [B,h,T], ctx [B,D]
    prob = np.empty((B, heads, T), dt)
    ctx = np.empty((B, D), dt)
    _attention_row0_forward(q0, p["b_q"], kv, b_kv, valid, heads, prob, ctx,
                            np.empty((B, heads, T), np.float64))
    # 4. H0 = X0 + ctx W_o + b_o;  A2 = LN_2(H0)
    o = ctx @ p["w_o"]                                    # [B,D]
    h0 = np.empty((B, D), dt)
    xhat2 = np.empty((B, D), dt)
    rstd2 = np.empty(B, dt)
    a2 = np.empty((B, D), dt)
    _bias_residual_layernorm_forward(x, o, p["b_o"], p["ln2_gamma"], p["ln2_beta"], eps,
                                     h0, xhat2, rstd2, a2)
    # 5. MLP on token 0: pre = A2 W_1 + b_1, U = GELU(pre), Y0 = H0 + U W_2 + b_2
    pre = a2 @ p["w_1"]                                   # [B,F]
    u = np.empty_like(pre)                                # [B,F]
    _bias_gelu_forward(pre, p["b_1"], u, dt.type(_INV_SQRT2))
    y0 = u @ p["w_2"]                                     # [B,D]
    # 6. out = normalize(Y0)
    out = np.empty((B, D), dt)
    norm = np.empty(B, dt)
    _bias_residual_l2norm_forward(y0, p["b_2"], h0, out, norm)
    cache = dict(backend="numba", heads=heads, B=B, k=k, D=D, valid=valid, w_kv=w_kv,
                 xhat1=xhat1, rstd1=rstd1, a1=a1, a1_0=a1_0, kv=kv, q0=q0, prob=prob, ctx=ctx,
                 xhat2=xhat2, rstd2=rstd2, a2=a2, pre=pre, u=u, out=out, norm=norm)
    return out, cache


def _fusion_backward(params, cache, dout, *, return_input_grads=False):
    """Body of :func:`fusion_backward` (see there)."""
    if cache.get("backend") != "numba":
        raise ValueError(
            f"cache was produced by backend {cache.get('backend', 'numpy')!r}; "
            "pass it to the same backend's fusion_backward"
        )
    p = params
    dt = p["w_q"].dtype
    B, k, D, heads = cache["B"], cache["k"], cache["D"], cache["heads"]
    T = k + 1
    dout = np.ascontiguousarray(dout, dtype=dt)          # [B,D]
    g = {}
    # 6. normalisation
    dy = np.empty((B, D), dt)
    _l2norm_backward(dout, cache["out"], cache["norm"], dy)
    # 5. MLP (token 0 only)
    g["b_2"] = _colsum_rows(dy)
    g["w_2"] = cache["u"].T @ dy                          # [F,D]
    dpre = dy @ p["w_2"].T                                # [B,F]
    _gelu_backward_inplace(dpre, cache["pre"], dt.type(_INV_SQRT2), dt.type(_INV_SQRT2PI))
    g["b_1"] = _colsum_rows(dpre)
    g["w_1"] = cache["a2"].T @ dpre                       # [D,F]
    da2 = dpre @ p["w_1"].T                               # [B,D]
    # 4. LN_2 + residual: dH0 = dY0 + LN_2ᵀ(dA2)
    dh0 = np.empty((B, D), dt)
    part2 = np.empty((_nblk(B), 2, D), dt)
    _layernorm2_backward(da2, cache["xhat2"], cache["rstd2"], p["ln2_gamma"], dy, dh0, part2)
    s2 = part2.sum(axis=0, dtype=np.float64).astype(dt)
    g["ln2_gamma"], g["ln2_beta"] = s2[0], s2[1]
    g["b_o"] = _colsum_rows(dh0)
    g["w_o"] = cache["ctx"].T @ dh0                       # [D,D]
    dctx = dh0 @ p["w_o"].T                               # [B,D]
    # 3. attention (query row only)
    dq0 = np.empty((B, D), dt)
    dkv = np.empty((B, T, 2 * D), dt)
    _attention_row0_backward(dctx, cache["prob"], cache["q0"], cache["kv"], cache["valid"], heads,
                             dq0, dkv, np.empty((B, heads, T), np.float64))
    # 2. projections: dW_{k,v} over all tokens, dW_q over token 0
    dkv2 = dkv.reshape(B * T, 2 * D)
    db_kv = _colsum_rows(dkv2)
    a1f = cache["a1"].reshape(B * T, D)                   # [B*T,D]
    if B * T >= 1024:
        # same product, other orientation: OpenBLAS's TN kernel with a long inner dimension ran
        # 2.2–2.6× slower than NT + a 2 MB transpose copy (measured at B·T = 2816 and 11264)
        dw_kv = np.ascontiguousarray((dkv2.T @ a1f).T)    # [D,2D]
    else:
        dw_kv = a1f.T @ dkv2                              # [D,2D]
    g["w_k"], g["w_v"] = np.ascontiguousarray(dw_kv[:, :D]), np.ascontiguousarray(dw_kv[:, D:])
    g["b_k"], g["b_v"] = db_kv[:D].copy(), db_kv[D:].copy()
    g["b_q"] = _colsum_rows(dq0)
    g["w_q"] = cache["a1_0"].T @ dq0                      # [D,D]
    da1 = (dkv2 @ cache["w_kv"].T).reshape(B, T, D)       # [B,T,D]
    dq_proj = dq0 @ p["w_q"].T                            # [B,D], token 0's extra dA1
    # 1. LN_1 + residual + type embeddings
    dx = np.empty((B, T, D), dt)
    part1 = np.empty((_nblk(B * T), 4, D), dt)
    _layernorm1_backward(da1, dq_proj, dh0, cache["xhat1"], cache["rstd1"], p["ln1_gamma"], dx,
                         part1)
    s1 = part1.sum(axis=0, dtype=np.float64).astype(dt)
    g["ln1_gamma"], g["ln1_beta"], g["e_query"], g["e_neighbor"] = s1[0], s1[1], s1[2], s1[3]
    grads = {name: np.ascontiguousarray(g[name], dtype=dt) for name in params}
    if return_input_grads:
        grads["query"] = np.ascontiguousarray(dx[:, 0, :])
        grads["retrieved"] = np.ascontiguousarray(dx[:, 1:, :])
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
