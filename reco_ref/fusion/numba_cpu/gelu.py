"""Bias + GELU of the MLP (query token only) and its backward.

Two kernel pairs: the exact erf form for float64 data (``math.erf``, in the data's dtype), and for float32 data a
vectorisable approximation of Φ with a documented error bound (:data:`GELU_MAX_ABS_ERR`) whose backward also
sums the ``db_1`` columns.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ..constants import GELU_INV_SQRT2 as _INV_SQRT2, GELU_INV_SQRT_2PI as _INV_SQRT2PI  # noqa: F401 (re-exported)
from .jit import PARALLEL_IEEE, PARALLEL_REASSOC


@njit(**PARALLEL_IEEE)
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


@njit(**PARALLEL_IEEE)
def _gelu_backward_inplace(du, pre, inv_sqrt2, inv_sqrt2pi):
    """du <- du ⊙ GELU'(pre),  GELU'(u) = Φ(u) + u·φ(u).  du/pre [N,F]; constants in the data's dtype."""
    N, F = du.shape
    for i in prange(N):
        for j in range(F):
            v = pre[i, j]
            cdf = 0.5 * (1.0 + math.erf(v * inv_sqrt2))
            pdf = inv_sqrt2pi * math.exp(-0.5 * v * v)
            du[i, j] = du[i, j] * (cdf + v * pdf)


# float32 GELU without scalar libm calls, so the loops vectorise (numba has no SVML here).
#   Φ(x) = ½·erfc(−x/√2);  erfc(z) ≈ (a₁t + a₂t² + a₃t³ + a₄t⁴ + a₅t⁵)·e^{−z²},  t = 1/(1 + p z), z ≥ 0
# (Abramowitz & Stegun 7.1.26, |error| ≤ 1.5e-7 on erf), e^{−z²} = e^{−x²/2} by scaling and squaring
# (Taylor to degree 11 at y/128, then 7 squarings: ~1e-11 relative), all in float64 registers.
# |x| > 10.95 (x²/2 > 60) is exact: Φ = 1 or 0, φ = 0.  |GELU_v2 − GELU| ≤ GELU_MAX_ABS_ERR, checked on a dense
# grid by tests/fusion/test_numba_cpu.py (measured errors: docs/performance.md, "GELU approximation"); float64
# data keep the exact erf kernels above.
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


@njit(**PARALLEL_REASSOC)
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


@njit(**PARALLEL_REASSOC)
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
