"""Exact nearest neighbours by blocked brute force: the audit of HNSW and what sharded search reproduces exactly.

``exact_search(vectors [n,D], queries [N,D], k) -> (rows [N,k'] int64, scores [N,k'] float32)``, ``k' = min(k, n)``,
sorted by descending score (inner product = cosine), ties by row id; :class:`ExactIndex` gives it the index API of
:class:`~reco_ref.memory.index.HnswIndex`.
"""

from __future__ import annotations

import numpy as np

from .row_groups import expand_groups, group_table

EXACT_ROW_BLOCK = 65536  # memory rows per matmul block in brute force: 65536 x 512 x 4 B = 128 MiB
EXACT_QUERY_BLOCK = 1024  # queries per block: scores block [1024, 65536] float32 = 256 MiB at most


def as_f32_block(a: np.ndarray, lo: int, hi: int) -> np.ndarray:
    # memmap slice -> contiguous float32 copy of just this block (float16 storage is widened here)
    return np.ascontiguousarray(a[lo:hi], dtype=np.float32)


def _topk_merge(best_s: np.ndarray, best_r: np.ndarray, s: np.ndarray, r: np.ndarray, k: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Merge candidate lists per query: keep the k highest scores, ties broken by the smaller row id."""
    cs = np.concatenate([best_s, s], axis=1)  # [b, k0+k1]
    cr = np.concatenate([best_r, r], axis=1)
    if cs.shape[1] > k:
        part = np.argpartition(-cs, k - 1, axis=1)[:, :k]
        cs = np.take_along_axis(cs, part, 1)
        cr = np.take_along_axis(cr, part, 1)
    # final order: score descending, then row ascending (deterministic across block / shard layouts)
    order = np.lexsort((cr, -cs), axis=1)
    return np.take_along_axis(cs, order, 1), np.take_along_axis(cr, order, 1)


def _above(s: np.ndarray, thr: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Entries of ``s [b, r]`` greater than ``thr [b]`` per row, packed left into ``[b, c]`` (pad: -inf, row 0);
    ``ids [r]``: the row id of each column."""
    qi, ci = np.nonzero(s > thr[:, None])  # qi ascending
    b = s.shape[0]
    if qi.size == 0:
        return np.zeros((b, 0), np.float32), np.zeros((b, 0), np.int64)
    cnt = np.bincount(qi, minlength=b)
    start = np.concatenate([[0], np.cumsum(cnt)[:-1]])
    pos = np.arange(qi.size) - start[qi]
    ps = np.full((b, int(cnt.max())), -np.inf, np.float32)
    pr = np.zeros((b, int(cnt.max())), np.int64)
    ps[qi, pos] = s[qi, ci]
    pr[qi, pos] = ids[ci]
    return ps, pr


def exact_search(vectors: np.ndarray, queries: np.ndarray, k: int, *, row_offset: int = 0,
                 row_block: int = EXACT_ROW_BLOCK, query_block: int = EXACT_QUERY_BLOCK,
                 rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-k inner product, blocked so RAM stays bounded.

    .. math:: \\mathrm{rows}_i = \\operatorname{top\\text{-}k}_j\\; \\langle q_i, x_j \\rangle

    Parameters
    ----------
    vectors : ndarray [n, D] float16/float32 (memmap ok) — memory rows
    queries : ndarray [N, D] float32
    k : int — columns returned: ``min(k, n)``
    row_offset : int — added to the returned row ids (shards use global ids)
    rows : int64 [c] ascending, optional — search only these rows (the representatives of groups of
        identical rows); ``n`` is then ``c``

    Returns
    -------
    rows : int64 [N, k'] and scores : float32 [N, k'], score descending, ties by ascending row.

    Peak RAM: one row block as float32 (``row_block*D*4``) plus one score block
    (``query_block*row_block*4``), independent of n.
    """
    n = vectors.shape[0] if rows is None else int(rows.size)
    k = min(int(k), n)
    nq = queries.shape[0]
    rows_out = np.zeros((nq, k), np.int64)
    scores_out = np.zeros((nq, k), np.float32)
    if k == 0 or nq == 0:
        return rows_out, scores_out
    # row blocks outer, query blocks inner: each memory block is read (and widened) once per call
    best_s = [np.full((min(query_block, nq - q0), 0), -np.inf, np.float32) for q0 in range(0, nq, query_block)]
    best_r = [np.zeros((s.shape[0], 0), np.int64) for s in best_s]
    for lo in range(0, n, row_block):
        hi = min(lo + row_block, n)
        ids = np.arange(lo, hi, dtype=np.int64) if rows is None else np.asarray(rows[lo:hi], np.int64)  # [r]
        if ids[-1] - ids[0] == ids.size - 1:  # contiguous rows: one slice
            block = as_f32_block(vectors, int(ids[0]), int(ids[-1]) + 1)  # [r, D]
        else:  # a subset: a sorted gather, read once
            block = np.ascontiguousarray(vectors[ids], dtype=np.float32)
        ids = ids + row_offset
        kb = min(k, hi - lo)
        for bi, q0 in enumerate(range(0, nq, query_block)):
            q = queries[q0:q0 + query_block]  # [b, D]
            s = q @ block.T  # [b, r]
            if best_s[bi].shape[1] == k:
                # Only scores above the current k-th best can enter (rows here are larger than any kept
                # row, so a tie loses).  One comparison per score instead of a partition: after the first
                # block few survive, and selection stops costing as much as the matmul.
                ps, pr = _above(s, best_s[bi][:, k - 1], ids)
            elif kb < s.shape[1]:
                part = np.argpartition(-s, kb - 1, axis=1)[:, :kb]  # [b, kb]
                ps, pr = np.take_along_axis(s, part, 1), ids[part]
            else:
                ps, pr = s, np.broadcast_to(ids, s.shape)
            if ps.shape[1]:
                best_s[bi], best_r[bi] = _topk_merge(best_s[bi], best_r[bi], ps, pr, k)
    for bi, q0 in enumerate(range(0, nq, query_block)):
        # Re-score the winners with one float64 dot each: the gemm above may round differently for
        # different block shapes, this does not, so a sharded exact search returns the same bits as
        # an unsharded one (and the scores are exact to float32 precision).
        r = best_r[bi]  # [b, k]
        flat = r.reshape(-1) - row_offset
        order = np.argsort(flat, kind="stable")
        x = np.empty((flat.size, vectors.shape[1]), np.float64)
        x[order] = vectors[flat[order]]
        s = np.einsum("bd,bkd->bk", queries[q0:q0 + query_block].astype(np.float64),
                      x.reshape(r.shape + (-1,))).astype(np.float32)
        o = np.lexsort((r, -s), axis=1)
        scores_out[q0:q0 + query_block] = np.take_along_axis(s, o, 1)
        rows_out[q0:q0 + query_block] = np.take_along_axis(r, o, 1)
    return rows_out, scores_out


def exact_groups(vectors: np.ndarray, queries: np.ndarray, k: int, reps: np.ndarray,
                  table: tuple[np.ndarray, np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k rows over the distinct vectors ``reps`` only, expanded to their rows (:func:`expand_groups`).

    Why not plain brute force over every row: identical rows get float32 scores that may differ in the
    last bit with their position in the gemm, so which copies of a vector made the top k depended on the
    block layout; here every copy has its representative's (float64 re-scored) score and copies tie by row
    id, as the HNSW search over the same groups returns them.  And it multiplies ``c`` rows, not ``n``.
    """
    k = min(int(k), int(table[0].size))
    if k == 0 or queries.shape[0] == 0:
        return np.zeros((queries.shape[0], k), np.int64), np.zeros((queries.shape[0], k), np.float32)
    r, s = exact_search(vectors, queries, min(k, int(reps.size)), rows=reps)
    return expand_groups(r, s, k, table)


class ExactIndex:
    """Brute-force search over a (memory-mapped) array, same ``search`` signature as :class:`HnswIndex`.

    ``groups [n]`` (:func:`row_groups`): search the distinct vectors and expand them to their rows (the same
    answer as over every row, with identical rows tied exactly and ordered by row id).
    """

    def __init__(self, vectors: np.ndarray, groups: np.ndarray | None = None):
        self.vectors = vectors
        self.dim = int(vectors.shape[1])
        self.table = None if groups is None else group_table(np.asarray(groups, np.int64))
        self.reps = None if groups is None else np.flatnonzero(np.asarray(groups) == np.arange(groups.shape[0]))

    def __len__(self) -> int:
        return int(self.vectors.shape[0])

    def search(self, queries: np.ndarray, k: int, *, ef: int | None = None, num_threads: int | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """queries [N,D] float32 -> rows [N,k'] int64, scores [N,k'] float32 (``ef``/threads ignored)."""
        if self.table is not None:
            return exact_groups(self.vectors, queries, k, self.reps, self.table)
        return exact_search(self.vectors, queries, k)
