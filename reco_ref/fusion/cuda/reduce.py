"""Reductions on the GPU: column sums for bias / LayerNorm-parameter / type-embedding gradients,
block-wide tree reductions used by the row kernels, and small utilities (fill, copy).

Column sums run over the leading two axes of a ``[B,T,C]`` array restricted to tokens
``t0 ≤ t < t1`` (so ``de_q`` sums token 0 and ``de_r`` tokens ``1..k`` of the same buffer):

* v1 ``colsum_v1``: one thread per column loops over every row (coalesced across the warp, but only
  ``C`` threads: too few to fill a large GPU when ``B·T`` is large).
* v2 ``colsum``: two stages — a grid of ``(column block, row chunk)`` writes partial sums
  ``part[chunk, c]``, then one thread per column adds the ``chunks`` partials (deterministic, no
  atomics).  With ``w`` given it also returns ``Σ a ⊙ w`` (LayerNorm's ``dγ = Σ dA ⊙ x̂``).

Accumulation is in float64 for both dtypes.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda

from .config import KernelConfig, get_config

__all__ = ["block_sum", "block_max", "colsum_v1", "colsum", "fill", "copy", "add_", "sum_all"]


@cuda.jit(device=True)
def block_sum(sh, v):
    """Sum of ``v`` over the block's threads (1-D block, power-of-two size); every thread gets it.

    ``sh`` is a float64 shared array of at least ``blockDim.x`` entries.
    """
    tid = cuda.threadIdx.x
    sh[tid] = v
    cuda.syncthreads()
    s = cuda.blockDim.x // 2
    while s > 0:
        if tid < s:
            sh[tid] += sh[tid + s]
        cuda.syncthreads()
        s //= 2
    r = sh[0]
    cuda.syncthreads()  # sh may be reused right after
    return r


@cuda.jit(device=True)
def block_max(sh, v):
    """Maximum of ``v`` over the block's threads; every thread gets it (see :func:`block_sum`)."""
    tid = cuda.threadIdx.x
    sh[tid] = v
    cuda.syncthreads()
    s = cuda.blockDim.x // 2
    while s > 0:
        if tid < s:
            if sh[tid + s] > sh[tid]:
                sh[tid] = sh[tid + s]
        cuda.syncthreads()
        s //= 2
    r = sh[0]
    cuda.syncthreads()
    return r


@cuda.jit
def _colsum_v1_kernel(a, t0, t1, out):
    # a [B,T,C] -> out [C] = Σ_{b, t0<=t<t1} a[b,t,:]
    c = cuda.grid(1)
    if c < out.shape[0]:
        acc = 0.0
        for b in range(a.shape[0]):
            for t in range(t0, t1):
                acc += a[b, t, c]
        out[c] = acc


@cuda.jit
def _colsum_partial_kernel(a, w, use_w, t0, t1, part):
    # a, w [B,T,C] -> part [chunks, 2, C]: chunk's Σ a⊙w (if use_w) and Σ a over its rows
    c = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    ch = cuda.blockIdx.y
    nch = cuda.gridDim.y
    C = part.shape[2]
    if c < C:
        nt = t1 - t0
        n_rows = a.shape[0] * nt
        r0 = (n_rows * ch) // nch
        r1 = (n_rows * (ch + 1)) // nch
        s = 0.0
        sw = 0.0
        for n in range(r0, r1):
            b = n // nt
            t = t0 + n - b * nt
            v = a[b, t, c]
            s += v
            if use_w:
                sw += v * w[b, t, c]
        part[ch, 0, c] = sw
        part[ch, 1, c] = s


@cuda.jit
def _colsum_final_kernel(part, out_w, write_w, out):
    # part [chunks, 2, C] -> out [C] = Σ_chunks part[:,1], out_w [C] = Σ_chunks part[:,0] (if write_w)
    c = cuda.grid(1)
    if c < out.shape[0]:
        s = 0.0
        sw = 0.0
        for ch in range(part.shape[0]):
            sw += part[ch, 0, c]
            s += part[ch, 1, c]
        out[c] = s
        if write_w:
            out_w[c] = sw


def _t_range(a, t0, t1):
    t1 = a.shape[1] if t1 is None else t1
    if not (0 <= t0 <= t1 <= a.shape[1]):
        raise ValueError(f"colsum: token range [{t0},{t1}) outside [0,{a.shape[1]}]")
    return t0, t1


def colsum_v1(a, out, *, t0: int = 0, t1: int | None = None, cfg: KernelConfig | None = None) -> None:
    """v1: ``out[c] = Σ_{b, t0≤t<t1} a[b,t,c]``, one thread per column.  a [B,T,C], out [C]."""
    cfg = cfg or get_config()
    t0, t1 = _t_range(a, t0, t1)
    C = out.shape[0]
    n = cfg.threads
    _colsum_v1_kernel[math.ceil(C / n), n](a, t0, t1, out)


