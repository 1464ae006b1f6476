"""Two nearest-neighbour indexes with one API: hnswlib HNSW (approximate) and blocked brute force (exact).

Both answer ``search(queries [N,D] float32, k) -> (rows [N,k'] int64, scores [N,k'] float32)`` with
``k' = min(k, len(index))`` columns sorted by descending score (inner product = cosine, since every
vector is L2-normalised).  Exclusion, masks and padding live one level up, in :mod:`.search`.

Why brute force beside HNSW: it is the audit (recall of HNSW is measured against it) and the reference
the sharded search must reproduce exactly.

Identical rows (a memory captioned from class templates: ~60 copies of each caption vector) are grouped
(:func:`row_groups`); a memory's index then holds one element per distinct vector, labelled with the
group's smallest row id, and both indexes expand each group found to all its rows at the same score,
ties by row id (:func:`expand_groups`).  Duplicates are then exact in HNSW too, and the index is smaller.

This module holds HNSW (build, add, load, the file checks, :class:`HnswIndex`); brute force is :mod:`.exact`
and the groups of identical rows are :mod:`.row_groups`, both re-exported here.
"""

from __future__ import annotations

import math
import os
import threading
from pathlib import Path

import hnswlib
import numpy as np

from ..errors import MemoryFormatError, SearchError
from .exact import EXACT_QUERY_BLOCK, EXACT_ROW_BLOCK, ExactIndex, as_f32_block, exact_groups, exact_search  # noqa: F401
from .format import sparse_reads
from .row_groups import HASH_BLOCK, check_groups, expand_groups, group_table, row_groups  # noqa: F401

ADD_BLOCK = 65536  # rows handed to hnswlib.add_items at once (bounded RAM when the source is a memmap)


def default_threads() -> int:
    """Threads for hnswlib: ``$RECO_REF_THREADS`` or the CPU count."""
    return int(os.environ.get("RECO_REF_THREADS", 0)) or (os.cpu_count() or 1)


# ----------------------------------------------------------------------------------------------------------
# HNSW
# ----------------------------------------------------------------------------------------------------------
def hnsw_build(vectors: np.ndarray, *, M: int = 16, ef_construction: int = 200, num_threads: int | None = None,
               seed: int = 100, max_elements: int | None = None, rows: np.ndarray | None = None) -> hnswlib.Index:
    """Build an hnswlib index (space ``ip``) over ``vectors [n,D]`` (memmap ok), labels = row ids.

    ``rows``: int64 ``[m]`` ascending, the rows to index (default all ``0..n-1``); a memory indexes one
    representative row per group of identical vectors (:func:`row_groups`).  Rows are fed in blocks of
    :data:`ADD_BLOCK` so a memory-mapped source is never fully copied to RAM (the index itself holds one
    float32 copy: that is hnswlib's layout).
    """
    n, dim = vectors.shape
    m = n if rows is None else int(len(rows))
    index = hnswlib.Index(space="ip", dim=int(dim))
    index.init_index(max_elements=max(int(max_elements or m), 1), M=int(M), ef_construction=int(ef_construction),
                     random_seed=int(seed))
    hnsw_add(index, vectors, 0, num_threads=num_threads, rows=rows)
    return index


def hnsw_add(index: hnswlib.Index, vectors: np.ndarray, first_row: int, num_threads: int | None = None, *,
             rows: np.ndarray | None = None) -> None:
    """Insert ``vectors[rows]`` with labels ``first_row + rows``, growing the index (resize_index) if needed.

    ``rows``: int64 ``[m]`` ascending indices into ``vectors [*,D]`` (default all of them, i.e. append
    ``vectors`` as rows ``first_row..first_row+len(vectors)-1``).
    """
    rows = np.arange(vectors.shape[0], dtype=np.int64) if rows is None else np.asarray(rows, np.int64)
    m = int(rows.size)
    need = int(index.get_current_count()) + m
    if need > index.get_max_elements():
        index.resize_index(need)
    threads = int(num_threads or default_threads())
    for lo in range(0, m, ADD_BLOCK):
        part = rows[lo:lo + ADD_BLOCK]
        if part.size and part[-1] - part[0] == part.size - 1:  # a contiguous run: a slice, no gather
            block = as_f32_block(vectors, int(part[0]), int(part[-1]) + 1)  # [b, D]
        else:
            block = np.ascontiguousarray(vectors[part], dtype=np.float32)  # sorted gather from the memmap
        index.add_items(block, first_row + part, num_threads=threads)


