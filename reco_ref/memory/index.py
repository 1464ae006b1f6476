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
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import threading
from pathlib import Path

import hnswlib
import numpy as np

from ..errors import MemoryFormatError, SearchError
from .format import sparse_reads

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
            block = _as_f32_block(vectors, int(part[0]), int(part[-1]) + 1)  # [b, D]
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


# ----------------------------------------------------------------------------------------------------------
# groups of identical rows: one index element per distinct vector
# ----------------------------------------------------------------------------------------------------------
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
                            return _exact_groups(self.vectors, queries, k, self.reps, self.table)
                        if self.vectors is not None:
                            return exact_search(self.vectors, queries, k)
                        raise SearchError(f"HNSW could not return {k_el} neighbours even with ef={ef_used} >= n={n}")
                    ef_used = min(2 * ef_used, n)
        rows = labels.astype(np.int64)  # [N,k_el]
        scores = (1.0 - dist).astype(np.float32)  # [N,k_el]
        if self.table is not None:
            return expand_groups(rows, scores, k, self.table)
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
            block = _as_f32_block(vectors, int(ids[0]), int(ids[-1]) + 1)  # [r, D]
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


def _exact_groups(vectors: np.ndarray, queries: np.ndarray, k: int, reps: np.ndarray,
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
            return _exact_groups(self.vectors, queries, k, self.reps, self.table)
        return exact_search(self.vectors, queries, k)
