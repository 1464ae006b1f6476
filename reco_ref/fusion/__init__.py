"""The RECO fusion layer φ (docs/reco.md §2): one pre-LN transformer encoder layer read out at the query token.

Front door. Validates inputs once, then dispatches to a backend module by name, found in the
shared registry :mod:`reco_ref.backends` (the training losses use the same one):

===========  ==================================  ======================================
backend      module                              install
===========  ==================================  ======================================
``numpy``    :mod:`reco_ref.fusion.reference`    always (the readable truth)
``numba``    ``reco_ref.fusion.numba_cpu``       runtime dependency ``numba``
``cuda``     ``reco_ref.fusion.cuda``            extra ``pip install -e ".[cuda]"`` (numba-cuda) + a GPU
===========  ==================================  ======================================

Public API
----------
``init_params(dim, heads, mlp_ratio=4, seed=0, dtype=np.float32) -> FusionParams``
    18 named arrays (``ln1_gamma, ln1_beta, w_q, b_q, w_k, b_k, w_v, b_v, w_o, b_o, ln2_gamma,
    ln2_beta, w_1, b_1, w_2, b_2, e_query, e_neighbor``), row-vector convention (``x @ W``,
    ``W`` of shape ``[in, out]``), identity at init.
``fusion_forward(params, query[B,D], retrieved[B,k,D], mask[B,k] | None = None, *, heads=None, backend="numpy") -> (out[B,D], cache)``
``fusion_backward(params, cache, dout[B,D], *, backend=None, return_input_grads=False) -> grads``
    ``grads`` is a plain dict with the same 18 keys/shapes/dtype as ``params`` (plus ``"query"``
    and ``"retrieved"`` when ``return_input_grads``).
``count_params(params) -> int``; ``save_params / load_params / save_param_set / load_param_set``
(see :mod:`reco_ref.fusion.params`).

Heads (binding decision)
------------------------
Heads are config, not an array. :func:`init_params` and :func:`load_params` return a
:class:`FusionParams` — a ``dict`` subclass carrying read-only ``.heads`` and ``.mlp_ratio`` — so
``fusion_forward(params, q, r, mask)`` needs nothing else. ``heads=`` (keyword-only) overrides
it; a plain dict without ``.heads`` must be given ``heads=``, else :class:`~reco_ref.errors.ShapeError`.

Backend contract (``reference.py``, ``numba_cpu/__init__.py``, ``cuda/__init__.py`` are identical)
--------------------------------------------------------------------------------------------------
``fusion_forward(params, query, retrieved, mask=None, *, heads: int) -> (out, cache: dict)``
    ``heads`` arrives resolved (an int dividing D); ``mask`` is ``None`` (all valid) or bool
    ``[B, k]``; inputs are already validated (dtype = params dtype, finite, C-contiguous).
    ``cache`` is a ``dict`` (the front door adds the key ``"backend"`` to it).
``fusion_backward(params, cache, dout, *, return_input_grads=False) -> dict``
InfoNCE (:mod:`reco_ref.train.losses` dispatches to the same modules):
``infonce_forward(a, b, tau, *, max_scale=MAX_SCALE) -> (loss: float, cache: dict)`` and
``infonce_backward(cache, dloss=1.0) -> (da, db, dtau: float)``.

Masked neighbour slots may hold anything finite or not: where a mask is given, the front door
replaces non-finite values in masked slots by 0 before dispatch (a masked slot provably has no
effect on the output or on the other gradients; its own input gradient is exactly 0).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from ..backends import BACKENDS, backend_of_cache, get_backend
from ..checks import check_array
from ..errors import RecoError, ShapeError
from .params import (
    INITS,
    PARAM_NAMES,
    RELEVANCE_NAMES,
    FusionConfig,
    FusionParams,
    count_params,
    init_params,
    load_param_set,
    load_params,
    param_shapes,
    relevance_of,
    save_param_set,
    save_params,
)

__all__ = [
    "BACKENDS",
    "INITS",
    "PARAM_NAMES",
    "RELEVANCE_NAMES",
    "relevance_of",
    "score_features",
    "resolve_score_map",
    "relevance_gate",
    "gated_scores",
    "FusionConfig",
    "FusionParams",
    "count_params",
    "init_params",
    "param_shapes",
    "save_params",
    "load_params",
    "save_param_set",
    "load_param_set",
    "fusion_forward",
    "fusion_backward",
    "get_backend",
    "check_params",
]

def _resolve_heads(params, heads, D: int) -> int:
    if heads is None:
        heads = getattr(params, "heads", None)
        if heads is None:
            raise ShapeError("heads: params is a plain dict without .heads; pass heads= "
                             "(or use FusionParams from init_params/load_params)")  # fmt: skip
    if isinstance(heads, bool) or not isinstance(heads, (int, np.integer)) or heads < 1:
        raise ShapeError(f"heads: expected a positive int, got {heads!r}")
    heads = int(heads)
    if D % heads:
        raise ShapeError(f"heads: {heads} does not divide the embedding dim D={D}")
    return heads


def check_params(params: Mapping[str, np.ndarray], finite: bool = True, *, rescan: bool = False) -> tuple[int, np.dtype]:
    """Check the 18 fusion arrays are present, consistently shaped and of one float dtype.

    Returns ``(D, dtype)``. Raises :class:`ShapeError` naming the array, expected and found.

    Validation once at the door: a :class:`FusionParams` whose arrays are still the very objects
    that passed a full check (made by ``init_params``/``load_params``, or checked here before) is
    not re-scanned — see :class:`FusionParams` for what in-place writes get. ``rescan=True`` forces
    the full check; plain dicts are always checked in full.
    """
    stamped = None if rescan else getattr(params, "_stamped", None)
    if stamped is not None:
        known = stamped()
        if known is not None:
            return known
    if isinstance(params, FusionParams):
        params._stamp = None  # a check that fails below must not leave an old stamp standing
    if not isinstance(params, Mapping):
        raise ShapeError(f"params: expected a dict of arrays, got {type(params).__name__}")
    missing = [n for n in PARAM_NAMES if n not in params]
    if missing:
        raise ShapeError(f"params: missing {missing} (expected the 18 names {list(PARAM_NAMES)})")
    try:
        rel = relevance_of(params)
    except RecoError as exc:
        raise ShapeError(str(exc)) from None
    if rel is not None and not all(n in params for n in RELEVANCE_NAMES):
        raise ShapeError(f"params: has one of {list(RELEVANCE_NAMES)} but not both")
    g = check_array("params['ln1_gamma']", params["ln1_gamma"], ndim=1, finite=finite)
    D, dtype = g.shape[0], g.dtype
    w1 = check_array("params['w_1']", params["w_1"], ndim=2, dtypes=[dtype], finite=finite)
    if w1.shape[0] != D or w1.shape[1] % D:
        raise ShapeError(f"params['w_1']: shape {w1.shape}, expected ({D}, mlp_ratio*{D})")
    names = PARAM_NAMES
    if rel is not None:
        hb = check_array("params['rel_beta']", params["rel_beta"], ndim=1, dtypes=[dtype], finite=finite).shape[0]
        config = getattr(params, "config", None)
        if config is not None and config.heads != hb:
            raise ShapeError(f"params['rel_beta']: shape ({hb},), expected ({config.heads},) (one per head)")
        if hb < 1 or D % hb:
            raise ShapeError(f"params['rel_beta']: shape ({hb},), expected one entry per head (a divisor of D={D})")
        names = PARAM_NAMES + RELEVANCE_NAMES
    shapes = param_shapes(D, w1.shape[1] // D, None if rel is None else hb)
    for name in names:
        check_array(f"params[{name!r}]", params[name], shape=shapes[name], dtypes=[dtype], finite=finite)
    if finite and isinstance(params, FusionParams):
        params._set_stamp(D, dtype)  # fully checked now: later calls compare identities only
    return D, dtype


def score_features(params, scores, mask=None, *, dtype=None, score_map=None):
    """Raw search scores ``[B, k]`` (cosines) → the feature ``(s − center)/width`` that ``β`` multiplies.

    Masked slots (``mask`` False) may hold anything (non-finite included) and become 0. Returns ``None`` for a
    module without the relevance bias. The map's centre and width come from the module's config
    (:class:`FusionConfig`; see docs/reco.md §2 "Relevance bias"), or from ``score_map = (center, width)`` — the
    searched memory's map, which a module with ``config.rel_source == "memory"`` requires
    (:func:`reco_ref.memory.score_map.memory_score_map`)."""
    rel = relevance_of(params)
    if rel is None:
        return None
    center, width = resolve_score_map(params, score_map)
    s = np.asarray(scores, dtype=np.float64)
    if mask is not None:
        s = np.where(mask, s, center)
    dt = np.dtype(dtype) if dtype is not None else np.asarray(params["ln1_gamma"]).dtype
    return np.ascontiguousarray((s - center) / width, dtype=dt)


def relevance_gate(params, features, mask=None):
    r"""The relevance bias's own verdict on a query's neighbours: the share of attention its bias alone gives the
    query token, averaged over heads — float64 [B] in (0, 1].

    .. math::

        \rho_b = \frac{1}{h}\sum_{h'} \frac{e^{\gamma_{h'}}}{e^{\gamma_{h'}} + \sum_{j\ \text{valid}}
        e^{\beta_{h'} f_{bj}}}

    ``features`` [B, k] are the mapped scores (:func:`score_features`). It is the attention the query token gets
    when the content logits are equal (exactly the layer's query share when ``W_q`` or ``W_k`` is 0): 1 = "none of
    these neighbours is relevant, keep the query", 0 = "use the memory". Evaluation uses it to fall back to the
    frozen class text for a query the memory does not cover ([ours]; :func:`gated_scores`).
    A module without the relevance bias has no verdict: all zeros (the memory is always used, as in the paper).
    """
    f = np.asarray(features, np.float64)
    if f.ndim != 2:
        raise ShapeError(f"features: expected [B,k], got shape {f.shape}")
    if relevance_of(params) is None:
        return np.zeros(f.shape[0])
    beta = np.asarray(params["rel_beta"], np.float64)  # [h]
    gamma = np.asarray(params["rel_gamma"], np.float64)  # [h]
    logit = beta[None, :, None] * f[:, None, :]  # [B, h, k]
    if mask is not None:
        logit = np.where(np.asarray(mask, bool)[:, None, :], logit, -np.inf)
    top = np.maximum(logit.max(axis=2), gamma[None, :])  # [B, h]: a stable softmax
    own = np.exp(gamma[None, :] - top)  # [B, h]
    return (own / (own + np.exp(logit - top[..., None]).sum(axis=2))).mean(axis=1)


def gated_scores(img: np.ndarray, cls_refined: np.ndarray, cls_frozen: np.ndarray, gate: np.ndarray | None
                 ) -> np.ndarray:
    """Class scores ``(1 − ρ)·⟨v, t̄_c⟩ + ρ·⟨v, t_c⟩`` [N, C] (float64): the relevance gate [ours] in zero-shot
    classification (see :mod:`reco_ref.eval.zeroshot`). The class text is refined once for every query and cannot
    know whether a query image is covered by the memory; a query whose image module kept its own token (ρ → 1)
    compares with the frozen class text instead.

    ``img`` [N, D], ``cls_refined`` / ``cls_frozen`` [C, D], ``gate`` [N] in [0, 1] or None (= 0: the refined
    class text only)."""
    s = np.asarray(img, np.float64) @ np.asarray(cls_refined, np.float64).T  # [N, C]
    if gate is None:
        return s
    g = np.asarray(gate, np.float64)
    if g.shape != (img.shape[0],) or not np.isfinite(g).all() or (g < 0).any() or (g > 1).any():
        raise ShapeError(f"gate: expected [N={img.shape[0]}] values in [0, 1], got shape {g.shape}")
    if not g.any():
        return s
    return (1.0 - g)[:, None] * s + g[:, None] * (np.asarray(img, np.float64) @ np.asarray(cls_frozen, np.float64).T)


def resolve_score_map(params, score_map=None) -> tuple[float, float]:
    """The ``(center, width)`` a relevance module's scores are mapped with: ``score_map`` when given, else the
    config's; a module whose config says ``rel_source="memory"`` must be given the searched memory's map."""
    rel = relevance_of(params)
    if rel is None:
        raise ShapeError("score map: this fusion module has no relevance bias")
    if score_map is None:
        config = getattr(params, "config", None)
        if config is not None and config.rel_source == "memory":
            raise ShapeError("score_map: this module reads scores relative to the searched memory "
                             "(rel_source='memory'); pass score_map=memory_score_map(memory, modality)")
        return rel
    try:
        center, width = (float(x) for x in score_map)
    except (TypeError, ValueError):
        raise ShapeError(f"score_map: expected (center, width), got {score_map!r}") from None
    if not (np.isfinite(center) and np.isfinite(width) and width > 0):
        raise ShapeError(f"score_map: expected a finite centre and a positive width, got {score_map!r}")
    return center, width


def fusion_forward(params, query, retrieved, mask=None, *, heads=None, backend="numpy", scores=None,
                   score_map=None):
    """Refine ``query`` with its retrieved neighbours (docs/reco.md §2); validates, then dispatches.

    Parameters
    ----------
    params : FusionParams or dict of the 18 arrays
    query : ndarray, shape [B, D], float dtype equal to the params'
    retrieved : ndarray, shape [B, k, D] (k ≥ 0)
    mask : ndarray of bool, shape [B, k], or None
        ``True`` marks a valid neighbour; ``None`` = all valid. Rows may have no valid neighbour.
    heads : int, optional
        Defaults to ``params.heads``; required for a plain dict.
    backend : {"numpy", "numba", "cuda"}
    scores : ndarray, shape [B, k], or None
        Raw search scores (cosine of the query's search key with each neighbour's). Required when ``params``
        has the relevance bias (``rel_beta, rel_gamma``); the front door maps them to ``(s − center)/width``
        (:func:`score_features`) before dispatch. Ignored by the paper's layer (no relevance arrays).
    score_map : (center, width), optional
        The map to use instead of the config's: the searched memory's (required when ``config.rel_source`` is
        ``"memory"``; :func:`reco_ref.memory.score_map.memory_score_map`).

    Returns
    -------
    out : ndarray, shape [B, D]
        L2-normalised refined embedding; at init exactly ``normalize(query)`` (bit for bit).
    cache : dict
        Pass it to :func:`fusion_backward`; records ``heads`` and ``backend``.

    Raises
    ------
    ShapeError
        Wrong shape/dtype, NaN/inf, embedding dim ≠ params dim, heads not dividing D, a bad mask,
        or an output row that cannot be normalised (zero before normalisation).
    """
    D, dtype = check_params(params)
    query = check_array("query [B,D]", query, ndim=2)
    if query.shape[1] != D:
        raise ShapeError(f"query: embedding dim {query.shape[1]} does not match the params' dim {D}")
    if query.dtype != dtype:
        raise ShapeError(f"query: dtype {query.dtype} differs from the params' dtype {dtype}")
    B = query.shape[0]
    if B == 0:
        raise ShapeError("query: batch size B is 0, expected at least one row")
    check_array("retrieved [B,k,D]", retrieved, ndim=3, dtypes=[dtype], finite=False)
    if retrieved.shape[2] != D:
        raise ShapeError(f"retrieved: embedding dim {retrieved.shape[2]} does not match the params' dim {D}")
    if retrieved.shape[0] != B:
        raise ShapeError(f"retrieved: batch size {retrieved.shape[0]} differs from query's B={B}")
    k = retrieved.shape[1]
    if mask is not None:
        check_array("mask [B,k]", mask, shape=(B, k), dtypes=[np.bool_], finite=False)
        bad = ~np.isfinite(retrieved)
        if bad.any():
            if bad[mask].any():
                raise ShapeError(f"retrieved: {int(bad[mask].sum())} NaN/inf value(s) in valid (unmasked) neighbour slots")
            retrieved = np.where(bad, 0, retrieved).astype(dtype)  # masked slots only: provably no effect
        mask = np.ascontiguousarray(mask)
    else:
        check_array("retrieved [B,k,D]", retrieved, ndim=3, dtypes=[dtype], finite=True)
    heads = _resolve_heads(params, heads, D)
    kw = {}
    if relevance_of(params) is not None:
        if params["rel_beta"].shape[0] != heads:
            raise ShapeError(f"params['rel_beta']: {params['rel_beta'].shape[0]} entries, expected one per head ({heads})")
        if scores is None:
            raise ShapeError("scores: this fusion module has the relevance bias (rel_beta, rel_gamma) and needs the "
                             "neighbours' search scores [B,k]; got None")
        check_array("scores [B,k]", scores, shape=(B, k), finite=False)
        sc = np.asarray(scores)
        if sc.dtype.kind != "f":
            raise ShapeError(f"scores: dtype {sc.dtype}, expected a float dtype")
        bad = ~np.isfinite(sc) if mask is None else (~np.isfinite(sc) & mask)
        if bad.any():
            raise ShapeError(f"scores: {int(bad.sum())} NaN/inf value(s) in valid neighbour slots")
        kw["scores"] = score_features(params, sc, mask, dtype=dtype, score_map=score_map)
    mod = get_backend(backend)
    with np.errstate(invalid="ignore", divide="ignore"):  # a zero row is reported just below, by name
        out, cache = mod.fusion_forward(params, np.ascontiguousarray(query), np.ascontiguousarray(retrieved), mask,
                                        heads=heads, **kw)
    if not np.isfinite(out).all():
        rows = np.flatnonzero(~np.isfinite(out).all(axis=1))
        raise ShapeError(f"fusion output: rows {rows[:10].tolist()} are not finite (zero vector before "
                         f"normalisation, or overflow); a query row must not be zero")  # fmt: skip
    if isinstance(cache, dict):
        cache["backend"] = backend
    return out, cache


def fusion_backward(params, cache, dout, *, backend=None, return_input_grads=False):
    """Gradients of ``sum(dout * out)`` with respect to every parameter (docs/reco.md §2 "Backward").

    Parameters
    ----------
    params : the params given to :func:`fusion_forward`
    cache : dict returned by :func:`fusion_forward`
    dout : ndarray, shape [B, D], same dtype
    backend : str, optional
        Defaults to the backend that produced ``cache``; a different explicit one is an error.
    return_input_grads : bool
        Add ``"query"`` [B, D] and ``"retrieved"`` [B, k, D].

    Returns
    -------
    grads : dict, same 18 keys, shapes and dtype as ``params``.
    """
    D, dtype = check_params(params, finite=False)
    backend = backend_of_cache(cache, backend, "fusion_forward")
    dout = check_array("dout [B,D]", dout, ndim=2, dtypes=[dtype])
    B = cache.get("B")
    if dout.shape[1] != D or (B is not None and dout.shape[0] != B):
        raise ShapeError(f"dout: shape {dout.shape}, expected ({B if B is not None else 'B'}, {D})")
    mod = get_backend(backend)
    return mod.fusion_backward(params, cache, np.ascontiguousarray(dout), return_input_grads=return_input_grads)
