"""Groups of identical rows: one index element per distinct vector, expanded to all its rows at search time.

``vectors [n, D]`` (memmap ok) -> ``groups int64 [n]``: each row's representative, the smallest row id holding the
same bytes (:func:`row_groups`); a memory's HNSW index then holds the representatives only, and both indexes
(:mod:`.index`, :mod:`.exact`) expand each group found to all its rows at the same score, ties by row id
(:func:`expand_groups`).
"""

from __future__ import annotations

import contextlib
import hashlib

import numpy as np

from ..errors import MemoryFormatError
from .format import sparse_reads

# Why: a memory captioned from class templates holds ~60 bit-identical text vectors per caption.  HNSW
# over such a set is both wasteful (60 elements where 1 carries the information) and wrong in practice:
# identical elements crowd each other's neighbour lists, the graph falls apart into islands, and a query
# lands among another class's copies (0.854 same-class neighbours where exact search finds 1.0).
# Indexing each distinct vector once and expanding it to all its rows at search time makes duplicates
# exact, the index smaller and its build faster.
HASH_BLOCK = 8192  # rows hashed / compared per block (bounded RAM on a memmap: 8192 x 768 x 4 B = 24 MiB)


def _row_hashes(vectors: np.ndarray, block: int = HASH_BLOCK) -> np.ndarray:
    """64-bit hash of each row's bytes: ``vectors [n, D]`` (memmap ok) -> uint64 ``[n]``."""
    n = vectors.shape[0]
    out = np.empty(n, np.uint64)
    for lo in range(0, n, block):
        raw = np.ascontiguousarray(vectors[lo:lo + block])  # [b, D]: each row a contiguous buffer
        out[lo:lo + raw.shape[0]] = np.frombuffer(
            b"".join(hashlib.blake2b(r, digest_size=8).digest() for r in raw), "<u8")
    return out


def _same_rows(vectors: np.ndarray, a: np.ndarray, b: np.ndarray, block: int = HASH_BLOCK) -> np.ndarray:
    """bool ``[m]``: rows ``vectors[a[i]]`` and ``vectors[b[i]]`` hold the same bytes (not float ==: -0.0 != 0.0)."""
    out = np.empty(a.size, bool)
    for lo in range(0, a.size, block):
        x = np.ascontiguousarray(vectors[a[lo:lo + block]])  # [b, D]
        y = np.ascontiguousarray(vectors[b[lo:lo + block]])
        out[lo:lo + x.shape[0]] = (x.view(np.uint8) == y.view(np.uint8)).all(1)
    return out


def row_groups(vectors: np.ndarray) -> np.ndarray:
    """Group the bit-identical rows of ``vectors [n, D]`` (memmap ok, read twice in blocks).

    Returns
    -------
    groups : int64 ``[n]`` — for each row the smallest row id holding the same bytes (its representative);
        ``groups[r] == r`` for representatives, ``groups[r] < r`` for their copies.  The map is a pure
        function of the array's bytes, so an ``add`` that appends rows keeps every old row's representative.

    Rows are hashed (blake2b, 64 bits) and grouped by hash; every member is then compared byte for byte
    with its representative, and the rows of a hash shared by different vectors (a collision) are regrouped
    by their bytes.
    """
    n = vectors.shape[0]
    if n == 0:
        return np.zeros(0, np.int64)
    h = _row_hashes(vectors)  # [n]
    _, first, inverse = np.unique(h, return_index=True, return_inverse=True)  # first: the first (smallest) row
    groups = first[inverse.reshape(-1)].astype(np.int64)  # [n]
    cand = np.flatnonzero(groups != np.arange(n))  # rows that claim an earlier identical row
    same = _same_rows(vectors, cand, groups[cand])
    for hv in np.unique(h[cand[~same]]):  # hash collisions: regroup those rows by their bytes
        seen: dict[bytes, int] = {}
        for r in np.flatnonzero(h == hv).tolist():  # ascending: the smallest row of each vector comes first
            groups[r] = seen.setdefault(np.ascontiguousarray(vectors[r]).tobytes(), r)
    return groups


