"""Masked softmax attention on the GPU: one block per (batch row, head), the sequence in shared memory.

Two versions, each checked against :func:`reco_ref.fusion.reference.attention_forward` /
``attention_backward`` in the tests:

* v1 ``attention_full_forward`` / ``attention_full_backward`` — the reference's computation: all
  ``T`` query rows, layout ``q, k, v [B,h,T,dh]``, probabilities ``p [B,h,T,T]``.  K and V of the
  head live in shared memory; each thread owns query rows ``tid, tid+threads, …``.
* v2 ``attention_row0_forward`` / ``attention_row0_backward`` — what the fusion layer needs: only
  the query token's row (rows ``1..T-1`` of the output are never read, docs/reco.md §2 read-out), in the
  layer's fused layout ``q0 [B,D]``, ``kv [B,T,2D]`` (K in columns ``:D``, V in ``D:``), with the
  projection biases added on the fly (and written back, the backward needs biased Q, K, V).
  The head's K (then V, reusing the buffer) is staged in shared memory with coalesced loads.
  Optionally with the relevance bias (docs/reco.md §2 "Relevance bias" [ours]) added to the logits — see
  below; built as a separate specialisation, so the layer without it runs the same code as before.

Relevance bias (row-0 kernels, ``scores``/``rel_beta``/``rel_gamma`` given; the reference's
:func:`~reco_ref.fusion.reference.relevance_bias_forward` / ``relevance_bias_backward``)::

    S[b,h,0] = Q0·K_0/√dh + γ_h                 (logit toward the query token)
    S[b,h,t] = Q0·K_t/√dh + β_h · s[b,t-1]      (toward neighbour t = 1..k), before the mask and softmax
    dβ_h = Σ_{b, t≥1} dS[b,h,t] · s[b,t-1],     dγ_h = Σ_b dS[b,h,0]

Only the query row is computed (the other rows never reach the read-out, so their ``dS`` is 0 in the
reference too).  The forward adds the bias on the fly; the backward kernel writes the unscaled
``dS [B,h,T]`` and :func:`relevance_bias_backward` reduces it to ``dβ, dγ [h]`` (one block per head,
deterministic, no atomics).

Masked keys get probability exactly 0, hence no gradient.  Scores, softmax and dot products
accumulate in float64.  Shared buffers are sized at compile time: kernels are built per
``(T_max, dh, threads, dtype)`` with ``T_max`` = the next power of two ≥ T, so a handful of
specialisations cover all neighbour counts.  Limit: ``T_max·dh·itemsize ≤ 48 KiB`` (static shared
memory), e.g. T ≤ 128 with dh = 64 in float32.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda

from .config import KernelConfig, get_config
from .reduce import block_max, block_sum

__all__ = [
    "attention_full_forward",
    "attention_full_backward",
    "attention_row0_forward",
    "attention_row0_backward",
    "relevance_bias_backward",
]

_cache: dict = {}
_SHARED_LIMIT = 48 * 1024


def _tmax(T: int) -> int:
    return 1 << max(0, (T - 1).bit_length())


def _check_shared(tmax: int, dh: int, dtype, buffers: int) -> None:
    need = buffers * tmax * dh * np.dtype(dtype).itemsize
    if need > _SHARED_LIMIT:
        raise ValueError(
            f"attention: T_max={tmax} × dh={dh} × {np.dtype(dtype).itemsize} B × {buffers} buffers = "
            f"{need} B exceeds the {_SHARED_LIMIT} B of static shared memory; use fewer neighbours, "
            f"more heads, or float32"
        )


# ---------------------------------------------------------------------------------------------
# v1: all query rows, [B,h,T,dh] layout
# ---------------------------------------------------------------------------------------------


def _full_fwd(tmax: int, dh: int, threads: int, dtype):
    key = ("full_fwd", tmax, dh, threads, np.dtype(dtype).str)
    if key in _cache:
        return _cache[key]
    TM, DH, NTH, NT = tmax, dh, threads, np.dtype(dtype).type

    def kernel(q, k, v, valid, scale, out, p):
        sK = cuda.shared.array((TM, DH), NT)
        sV = cuda.shared.array((TM, DH), NT)
        sc = cuda.local.array(TM, np.float64)
        H = q.shape[1]
        T = q.shape[2]
        b = cuda.blockIdx.x // H
        hh = cuda.blockIdx.x - b * H
        tid = cuda.threadIdx.x
        for e in range(tid, T * DH, NTH):
            t = e // DH
            d = e - t * DH
            sK[t, d] = k[b, hh, t, d]
            sV[t, d] = v[b, hh, t, d]
        cuda.syncthreads()
        for i in range(tid, T, NTH):
            m = -math.inf
            for j in range(T):
                if valid[b, j]:
                    acc = 0.0
                    for d in range(DH):
                        acc += q[b, hh, i, d] * sK[j, d]
                    acc *= scale
                    sc[j] = acc
                    if acc > m:
                        m = acc
            z = 0.0
            for j in range(T):
                if valid[b, j]:
                    sc[j] = math.exp(sc[j] - m)
                    z += sc[j]
                else:
                    sc[j] = 0.0  # masked key: probability exactly 0
            for j in range(T):
                sc[j] = sc[j] / z
                p[b, hh, i, j] = sc[j]
            for d in range(DH):
                acc = 0.0
                for j in range(T):
                    acc += sc[j] * sV[j, d]
                out[b, hh, i, d] = acc

    _cache[key] = cuda.jit(kernel)
    return _cache[key]


def attention_full_forward(q, k, v, valid, out, p, *, cfg: KernelConfig | None = None) -> None:
    """v1 forward.  q/k/v [B,h,T,dh], valid [B,T] bool -> out [B,h,T,dh], p [B,h,T,T]."""
    cfg = cfg or get_config()
    B, H, T, dh = q.shape
    tm = _tmax(T)
    _check_shared(tm, dh, q.dtype, 2)
    if B * H:
        _full_fwd(tm, dh, cfg.threads, q.dtype)[B * H, cfg.threads](q, k, v, valid, 1.0 / math.sqrt(dh),
                                                                    out, p)


def _full_bwd(tmax: int, dh: int, threads: int, dtype):
    key = ("full_bwd", tmax, dh, threads, np.dtype(dtype).str)
    if key in _cache:
        return _cache[key]
    TM, DH, NTH, NT = tmax, dh, threads, np.dtype(dtype).type

    def kernel(dout, q, k, v, p, scale, ds, dq, dk, dv):
        # ds [B,h,T,T] is scratch (dS = P ⊙ (dP − rowsum(dP ⊙ P)), scaled)
        sK = cuda.shared.array((TM, DH), NT)
        sV = cuda.shared.array((TM, DH), NT)
        H = q.shape[1]
        T = q.shape[2]
        b = cuda.blockIdx.x // H
        hh = cuda.blockIdx.x - b * H
        tid = cuda.threadIdx.x
        for e in range(tid, T * DH, NTH):
            t = e // DH
            d = e - t * DH
            sK[t, d] = k[b, hh, t, d]
            sV[t, d] = v[b, hh, t, d]
        cuda.syncthreads()
        # phase 1, per query row i: dP_ij = dout_i·V_j, dS_ij, dQ_i = Σ_j dS_ij K_j
        for i in range(tid, T, NTH):
            s = 0.0
            for j in range(T):
                acc = 0.0
                for d in range(DH):
                    acc += dout[b, hh, i, d] * sV[j, d]
                ds[b, hh, i, j] = acc
                s += acc * p[b, hh, i, j]
            for j in range(T):
                ds[b, hh, i, j] = p[b, hh, i, j] * (ds[b, hh, i, j] - s) * scale
            for d in range(DH):
                acc = 0.0
                for j in range(T):
                    acc += ds[b, hh, i, j] * sK[j, d]
                dq[b, hh, i, d] = acc
        cuda.syncthreads()  # ds rows of every thread are visible to the block from here on
        # phase 2, per key row j: dK_j = Σ_i dS_ij Q_i,  dV_j = Σ_i P_ij dout_i
        for j in range(tid, T, NTH):
            for d in range(DH):
                acck = 0.0
                accv = 0.0
                for i in range(T):
                    acck += ds[b, hh, i, j] * q[b, hh, i, d]
                    accv += p[b, hh, i, j] * dout[b, hh, i, d]
                dk[b, hh, j, d] = acck
                dv[b, hh, j, d] = accv

    _cache[key] = cuda.jit(kernel)
    return _cache[key]


def attention_full_backward(dout, q, k, v, p, dq, dk, dv, *, cfg: KernelConfig | None = None) -> None:
    """v1 backward.  dout/q/k/v [B,h,T,dh], p [B,h,T,T] -> dq, dk, dv [B,h,T,dh]."""
    cfg = cfg or get_config()
    B, H, T, dh = q.shape
    tm = _tmax(T)
    _check_shared(tm, dh, q.dtype, 2)
    if B * H:
        ds = cuda.device_array(p.shape, dtype=p.dtype)
        _full_bwd(tm, dh, cfg.threads, q.dtype)[B * H, cfg.threads](dout, q, k, v, p, 1.0 / math.sqrt(dh),
                                                                    ds, dq, dk, dv)


# ---------------------------------------------------------------------------------------------
# v2: the query row only, fused layer layout
# ---------------------------------------------------------------------------------------------


def _row0_fwd(tmax: int, dh: int, threads: int, dtype, rel: bool = False):
    key = ("row0_fwd", tmax, dh, threads, np.dtype(dtype).str, bool(rel))
    if key in _cache:
        return _cache[key]
    TM, DH, NTH, NT, REL = tmax, dh, threads, np.dtype(dtype).type, bool(rel)

    def kernel(q0, b_q, kv, b_k, b_v, valid, heads, scale, scores, rel_beta, rel_gamma, p, ctx):
        # scores [B,k], rel_beta / rel_gamma [h]: read only when REL (else empty placeholders)
        sQ = cuda.shared.array(DH, np.float64)
        sKV = cuda.shared.array((TM, DH), NT)  # K of the head, then V (buffer reused)
        sP = cuda.shared.array(TM, np.float64)
        sh = cuda.shared.array(NTH, np.float64)
        T = kv.shape[1]
        D = kv.shape[2] // 2
        b = cuda.blockIdx.x // heads
        hh = cuda.blockIdx.x - b * heads
        o = hh * DH
        tid = cuda.threadIdx.x
        for d in range(tid, DH, NTH):
            qv = q0[b, o + d] + b_q[o + d]
            q0[b, o + d] = qv
            sQ[d] = q0[b, o + d]
        for e in range(tid, T * DH, NTH):  # consecutive threads read consecutive columns
            t = e // DH
            d = e - t * DH
            kv[b, t, o + d] = kv[b, t, o + d] + b_k[o + d]
            sKV[t, d] = kv[b, t, o + d]
        cuda.syncthreads()
        m = -math.inf
        for t in range(tid, T, NTH):
            if valid[b, t]:
                acc = 0.0
                for d in range(DH):
                    acc += sQ[d] * sKV[t, d]
                acc *= scale
                if REL:  # relevance bias: γ_h toward the query token, β_h·s[b,t-1] toward neighbour t
                    if t == 0:
                        acc += rel_gamma[hh]
                    else:
                        acc += rel_beta[hh] * scores[b, t - 1]
                sP[t] = acc
                if acc > m:
                    m = acc
        m = block_max(sh, m)  # finite: the query token is always valid
        z = 0.0
        for t in range(tid, T, NTH):
            if valid[b, t]:
                sP[t] = math.exp(sP[t] - m)
                z += sP[t]
            else:
                sP[t] = 0.0  # masked key: probability exactly 0
        z = block_sum(sh, z)
        for t in range(tid, T, NTH):
            sP[t] = sP[t] / z
            p[b, hh, t] = sP[t]
        for e in range(tid, T * DH, NTH):  # V into the same buffer (after block_sum's barrier)
            t = e // DH
            d = e - t * DH
            kv[b, t, D + o + d] = kv[b, t, D + o + d] + b_v[o + d]
            sKV[t, d] = kv[b, t, D + o + d]
        cuda.syncthreads()
        for d in range(tid, DH, NTH):
            acc = 0.0
            for t in range(T):
                acc += sP[t] * sKV[t, d]
            ctx[b, o + d] = acc

    _cache[key] = cuda.jit(kernel)
    return _cache[key]


def _placeholder(dtype, ndim: int):
    """An empty device array standing in for an argument the kernel specialisation never reads."""
    return cuda.device_array((0,) * ndim, dtype=dtype)


def _check_rel(scores, rel_beta, rel_gamma, B: int, T: int, heads: int, dtype) -> bool:
    """True when the relevance bias is given (all three arrays), after checking shapes and dtypes."""
    given = [a is not None for a in (scores, rel_beta, rel_gamma)]
    if not any(given):
        return False
    if not all(given):
        raise ValueError("attention: the relevance bias needs scores, rel_beta and rel_gamma together")
    if tuple(scores.shape) != (B, T - 1) or tuple(rel_beta.shape) != (heads,) or tuple(rel_gamma.shape) != (heads,):
        raise ValueError(f"attention: relevance bias shapes scores {tuple(scores.shape)}, rel_beta "
                         f"{tuple(rel_beta.shape)}, rel_gamma {tuple(rel_gamma.shape)}; expected "
                         f"({B}, {T - 1}), ({heads},), ({heads},)")
    for name, a in (("scores", scores), ("rel_beta", rel_beta), ("rel_gamma", rel_gamma)):
        if a.dtype != dtype:
            raise ValueError(f"attention: {name} dtype {a.dtype}, expected {np.dtype(dtype)}")
    return True


def attention_row0_forward(q0, b_q, kv, b_k, b_v, valid, heads: int, p, ctx, *, scores=None, rel_beta=None,
                           rel_gamma=None, cfg: KernelConfig | None = None) -> None:
    """v2 forward (query row only).

    q0 [B,D] = A1[:,0] W_q (bias added in place), kv [B,T,2D] = A1 [W_k|W_v] (biases added in
    place), valid [B,T] bool -> p [B,h,T], ctx [B,D] = concat_h(P_0 V)

    With the relevance bias (``scores [B,k]`` score features, ``rel_beta, rel_gamma [h]``, same dtype;
    all three or none) the logits are ``S_0 = Q0·K_0/√dh + γ_h`` and ``S_t = Q0·K_t/√dh + β_h·s[b,t-1]``
    (t ≥ 1) before the mask; masked slots of ``scores`` are never read.
    """
    cfg = cfg or get_config()
    B, T, D2 = kv.shape
    dh = (D2 // 2) // heads
    tm = _tmax(T)
    _check_shared(tm, dh, kv.dtype, 1)
    rel = _check_rel(scores, rel_beta, rel_gamma, B, T, heads, kv.dtype)
    if not rel:
        scores, rel_beta, rel_gamma = _placeholder(kv.dtype, 2), _placeholder(kv.dtype, 1), _placeholder(kv.dtype, 1)
    if B:
        _row0_fwd(tm, dh, cfg.threads, kv.dtype, rel)[B * heads, cfg.threads](
            q0, b_q, kv, b_k, b_v, valid, heads, 1.0 / math.sqrt(dh), scores, rel_beta, rel_gamma, p, ctx)


def _row0_bwd(tmax: int, dh: int, threads: int, dtype, rel: bool = False):
    key = ("row0_bwd", tmax, dh, threads, np.dtype(dtype).str, bool(rel))
    if key in _cache:
        return _cache[key]
    TM, DH, NTH, REL = tmax, dh, threads, bool(rel)

    def kernel(dctx, p, q0, kv, valid, heads, scale, dq0, dkv, ds):
        # ds [B,h,T]: the logit gradient dS (unscaled), written only when REL (else an empty placeholder)
        sG = cuda.shared.array(DH, np.float64)   # dctx of the head
        sP = cuda.shared.array(TM, np.float64)
        sDS = cuda.shared.array(TM, np.float64)
        sh = cuda.shared.array(NTH, np.float64)
        T = kv.shape[1]
        D = kv.shape[2] // 2
        b = cuda.blockIdx.x // heads
        hh = cuda.blockIdx.x - b * heads
        o = hh * DH
        tid = cuda.threadIdx.x
        for d in range(tid, DH, NTH):
            sG[d] = dctx[b, o + d]
        for t in range(tid, T, NTH):
            sP[t] = p[b, hh, t]
        cuda.syncthreads()
        sdp = 0.0
        for t in range(tid, T, NTH):  # dP_t = dctx · V_t
            acc = 0.0
            if valid[b, t]:
                for d in range(DH):
                    acc += sG[d] * kv[b, t, D + o + d]
            sDS[t] = acc
            sdp += sP[t] * acc
        sdp = block_sum(sh, sdp)  # Σ_t P_t dP_t
        for t in range(tid, T, NTH):
            g = sP[t] * (sDS[t] - sdp)  # dS_t = P_t (dP_t - Σ P dP); 0 where masked
            if REL:
                ds[b, hh, t] = g  # = dB_t, the relevance bias's gradient
            sDS[t] = g * scale  # dS_t / sqrt(dh)
        cuda.syncthreads()
        for e in range(tid, T * DH, NTH):
            t = e // DH
            d = e - t * DH
            dkv[b, t, o + d] = sDS[t] * q0[b, o + d]       # dK_t = dS_t Q0 / sqrt(dh)
            dkv[b, t, D + o + d] = sP[t] * sG[d]           # dV_t = P_t dctx
        for d in range(tid, DH, NTH):                      # dQ0 = Σ_t dS_t K_t / sqrt(dh)
            acc = 0.0
            for t in range(T):
                acc += sDS[t] * kv[b, t, o + d]
            dq0[b, o + d] = acc

    _cache[key] = cuda.jit(kernel)
    return _cache[key]


def attention_row0_backward(dctx, p, q0, kv, valid, heads: int, dq0, dkv, *, ds=None,
                            cfg: KernelConfig | None = None) -> None:
    """v2 backward.  dctx [B,D], p [B,h,T], q0 [B,D] and kv [B,T,2D] (biased, from the forward),
    valid [B,T] -> dq0 [B,D], dkv [B,T,2D] (written in full; zero on masked tokens).

    With ``ds [B,h,T]`` given it also receives the query row's logit gradient
    ``dS_t = P_t (dP_t − Σ_u P_u dP_u)``, ``dP_t = dctx_h · V_t`` (exactly 0 on masked tokens): the
    gradient of any additive logit bias, reduced to ``dβ, dγ`` by :func:`relevance_bias_backward`.
    """
    cfg = cfg or get_config()
    B, T, D2 = kv.shape
    dh = (D2 // 2) // heads
    rel = ds is not None
    if rel and tuple(ds.shape) != (B, heads, T):
        raise ValueError(f"attention: ds shape {tuple(ds.shape)}, expected ({B}, {heads}, {T})")
    if not rel:
        ds = _placeholder(kv.dtype, 3)
    if B:
        _row0_bwd(_tmax(T), dh, cfg.threads, kv.dtype, rel)[B * heads, cfg.threads](
            dctx, p, q0, kv, valid, heads, 1.0 / math.sqrt(dh), dq0, dkv, ds)


# ---------------------------------------------------------------------------------------------
# Relevance bias: dβ, dγ from the query row's logit gradient
# ---------------------------------------------------------------------------------------------


def _rel_bwd(threads: int):
    key = ("rel_bwd", threads)
    if key in _cache:
        return _cache[key]
    NTH = threads

    def kernel(ds, scores, valid, dbeta, dgamma):
        # one block per head hh: dβ_h = Σ_{b,t≥1} dS[b,h,t]·s[b,t-1], dγ_h = Σ_b dS[b,h,0]
        sh = cuda.shared.array(NTH, np.float64)
        B = ds.shape[0]
        T = ds.shape[2]
        hh = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        accb = 0.0
        accg = 0.0
        for e in range(tid, B * T, NTH):
            b = e // T
            t = e - b * T
            if t == 0:
                accg += ds[b, hh, 0]
            elif valid[b, t]:  # dS is 0 on masked slots; their scores may be anything
                accb += ds[b, hh, t] * scores[b, t - 1]
        accb = block_sum(sh, accb)
        accg = block_sum(sh, accg)
        if tid == 0:
            dbeta[hh] = accb
            dgamma[hh] = accg

    _cache[key] = cuda.jit(kernel)
    return _cache[key]


def relevance_bias_backward(ds, scores, valid, dbeta, dgamma, *, cfg: KernelConfig | None = None) -> None:
    r"""Gradients of the relevance bias from the query row's logit gradient (float64 accumulation).

    .. math::

        d\beta_h = \sum_{b,\ t \ge 1} dS_{b,h,t}\, s_{b,t-1}, \qquad d\gamma_h = \sum_b dS_{b,h,0}

    ds [B,h,T] (from :func:`attention_row0_backward`), scores [B,k] (k = T−1; masked slots skipped),
    valid [B,T] bool -> dbeta, dgamma [h] (overwritten).  The scores get no gradient (docs/reco.md §2).
    """
    cfg = cfg or get_config()
    B, H, T = ds.shape
    if H:
        _rel_bwd(cfg.threads)[H, cfg.threads](ds, scores, valid, dbeta, dgamma)
