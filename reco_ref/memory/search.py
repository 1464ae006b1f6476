"""Search with exclusions and masks, and the retrieval step RECO trains and evaluates with (docs/reco.md §1).

Two functions:

* :func:`search_index` — k nearest rows of one index (HNSW or exact) for a batch of queries, after
  dropping excluded rows (self-exclusion) and near-duplicates; ``min(k, n)`` columns (a memory of n
  rows has no more to give), padded with ``row=-1, score=-inf, valid=False`` where fewer survive
  (exclusions, duplicates).  Never a garbage index.
* :func:`retrieve` — the four ablation combinations: ``search ∈ {uni, cross}`` picks the index,
  ``fuse ∈ {cross, uni}`` picks which modality's embeddings the fusion module is fed.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..checks import check_array
from ..errors import SearchError

DEFAULT_DUP_THRESHOLD = 0.98  # docs/reco.md §1 [ours]: neighbours with cosine >= this count as near-duplicates
MODALITIES = ("image", "text")
QUERY_NORM_TOL = 1e-2  # |‖q‖ - 1| allowed: float16 round-off passes, an unnormalised vector does not
MAX_EF = 100_000


def check_queries(queries: Any, dim: int, what: str) -> np.ndarray:
    """queries [N,D] float16/32/64, finite, unit L2 norm, D == the index's dim -> float32 C-contiguous.

    The rule for norms: every query must already be L2-normalised (``|‖q‖ - 1| <= 1e-2``), as every
    encoder here returns them; the scores are then cosines.  An unnormalised query is refused (its
    "cosine" could be 100), and the zero vector, which has no direction, is refused by name.
    """
    if isinstance(queries, np.ndarray) and queries.ndim == 2 and queries.shape[1] != dim:
        raise SearchError(f"queries [N,D]: D={queries.shape[1]} but the {what} has dim {dim}; "
                          "pass queries embedded for that index")
    q = check_array("queries [N,D]", queries, shape=(None, dim), dtypes=(np.float32, np.float64, np.float16))
    q = np.ascontiguousarray(q, dtype=np.float32)
    norms = np.linalg.norm(q, axis=1)  # [N]
    if (norms == 0).any():
        raise SearchError(f"queries [N,D]: query {int(np.argmin(norms))} is the zero vector (no direction to search)")
    bad = np.abs(norms - 1) > QUERY_NORM_TOL
    if bad.any():
        i = int(np.argmax(bad))
        raise SearchError(f"queries [N,D]: query {i} has L2 norm {norms[i]:.4g}; queries must be L2-normalised "
                          "(q / ||q||, as the encoders return them) so that scores are cosines")
    return q


def normalize_exclude(exclude: Any, nq: int) -> np.ndarray:
    """``exclude`` -> padded int64 [N, E] of row ids to drop per query (-1 = nothing).

    Accepts ``None``; an int array ``[N]`` (one row per query, -1 for none; self-exclusion); an int array
    ``[N, E]``; or a sequence of N int arrays of any lengths.
    """
    if exclude is None:
        return np.full((nq, 0), -1, np.int64)
    if isinstance(exclude, np.ndarray) and exclude.dtype != object:
        if exclude.dtype.kind not in "iu":
            raise SearchError(f"exclude: expected integer row ids, got dtype {exclude.dtype}")
        if exclude.ndim == 1:
            exclude = exclude[:, None]
        if exclude.ndim != 2 or exclude.shape[0] != nq:
            raise SearchError(f"exclude: shape {exclude.shape}, expected [N={nq}] or [N={nq}, E]")
        return exclude.astype(np.int64)
    if not isinstance(exclude, Sequence) or len(exclude) != nq:
        raise SearchError(f"exclude: expected None, an int array [N={nq}] or a list of N={nq} arrays")
    lens = [np.size(e) for e in exclude]
    out = np.full((nq, max(lens, default=0)), -1, np.int64)
    for i, e in enumerate(exclude):
        e = np.asarray(e).reshape(-1)
        if e.size and e.dtype.kind not in "iu":
            raise SearchError(f"exclude[{i}]: expected integer row ids, got dtype {e.dtype}")
        out[i, :e.size] = e
    return out


def _dup_value(dup_threshold: Any) -> float | None:
    if dup_threshold is None or dup_threshold is False:
        return None
    if dup_threshold is True:
        return DEFAULT_DUP_THRESHOLD
    if isinstance(dup_threshold, (str, bytes)) or not np.isscalar(dup_threshold):
        raise SearchError(f"dup_threshold: expected None, True or a cosine in (-1, 1], got {dup_threshold!r}")
    try:
        t = float(dup_threshold)
    except (TypeError, ValueError):
        raise SearchError(f"dup_threshold: expected None, True or a cosine in (-1, 1], got {dup_threshold!r}") from None
    if not -1.0 < t <= 1.0 + 1e-6:
        raise SearchError(f"dup_threshold: {t} is not a cosine in (-1, 1]")
    return t


def search_index(index: Any, queries: np.ndarray, k: int, *, exclude: Any = None, dup_threshold: Any = None,
                 ef: int | None = None, num_threads: int | None = None, what: str = "index"
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """k nearest rows of ``index`` per query, with exclusions; fewer than k survivors -> masked slots.

    Parameters
    ----------
    index : HnswIndex | ExactIndex (anything with ``search(q, k, ef=, num_threads=)``, ``dim``, ``len``)
    queries : [N, D] float — L2-normalised query embeddings
    k : int >= 1
    exclude : row ids to drop per query (see :func:`normalize_exclude`)
    dup_threshold : None (off), True (0.98) or a cosine; rows scoring >= it are dropped as near-duplicates
    ef : HNSW beam width for this call (raised to at least the number of candidates fetched)

    Returns
    -------
    rows : int64 [N, k'] (−1 where invalid), scores : float32 [N, k'] (−inf where invalid), valid : bool [N, k']
        with ``k' = min(k, len(index))``: a memory of n rows has at most n neighbours to give, so the
        answer is capped at n columns (never padded to a huge ``k``); within those columns, slots left
        empty by exclusions and duplicates are padded with −1 / −inf / False.  Candidates whose score is
        not finite (a corrupt row) are never returned as valid.

    Candidates are over-fetched (``k + E``, doubled while a query still lacks survivors and the index has
    more rows), so excluding rows never shrinks the answer below what the memory can give.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise SearchError(f"k: expected an integer >= 1, got {k!r}")
    q = check_queries(queries, index.dim, what)
    nq, n = q.shape[0], len(index)
    k = min(int(k), n)  # the cap: never more columns than the memory has rows
    if ef is not None and (isinstance(ef, bool) or not isinstance(ef, (int, np.integer)) or not 1 <= ef <= MAX_EF):
        raise SearchError(f"ef: expected an integer in [1, {MAX_EF}], got {ef!r}")
    excl = normalize_exclude(exclude, nq)  # [N, E]
    dup = _dup_value(dup_threshold)
    rows = np.full((nq, k), -1, np.int64)
    scores = np.full((nq, k), -np.inf, np.float32)
    valid = np.zeros((nq, k), bool)
    if k == 0 or nq == 0:
        return rows, scores, valid
    pending = np.arange(nq)  # queries still lacking k survivors
    fetch = min(n, k + excl.shape[1] + (k if dup is not None else 0))
    while pending.size:
        cand_r, cand_s = index.search(q[pending], fetch, ef=None if ef is None else max(int(ef), fetch),
                                      num_threads=num_threads)  # [P, fetch]
        keep = np.isfinite(cand_s)  # a NaN score means a corrupt row: never a valid neighbour
        if excl.shape[1]:
            keep &= ~(cand_r[:, :, None] == excl[pending][:, None, :]).any(-1)
        if dup is not None:
            keep &= cand_s < dup
        n_keep = keep.sum(1)
        # stable: survivors keep their score order; take the first k of them
        order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
        r = np.take_along_axis(cand_r, order, 1)
        s = np.take_along_axis(cand_s, order, 1)
        v = np.take_along_axis(keep, order, 1)
        kk = r.shape[1]
        rows[pending, :kk] = np.where(v, r, -1)
        scores[pending, :kk] = np.where(v, s, -np.inf)
        valid[pending, :kk] = v
        if fetch >= n:
            break
        pending = pending[n_keep < k]
        fetch = min(n, 2 * fetch)
    return rows, scores, valid


def retrieve(memory: Any, queries: np.ndarray, query_modality: str, search: str = "uni", fuse: str = "cross",
             k: int = 10, exclude: Any = None, *, dup_threshold: Any = None, exact: bool = False,
             ef: int | None = None, num_threads: int | None = None, with_scores: bool = False
             ) -> tuple[np.ndarray, ...]:
    """Neighbours for the fusion module (docs/reco.md §1): search one modality, return another's embeddings.

    Parameters
    ----------
    memory : Memory or ShardedMemory
    queries : [N, D] — what is searched.  ``search="uni"`` and an image query on a memory with image keys
        (``memory.key_dim``) take the query's *key* here (``encode_image_keys``); otherwise the embedding.
    query_modality : "image" | "text" — what the queries are
    search : "uni" (image→image index, text→text index; the paper) | "cross" (image→text, text→image)
    fuse : "cross" (the paper: image query is fed text embeddings ``T^M[idx]`` and vice versa) | "uni"
    k, exclude, dup_threshold, exact, ef : as :meth:`Memory.search`
    with_scores : also return the search scores (what the relevance bias of the fusion layer reads)

    Returns
    -------
    neighbours : float32 [N, k, D] — zeros in invalid slots
    valid : bool [N, k] — the attention mask (False = masked out)
    rows : int64 [N, k] — memory row ids (−1 where invalid)
    scores : float32 [N, k] — cosine of the searched vectors (−inf where invalid); only when ``with_scores``
    """
    if query_modality not in MODALITIES:
        raise SearchError(f"query_modality: expected 'image' or 'text', got {query_modality!r}")
    if search not in ("uni", "cross"):
        raise SearchError(f"search: expected 'uni' or 'cross', got {search!r}")
    if fuse not in ("uni", "cross"):
        raise SearchError(f"fuse: expected 'uni' or 'cross', got {fuse!r}")
    other = "text" if query_modality == "image" else "image"
    searched = query_modality if search == "uni" else other
    fed = other if fuse == "cross" else query_modality
    rows, scores, valid = memory.search(queries, modality=searched, k=k, exact=exact, exclude=exclude,
                                        dup_threshold=dup_threshold, ef=ef, num_threads=num_threads)
    neighbours = memory.embeddings(fed, rows)  # [N, k, D], zeros where rows == -1
    return (neighbours, valid, rows, scores) if with_scores else (neighbours, valid, rows)
