r"""A memory's own score scale: where a typical nearest neighbour sits in a search space, and how much that varies.

The relevance bias of the fusion layer (docs/reco.md §2 "Relevance bias") reads each neighbour's search score ``s`` as
the feature ``f = (s − center)/width``. With ``center, width`` fixed at training time the feature depends on the
*training* memory's spread: a memory whose rows are all close to each other (a photo memory seen by a query
drawing) gives every neighbour a high raw cosine, and the layer trusts it. The memory-relative map [ours] measures
``center`` and ``width`` on the memory being searched:

.. math::

    \text{center} = \operatorname{median}_{q}\ n_q, \qquad
    \text{width} = \frac{\operatorname{IQR}_{q}\ n_q}{1.349}, \qquad
    n_q = \max_{j:\ m_j \ne m_q} \cos(m_q, m_j)

over sampled rows ``q`` of the search vectors ``m`` of one modality (image keys where the memory has them, else image
embeddings; text embeddings): the median and the robust spread (interquartile range / 1.349, the standard deviation
of a normal) of the cosine of a row to its nearest *other* row. ``f = 0`` is "as close as a typical nearest
neighbour inside this memory", ``f = −3`` three typical neighbour-to-neighbour variations below it. Both are
measured among nearest neighbours, so a memory that joins two domains (flowers + birds) has about the scale of
each: an earlier width, the spread of *unrelated* pairs, grew with the gap between the domains (0.035 for CUB-100
alone, 0.059 joined with Flowers-102) and softened the gate exactly where a query from a third domain arrives
(docs/training.md). Rows that are the same vector as the query (cosine ≥ 1 − 1e-6: duplicated captions, duplicated
images) do not count as its neighbour — with 60 rows per caption every caption's nearest "other" row would
otherwise be itself (cosine 1).

Cost: ``queries`` sampled rows against every row, in blocks of ``BLOCK`` rows (bounded temporaries
``[queries, BLOCK]``): about ``2 · queries · n · d`` flops, once per memory and modality — at build (stored in the
manifest) or, for older memories, once per opened memory. The draw is a pure function of ``seed`` and the row
count.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..errors import RecoError

__all__ = ["space_score_map", "memory_score_map", "SAME_VECTOR", "MAP_QUERIES"]

#: Cosines at or above this count as the same vector (a duplicate), not as a neighbour.
SAME_VECTOR = 1.0 - 1e-6
#: Sampled query rows for the nearest-neighbour statistics.
MAP_QUERIES = 1000
#: The robust standard deviation of a normal sample: interquartile range / IQR_PER_SD.
IQR_PER_SD = 1.349
BLOCK = 4096


def _unit(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, np.float64)
    n = np.linalg.norm(a, axis=1, keepdims=True)
    if not np.isfinite(a).all() or (n == 0).any():
        raise RecoError("score map: a search vector is zero or not finite")
    return a / n


def space_score_map(parts: np.ndarray | Sequence[np.ndarray], *, queries: int = MAP_QUERIES,
                    seed: int = 0, query_parts: np.ndarray | Sequence[np.ndarray] | None = None
                    ) -> tuple[float, float]:
    """``(center, width)`` of the memory-relative score map of one search space (see the module docstring).

    Parameters
    ----------
    parts : [n, d] array, or a list of [n_s, d] arrays (the shards of one memory, in row order) — memmaps are read
        block by block
    queries : rows sampled for the nearest-neighbour statistics (all rows when fewer)
    seed : the draw
    query_parts : the same rows in *another* space (cross-modal search: the memory's image embeddings searching its
        captions, or the reverse), [n, d_q] arrays split like ``parts``; the sampled rows' vectors then come from
        here, and a row's own pair (same row) is what is excluded instead of an identical vector

    Returns
    -------
    (center, width) : floats; ``width > 0``

    Raises
    ------
    RecoError  fewer than 2 distinct vectors, no spread among the nearest-neighbour cosines, mismatched widths,
        non-finite or zero vectors
    """
    arrs = [parts] if isinstance(parts, np.ndarray) else list(parts)
    if not arrs or any(np.ndim(a) != 2 for a in arrs):
        raise RecoError("score map: expected one or more [n, d] arrays")
    d = {int(a.shape[1]) for a in arrs}
    if len(d) != 1:
        raise RecoError(f"score map: parts of different widths {sorted(d)}")
    sizes = np.array([a.shape[0] for a in arrs], np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    n = int(starts[-1])
    if n < 2:
        raise RecoError(f"score map: need at least 2 rows, got {n}")

    qarrs = arrs
    if query_parts is not None:
        qarrs = [query_parts] if isinstance(query_parts, np.ndarray) else list(query_parts)
        if [a.shape[0] for a in qarrs] != sizes.tolist() or len({int(a.shape[1]) for a in qarrs}) != 1:
            raise RecoError("score map: query_parts must hold the same rows as parts, split the same way")

    def rows(idx: np.ndarray) -> np.ndarray:  # global rows -> [len(idx), d_q] float64 unit vectors
        part = np.searchsorted(starts, idx, side="right") - 1
        out = np.empty((idx.size, int(qarrs[0].shape[1])), np.float64)
        for p in np.unique(part):
            sel = part == p
            out[sel] = np.asarray(qarrs[p][idx[sel] - starts[p]], np.float64)
        return _unit(out)

    rng = np.random.default_rng([int(seed), 0x5C3A])
    q_idx = np.sort(rng.choice(n, size=min(int(queries), n), replace=False))
    q = rows(q_idx)  # [Q, d_q]
    if q.shape[1] != next(iter(d)):
        raise RecoError(f"score map: query vectors of width {q.shape[1]} cannot search vectors of width {next(iter(d))}")
    best = np.full(q_idx.size, -np.inf)
    for p, a in enumerate(arrs):
        for lo in range(0, a.shape[0], BLOCK):
            s = q @ _unit(a[lo:lo + BLOCK]).T  # [Q, <=BLOCK]
            if query_parts is None:
                s[s >= SAME_VECTOR] = -np.inf  # the query itself and its exact duplicates are not neighbours
            else:  # cross-modal: the query's own pair is not its neighbour
                glob = starts[p] + lo + np.arange(s.shape[1])
                s[q_idx[:, None] == glob[None, :]] = -np.inf
            best = np.maximum(best, s.max(axis=1))
    found = best[np.isfinite(best)]
    if not found.size:
        raise RecoError("score map: every row is the same vector (no two distinct search vectors)")
    q25, center, q75 = (float(x) for x in np.percentile(found, [25, 50, 75]))
    width = (q75 - q25) / IQR_PER_SD
    if not width > 0:
        raise RecoError("score map: the nearest-neighbour cosines have no spread (interquartile range 0): too few "
                        "distinct vectors to give this memory a scale")
    return center, width


def memory_score_map(memory: Any, modality: str, search: str = "uni") -> tuple[float, float]:
    """``(center, width)`` of ``memory``'s search space for ``modality`` ("image" | "text") queries; cached on the
    object. ``search="cross"``: the space a cross-modal search of that modality runs in — the memory's own
    image embeddings against its captions (image queries) or its captions against its image embeddings (text
    queries), a row's own pair excluded.

    A :class:`~reco_ref.memory.Memory` built by this version carries its map in ``manifest.json`` (``score_map``,
    computed at build and after every add, read here at no cost); an older memory, and a
    :class:`~reco_ref.memory.ShardedMemory` (the map of the union of its shards, not of any one shard), get it
    computed here once per opened object from their search vectors (image keys where present)."""
    if modality not in ("image", "text"):
        raise RecoError(f"modality: expected 'image' or 'text', got {modality!r}")
    if search not in ("uni", "cross"):
        raise RecoError(f"search: expected 'uni' or 'cross', got {search!r}")
    cache = memory.__dict__.setdefault("_score_maps", {})
    if search == "cross":
        key = f"cross-{modality}"
        if key not in cache:
            shards = getattr(memory, "shards", None) or [memory]
            img, txt = [np.asarray(s.image) for s in shards], [np.asarray(s.text) for s in shards]
            cache[key] = (space_score_map(txt, query_parts=img) if modality == "image"
                          else space_score_map(img, query_parts=txt))
        return cache[key]
    stored = (getattr(memory, "manifest", None) or {}).get("score_map")
    if modality not in cache and stored is not None and getattr(memory, "shards", None) is None:
        if stored.get(modality) is None:
            raise RecoError(f"{getattr(memory, 'root', 'memory')}: no {modality} score map (fewer than 2 distinct "
                            "search vectors): a fusion module that reads scores relative to the memory cannot use it")
        cache[modality] = tuple(float(x) for x in stored[modality])
    if modality not in cache:
        shards = getattr(memory, "shards", None)
        parts = [s.vectors(modality) for s in shards] if shards is not None else [memory.vectors(modality)]
        cache[modality] = space_score_map(parts)
    return cache[modality]
