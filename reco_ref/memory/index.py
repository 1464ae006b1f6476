"""Two nearest-neighbour indexes with one API: hnswlib HNSW (approximate) and blocked brute force (exact).

Both answer ``search(queries [N,D] float32, k) -> (rows [N,k'] int64, scores [N,k'] float32)`` with
``k' = min(k, len(index))`` columns sorted by descending score (inner product = cosine, since every
vector is L2-normalised).  Exclusion, masks and padding live one level up, in :mod:`.search`.

Why brute force beside HNSW: it is the audit (recall of HNSW is measured against it) and the reference
the sharded search must reproduce exactly.
"""

from __future__ import annotations

import math
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
              max_elements: int = 0, vectors: np.ndarray | None = None, source: str | None = None) -> hnswlib.Index:
    """Check an index file's whole structure (:func:`check_hnsw_file`), then load it with hnswlib.

    hnswlib trusts every byte of the file it loads: a flipped bit in a neighbour id becomes an
    out-of-bounds read at search time (the interpreter dies).  So the file is validated first, every
    time, whatever ``verify`` mode opened the memory.  ``source``: a path to read instead of ``path``
    (``/proc/self/fd/N`` of a descriptor a :class:`~reco_ref.memory.store.Memory` holds open), ``path``
    naming it in messages.
    """
    src = Path(source) if source else Path(path)
    check_hnsw_file(src, dim=dim, count=expect_count, M=expect_M, ef_construction=expect_ef_construction,
                    vectors=vectors, name=str(path))
    index = hnswlib.Index(space="ip", dim=int(dim))
    try:
        index.load_index(str(src), max_elements=int(max_elements))
    except (RuntimeError, ValueError, MemoryError) as exc:
        raise MemoryFormatError(f"{path}: not a readable hnswlib index of dim {dim} ({exc})") from exc
    return index


