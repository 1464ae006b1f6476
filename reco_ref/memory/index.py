"""Two nearest-neighbour indexes with one API: hnswlib HNSW (approximate) and blocked brute force (exact).

Both answer ``search(queries [N,D] float32, k) -> (rows [N,k'] int64, scores [N,k'] float32)`` with
``k' = min(k, len(index))`` columns sorted by descending score (inner product = cosine, since every
vector is L2-normalised).  Exclusion, masks and padding live one level up, in :mod:`.search`.

Why brute force beside HNSW: it is the audit (recall of HNSW is measured against it) and the reference
the sharded search must reproduce exactly.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import hnswlib
import numpy as np

from ..errors import MemoryFormatError, SearchError

ADD_BLOCK = 65536  # rows handed to hnswlib.add_items at once (bounded RAM when the source is a memmap)
EXACT_ROW_BLOCK = 65536  # memory rows per matmul block in brute force: 65536 x 512 x 4 B = 128 MiB
EXACT_QUERY_BLOCK = 1024  # queries per block: scores block [1024, 65536] float32 = 256 MiB at most


def default_threads() -> int:
    """Threads for hnswlib: ``$RECO_REF_THREADS`` or the CPU count."""
    return int(os.environ.get("RECO_REF_THREADS", 0)) or (os.cpu_count() or 1)


def _as_f32_block(a: np.ndarray, lo: int, hi: int) -> np.ndarray:
    # memmap slice -> contiguous float32 copy of just this block (float16 storage is widened here)
    return np.ascontiguousarray(a[lo:hi], dtype=np.float32)


# ----------------------------------------------------------------------------------------------------------
# HNSW
# ----------------------------------------------------------------------------------------------------------
def hnsw_build(vectors: np.ndarray, *, M: int = 16, ef_construction: int = 200, num_threads: int | None = None,
               seed: int = 100, max_elements: int | None = None) -> hnswlib.Index:
    """Build an hnswlib index (space ``ip``) over ``vectors [n,D]`` (memmap ok), labels = row ids 0..n-1.

    Rows are fed in blocks of :data:`ADD_BLOCK` so a memory-mapped source is never fully copied to RAM
    (the index itself holds one float32 copy: that is hnswlib's layout).
    """
    n, dim = vectors.shape
    index = hnswlib.Index(space="ip", dim=int(dim))
    index.init_index(max_elements=max(int(max_elements or n), 1), M=int(M), ef_construction=int(ef_construction),
                     random_seed=int(seed))
    hnsw_add(index, vectors, 0, num_threads=num_threads)
    return index


def hnsw_add(index: hnswlib.Index, vectors: np.ndarray, first_row: int, num_threads: int | None = None) -> None:
    """Append ``vectors [m,D]`` as rows ``first_row..first_row+m-1``, growing the index (resize_index) if needed."""
    m = vectors.shape[0]
    need = first_row + m
    if need > index.get_max_elements():
        index.resize_index(need)
    threads = int(num_threads or default_threads())
    for lo in range(0, m, ADD_BLOCK):
        hi = min(lo + ADD_BLOCK, m)
        block = _as_f32_block(vectors, lo, hi)  # [b, D]
        index.add_items(block, np.arange(first_row + lo, first_row + hi, dtype=np.int64), num_threads=threads)


def hnsw_load(path: Path, dim: int, *, expect_count: int, expect_M: int, expect_ef_construction: int,
              max_elements: int = 0) -> hnswlib.Index:
    """Load an index file and check it against what the manifest recorded (count, M, dim)."""
    index = hnswlib.Index(space="ip", dim=int(dim))
    try:
        index.load_index(str(path), max_elements=int(max_elements))
    except (RuntimeError, ValueError, MemoryError) as exc:
        raise MemoryFormatError(f"{path}: not a readable hnswlib index of dim {dim} ({exc})") from exc
    found = {"count": index.get_current_count(), "M": index.M, "ef_construction": index.ef_construction}
    want = {"count": expect_count, "M": expect_M, "ef_construction": expect_ef_construction}
    for key in want:
        if found[key] != want[key]:
            raise MemoryFormatError(f"{path}: index {key} is {found[key]}, manifest says {want[key]}")
    return index


def hnsw_header(path: Path) -> dict:
    """Read the fixed 96-byte header of an hnswlib (0.7/0.8) index file without loading the index.

    Layout (little-endian): offsetLevel0, max_elements, cur_element_count, size_data_per_element,
    label_offset, offsetData (6 x u64), maxlevel, enterpoint_node (2 x i32/u32), maxM, maxM0, M (3 x u64),
    mult (f64), ef_construction (u64).  ``dim`` follows from size_data_per_element = (2M*4 + 4) + 4*dim + 8.
    """
    import struct

    with open(path, "rb") as fh:
        raw = fh.read(96)
    if len(raw) < 96:
        raise MemoryFormatError(f"{path}: {len(raw)} bytes, too short for an hnswlib index header")
    (off0, max_el, count, size_el, label_off, off_data, maxlevel, enter, maxM, maxM0, M, mult,
     efc) = struct.unpack("<QQQQQQiIQQQdQ", raw)
    dim4 = size_el - (maxM0 * 4 + 4) - 8
    if off0 != 0 or maxM0 != 2 * M or dim4 <= 0 or dim4 % 4 or off_data != maxM0 * 4 + 4:
        raise MemoryFormatError(f"{path}: not an hnswlib index header (M={M}, maxM0={maxM0}, size={size_el})")
    return {"count": int(count), "max_elements": int(max_el), "M": int(M), "ef_construction": int(efc),
            "dim": int(dim4 // 4)}


def check_hnsw_header(path: Path, *, dim: int, count: int, M: int, ef_construction: int) -> None:
    """Compare an index file's header with what the manifest recorded (cheap: 96 bytes read)."""
    h = hnsw_header(path)
    want = {"dim": dim, "count": count, "M": M, "ef_construction": ef_construction}
    for key, value in want.items():
        if h[key] != value:
            raise MemoryFormatError(f"{path}: index {key} is {h[key]}, manifest says {value}")


class HnswIndex:
    """Approximate search through an hnswlib index; ``ef`` is set per call (default max(k, 50)).

    Scores are ``1 - distance`` (hnswlib's ``ip`` distance is ``1 - <q, x>``), i.e. the cosine.
    ``vectors`` (the indexed array) lets a query that the graph walk cannot answer in full (``k`` close
    to ``n`` on a graph with an unreachable node) fall back to brute force instead of failing.
    """

    def __init__(self, index: hnswlib.Index, vectors: np.ndarray | None = None):
        self.index = index
        self.vectors = vectors
        self.dim = int(index.dim)
        self._lock = threading.Lock()  # set_ef + knn_query must not interleave between callers

    def __len__(self) -> int:
        return int(self.index.get_current_count())

    def search(self, queries: np.ndarray, k: int, *, ef: int | None = None, num_threads: int | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """queries [N,D] float32 -> rows [N,k'] int64, scores [N,k'] float32, k' = min(k, len)."""
        n = len(self)
        k = min(int(k), n)
        nq = queries.shape[0]
        if k == 0 or nq == 0:
            return np.zeros((nq, k), np.int64), np.zeros((nq, k), np.float32)
        ef_used = max(int(ef) if ef else 50, k)  # hnswlib needs ef >= k to return k results
        threads = int(num_threads or default_threads())
        with self._lock:
            while True:
                self.index.set_ef(ef_used)
                try:
                    labels, dist = self.index.knn_query(queries, k=k, num_threads=threads)
                    break
                except RuntimeError:
                    # "cannot return the results in a contiguous 2D array": the graph walk found < k
                    # points (tiny or badly connected graph).  Widen the beam; at ef >= n it is exhaustive.
                    if ef_used >= n:
                        if self.vectors is not None:
                            return exact_search(self.vectors, queries, k)
                        raise SearchError(f"HNSW could not return {k} neighbours even with ef={ef_used} >= n={n}")
                    ef_used = min(2 * ef_used, n)
        rows = labels.astype(np.int64)  # [N,k]
        scores = (1.0 - dist).astype(np.float32)  # [N,k]
        return rows, scores


# ----------------------------------------------------------------------------------------------------------
# exact brute force
# ----------------------------------------------------------------------------------------------------------
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


def _above(s: np.ndarray, thr: np.ndarray, first_row: int) -> tuple[np.ndarray, np.ndarray]:
    """Entries of ``s [b, r]`` greater than ``thr [b]`` per row, packed left into ``[b, c]`` (pad: -inf, row 0)."""
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
    pr[qi, pos] = ci + first_row
    return ps, pr


def exact_search(vectors: np.ndarray, queries: np.ndarray, k: int, *, row_offset: int = 0,
                 row_block: int = EXACT_ROW_BLOCK, query_block: int = EXACT_QUERY_BLOCK
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-k inner product, blocked so RAM stays bounded.

    .. math:: \\mathrm{rows}_i = \\operatorname{top\\text{-}k}_j\\; \\langle q_i, x_j \\rangle

    Parameters
    ----------
    vectors : ndarray [n, D] float16/float32 (memmap ok) — memory rows
    queries : ndarray [N, D] float32
    k : int — columns returned: ``min(k, n)``
    row_offset : int — added to the returned row ids (shards use global ids)

    Returns
    -------
    rows : int64 [N, k'] and scores : float32 [N, k'], score descending, ties by ascending row.

    Peak RAM: one row block as float32 (``row_block*D*4``) plus one score block
    (``query_block*row_block*4``), independent of n.
    """
    n = vectors.shape[0]
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
        block = _as_f32_block(vectors, lo, hi)  # [r, D]
        kb = min(k, hi - lo)
        for bi, q0 in enumerate(range(0, nq, query_block)):
            q = queries[q0:q0 + query_block]  # [b, D]
            s = q @ block.T  # [b, r]
            if best_s[bi].shape[1] == k:
                # Only scores above the current k-th best can enter (rows here are larger than any kept
                # row, so a tie loses).  One comparison per score instead of a partition: after the first
                # block few survive, and selection stops costing as much as the matmul.
                ps, pr = _above(s, best_s[bi][:, k - 1], lo + row_offset)
            elif kb < s.shape[1]:
                part = np.argpartition(-s, kb - 1, axis=1)[:, :kb]  # [b, kb]
                ps, pr = np.take_along_axis(s, part, 1), part.astype(np.int64) + (lo + row_offset)
            else:
                ps, pr = s, np.broadcast_to(np.arange(s.shape[1], dtype=np.int64) + (lo + row_offset), s.shape)
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


class ExactIndex:
    """Brute-force search over a (memory-mapped) array, same ``search`` signature as :class:`HnswIndex`."""

    def __init__(self, vectors: np.ndarray):
        self.vectors = vectors
        self.dim = int(vectors.shape[1])

    def __len__(self) -> int:
        return int(self.vectors.shape[0])

    def search(self, queries: np.ndarray, k: int, *, ef: int | None = None, num_threads: int | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """queries [N,D] float32 -> rows [N,k'] int64, scores [N,k'] float32 (``ef``/threads ignored)."""
        return exact_search(self.vectors, queries, k)
