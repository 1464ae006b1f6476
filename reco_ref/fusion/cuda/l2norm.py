"""The read-out on the GPU: ``Y0 = H0 + (U W_2 + b_2)`` and ``out = Y0 / ‖Y0‖`` (forward), and
``dz = (dy − y (yᵀdy)) / ‖z‖`` (backward).  One block per row, shared-memory tree reductions."""

from __future__ import annotations

import math

import numpy as np
from numba import cuda

from .config import KernelConfig, get_config
from .reduce import block_sum

__all__ = ["bias_residual_l2norm_forward", "l2norm_forward", "l2norm_backward"]

_cache: dict = {}


def _fwd(threads: int):
    key = ("fwd", threads)
    if key in _cache:
        return _cache[key]
    NTH = threads

    def kernel(y, b2, h, has_res, out, norm):
        sh = cuda.shared.array(NTH, np.float64)
        D = y.shape[1]
        b = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        ss = 0.0
        for d in range(tid, D, NTH):
            if has_res:
                y[b, d] = h[b, d] + (y[b, d] + b2[d])
            v = y[b, d]
            ss += v * v
        nr = math.sqrt(block_sum(sh, ss))
        if tid == 0:
            norm[b] = nr
        for d in range(tid, D, NTH):
            out[b, d] = y[b, d] / nr

    _cache[key] = cuda.jit(kernel)
    return _cache[key]


def bias_residual_l2norm_forward(y, b2, h, out, norm, *, cfg: KernelConfig | None = None) -> None:
    """``y ← h + (y + b2)`` (in place), ``out = y/‖y‖``.  y/h/out [B,D], b2 [D] -> norm [B]."""
    cfg = cfg or get_config()
    if y.shape[0]:
        _fwd(cfg.threads)[y.shape[0], cfg.threads](y, b2, h, True, out, norm)


def l2norm_forward(z, out, norm, *, cfg: KernelConfig | None = None) -> None:
    """``out = z/‖z‖`` per row.  z/out [B,D] -> norm [B]."""
    cfg = cfg or get_config()
    if z.shape[0]:
        _fwd(cfg.threads)[z.shape[0], cfg.threads](z, z[0], z, False, out, norm)


def _bwd(threads: int):
    key = ("bwd", threads)
    if key in _cache:
        return _cache[key]
    NTH = threads

    def kernel(dout, out, norm, dz):
        sh = cuda.shared.array(NTH, np.float64)
        D = out.shape[1]
        b = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        s = 0.0
        for d in range(tid, D, NTH):
            s += out[b, d] * dout[b, d]
        s = block_sum(sh, s)
        inv = 1.0 / norm[b]
        for d in range(tid, D, NTH):
            dz[b, d] = (dout[b, d] - out[b, d] * s) * inv

    _cache[key] = cuda.jit(kernel)
    return _cache[key]


def l2norm_backward(dout, out, norm, dz, *, cfg: KernelConfig | None = None) -> None:
    """``dz = (dout − out (outᵀdout)) / norm``.  dout/out/dz [B,D], norm [B]."""
    cfg = cfg or get_config()
    if out.shape[0]:
        _bwd(cfg.threads)[out.shape[0], cfg.threads](dout, out, norm, dz)
