r"""RECO's training objective (docs/reco.md §3): symmetric InfoNCE with a learnable temperature, and the
three-term RECO loss.

Symmetric InfoNCE between two batches ``a, b`` of shape ``[N, D]`` (row ``i`` of ``a`` matches row
``i`` of ``b``) with scale ``s = min(exp(τ), max_scale)``::

    Z = s · a bᵀ                                               [N, N]
    ℓ = ½ [ mean_i(lse_j Z_ij − Z_ii) + mean_j(lse_i Z_ij − Z_jj) ]
    dZ = ½ [ (softmax_rows(Z) − I) + (softmax_cols(Z) − I) ] / N
    da = s · dZ b,   db = s · dZᵀ a,   ds = Σ dZ ⊙ a bᵀ,   dτ = s · ds  (0 when clamped)

``lse`` is the log-sum-exp, computed stably (max subtracted), so scales up to ``max_scale`` and far
beyond never overflow. The clamp: when ``exp(τ) > max_scale`` the scale is the constant
``max_scale`` and ``dτ = 0`` (the gradient of ``min(exp τ, c)`` in the clamped region); at exactly
``exp(τ) == max_scale`` the gradient still flows, as ``torch.clamp`` does.

Backends: ``backend="numpy"`` runs the code below; ``"numba"`` and ``"cuda"`` dispatch to
``infonce_forward / infonce_backward`` of :mod:`reco_ref.fusion.numba_cpu` / ``reco_ref.fusion.cuda``
(same signature minus ``backend``; their cache must be a dict), found through the registry
:mod:`reco_ref.backends` that the fusion front door uses too.
"""

from __future__ import annotations

import math

import numpy as np

from ..checks import check_array
from ..backends import backend_function, backend_of_cache
from ..errors import ShapeError
from ..fusion.constants import DEFAULT_TAU, MAX_SCALE  # τ at init; clamp of the scale s = exp(τ), shared with the backends

__all__ = [
    "DEFAULT_TAU",
    "MAX_SCALE",
    "infonce_forward",
    "infonce_backward",
    "reco_loss_forward",
    "reco_loss_backward",
]


def _check_tau(tau) -> float:
    t = np.asarray(tau)
    if t.size != 1 or t.dtype.kind not in "fiu":
        raise ShapeError(f"tau: expected a real scalar, got {tau!r}")
    t = float(t.reshape(()))
    if not math.isfinite(t):
        raise ShapeError(f"tau: expected a finite value, got {t}")
    return t


def _check_pair(a, b):
    a = check_array("a [N,D]", a, ndim=2)
    b = check_array("b [N,D]", b, ndim=2, dtypes=[a.dtype])
    if a.shape != b.shape:
        raise ShapeError(f"b: shape {b.shape} differs from a's shape {a.shape}")
    if a.shape[0] == 0:
        raise ShapeError("a: batch size N is 0, expected at least one pair")
    return np.ascontiguousarray(a), np.ascontiguousarray(b)


def _logsumexp(z, axis):
    """Stable log Σ exp along ``axis`` (keepdims)."""
    zmax = z.max(axis=axis, keepdims=True)
    return zmax + np.log(np.exp(z - zmax).sum(axis=axis, keepdims=True))


def _infonce_forward_numpy(a, b, tau, max_scale):
    dtype = a.dtype
    raw = math.exp(tau) if tau < 709.0 else math.inf  # exp overflows float64 beyond ~709.78
    clamped = raw > max_scale
    s = max_scale if clamped else raw
    G = a @ b.T  # [N, N] cosine similarities for normalised rows
    Z = (dtype.type(s) * G).astype(dtype, copy=False)  # [N, N] logits
    lse_r = _logsumexp(Z, axis=1)  # [N, 1] over each row (a_i against every b_j)
    lse_c = _logsumexp(Z, axis=0)  # [1, N] over each column (b_j against every a_i)
    diag = np.diagonal(Z)  # [N]
    loss = 0.5 * (float(np.mean(lse_r[:, 0] - diag)) + float(np.mean(lse_c[0] - diag)))
    cache = {"a": a, "b": b, "G": G, "Z": Z, "lse_r": lse_r, "lse_c": lse_c, "s": s, "raw_scale": raw,
             "clamped": clamped, "tau": tau}  # fmt: skip
    return loss, cache


def _infonce_backward_numpy(cache, dloss):
    a, b, G, Z = cache["a"], cache["b"], cache["G"], cache["Z"]
    N = a.shape[0]
    dtype = a.dtype
    s = dtype.type(cache["s"])
    P_r = np.exp(Z - cache["lse_r"])  # [N, N] softmax over rows
    P_c = np.exp(Z - cache["lse_c"])  # [N, N] softmax over columns (= softmax_rows(Zᵀ)ᵀ)
    dZ = 0.5 * (P_r + P_c)  # [N, N]
    dZ[np.diag_indices(N)] -= 1.0  # the two −I terms, ½ each
    dZ *= dtype.type(dloss / N)
    da = s * (dZ @ b)  # [N, D]
    db = s * (dZ.T @ a)  # [N, D]
    ds = float((dZ * G).sum())
    dtau = 0.0 if cache["clamped"] else ds * cache["s"]  # d exp(τ)/dτ = exp(τ) = s below the clamp
    return da, db, dtau


