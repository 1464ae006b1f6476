"""Symmetric InfoNCE on the GPU (docs/reco.md §3), everything on device including the temperature.

    G = a bᵀ                                  [N,N]  (GEMM, NT)
    s = min(exp τ, max_scale),  Z = s G
    lse_r[i] = log Σ_j exp Z_ij,  lse_c[j] = log Σ_i exp Z_ij     (one block per row / column)
    ℓ = ½ [mean_i(lse_r − Z_ii) + mean_j(lse_c − Z_jj)]
    dZ = (dℓ/2N) [(softmax_rows(Z) − I) + (softmax_cols(Z) − I)]
    da = s dZ b,  db = s dZᵀ a  (GEMMs NN / TN on gs = s·dZ),  dτ = s Σ dZ ⊙ G  (0 when clamped)

``τ`` is a 1-element device array, so a training loop can update it with the AdamW kernel without
a host round trip; ``s`` and the clamp flag are computed on the device.  Float64 accumulation.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda

from ..constants import MAX_SCALE
from .config import KernelConfig, get_config
from .gemm import gemm
from .reduce import block_max, block_sum, sum_all

__all__ = ["infonce_forward_device", "infonce_backward_device"]

_cache: dict = {}


@cuda.jit
def _scale_kernel(tau, max_scale, sc):
    # sc[0] = s, sc[1] = 1.0 when clamped (strict >, as the reference: at equality the gradient flows)
    if cuda.grid(1) == 0:
        t = tau[0]
        raw = math.exp(t) if t < 709.0 else math.inf
        if raw > max_scale:
            sc[0] = max_scale
            sc[1] = 1.0
        else:
            sc[0] = raw
            sc[1] = 0.0


def _lse(threads: int, rows: bool):
    key = ("lse", threads, rows)
    if key in _cache:
        return _cache[key]
    NTH = threads

    def kernel(g, sc, lse):
        # one block per row (rows=True) or column of Z = s·G
        sh = cuda.shared.array(NTH, np.float64)
        N = g.shape[0]
        i = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        s = sc[0]
        m = -math.inf
        for j in range(tid, N, NTH):
            z = s * (g[i, j] if rows else g[j, i])
            if z > m:
                m = z
        m = block_max(sh, m)
        acc = 0.0
        for j in range(tid, N, NTH):
            z = s * (g[i, j] if rows else g[j, i])
            acc += math.exp(z - m)
        acc = block_sum(sh, acc)
        if tid == 0:
            lse[i] = m + math.log(acc)

    _cache[key] = cuda.jit(kernel)
    return _cache[key]


def _loss(threads: int):
    key = ("loss", threads)
    if key in _cache:
        return _cache[key]
    NTH = threads

    def kernel(g, sc, lse_r, lse_c, out):
        sh = cuda.shared.array(NTH, np.float64)
        N = g.shape[0]
        s = sc[0]
        acc = 0.0
        for i in range(cuda.threadIdx.x, N, NTH):
            acc += lse_r[i] + lse_c[i] - 2.0 * s * g[i, i]
        acc = block_sum(sh, acc)
        if cuda.threadIdx.x == 0:
            out[0] = 0.5 * acc / N

    _cache[key] = cuda.jit(kernel)
    return _cache[key]


def _dz(threads: int):
    key = ("dz", threads)
    if key in _cache:
        return _cache[key]
    NTH = threads

    def kernel(g, sc, lse_r, lse_c, dloss, gs, dsp):
        # one block per row i: gs[i,:] = s·dZ[i,:], dsp[i] = Σ_j dZ_ij G_ij
        sh = cuda.shared.array(NTH, np.float64)
        N = g.shape[0]
        i = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        s = sc[0]
        coef = dloss[0] / (2.0 * N)
        acc = 0.0
        for j in range(tid, N, NTH):
            gij = g[i, j]
            z = s * gij
            dz = math.exp(z - lse_r[i]) + math.exp(z - lse_c[j])
            if i == j:
                dz -= 2.0
            dz *= coef
            gs[i, j] = s * dz
            acc += dz * gij
        acc = block_sum(sh, acc)
        if tid == 0:
            dsp[i] = acc

    _cache[key] = cuda.jit(kernel)
    return _cache[key]


@cuda.jit
def _dtau_kernel(sc, ds, dtau):
    if cuda.grid(1) == 0:
        dtau[0] = 0.0 if sc[1] > 0.5 else sc[0] * ds[0]


def infonce_forward_device(a, b, tau, *, max_scale: float = MAX_SCALE, cfg: KernelConfig | None = None):
    """Forward on device arrays.

    Parameters
    ----------
    a, b : device arrays [N,D]
    tau : device array [1] (float64 or the data dtype), the log-scale

    Returns
    -------
    loss : device array [1] float64
    cache : dict of device arrays (``sc = [s, clamped]``)
    """
    cfg = cfg or get_config()
    N = a.shape[0]
    g = cuda.device_array((N, N), dtype=a.dtype)
    gemm(a, b, g, tb=True, cfg=cfg)  # G = a bᵀ
    sc = cuda.device_array(2, dtype=np.float64)
    _scale_kernel[1, 1](tau, float(max_scale), sc)
    lse_r = cuda.device_array(N, dtype=np.float64)
    lse_c = cuda.device_array(N, dtype=np.float64)
    nth = cfg.threads
    _lse(nth, True)[N, nth](g, sc, lse_r)
    _lse(nth, False)[N, nth](g, sc, lse_c)
    loss = cuda.device_array(1, dtype=np.float64)
    _loss(nth)[1, nth](g, sc, lse_r, lse_c, loss)
    return loss, dict(backend="cuda", a=a, b=b, g=g, sc=sc, lse_r=lse_r, lse_c=lse_c)


def infonce_backward_device(cache, dloss, *, cfg: KernelConfig | None = None):
    """Backward on device arrays.  ``dloss``: device array [1].  Returns ``(da, db, dtau [1])``."""
    cfg = cfg or get_config()
    a, b, g, sc = cache["a"], cache["b"], cache["g"], cache["sc"]
    N = a.shape[0]
    nth = cfg.threads
    gs = cuda.device_array((N, N), dtype=a.dtype)
    dsp = cuda.device_array(N, dtype=np.float64)
    _dz(nth)[N, nth](g, sc, cache["lse_r"], cache["lse_c"], dloss, gs, dsp)
    da = cuda.device_array(a.shape, dtype=a.dtype)
    db = cuda.device_array(b.shape, dtype=b.dtype)
    gemm(gs, b, da, cfg=cfg)            # da = s dZ b
    gemm(gs, a, db, ta=True, cfg=cfg)   # db = s dZᵀ a
    ds = cuda.device_array(1, dtype=np.float64)
    sum_all(dsp, ds, cfg=cfg)
    dtau = cuda.device_array(1, dtype=np.float64)
    _dtau_kernel[1, 1](sc, ds, dtau)
    return da, db, dtau
