"""The first kernel generation of the numba fusion backend, kept for the tests (llm.c keeps its kernel versions
in ``dev/``): not imported by the runtime.

Each was replaced in :mod:`reco_ref.fusion.numba_cpu` by a faster version that the layer runs; the tests hold
both generations to the NumPy reference (tests/fusion/test_numba_cpu.py), so a version can be compared against
its predecessor and brought back if the new one regresses.

* ``_layernorm1_backward`` reads a written ``dA1 [B,T,D]``; ``layernorm._layernorm1_backward_v2`` assembles it
  from the attention folds instead.
* ``_gemv_v1`` is the plain axpy GEMV; ``gemv._gemv_v2`` streams four weight rows per pass.

Same numba options as the runtime kernels they mirror, except ``cache=False``: ``_ln1_row_backward`` is inlined
from another file, and numba's on-disk cache would not notice a change there.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from reco_ref.fusion.numba_cpu.jit import PARALLEL_IEEE, SERIAL_REASSOC
from reco_ref.fusion.numba_cpu.layernorm import _ln1_row_backward

_PARALLEL_IEEE_UNCACHED = {**PARALLEL_IEEE, "cache": False}
_SERIAL_REASSOC_UNCACHED = {**SERIAL_REASSOC, "cache": False}


@njit(**_PARALLEL_IEEE_UNCACHED)
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


@njit(**_SERIAL_REASSOC_UNCACHED)
def _gemv_v1(x, w, y):
    """y = x @ w for one row.  x [1,Din], w [Din,Dout] (row-major, read once) -> y [1,Dout].

    Plain axpy per weight row: the output row is loaded and stored once per weight row, which makes
    it L1-bound (timings against v2 and OpenBLAS: docs/performance.md).
    """
    Din, Dout = w.shape
    for j in range(Dout):
        y[0, j] = 0.0
    for i in range(Din):
        xi = x[0, i]
        for j in range(Dout):
            y[0, j] += xi * w[i, j]
