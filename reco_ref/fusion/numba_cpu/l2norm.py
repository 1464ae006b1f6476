"""The output step: bias + residual + L2 normalisation of the query token, and its backward."""

from __future__ import annotations

import math

from numba import njit, prange

from .jit import PARALLEL_IEEE


@njit(**PARALLEL_IEEE)
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


@njit(**PARALLEL_IEEE)
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
