"""AdamW step on the GPU, so parameters, gradients and moments never leave the device.

Same update as :func:`reco_ref.train.optim.adamw_step` (and ``torch.optim.AdamW``); ``t`` counts
from 1::

    p ← p · (1 − lr·λ)            where decay applies (matrices, ndim ≥ 2, by default)
    m ← β1 m + (1 − β1) g
    v ← β2 v + (1 − β2) g²
    p ← p − (lr/(1 − β1^t)) · m / (sqrt(v)/sqrt(1 − β2^t) + ε)

The state is ``{"step": int, "m.<name>": device array, "v.<name>": device array}``;
:func:`state_to_host` gives the NumPy layout of :func:`reco_ref.train.optim.adamw_init` (saveable
with :mod:`reco_ref.io`), :func:`state_to_device` the reverse.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda

from .config import KernelConfig, get_config

__all__ = ["adamw_init_device", "adamw_step_device", "state_to_device", "state_to_host"]


@cuda.jit
def _adamw_kernel(p, g, m, v, lr, b1, b2, eps, decay_factor, inv_c1, inv_sqrt_c2):
    i = cuda.grid(1)
    if i < p.shape[0]:
        pi = p[i] * decay_factor
        mi = m[i] * b1 + (1.0 - b1) * g[i]
        vi = v[i] * b2 + (1.0 - b2) * (g[i] * g[i])
        m[i] = mi
        v[i] = vi
        p[i] = pi - (lr * inv_c1) * m[i] / (math.sqrt(v[i]) * inv_sqrt_c2 + eps)


def adamw_init_device(dparams) -> dict:
    """Zero moments on the device for every parameter, ``step = 0``."""
    state = {"step": 0}
    for name, p in dparams.items():
        state["m." + name] = cuda.to_device(np.zeros(p.shape, dtype=p.dtype))
        state["v." + name] = cuda.to_device(np.zeros(p.shape, dtype=p.dtype))
    return state


def state_to_device(state) -> dict:
    """NumPy optimiser state (``reco_ref.train.optim`` layout) → device state."""
    out = {"step": int(state["step"])}
    for key, val in state.items():
        if key != "step":
            out[key] = cuda.to_device(np.ascontiguousarray(val))
    return out


def state_to_host(dstate) -> dict:
    """Device state → NumPy state (``"step"`` as a 0-d int64 array)."""
    out = {"step": np.array(int(dstate["step"]), dtype=np.int64)}
    for key, val in dstate.items():
        if key != "step":
            out[key] = val.copy_to_host()
    return out


def adamw_step_device(dparams, dgrads, dstate, lr: float, *, betas=(0.9, 0.98), eps: float = 1e-6,
                      weight_decay: float = 0.2, decay=None, cfg: KernelConfig | None = None) -> None:
    """One AdamW update in place on device parameters and state (one kernel per parameter).

    ``decay``: None (matrices only), a collection of names, or a callable ``(name, array) -> bool``,
    as :func:`reco_ref.fusion.params.adamw_decays` — the callable gets a host placeholder of the
    parameter's shape (for ``ndim``/``shape`` tests), not its values, which stay on the device.
    """
    from ..params import adamw_decays

    cfg = cfg or get_config()
    b1, b2 = float(betas[0]), float(betas[1])
    t = int(dstate["step"]) + 1
    c1 = 1.0 - b1**t
    c2 = 1.0 - b2**t
    n = cfg.threads
    for name, g in dgrads.items():
        if name not in dparams:
            continue
        p = dparams[name]
        if g.shape != p.shape:
            raise ValueError(f"grads[{name!r}]: shape {g.shape}, expected {p.shape}")
        decays = bool(weight_decay) and adamw_decays(name, np.empty(p.shape, dtype=np.bool_), decay)
        factor = 1.0 - lr * weight_decay if decays else 1.0
        size = p.size
        if size == 0:
            continue
        flat = lambda x: x.reshape(size)  # noqa: E731  contiguous device arrays
        _adamw_kernel[math.ceil(size / n), n](flat(p), flat(g), flat(dstate["m." + name]),
                                              flat(dstate["v." + name]), float(lr), b1, b2, float(eps),
                                              factor, 1.0 / c1, 1.0 / math.sqrt(c2))
    dstate["step"] = t
