"""Symmetric InfoNCE (docs/reco.md §3) on the CPU: logits on BLAS, log-sum-exp and ``dZ`` in numba kernels.

Same contract as :func:`reco_ref.train.losses.infonce_forward` / ``infonce_backward`` minus ``backend``; the front
door ``infonce_forward(..., backend="numba")`` dispatches here.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ..constants import MAX_SCALE
from .jit import PARALLEL_IEEE


@njit(**PARALLEL_IEEE)
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


@njit(**PARALLEL_IEEE)
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