def infonce_forward(a, b, tau, *, max_scale=MAX_SCALE, backend="numpy"):
    r"""Symmetric InfoNCE loss between matched rows of ``a`` and ``b``.

    .. math::

        s = \min(e^\tau, s_{\max}), \quad Z = s\, a b^\top, \quad
        \ell = \tfrac12\Big[\tfrac1N\sum_i \big(\log\textstyle\sum_j e^{Z_{ij}} - Z_{ii}\big)
        + \tfrac1N\sum_j \big(\log\textstyle\sum_i e^{Z_{ij}} - Z_{jj}\big)\Big]

    Parameters
    ----------
    a, b : ndarray, shape [N, D], same float dtype
        Usually L2-normalised embeddings (not required).
    tau : float
        Log-scale τ; the scale is ``exp(tau)`` clamped at ``max_scale``.
    max_scale : float
        Clamp of the scale (default 100, as CLIP).
    backend : {"numpy", "numba", "cuda"}

    Returns
    -------
    loss : float
    cache : dict for :func:`infonce_backward` (records ``backend``)
    """
    a, b = _check_pair(a, b)
    tau = _check_tau(tau)
    max_scale = float(max_scale)
    if not (max_scale > 0 and math.isfinite(max_scale)):
        raise ShapeError(f"max_scale: expected a positive finite float, got {max_scale}")
    if backend == "numpy":
        loss, cache = _infonce_forward_numpy(a, b, tau, max_scale)
    else:
        loss, cache = backend_function(backend, "infonce_forward")(a, b, tau, max_scale=max_scale)
        loss = float(loss)
    if isinstance(cache, dict):
        cache["backend"] = backend
    return loss, cache


def infonce_backward(cache, dloss=1.0, *, backend=None):
    r"""Gradients of :func:`infonce_forward`, including the temperature.

    .. math::

        dZ = \tfrac{1}{2N}\big[(\mathrm{softmax_{rows}}(Z) - I) + (\mathrm{softmax_{cols}}(Z) - I)\big]\cdot d\ell

        da = s\, dZ\, b, \quad db = s\, dZ^\top a, \quad
        d\tau = \begin{cases} s \sum_{ij} dZ_{ij} (a b^\top)_{ij} & e^\tau \le s_{\max} \\ 0 & \text{clamped} \end{cases}

    Parameters
    ----------
    cache : dict from :func:`infonce_forward`
    dloss : float
        Upstream gradient of the loss (1 for the loss itself).
    backend : str, optional
        Defaults to the backend that made ``cache``.

    Returns
    -------
    da, db : ndarray, shape [N, D]
    dtau : float
    """
    backend = backend_of_cache(cache, backend, "infonce_forward")
    dloss = float(dloss)
    if not math.isfinite(dloss):
        raise ShapeError(f"dloss: expected a finite value, got {dloss}")
    if backend == "numpy":
        return _infonce_backward_numpy(cache, dloss)
    da, db, dtau = backend_function(backend, "infonce_backward")(cache, dloss)
    return da, db, float(dtau)


def reco_loss_forward(v_bar, t_bar, v, t, tau, *, weights=(1.0, 1.0, 1.0), max_scale=MAX_SCALE, backend="numpy"):
    r"""The RECO loss (docs/reco.md §3): refined↔refined plus refined↔original, both directions.

    .. math::

        L = w_1\,\ell(\bar v, \bar t) + w_2\,\ell(\bar v, t) + w_3\,\ell(v, \bar t)

    with ℓ the symmetric InfoNCE of :func:`infonce_forward` sharing one τ. Equal weights are the
    default [ours]. ``v`` and ``t`` are the frozen encoders' embeddings (no gradient returned).

    Parameters
    ----------
    v_bar, t_bar : ndarray, shape [N, D] — refined image / text embeddings
    v, t : ndarray, shape [N, D] — original (frozen) image / text embeddings
    tau : float
    weights : three non-negative floats
    max_scale : float
    backend : str

    Returns
    -------
    loss : float
    cache : dict for :func:`reco_loss_backward` (also holds each term under ``"terms"``)
    """
    w = tuple(float(x) for x in weights)
    if len(w) != 3 or any(not math.isfinite(x) or x < 0 for x in w):
        raise ShapeError(f"weights: expected three non-negative finite floats, got {weights!r}")
    l1, c1 = infonce_forward(v_bar, t_bar, tau, max_scale=max_scale, backend=backend)
    l2, c2 = infonce_forward(v_bar, t, tau, max_scale=max_scale, backend=backend)
    l3, c3 = infonce_forward(v, t_bar, tau, max_scale=max_scale, backend=backend)
    loss = w[0] * l1 + w[1] * l2 + w[2] * l3
    return loss, {"weights": w, "caches": (c1, c2, c3), "terms": (l1, l2, l3)}


def reco_loss_backward(cache, dloss=1.0):
    r"""Gradients of :func:`reco_loss_forward` with respect to the refined embeddings and τ.

    .. math::

        d\bar v = w_1\, d_a\ell(\bar v,\bar t) + w_2\, d_a\ell(\bar v, t), \quad
        d\bar t = w_1\, d_b\ell(\bar v,\bar t) + w_3\, d_b\ell(v, \bar t), \quad
        d\tau = \textstyle\sum_i w_i\, d_\tau \ell_i

    Returns
    -------
    dv_bar, dt_bar : ndarray, shape [N, D]
    dtau : float
    """
    w = cache["weights"]
    c1, c2, c3 = cache["caches"]
    da1, db1, dt1 = infonce_backward(c1, w[0] * dloss)
    da2, _, dt2 = infonce_backward(c2, w[1] * dloss)
    _, db3, dt3 = infonce_backward(c3, w[2] * dloss)
    return da1 + da2, db1 + db3, dt1 + dt2 + dt3
