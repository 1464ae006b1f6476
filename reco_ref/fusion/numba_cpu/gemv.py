"""Batch-1 GEMVs: one query row times a weight matrix, streamed once, and the per-head fold/unfold.

Larger batches run their GEMMs on BLAS (``numpy @``): :func:`_mm` picks.  :func:`_heads_view` is the no-copy
per-head view of a weight matrix that the batched per-head GEMMs read.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .jit import SERIAL_REASSOC


# Batch-1 GEMVs.  One query reads every weight once and does 2 FLOPs per weight: the time is the
# weight read.  These stream each weight matrix row by row, contiguously, with the (≤ 12 KiB) output
# row in L1; single-threaded like every batch-1 step (SMALL_WORK).  No prange: nothing to split.


@njit(**SERIAL_REASSOC)
def _gemv_v2(x, w, y):
    """y = x @ w for one row, four weight rows per pass over y.  x [1,Din], w [Din,Dout] -> y [1,Dout].

    Version 2: the plain axpy per weight row (v1, kept in tests/fusion/kernels_v1.py) loads and stores the
    output row once per weight row and is L1-bound; four rows per pass cut the traffic on y to a quarter.
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


@njit(**SERIAL_REASSOC)
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


@njit(**SERIAL_REASSOC)
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


def _heads_view(w, heads: int):
    """W [D_in, D] -> [h, D_in, dh] view: head i's output columns, no copy (BLAS reads it with lda=D)."""
    Din, D = w.shape
    return w.reshape(Din, heads, D // heads).transpose(1, 0, 2)