def hnsw_load(path: Path, dim: int, *, expect_count: int, expect_M: int, expect_ef_construction: int,
              max_elements: int = 0, vectors: np.ndarray | None = None, source: str | None = None,
              groups: np.ndarray | None = None) -> hnswlib.Index:
    """Check an index file's whole structure (:func:`check_hnsw_file`), then load it with hnswlib.

    hnswlib trusts every byte of the file it loads: a flipped bit in a neighbour id becomes an
    out-of-bounds read at search time (the interpreter dies).  So the file is validated first, every
    time, whatever ``verify`` mode opened the memory.  ``source``: a path to read instead of ``path``
    (``/proc/self/fd/N`` of a descriptor a :class:`~reco_ref.memory.store.Memory` holds open), ``path``
    naming it in messages.  ``groups [n]``: the memory's row -> representative map (:func:`row_groups`) when
    the index holds one vector per group of identical rows; None = one element per row.
    """
    src = Path(source) if source else Path(path)
    check_hnsw_file(src, dim=dim, count=expect_count, M=expect_M, ef_construction=expect_ef_construction,
                    vectors=vectors, name=str(path), groups=groups)
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
                    vectors: np.ndarray | None = None, name: str | None = None, block: int = 65536,
                    groups: np.ndarray | None = None) -> None:
    """Validate an hnswlib index file completely, without hnswlib: what makes loading it safe.

    Checks: the header against the manifest (dim, count, M, ef_construction) and itself; the exact file
    size implied by the per-element link-list sizes; every level-0 and upper-level neighbour list
    (count <= its capacity, ids < count, no deleted marks); every level <= maxlevel and the entry point
    on the top level; labels a permutation of ``0..count-1`` or, with ``groups [n]`` (the memory's row ->
    representative map, :func:`row_groups`), exactly the representative rows, each once; stored vectors
    finite and, when ``vectors [n, dim]`` is given, equal to ``vectors[label]`` in float32 (the index holds
    exactly the memory's rows, or one per group of identical rows: then every row is also checked to be
    bit-identical to its representative, :func:`check_groups`).  Cost: one read of the file (plus one of
    ``vectors``).
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
    n_rows = n if groups is None else int(groups.shape[0])  # labels are row ids of the memory: < n_rows
    if groups is not None:
        check_groups(groups, count=n, name=name, vectors=vectors, rows="all")
    seen = np.zeros(n_rows, np.int64)
    if vectors is not None and (vectors.shape != (n_rows, dim)):
        raise MemoryFormatError(f"{name}: index holds {n}x{dim} vectors for {n_rows} rows, the memory's array is "
                                f"{vectors.shape}")
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
        if (labels >= n_rows).any():
            raise MemoryFormatError(f"{bad}: a label is >= the row count {n_rows} (labels must be row ids)")
        seen += np.bincount(labels.astype(np.int64), minlength=n_rows)
        data = el[:, h["offset_data"]:h["offset_data"] + 4 * dim].copy().view("<f4")  # [b, dim]
        if not np.isfinite(data).all():
            raise MemoryFormatError(f"{name}: holds NaN/inf vector components (element {lo + int(np.argmax(~np.isfinite(data).all(1)))})")
        if vectors is not None:
            mine = np.asarray(vectors[labels.astype(np.int64)], np.float32)
            if not np.array_equal(mine, data):
                raise MemoryFormatError(f"{name}: the index's vectors differ from the memory's rows (element "
                                        f"{lo + int(np.argmax((mine != data).any(1)))}); the files do not belong together")
    if groups is None and n and (seen != 1).any():
        raise MemoryFormatError(f"{bad}: labels are not the row ids 0..{n - 1} (each once)")
    if groups is not None and (seen != (groups == np.arange(n_rows))).any():
        raise MemoryFormatError(f"{bad}: labels are not the representative rows of its groups file (each once)")
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


def check_hnsw_sample(path: Path, vectors: np.ndarray, elements: np.ndarray, name: str | None = None, *,
                      groups: np.ndarray | None = None) -> None:
    """Compare the stored vectors of the sampled ``elements`` (internal ids) of an index file with the
    memory's rows they are labelled with: the cheap, open-time form of :func:`check_hnsw_file`'s full
    comparison (run at every load).  With the arrays bound to the manifest (``format.check_binding``),
    this binds the index too: one copied from another memory is refused when the memory is opened.

    ``vectors [n, dim]``: the indexed array (memmap ok: only the labelled rows are read); ``elements``:
    sorted ids ``< count``; ``groups [n]``: the row -> representative map when the index holds one element
    per group of identical rows (labels must then be representatives; ``n = count`` without it).  Assumes
    the header was checked against the manifest (:func:`check_hnsw_header`).
    """
    name = name or str(path)
    h = hnsw_header(path, name)
    n, dim, size_el = h["count"], h["dim"], h["size_el"]
    elements = np.asarray(elements, np.int64)
    if not n or not elements.size:
        return
    size = Path(path).stat().st_size
    if size < HNSW_HEADER + n * size_el:
        raise MemoryFormatError(f"{name}: {size} bytes, too short for {n} elements of {size_el} bytes")
    n_rows = n if groups is None else int(groups.shape[0])
    if vectors.shape != (n_rows, dim) or elements[-1] >= n:
        raise MemoryFormatError(f"{name}: index holds {n}x{dim} vectors for {n_rows} rows, the memory's array is "
                                f"{vectors.shape}")
    raw = np.memmap(path, dtype=np.uint8, mode="r", offset=HNSW_HEADER, shape=(n, size_el))
    with sparse_reads(raw):
        el = np.ascontiguousarray(raw[elements])  # [s, size_el]: only the sampled elements are read
    del raw
    labels = el[:, h["label_offset"]:h["label_offset"] + 8].copy().view("<u8")[:, 0].astype(np.int64)  # [s]
    if (labels >= n_rows).any() or (labels < 0).any():
        raise MemoryFormatError(f"{name}: corrupt index structure: a label is >= the row count {n_rows} "
                                "(labels must be row ids)")
    if groups is not None and (groups[labels] != labels).any():
        raise MemoryFormatError(f"{name}: corrupt index structure: a label is not a representative row of its "
                                "groups file (the files do not belong together)")
    data = el[:, h["offset_data"]:h["offset_data"] + 4 * dim].copy().view("<f4")  # [s, dim]
    order = np.argsort(labels, kind="stable")  # sorted gathers read the memmap sequentially
    mine = np.empty_like(data)
    with sparse_reads(vectors):
        mine[order] = np.asarray(vectors[labels[order]], np.float32)
    same = (mine == data).all(1)
    if not same.all():
        raise MemoryFormatError(f"{name}: the index's vectors differ from the memory's rows (element "
                                f"{int(elements[np.argmin(same)])}); the files do not belong together")


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
    ``groups [n]`` (:func:`row_groups`): the index holds one element per group of identical rows; each
    group found is expanded to all its rows at the same score (exact for duplicates), ties by row id.
    """

    def __init__(self, index: hnswlib.Index, vectors: np.ndarray | None = None, groups: np.ndarray | None = None):
        self.index = index
        self.vectors = vectors
        self.dim = int(index.dim)
        self.table = None if groups is None else group_table(np.asarray(groups, np.int64))
        self.reps = None if groups is None else np.flatnonzero(np.asarray(groups) == np.arange(groups.shape[0]))
        self._rows = None if groups is None else int(groups.shape[0])
        self._lock = threading.Lock()  # set_ef + knn_query must not interleave between callers

    def __len__(self) -> int:
        """Rows answerable (memory rows; more than the index's elements when identical rows share one)."""
        return self._rows if self._rows is not None else int(self.index.get_current_count())

    def search(self, queries: np.ndarray, k: int, *, ef: int | None = None, num_threads: int | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """queries [N,D] float32 -> rows [N,k'] int64, scores [N,k'] float32, k' = min(k, len)."""
        k = min(int(k), len(self))
        n = int(self.index.get_current_count())  # elements: with groups, k' groups always hold >= k' rows
        k_el = min(k, n)
        nq = queries.shape[0]
        if k == 0 or nq == 0:
            return np.zeros((nq, k), np.int64), np.zeros((nq, k), np.float32)
        ef_used = max(int(ef) if ef else 50, k_el)  # hnswlib needs ef >= k to return k results
        threads = int(num_threads or default_threads())
        with self._lock:
            while True:
                self.index.set_ef(ef_used)
                try:
                    labels, dist = self.index.knn_query(queries, k=k_el, num_threads=threads)
                    break
                except RuntimeError:
                    # "cannot return the results in a contiguous 2D array": the graph walk found < k
                    # points (tiny or badly connected graph).  Widen the beam; at ef >= n it is exhaustive.
                    if ef_used >= n:
                        if self.vectors is not None and self.table is not None:
                            return exact_groups(self.vectors, queries, k, self.reps, self.table)
                        if self.vectors is not None:
                            return exact_search(self.vectors, queries, k)
                        raise SearchError(f"HNSW could not return {k_el} neighbours even with ef={ef_used} >= n={n}")
                    ef_used = min(2 * ef_used, n)
        rows = labels.astype(np.int64)  # [N,k_el]
        scores = (1.0 - dist).astype(np.float32)  # [N,k_el]
        if self.table is not None:
            return expand_groups(rows, scores, k, self.table)
        return rows, scores
