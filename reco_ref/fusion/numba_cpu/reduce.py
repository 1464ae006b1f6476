"""Column sums over rows (the bias gradients), as per-block partials summed in float64."""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .jit import PARALLEL_IEEE
from .threads import _nblk


@njit(**PARALLEL_IEEE)
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


def _colsum_rows(m2: np.ndarray) -> np.ndarray:
    """Σ over rows of m2 [N,C] in m2's dtype (bias gradients)."""
    part = np.empty((_nblk(m2.shape[0]), m2.shape[1]), dtype=m2.dtype)
    if m2.shape[0] == 0:
        return np.zeros(m2.shape[1], dtype=m2.dtype)
    _colsum(m2, part)
    return part.sum(axis=0, dtype=np.float64).astype(m2.dtype)