def hnsw_header(path: Path, name: str | None = None) -> dict:
    """Read the fixed 96-byte header of an hnswlib (0.7/0.8) index file without loading the index.

    Layout (little-endian): offsetLevel0, max_elements, cur_element_count, size_data_per_element,
    label_offset, offsetData (6 x u64), maxlevel, enterpoint_node (2 x i32/u32), maxM, maxM0, M (3 x u64),
    mult (f64), ef_construction (u64).  ``dim`` follows from size_data_per_element = (2M*4 + 4) + 4*dim + 8.
    """
    import struct

    name = name or str(path)
    with open(path, "rb") as fh:
        raw = fh.read(HNSW_HEADER)
    if len(raw) < HNSW_HEADER:
        raise MemoryFormatError(f"{name}: {len(raw)} bytes, too short for an hnswlib index header")
    (off0, max_el, count, size_el, label_off, off_data, maxlevel, enter, maxM, maxM0, M, mult,
     efc) = struct.unpack("<QQQQQQiIQQQdQ", raw)
    dim4 = size_el - (maxM0 * 4 + 4) - 8
    if off0 != 0 or maxM0 != 2 * M or maxM != M or dim4 <= 0 or dim4 % 4 or off_data != maxM0 * 4 + 4 \
            or label_off != off_data + dim4 or max_el < count or not 2 <= M <= 1 << 16 \
            or abs(mult - 1.0 / math.log(M)) > 1e-12:
        raise MemoryFormatError(f"{name}: not an hnswlib index header (M={M}, maxM0={maxM0}, size={size_el})")
    return {"count": int(count), "max_elements": int(max_el), "M": int(M), "ef_construction": int(efc),
            "dim": int(dim4 // 4), "size_el": int(size_el), "label_offset": int(label_off),
            "offset_data": int(off_data), "maxlevel": int(maxlevel), "enterpoint": int(enter), "mult": float(mult)}


HNSW_HEADER = 96


def check_hnsw_file(path: Path, *, dim: int, count: int, M: int, ef_construction: int,
                    vectors: np.ndarray | None = None, name: str | None = None, block: int = 65536) -> None:
    """Validate an hnswlib index file completely, without hnswlib: what makes loading it safe.

    Checks: the header against the manifest (dim, count, M, ef_construction) and itself; the exact file
    size implied by the per-element link-list sizes; every level-0 and upper-level neighbour list
    (count <= its capacity, ids < count, no deleted marks); every level <= maxlevel and the entry point
    on the top level; labels a permutation of ``0..count-1``; stored vectors finite and, when
    ``vectors [count, dim]`` is given, equal to ``vectors[label]`` in float32 (the index holds exactly
    the memory's rows).  Cost: one read of the file (plus one of ``vectors``).
    """
    import struct

    name = name or str(path)
    h = hnsw_header(path, name)
    want = {"dim": dim, "count": count, "M": M, "ef_construction": ef_construction}
    for key, value in want.items():
        if h[key] != value:
            raise MemoryFormatError(f"{name}: index {key} is {h[key]}, manifest says {value}")
    if h["max_elements"] != max(count, 1):  # hnswlib allocates max_elements slots at load: no more than needed
        raise MemoryFormatError(f"{name}: index capacity {h['max_elements']}, expected {max(count, 1)} "
                                "(a memory's indexes hold exactly its rows)")
    n, size_el, maxM0 = count, h["size_el"], 2 * M
    links_up = M * 4 + 4  # bytes of one upper-level list: u32 count + M ids
    size = Path(path).stat().st_size
    level0_end = HNSW_HEADER + n * size_el
    if size < level0_end + 4 * n:
        raise MemoryFormatError(f"{name}: {size} bytes, too short for {n} elements of {size_el} bytes")
    if n and not (0 <= h["maxlevel"] <= 64 and h["enterpoint"] < n):
        raise MemoryFormatError(f"{name}: entry point {h['enterpoint']} / max level {h['maxlevel']} out of range")
    bad = f"{name}: corrupt index structure"
    raw = np.memmap(path, dtype=np.uint8, mode="r", offset=HNSW_HEADER, shape=(n, size_el)) if n else None
    seen = np.zeros(n, np.int64)
    if vectors is not None and (vectors.shape != (n, dim)):
        raise MemoryFormatError(f"{name}: index holds {n}x{dim} vectors, the memory's array is {vectors.shape}")
    for lo in range(0, n, block):
        hi = min(lo + block, n)
        el = np.ascontiguousarray(raw[lo:hi])  # [b, size_el] bytes of level 0
        head = el[:, :4].copy().view("<u4")[:, 0]  # [b] u16 count | deleted mark << 16
        cnt = head & 0xFFFF
        if (cnt > maxM0).any() or (head >> 16).any():
            raise MemoryFormatError(f"{bad}: level-0 neighbour count > {maxM0} or a deleted mark "
                                    f"(element {lo + int(np.argmax((cnt > maxM0) | ((head >> 16) > 0)))})")
        ids = el[:, 4:4 + 4 * maxM0].copy().view("<u4")  # [b, maxM0]
        used = np.arange(maxM0)[None, :] < cnt[:, None]
        if (ids[used] >= n).any():
            raise MemoryFormatError(f"{bad}: a level-0 neighbour id is >= the element count {n}")
        labels = el[:, h["label_offset"]:h["label_offset"] + 8].copy().view("<u8")[:, 0]  # [b]
        if (labels >= n).any():
            raise MemoryFormatError(f"{bad}: a label is >= the element count {n} (labels must be row ids)")
        seen += np.bincount(labels.astype(np.int64), minlength=n)
        data = el[:, h["offset_data"]:h["offset_data"] + 4 * dim].copy().view("<f4")  # [b, dim]
        if not np.isfinite(data).all():
            raise MemoryFormatError(f"{name}: holds NaN/inf vector components (element {lo + int(np.argmax(~np.isfinite(data).all(1)))})")
        if vectors is not None:
            mine = np.asarray(vectors[labels.astype(np.int64)], np.float32)
            if not np.array_equal(mine, data):
                raise MemoryFormatError(f"{name}: the index's vectors differ from the memory's rows (element "
                                        f"{lo + int(np.argmax((mine != data).any(1)))}); the files do not belong together")
    if n and (seen != 1).any():
        raise MemoryFormatError(f"{bad}: labels are not the row ids 0..{n - 1} (each once)")
    # upper levels: u32 size then `size` bytes per element, in element order, up to the file's end
    with open(path, "rb") as fh:
        fh.seek(level0_end)
        tail = fh.read()
    pos, top_seen = 0, False
    levels = np.zeros(n, np.int64)  # [n] top level of each element
    upper: list[tuple[int, np.ndarray]] = []  # (element, its lists [level, 1+M]) for the level check below
    for i in range(n):
        if pos + 4 > len(tail):
            raise MemoryFormatError(f"{bad}: file ends inside the link lists (element {i})")
        (ll,) = struct.unpack_from("<I", tail, pos)
        pos += 4
        if not ll:
            if i == h["enterpoint"] and h["maxlevel"] > 0:
                raise MemoryFormatError(f"{bad}: the entry point has no upper levels but max level is {h['maxlevel']}")
            continue
        level, rest = divmod(ll, links_up)
        if rest or level > h["maxlevel"] or pos + ll > len(tail):
            raise MemoryFormatError(f"{bad}: element {i} has link-list size {ll} (level {level}, max {h['maxlevel']})")
        lists = np.frombuffer(tail, dtype="<u4", count=ll // 4, offset=pos).reshape(level, M + 1)  # [level, 1+M]
        c = lists[:, 0] & 0xFFFF
        if (c > M).any() or (lists[:, 0] >> 16).any() or (lists[:, 1:][np.arange(M)[None, :] < c[:, None]] >= n).any():
            raise MemoryFormatError(f"{bad}: element {i} has an upper-level neighbour list out of range")
        top_seen |= i == h["enterpoint"] and level == h["maxlevel"]
        levels[i] = level
        upper.append((i, lists))
        pos += ll
    if pos != len(tail):
        raise MemoryFormatError(f"{name}: {len(tail) - pos} trailing bytes after the last link list")
    for i, lists in upper:  # a neighbour on level l must itself reach level l (hnswlib reads its level-l list)
        for lev in range(1, lists.shape[0] + 1):
            nb = lists[lev - 1, 1:1 + (lists[lev - 1, 0] & 0xFFFF)].astype(np.int64)
            if (levels[nb] < lev).any():
                raise MemoryFormatError(f"{bad}: element {i} links on level {lev} to an element that has no level {lev}")
    if n and h["maxlevel"] > 0 and not top_seen:
        raise MemoryFormatError(f"{bad}: the entry point is not on the top level {h['maxlevel']}")


def check_hnsw_header(path: Path, *, dim: int, count: int, M: int, ef_construction: int) -> None:
    """Compare an index file's header with what the manifest recorded (cheap: 96 bytes read; the full
    structure is checked by :func:`check_hnsw_file` each time the index is loaded)."""
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