def colsum(a, out, *, w=None, out_w=None, t0: int = 0, t1: int | None = None,
           cfg: KernelConfig | None = None) -> None:
    """v2: ``out = Σ a`` (and ``out_w = Σ a ⊙ w`` when ``w`` is given) over batch and tokens
    ``t0 ≤ t < t1``.  a, w [B,T,C] (any strides); out, out_w [C]."""
    cfg = cfg or get_config()
    t0, t1 = _t_range(a, t0, t1)
    C = out.shape[0]
    n_rows = a.shape[0] * (t1 - t0)
    chunks = max(1, min(cfg.reduce_chunks, n_rows))
    part = cuda.device_array((chunks, 2, C), dtype=np.float64)
    n = cfg.threads
    use_w = w is not None
    _colsum_partial_kernel[(math.ceil(C / n), chunks), n](a, w if use_w else a, use_w, t0, t1, part)
    if use_w:
        if out_w is None or out_w.shape[0] != C:
            raise ValueError("colsum: out_w [C] is required with w")
        _colsum_final_kernel[math.ceil(C / n), n](part, out_w, True, out)
    else:
        _colsum_final_kernel[math.ceil(C / n), n](part, out, False, out)  # out_w unused


@cuda.jit
def _fill_kernel(a, v):
    i = cuda.grid(1)
    if i < a.shape[0]:
        a[i] = v


@cuda.jit
def _copy2d_kernel(src, dst):
    i, j = cuda.grid(2)
    if i < dst.shape[0] and j < dst.shape[1]:
        dst[i, j] = src[i, j]


def fill(a, value: float, *, cfg: KernelConfig | None = None) -> None:
    """Set every element of the device array ``a`` (contiguous, or a 2-D view) to ``value``."""
    cfg = cfg or get_config()
    if a.size == 0:
        return
    n = cfg.threads
    if a.ndim == 2 and not a.flags["C_CONTIGUOUS"]:
        rows = a.shape[0]
        for i in range(rows):  # rare (strided 2-D views); rows are contiguous slices
            _fill_kernel[math.ceil(a.shape[1] / n), n](a[i], value)
        return
    flat = a.reshape(a.size)
    _fill_kernel[math.ceil(a.size / n), n](flat, value)


def copy(src, dst, *, cfg: KernelConfig | None = None) -> None:
    """``dst[...] = src`` for 2-D device arrays of one shape (any strides)."""
    cfg = cfg or get_config()
    if src.shape != dst.shape:
        raise ValueError(f"copy: shapes differ {src.shape} vs {dst.shape}")
    t = cfg.tile
    _copy2d_kernel[(math.ceil(dst.shape[0] / t), math.ceil(dst.shape[1] / t)), (t, t)](src, dst)


@cuda.jit
def _add2d_kernel(dst, src):
    i, j = cuda.grid(2)
    if i < dst.shape[0] and j < dst.shape[1]:
        dst[i, j] = dst[i, j] + src[i, j]


def add_(dst, src, *, cfg: KernelConfig | None = None) -> None:
    """``dst += src`` for 2-D device arrays of one shape (any strides, e.g. ``dX[:,0,:]``)."""
    cfg = cfg or get_config()
    if src.shape != dst.shape:
        raise ValueError(f"add_: shapes differ {dst.shape} vs {src.shape}")
    if dst.size:
        t = cfg.tile
        _add2d_kernel[(math.ceil(dst.shape[0] / t), math.ceil(dst.shape[1] / t)), (t, t)](dst, src)


def _sum_all(threads: int):
    key = ("sum_all", threads)
    if key in _sum_cache:
        return _sum_cache[key]
    NTH = threads

    def kernel(x, scale, out):
        # one block: out[0] = scale · Σ x
        sh = cuda.shared.array(NTH, np.float64)
        s = 0.0
        for i in range(cuda.threadIdx.x, x.shape[0], NTH):
            s += x[i]
        s = block_sum(sh, s)
        if cuda.threadIdx.x == 0:
            out[0] = scale * s

    _sum_cache[key] = cuda.jit(kernel)
    return _sum_cache[key]


_sum_cache: dict = {}


def sum_all(x, out, *, scale: float = 1.0, cfg: KernelConfig | None = None) -> None:
    """``out[0] = scale · Σ x`` for a 1-D device array (one block, tree reduction, float64)."""
    cfg = cfg or get_config()
    _sum_all(cfg.threads)[1, cfg.threads](x, scale, out)
