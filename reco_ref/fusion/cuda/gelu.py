"""Exact (erf) GELU on the GPU, elementwise: ``GELU(u) = u·Φ(u)``, ``GELU'(u) = Φ(u) + u·φ(u)``.

* v1 ``gelu_forward``: ``out = GELU(u)`` (the bias added by a separate pass).
* v2 ``bias_gelu_forward``: the MLP's ``pre = A2 W_1 + b_1`` bias add fused in (``pre`` is updated
  in place, the backward needs it) — one pass over the ``[B,F]`` hidden activations instead of two.
* ``gelu_backward``: ``du ← du ⊙ GELU'(pre)`` in place.

Arrays are C-contiguous ``[N,F]``; one thread per element, a 1-D grid over ``N·F``.
"""

from __future__ import annotations

import math

from numba import cuda

from ..constants import GELU_INV_SQRT2 as _INV_SQRT2, GELU_INV_SQRT_2PI as _INV_SQRT2PI
from .config import KernelConfig, get_config

__all__ = ["gelu_forward", "bias_gelu_forward", "gelu_backward"]



@cuda.jit
def _gelu_kernel(u, out):
    i = cuda.grid(1)
    F = u.shape[1]
    if i < u.shape[0] * F:
        r = i // F
        c = i - r * F
        x = u[r, c]
        out[r, c] = 0.5 * x * (1.0 + math.erf(x * _INV_SQRT2))


@cuda.jit
def _bias_gelu_kernel(pre, bias, out):
    i = cuda.grid(1)
    F = pre.shape[1]
    if i < pre.shape[0] * F:
        r = i // F
        c = i - r * F
        pre[r, c] = pre[r, c] + bias[c]
        x = pre[r, c]  # the rounded value, as the reference sees it
        out[r, c] = 0.5 * x * (1.0 + math.erf(x * _INV_SQRT2))


@cuda.jit
def _gelu_bwd_kernel(du, pre):
    i = cuda.grid(1)
    F = pre.shape[1]
    if i < pre.shape[0] * F:
        r = i // F
        c = i - r * F
        x = pre[r, c]
        cdf = 0.5 * (1.0 + math.erf(x * _INV_SQRT2))
        pdf = _INV_SQRT2PI * math.exp(-0.5 * x * x)
        du[r, c] = du[r, c] * (cdf + x * pdf)


def _grid(n: int, cfg: KernelConfig):
    t = cfg.threads
    return max(1, math.ceil(n / t)), t


def gelu_forward(u, out, *, cfg: KernelConfig | None = None) -> None:
    """v1: ``out = GELU(u)``.  u, out [N,F]."""
    cfg = cfg or get_config()
    if u.size:
        _gelu_kernel[_grid(u.size, cfg)](u, out)


def bias_gelu_forward(pre, bias, out, *, cfg: KernelConfig | None = None) -> None:
    """v2: ``pre ← pre + bias`` (in place), ``out = GELU(pre)``.  pre, out [N,F], bias [F]."""
    cfg = cfg or get_config()
    if pre.size:
        _bias_gelu_kernel[_grid(pre.size, cfg)](pre, bias, out)


def gelu_backward(du, pre, *, cfg: KernelConfig | None = None) -> None:
    """``du ← du ⊙ (Φ(pre) + pre·φ(pre))`` in place.  du, pre [N,F]."""
    cfg = cfg or get_config()
    if pre.size:
        _gelu_bwd_kernel[_grid(pre.size, cfg)](du, pre)
