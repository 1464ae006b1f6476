"""Masked softmax attention on the GPU: one block per (batch row, head), the sequence in shared memory.

Two versions, each checked against :func:`reco_ref.fusion.reference.attention_forward` /
``attention_backward`` in the tests:

* v1 ``attention_full_forward`` / ``attention_full_backward`` — the reference's computation: all
  ``T`` query rows, layout ``q, k, v [B,h,T,dh]``, probabilities ``p [B,h,T,T]``.  K and V of the
  head live in shared memory; each thread owns query rows ``tid, tid+threads, …``.
* v2 ``attention_row0_forward`` / ``attention_row0_backward`` — what the fusion layer needs: only
  the query token's row (rows ``1..T-1`` of the output are never read, spec §2 read-out), in the
  layer's fused layout ``q0 [B,D]``, ``kv [B,T,2D]`` (K in columns ``:D``, V in ``D:``), with the
  projection biases added on the fly (and written back, the backward needs biased Q, K, V).
  The head's K (then V, reusing the buffer) is staged in shared memory with coalesced loads.

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


def _row0_fwd(tmax: int, dh: int, threads: int, dtype):
    key = ("row0_fwd", tmax, dh, threads, np.dtype(dtype).str)
    if key in _cache:
        return _cache[key]
    TM, DH, NTH, NT = tmax, dh, threads, np.dtype(dtype).type

    def kernel(q0, b_q, kv, b_k, b_v, valid, heads, scale, p, ctx):
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


def attention_row0_forward(q0, b_q, kv, b_k, b_v, valid, heads: int, p, ctx, *,
                           cfg: KernelConfig | None = None) -> None:
    """v2 forward (query row only).

    q0 [B,D] = A1[:,0] W_q (bias added in place), kv [B,T,2D] = A1 [W_k|W_v] (biases added in
    place), valid [B,T] bool -> p [B,h,T], ctx [B,D] = concat_h(P_0 V)
    """
    cfg = cfg or get_config()
    B, T, D2 = kv.shape
    dh = (D2 // 2) // heads
    tm = _tmax(T)
    _check_shared(tm, dh, kv.dtype, 1)
    if B:
        _row0_fwd(tm, dh, cfg.threads, kv.dtype)[B * heads, cfg.threads](
            q0, b_q, kv, b_k, b_v, valid, heads, 1.0 / math.sqrt(dh), p, ctx)


def _row0_bwd(tmax: int, dh: int, threads: int, dtype):
    key = ("row0_bwd", tmax, dh, threads, np.dtype(dtype).str)
    if key in _cache:
        return _cache[key]
    TM, DH, NTH = tmax, dh, threads

    def kernel(dctx, p, q0, kv, valid, heads, scale, dq0, dkv):
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
            sDS[t] = sP[t] * (sDS[t] - sdp) * scale  # dS_t / sqrt(dh); 0 where masked
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


def attention_row0_backward(dctx, p, q0, kv, valid, heads: int, dq0, dkv, *,
                            cfg: KernelConfig | None = None) -> None:
    """v2 backward.  dctx [B,D], p [B,h,T], q0 [B,D] and kv [B,T,2D] (biased, from the forward),
    valid [B,T] -> dq0 [B,D], dkv [B,T,2D] (written in full; zero on masked tokens)."""
    cfg = cfg or get_config()
    B, T, D2 = kv.shape
    dh = (D2 // 2) // heads
    if B:
        _row0_bwd(_tmax(T), dh, cfg.threads, kv.dtype)[B * heads, cfg.threads](
            dctx, p, q0, kv, valid, heads, 1.0 / math.sqrt(dh), dq0, dkv)
