"""Matrix products ``C (+)= op(A) · op(B)`` on the GPU, three versions (llm.c style: the simpler ones
stay next to the faster one, and every version is checked against ``numpy @`` in the tests).

``op(X)`` is ``X`` or ``Xᵀ``: the backward of ``Y = X W`` needs ``dX = dY Wᵀ`` (NT) and
``dW = Xᵀ dY`` (TN) besides the forward's NN.  Transposes are never materialised: the kernels read
the stored layout directly.  ``C`` may be a strided view (e.g. the ``K`` half of a ``[N,2D]``
buffer), so projections can write into slices of fused buffers.

* v1 ``naive``: one thread per output element, inner product straight from global memory.
* v2 ``tiled``: a ``tile × tile`` block stages ``tile × tile`` tiles of ``op(A)`` and ``op(B)`` in
  shared memory (each global element is read ``N/tile`` instead of ``N`` times); transposed
  operands are loaded so that neighbouring threads read neighbouring addresses (coalesced) and
  written transposed into the padded shared tile (no bank conflicts).
* v3 ``regblock``: v2 plus register blocking — each thread keeps a ``reg × reg`` block of outputs
  in registers, so a block covers ``(tile·reg)²`` outputs and every shared-memory value loaded is
  used ``reg`` times.

Shapes: ``op(A) [M,K]``, ``op(B) [K,N]``, ``C [M,N]``; ``accumulate`` adds into ``C``.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda

from .config import KernelConfig, get_config

__all__ = ["gemm", "gemm_naive_kernel", "gemm_tiled_kernel", "gemm_regblock_kernel"]

_cache: dict = {}


def gemm_naive_kernel(ta: bool, tb: bool, accumulate: bool):
    """v1: one thread per output, grid ``(ceil(N/t), ceil(M/t))`` of ``t × t`` blocks."""
    key = ("naive", ta, tb, accumulate)
    if key in _cache:
        return _cache[key]

    def kernel(A, B, C):
        M, N = C.shape
        K = A.shape[0] if ta else A.shape[1]
        col, row = cuda.grid(2)
        if row < M and col < N:
            acc = 0.0  # float64 accumulator (v1 favours clarity over speed)
            for kk in range(K):
                a = A[kk, row] if ta else A[row, kk]
                b = B[col, kk] if tb else B[kk, col]
                acc += a * b
            if accumulate:
                C[row, col] += acc
            else:
                C[row, col] = acc

    _cache[key] = cuda.jit(kernel)
    return _cache[key]


def gemm_tiled_kernel(tile: int, ta: bool, tb: bool, accumulate: bool, dtype):
    """v2: shared-memory tiles, ``tile × tile`` threads per block, one output per thread."""
    dtype = np.dtype(dtype)
    key = ("tiled", tile, ta, tb, accumulate, dtype.str)
    if key in _cache:
        return _cache[key]
    TILE = tile
    PAD = tile + 1  # padded row: transposed stores hit different banks
    NT = dtype.type

    def kernel(A, B, C):
        sA = cuda.shared.array((TILE, PAD), NT)  # sA[i, kk] = op(A)[row0+i, k0+kk]
        sB = cuda.shared.array((TILE, PAD), NT)  # sB[kk, j] = op(B)[k0+kk, col0+j]
        M, N = C.shape
        K = A.shape[0] if ta else A.shape[1]
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        row0 = cuda.blockIdx.y * TILE
        col0 = cuda.blockIdx.x * TILE
        acc = NT(0.0)
        for k0 in range(0, K, TILE):
            if ta:  # A stored [K,M]: neighbouring tx read neighbouring rows of op(A) (coalesced)
                r = row0 + tx
                kk = k0 + ty
                sA[tx, ty] = A[kk, r] if (r < M and kk < K) else NT(0.0)
            else:
                r = row0 + ty
                kk = k0 + tx
                sA[ty, tx] = A[r, kk] if (r < M and kk < K) else NT(0.0)
            if tb:  # B stored [N,K]
                c = col0 + ty
                kk = k0 + tx
                sB[tx, ty] = B[c, kk] if (c < N and kk < K) else NT(0.0)
            else:
                c = col0 + tx
                kk = k0 + ty
                sB[ty, tx] = B[kk, c] if (c < N and kk < K) else NT(0.0)
            cuda.syncthreads()
            for i in range(TILE):
                acc += sA[ty, i] * sB[i, tx]
            cuda.syncthreads()
        row = row0 + ty
        col = col0 + tx
        if row < M and col < N:
            if accumulate:
                C[row, col] += acc
            else:
                C[row, col] = acc

    _cache[key] = cuda.jit(kernel)
    return _cache[key]


def gemm_regblock_kernel(tile: int, reg: int, ta: bool, tb: bool, accumulate: bool, dtype):
    """v3: ``tile × tile`` threads, each computing ``reg × reg`` outputs of a ``BT × BT`` block tile
    (``BT = tile·reg``); the K loop steps by ``tile``.  Thread ``(ty, tx)`` owns rows
    ``ty + i·tile`` and columns ``tx + j·tile`` (strided, so shared reads are conflict-free)."""
    dtype = np.dtype(dtype)
    key = ("reg", tile, reg, ta, tb, accumulate, dtype.str)
    if key in _cache:
        return _cache[key]
    TILE = tile
    REG = reg
    BT = tile * reg
    BK = tile
    NTHR = tile * tile
    NLOAD = (BT * BK) // NTHR  # = reg: elements of each operand tile a thread loads
    NT = dtype.type
    SA = (BT, BK + 1)
    SB = (BK, BT + 1)
    RR = (REG, REG)

    def kernel(A, B, C):
        sA = cuda.shared.array(SA, NT)  # sA[i, kk] = op(A)[row0+i, k0+kk]
        sB = cuda.shared.array(SB, NT)  # sB[kk, j] = op(B)[k0+kk, col0+j]
        acc = cuda.local.array(RR, NT)
        areg = cuda.local.array(REG, NT)
        M, N = C.shape
        K = A.shape[0] if ta else A.shape[1]
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        tid = ty * TILE + tx
        row0 = cuda.blockIdx.y * BT
        col0 = cuda.blockIdx.x * BT
        for i in range(REG):
            for j in range(REG):
                acc[i, j] = NT(0.0)
        for k0 in range(0, K, BK):
            for l in range(NLOAD):
                e = tid + l * NTHR
                if ta:  # consecutive threads → consecutive rows of op(A) = contiguous in A [K,M]
                    kk = e // BT
                    i = e - kk * BT
                    r = row0 + i
                    sA[i, kk] = A[k0 + kk, r] if (r < M and k0 + kk < K) else NT(0.0)
                else:
                    i = e // BK
                    kk = e - i * BK
                    r = row0 + i
                    sA[i, kk] = A[r, k0 + kk] if (r < M and k0 + kk < K) else NT(0.0)
                if tb:  # B stored [N,K]
                    j = e // BK
                    kk = e - j * BK
                    c = col0 + j
                    sB[kk, j] = B[c, k0 + kk] if (c < N and k0 + kk < K) else NT(0.0)
                else:
                    kk = e // BT
                    j = e - kk * BT
                    c = col0 + j
                    sB[kk, j] = B[k0 + kk, c] if (c < N and k0 + kk < K) else NT(0.0)
            cuda.syncthreads()
            for kk in range(BK):
                for i in range(REG):
                    areg[i] = sA[ty + i * TILE, kk]
                for j in range(REG):
                    b = sB[kk, tx + j * TILE]
                    for i in range(REG):
                        acc[i, j] += areg[i] * b
            cuda.syncthreads()
        for i in range(REG):
            r = row0 + ty + i * TILE
            if r < M:
                for j in range(REG):
                    c = col0 + tx + j * TILE
                    if c < N:
                        if accumulate:
                            C[r, c] += acc[i, j]
                        else:
                            C[r, c] = acc[i, j]

    _cache[key] = cuda.jit(kernel)
    return _cache[key]


def gemm(A, B, C, *, ta: bool = False, tb: bool = False, accumulate: bool = False,
         version: int | None = None, cfg: KernelConfig | None = None) -> None:
    """``C (+)= op(A) op(B)`` on device arrays (2-D, any strides), launched with ``cfg``.

    Parameters
    ----------
    A : device array [M,K] (``ta=False``) or [K,M] (``ta=True``)
    B : device array [K,N] (``tb=False``) or [N,K] (``tb=True``)
    C : device array [M,N], written (or added to when ``accumulate``)
    version : 1, 2 or 3; default ``cfg.gemm_version``
    """
    cfg = cfg or get_config()
    version = version or cfg.gemm_version
    M, N = C.shape
    Ma, Ka = (A.shape[1], A.shape[0]) if ta else A.shape
    Kb, Nb = (B.shape[1], B.shape[0]) if tb else B.shape
    if Ma != M or Nb != N or Ka != Kb:
        raise ValueError(f"gemm: op(A) {Ma}x{Ka} · op(B) {Kb}x{Nb} does not give C {M}x{N}")
    if M == 0 or N == 0:
        return
    t = cfg.tile
    if Ka == 0:  # empty inner dimension: C = 0 (or unchanged)
        if not accumulate:
            from .reduce import fill

            fill(C, 0.0, cfg=cfg)
        return
    if version == 1:
        k = gemm_naive_kernel(ta, tb, accumulate)
        k[(math.ceil(N / t), math.ceil(M / t)), (t, t)](A, B, C)
    elif version == 2:
        k = gemm_tiled_kernel(t, ta, tb, accumulate, C.dtype)
        k[(math.ceil(N / t), math.ceil(M / t)), (t, t)](A, B, C)
    elif version == 3:
        bt = t * cfg.reg
        k = gemm_regblock_kernel(t, cfg.reg, ta, tb, accumulate, C.dtype)
        k[(math.ceil(N / bt), math.ceil(M / bt)), (t, t)](A, B, C)
    else:
        raise ValueError(f"gemm: version must be 1, 2 or 3, got {version}")
