r"""Apply the model: retrieval-enhance a batch of embeddings with a memory and a fusion module (docs/reco.md
§1–§2, inference).

.. math::

    \bar x = \varphi\big(x,\ \{ E^{M}_{\mathrm{fed}}[j] : j \in \mathrm{kNN}_{\mathrm{searched}}(x) \}\big)

``search="uni"`` searches the query's own modality (image keys for images when the memory has them),
``"cross"`` the other one; ``fuse="cross"`` feeds the other modality's embeddings of the retrieved rows,
``"uni"`` the query's own. Retrieval is :func:`reco_ref.memory.retrieve`; the fusion is
:func:`reco_ref.fusion.fusion_forward` on the chosen backend. Queries are processed ``batch_size`` at a
time so memory use stays bounded.

One case needs an index the memory does not store: a *text* query searched cross-modally against a memory
whose image index holds search keys (``memory.key_dim`` set, e.g. reco-mini's 1024-d keys) — text
embeddings live in the D-dim joint space, not the key space. That search then runs exactly (brute force)
over the memory's image *embeddings* ``V^M``, with the same exclusion and padding rules.

Two checks every caller runs before it: :func:`check_backend` (the fusion backend is usable here, ``cuda`` with a
device) and :func:`own_rows` (the memory row holding each query image itself, to ``exclude`` it from its own
neighbours).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..checks import cap_k, check_array
from ..errors import RecoError, SearchError, ShapeError
from ..fusion import fusion_forward, get_backend, relevance_gate, relevance_of, score_features
from ..memory import retrieve, search_index
from ..memory.exact import ExactIndex

__all__ = ["refine", "retrieve_for", "searched_score_map", "own_rows", "SELF_MATCH_COSINE", "check_backend"]

#: cosine at or above which a memory image counts as the query image itself (float32 rounding of 1.0)
SELF_MATCH_COSINE = 0.9999
_CHUNK = 2048  # queries per self-match search call: bounds the search's temporary arrays


def check_backend(backend: str) -> None:
    """Refuse an unknown or uninstalled fusion backend, or ``cuda`` without a device, before any work.

    ``get_backend("cuda")`` imports without a GPU (numba's CUDA module is importable anywhere); the first kernel
    launch then failed deep in a run (``CudaSupportError``, after the run folder was written).
    """
    get_backend(backend)  # BackendUnavailableError is a RecoError (one-line CLI error)
    if backend == "cuda":
        from numba import cuda

        if not cuda.is_available():  # True under NUMBA_ENABLE_CUDASIM=1 (the simulator) as well
            raise RecoError("fusion backend 'cuda': no usable CUDA device/driver (numba.cuda.is_available() is "
                            "False); use --backend numpy or numba")


def own_rows(memory: Any, search_vectors: np.ndarray, *, threshold: float = SELF_MATCH_COSINE) -> np.ndarray:
    """The memory row holding each query image itself (exact k=1 self-match, cosine ≥ ``threshold``), or -1.

    ``search_vectors`` [N, Dk] are what the memory's image index holds (image keys where ``memory.key_dim``
    is set, else image embeddings). Returns int64 [N].
    """
    out = np.full(len(search_vectors), -1, np.int64)
    for lo in range(0, len(search_vectors), _CHUNK):
        rows, scores, valid = memory.search(np.asarray(search_vectors[lo:lo + _CHUNK]), modality="image", k=1,
                                            exact=True)
        out[lo:lo + _CHUNK] = np.where(valid[:, 0] & (scores[:, 0] >= threshold), rows[:, 0], -1)
    return out


def retrieve_for(memory: Any, queries: np.ndarray, query_modality: str, *, search_queries: np.ndarray | None = None,
                 k: int = 10, search: str = "uni", fuse: str = "cross", exclude: Any = None,
                 dup_threshold: Any = None, exact: bool = False, with_scores: bool = False) -> tuple[np.ndarray, ...]:
    """Neighbours to feed φ for ``queries`` (one batch): ``(neighbours [N,k,D] f32, valid [N,k], rows [N,k])``,
    plus ``scores [N,k]`` (the search cosines, −inf where invalid) when ``with_scores``.

    ``search_queries`` ([N, Dk] image keys) is what a uni-modal image search uses on a memory with keys;
    every other search uses ``queries`` themselves.
    """
    if query_modality not in ("image", "text"):
        raise SearchError(f"query_modality: expected 'image' or 'text', got {query_modality!r}")
    if search not in ("uni", "cross"):
        raise SearchError(f"search: expected 'uni' or 'cross', got {search!r}")
    if fuse not in ("uni", "cross"):
        raise SearchError(f"fuse: expected 'uni' or 'cross', got {fuse!r}")
    keyed = getattr(memory, "key_dim", None) is not None
    if query_modality == "image" and search == "uni":
        q = queries if search_queries is None else search_queries
        return retrieve(memory, q, "image", search="uni", fuse=fuse, k=k, exclude=exclude,
                        dup_threshold=dup_threshold, exact=exact, with_scores=with_scores)
    if query_modality == "text" and search == "cross" and keyed:
        # text query → image *embeddings* (the image index holds keys of another width): exact search.
        rows, scores, valid = search_index(ExactIndex(np.asarray(memory.image)), queries, k, exclude=exclude,
                                           dup_threshold=dup_threshold,
                                           what=f"exact image-embedding index of {memory.root}")
        fed = "text" if fuse == "uni" else "image"
        out = (memory.embeddings(fed, rows), valid, rows)
        return out + (scores,) if with_scores else out
    return retrieve(memory, queries, query_modality, search=search, fuse=fuse, k=k, exclude=exclude,
                    dup_threshold=dup_threshold, exact=exact, with_scores=with_scores)


def searched_score_map(phi, memory: Any, query_modality: str, search: str = "uni") -> tuple[float, float] | None:
    """The score map ``phi`` reads its scores with when it searches ``memory``: the memory's own
    (:func:`~reco_ref.memory.score_map.memory_score_map`) for a module with ``rel_source="memory"``, else None (the
    module's config map, or no relevance bias at all)."""
    if getattr(getattr(phi, "config", None), "rel_source", "fixed") != "memory" or relevance_of(phi) is None:
        return None
    from ..memory.score_map import memory_score_map

    return memory_score_map(memory, query_modality, search=search)


def refine(phi, memory: Any, queries: np.ndarray, query_modality: str, *, search_queries: np.ndarray | None = None,
           k: int = 10, search: str = "uni", fuse: str = "cross", exclude: Any = None, dup_threshold: Any = None,
           backend: str = "numpy", batch_size: int = 1024, exact: bool = False, validate_params: bool = True,
           with_gate: bool = False) -> tuple[np.ndarray, ...]:
    """Refined embeddings ``x̄ = φ(x, neighbours)`` for every query row, in batches.

    Parameters
    ----------
    phi : FusionParams — φ_I for image queries, φ_T for text queries (``RecoWeights.phi(modality)``)
    memory : Memory | ShardedMemory
    queries : [N, D] — L2-normalised embeddings (the joint space; what φ refines)
    query_modality : "image" | "text"
    search_queries : [N, Dk], optional — image search keys for uni-modal image search on a memory with
        ``key_dim`` (default: ``queries``)
    k : neighbours per query, capped at the memory's rows (:func:`reco_ref.checks.cap_k`; a memory of 0 rows is
        refused)
    search, fuse : "uni" | "cross" (docs/reco.md §1; default uni-modal search, cross-modal fusion)
    exclude : int64 [N] own memory rows (−1 none), or [N, E] / list — dropped from the neighbours
    dup_threshold : None (off), True (0.98) or a cosine — near-duplicates dropped
    backend : "numpy" | "numba" | "cuda" (fusion)
    batch_size : queries per retrieval + fusion call
    exact : brute-force search instead of HNSW
    validate_params : scan φ's arrays (shapes, dtype, finiteness) on every fusion call, as the fusion front
        door does (default). ``False`` skips the scan and calls the backend directly — for a query server
        answering single queries, where scanning 7M parameters costs about as much as the layer itself; only
        for parameters already validated, e.g. by :func:`~reco_ref.reco.weights.load_reco_weights` at load
    with_gate : also return each query's relevance gate (:func:`~reco_ref.fusion.relevance_gate`)

    A module whose config says ``rel_source="memory"`` reads its scores against the searched memory's own map
    (:func:`~reco_ref.memory.score_map.memory_score_map` of the searched space, computed once per memory; for
    cross-modal search, the memory's own rows searching across the modalities).

    Returns
    -------
    refined : float32 [N, D] — unit rows
    rows : int64 [N, k'] — retrieved memory rows (−1 where invalid), ``k' = min(k, len(memory))``
    valid : bool [N, k']
    gate : float64 [N] — only with ``with_gate``: 1 = the bias keeps the query, 0 = it uses the memory (all 0
        for a module without the relevance bias)
    """
    D = int(phi["ln1_gamma"].shape[0])
    q = check_array("queries [N,D]", queries, ndim=2)
    if q.shape[1] != D:
        raise ShapeError(f"queries: embedding dim {q.shape[1]} does not match the fusion module's dim {D}")
    n = q.shape[0]
    sq = None
    if search_queries is not None:
        sq = check_array("search_queries [N,Dk]", search_queries, ndim=2)
        if sq.shape[0] != n:
            raise ShapeError(f"search_queries: {sq.shape[0]} rows, queries has {n}")
    if isinstance(batch_size, bool) or int(batch_size) < 1:
        raise ShapeError(f"batch_size: expected a positive int, got {batch_size!r}")
    excl = None
    if exclude is not None:
        excl = np.asarray(exclude) if not isinstance(exclude, list) else exclude
        if len(excl) != n:
            raise ShapeError(f"exclude: {len(excl)} entries, queries has {n}")
    # a memory of n rows gives at most n neighbours: the search returns min(k, n) columns, so the arrays are
    # sized with that k (sized with the k asked for, they met fewer columns and failed to broadcast)
    k = cap_k(k, memory)
    dtype = phi["ln1_gamma"].dtype
    relevance = relevance_of(phi) is not None  # the layer reads each neighbour's search score
    smap = searched_score_map(phi, memory, query_modality, search)
    gate = np.zeros(n) if with_gate else None
    if not validate_params:
        heads = getattr(phi, "heads", None)
        if heads is None:
            raise ShapeError("phi: validate_params=False needs FusionParams (with .heads), got a plain dict")
        mod = get_backend(backend)
    refined = np.empty((n, D), np.float32)
    rows = np.empty((n, k), np.int64)
    valid = np.empty((n, k), bool)
    for lo in range(0, n, int(batch_size)):
        hi = min(n, lo + int(batch_size))
        nb, ok, r, sc = retrieve_for(memory, q[lo:hi], query_modality, search_queries=None if sq is None else sq[lo:hi],
                                     k=k, search=search, fuse=fuse, exclude=None if excl is None else excl[lo:hi],
                                     dup_threshold=dup_threshold, exact=exact, with_scores=True)
        qb, nbb = np.ascontiguousarray(q[lo:hi], dtype=dtype), np.ascontiguousarray(nb, dtype=dtype)
        if validate_params:
            out, _ = fusion_forward(phi, qb, nbb, ok, backend=backend, scores=sc if relevance else None,
                                    score_map=smap)
        else:
            kw = {"scores": score_features(phi, sc, ok, dtype=dtype, score_map=smap)} if relevance else {}
            out, _ = mod.fusion_forward(phi, qb, nbb, np.ascontiguousarray(ok), heads=heads, **kw)
            if not np.isfinite(out).all():
                raise ShapeError("fusion output: a row is not finite (a zero query row?)")
        refined[lo:hi] = out
        rows[lo:hi] = r
        valid[lo:hi] = ok
        if with_gate and relevance:
            gate[lo:hi] = relevance_gate(phi, score_features(phi, sc, ok, score_map=smap), ok)
    return (refined, rows, valid, gate) if with_gate else (refined, rows, valid)