def check_groups(groups: np.ndarray, *, count: int, name: str, vectors: np.ndarray | None = None,
                 rows: np.ndarray | str | None = None) -> None:
    """Refuse a row -> representative map that is not one :func:`row_groups` could have written.

    Parameters
    ----------
    groups : int64 ``[n]`` — as loaded from ``<modality>.groups.npy``
    count : elements of the index (must equal the number of representatives)
    name : the file named in messages
    vectors : ``[n, D]`` the indexed array; with ``rows`` the rows checked to be bit-identical to their
        representative: ``"all"`` (at index load, one read of the array) or sorted row ids (a sample, at open)

    Raises
    ------
    MemoryFormatError : one line naming the file, the row and what is wrong
    """
    g = np.asarray(groups)
    if g.ndim != 1 or g.dtype != np.int64:
        raise MemoryFormatError(f"{name}: groups map has shape {g.shape} dtype {g.dtype}, expected int64 [rows]")
    n = g.shape[0]
    r = np.arange(n)
    bad = (g < 0) | (g > r)
    if bad.any():
        i = int(np.argmax(bad))
        raise MemoryFormatError(f"{name}: row {i} maps to {int(g[i])}, expected a representative row in [0, {i}] "
                                "(the groups file is damaged)")
    bad = g[g] != g
    if bad.any():
        i = int(np.argmax(bad))
        raise MemoryFormatError(f"{name}: row {i} maps to row {int(g[i])}, which is not a representative "
                                "(the groups file is damaged)")
    reps = int((g == r).sum())
    if reps != count:
        raise MemoryFormatError(f"{name}: {reps} representative rows, the index holds {count} vectors "
                                "(the groups file and the index do not belong together)")
    if vectors is None or rows is None:
        return
    if vectors.shape[0] != n:
        raise MemoryFormatError(f"{name}: maps {n} rows, the memory's array has {vectors.shape[0]}")
    sample = not isinstance(rows, str)
    sel = np.asarray(rows, np.int64) if sample else r
    sel = sel[g[sel] != sel]  # copies only: a representative is trivially its own vector
    with sparse_reads(vectors) if sample else contextlib.nullcontext():  # a full check reads sequentially
        same = _same_rows(vectors, sel, g[sel])
    if not same.all():
        i = int(sel[np.argmin(same)])
        raise MemoryFormatError(f"{name}: row {i} differs from its representative row {int(g[i])}; the groups "
                                "file does not belong to the memory's vectors")


def group_table(groups: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR view of a row -> representative map, for expanding search results.

    Returns ``members [n]`` (rows ordered by representative, ascending within a group), ``start [n]`` and
    ``size [n]`` indexed by representative row id: the rows of representative ``p`` are
    ``members[start[p]:start[p] + size[p]]`` (``size`` is 0 for non-representatives).
    """
    members = np.argsort(groups, kind="stable").astype(np.int64)
    size = np.bincount(groups, minlength=groups.shape[0]).astype(np.int64)
    return members, np.cumsum(size) - size, size


def expand_groups(reps: np.ndarray, scores: np.ndarray, k: int, table: tuple[np.ndarray, np.ndarray, np.ndarray]
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Expand representatives found by the index to their rows; keep the k best rows per query.

    Parameters
    ----------
    reps : int64 [N, K] — representative row ids found per query (K >= 1)
    scores : float32 [N, K] — their scores
    k : rows wanted per query; the caller guarantees the K groups hold at least k rows
    table : :func:`group_table` of the memory's groups

    Returns
    -------
    rows : int64 [N, k], scores : float32 [N, k] — score descending, ties by ascending row id (the order of
        exact search); every row of a group has its representative's score (they are the same vector).

    Only the groups needed to fill k slots are expanded (plus groups tied with the last one, which compete
    for its slots by row id), and at most k rows of each, so the work is O(N·k) however big a group is.
    """
    members, start, size = table
    N, K = reps.shape
    o = np.lexsort((reps, -scores), axis=1)  # the index's order, made deterministic on ties
    reps, scores = np.take_along_axis(reps, o, 1), np.take_along_axis(scores, o, 1)
    take = np.minimum(size[reps], k)  # [N, K]: no group contributes more than k rows
    use = (np.cumsum(take, axis=1) - take) < k  # groups that start before slot k
    last = np.where(use, scores, np.inf).min(axis=1)  # [N] score of the last group used
    use |= scores >= last[:, None]
    t = np.where(use, take, 0).reshape(-1)  # [N*K] rows emitted per (query, group)
    pair = np.repeat(np.arange(N * K), t)  # [T] the (query, group) of each emitted row
    pos = np.arange(pair.size) - np.repeat(np.cumsum(t) - t, t)  # its position inside the group
    rows = members[start[reps.reshape(-1)[pair]] + pos]
    sc = scores.reshape(-1)[pair]
    q = pair // K
    o = np.lexsort((rows, -sc, q))
    rows, sc, q = rows[o], sc[o], q[o]
    cnt = np.bincount(q, minlength=N)
    rank = np.arange(q.size) - np.repeat(np.cumsum(cnt) - cnt, cnt)
    keep = rank < k
    out_r = np.full((N, k), -1, np.int64)
    out_s = np.full((N, k), -np.inf, np.float32)
    out_r[q[keep], rank[keep]] = rows[keep]
    out_s[q[keep], rank[keep]] = sc[keep]
    return out_r, out_s
