"""Numba CUDA backend of the RECO fusion layer and of the symmetric InfoNCE loss.

Host-array contract (same signatures as :mod:`reco_ref.fusion.reference` and
:mod:`reco_ref.fusion.numba_cpu`; the front doors dispatch here with ``backend="cuda"``):

* ``fusion_forward(params, query, retrieved, mask=None, *, heads, scores=None) -> (out, cache)``
  (``scores [B,k]``: score features, used when ``params`` has the relevance bias ``rel_beta, rel_gamma``)
* ``fusion_backward(params, cache, dout, *, return_input_grads=False) -> grads``
* ``infonce_forward(a, b, tau, *, max_scale=MAX_SCALE) -> (loss, cache)``
* ``infonce_backward(cache, dloss=1.0) -> (da, db, dtau)``

Device-resident entry points (numba device arrays in and out, no host round trip between
forward → backward → optimiser step): :func:`fusion_forward_device`, :func:`fusion_backward_device`,
:func:`infonce_forward_device`, :func:`infonce_backward_device`, :func:`adamw_step_device`, with
:func:`params_to_device` / :func:`params_to_host`, :func:`valid_to_device`,
:func:`adamw_init_device`, :func:`state_to_device` / :func:`state_to_host`.

Kernels live by step — :mod:`.gemm`, :mod:`.layernorm`, :mod:`.attention`, :mod:`.gelu`,
:mod:`.l2norm`, :mod:`.reduce`, :mod:`.infonce`, :mod:`.adamw` — with the simpler versions kept
next to the faster ones (llm.c style) and every version tested.  Launch sizes come from
:class:`KernelConfig` (:func:`get_config` / :func:`set_config`); under the CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1``) the default uses tiny blocks.
"""

from __future__ import annotations

import numpy as np
from numba import cuda

from ..constants import MAX_SCALE
from .adamw import adamw_init_device, adamw_step_device, state_to_device, state_to_host
from .config import SIMULATOR, KernelConfig, get_config, set_config
from .infonce import infonce_backward_device, infonce_forward_device
from .layer import (
    fusion_backward_device,
    fusion_forward_device,
    params_to_device,
    params_to_host,
    valid_to_device,
)

__all__ = [
    "fusion_forward",
    "fusion_backward",
    "infonce_forward",
    "infonce_backward",
    "fusion_forward_device",
    "fusion_backward_device",
    "infonce_forward_device",
    "infonce_backward_device",
    "adamw_init_device",
    "adamw_step_device",
    "state_to_device",
    "state_to_host",
    "params_to_device",
    "params_to_host",
    "valid_to_device",
    "KernelConfig",
    "get_config",
    "set_config",
    "SIMULATOR",
]


def fusion_forward(params, query, retrieved, mask=None, *, heads: int, scores=None):
    """Forward on host arrays: copies inputs and parameters to the GPU, returns ``out`` [B,D] on the
    host and a cache holding the device buffers (``backend="cuda"``).

    ``scores [B,k]`` are the neighbours' score features (the front door maps raw cosines); required
    when ``params`` has ``rel_beta, rel_gamma`` (relevance bias, docs/reco.md §2), ignored otherwise."""
    dt = params["w_q"].dtype
    B, D = query.shape
    k = retrieved.shape[1]
    dparams = params_to_device(params)
    dq = cuda.to_device(np.ascontiguousarray(query, dtype=dt))
    dr = cuda.to_device(np.ascontiguousarray(retrieved, dtype=dt))
    dsc = None
    if scores is not None and "rel_beta" in params:
        dsc = cuda.to_device(np.ascontiguousarray(scores, dtype=dt))
    out, cache = fusion_forward_device(dparams, dq, dr, valid_to_device(mask, B, k), heads=heads, scores=dsc)
    return out.copy_to_host(), cache


def fusion_backward(params, cache, dout, *, return_input_grads: bool = False) -> dict:
    """Backward on host arrays (the cache from :func:`fusion_forward` of this module)."""
    if cache.get("backend") != "cuda":
        raise ValueError(f"cache was produced by backend {cache.get('backend', 'numpy')!r}; "
                         "pass it to the same backend's fusion_backward")
    dt = params["w_q"].dtype
    dparams = params_to_device(params)
    ddout = cuda.to_device(np.ascontiguousarray(dout, dtype=dt))
    g = fusion_backward_device(dparams, cache, ddout, return_input_grads=return_input_grads)
    return {name: np.ascontiguousarray(d.copy_to_host()) for name, d in g.items()}


def infonce_forward(a, b, tau, *, max_scale: float = MAX_SCALE):
    """Symmetric InfoNCE on host arrays (see :mod:`.infonce`); returns ``(loss: float, cache)``."""
    dt = np.result_type(a.dtype, b.dtype)
    da = cuda.to_device(np.ascontiguousarray(a, dtype=dt))
    db = cuda.to_device(np.ascontiguousarray(b, dtype=dt))
    dtau = cuda.to_device(np.array([float(tau)], dtype=np.float64))
    loss, cache = infonce_forward_device(da, db, dtau, max_scale=max_scale)
    return float(loss.copy_to_host()[0]), cache


def infonce_backward(cache, dloss: float = 1.0):
    """Gradients ``(da [N,D], db [N,D], dtau: float)`` on the host."""
    ddl = cuda.to_device(np.array([float(dloss)], dtype=np.float64))
    da, db, dtau = infonce_backward_device(cache, ddl)
    return da.copy_to_host(), db.copy_to_host(), float(dtau.copy_to_host()[0])
