"""A memory as N shards searched together; the merge is an exact top-k over the shards' answers.

Layout: a directory with ``shards.json`` and one complete memory per shard::

    shards.json   {"format_version": 1, "kind": "sharded", "embed_dim", "key_dim", "dtype",
                   "encoder": {"name", "fingerprint"}, "shards": [{"dir": "shard_000", "rows": n0, "offset": 0}, ...],
                   "counts": {"rows", "items", "failed"}}
    shard_000/    a memory (manifest.json, image.npy, ...) holding global rows [0, n0)
    shard_001/    rows [n0, n0+n1) ...

Row ids are global: shard s's local row r is ``offset_s + r``.  Each shard answers its own top-k (after
its exclusions, mapped to local ids), and the merge keeps the k best of the union, ties by the smaller
global row — the same order :func:`~reco_ref.memory.index.exact_search` uses, so exact search over the
shards returns what exact search over the concatenated memory returns.  (Why that holds: every member of
the global top-k is in its own shard's top-k.)
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import MemoryFormatError, SearchError
from ..io import atomic_write_json
from ..paths import plain_name
from . import format as fmt
from .search import check_queries, normalize_exclude
from .store import Memory

SHARDS_VERSION = 1
#: a whole sharded array gathered by ``np.asarray`` goes to RAM up to this size, beyond it to an unlinked temporary
#: file, memory-mapped (the client then holds only the pages in use; read at call time, tests lower it)
GATHER_RAM_BYTES = 1 << 30
#: rows read per shard per request when a whole array is gathered: bounds one answer (65536 x 768 x 4 B = 192 MiB)
GATHER_ROWS = 65536


def write_shards_manifest(root: str | Path, shard_dirs: list[str]) -> dict:
    """Write ``root/shards.json`` for the complete memories ``root/<shard_dirs[i]>`` (in row order)."""
    root = Path(root)
    shards, offset, items, failed, first = [], 0, 0, 0, None
    for d in shard_dirs:
        m = fmt.read_manifest(root / plain_name(d, f"shard folder {d!r}"))  # a plain name: open() confines it
        if first is None:
            first = m
        for key in ("embed_dim", "key_dim", "dtype", "encoder"):
            if m[key] != first[key]:
                raise MemoryFormatError(f"{root / d}: {key} {m[key]!r} differs from shard {shard_dirs[0]}'s {first[key]!r}")
        shards.append({"dir": d, "rows": m["counts"]["rows"], "offset": offset})
        offset += m["counts"]["rows"]
        items += m["counts"]["items"]
        failed += m["counts"]["failed"]
    if first is None:
        raise MemoryFormatError(f"{root}: a sharded memory needs at least one shard")
    spec = {"format_version": SHARDS_VERSION, "kind": "sharded", "embed_dim": first["embed_dim"],
            "key_dim": first["key_dim"], "dtype": first["dtype"], "encoder": first["encoder"], "shards": shards,
            "counts": {"rows": offset, "items": items, "failed": failed}}
    atomic_write_json(root / fmt.SHARDS, spec)
    return spec


def read_shards_spec(root: Path) -> dict:
    """``root/shards.json`` parsed and its structure checked (each entry an object); no shard opened."""
    path = root / fmt.SHARDS
    try:
        spec = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise MemoryFormatError(f"{path}: unreadable ({exc})") from exc
    if spec.get("format_version") != SHARDS_VERSION or not isinstance(spec.get("shards"), list):
        raise MemoryFormatError(f"{path}: format_version {spec.get('format_version')!r} / shards list not supported")
    for i, s in enumerate(spec["shards"]):
        if not isinstance(s, dict):
            raise MemoryFormatError(f"{path}: shards[{i}] must be an object {{dir, rows, offset}}")
    return spec


def shard_path(root: Path, spec: dict, i: int) -> Path:
    """Folder of shard ``i``: a name read from the file, confined to the sharded memory's folder (never ../)."""
    return root / plain_name(spec["shards"][i].get("dir"), f"{root / fmt.SHARDS}: shards[{i}].dir")


def check_shard_fits(root: Path, spec: dict, i: int, rows: int, manifest: dict) -> None:
    """Refuse shard ``i`` (opened: ``rows`` rows, its ``manifest``) unless it sits where ``shards.json`` says.

    Shards must be contiguous in order (offsets 0, n0, n0+n1, ...) and share the encoder and dim.
    """
    s = spec["shards"][i]
    offset = sum(int(t["rows"]) for t in spec["shards"][:i])
    if rows != s["rows"] or s["offset"] != offset:
        raise MemoryFormatError(f"{root / fmt.SHARDS}: shard {i} ({s['dir']}) has {rows} rows at offset {s['offset']}, "
                                f"expected {s['rows']} rows at offset {offset}")
    if manifest["encoder"] != spec["encoder"] or int(manifest["embed_dim"]) != spec["embed_dim"]:
        raise MemoryFormatError(f"{root / s['dir']}: encoder/dim differ from {root / fmt.SHARDS}")


def local_exclude(excl: np.ndarray, offset: int, n: int) -> np.ndarray:
    """Global exclusions int64 [N, E] -> a shard's local ones (rows outside ``[offset, offset+n)`` become -1)."""
    return np.where((excl >= offset) & (excl < offset + n), excl - offset, -1)


def merge_topk(answers: list[tuple[np.ndarray, np.ndarray, np.ndarray]], offsets: Any, k: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The exact merge of shards' answers: the k best of the union, ties by the smaller global row.

    Parameters
    ----------
    answers : per shard, in shard order, ``(rows int64 [N, k_s], scores float32 [N, k_s], valid bool [N, k_s])``
        with local row ids (what :meth:`Memory.search` returns)
    offsets : int [S] — each shard's first global row
    k : columns wanted

    Returns
    -------
    rows int64 [N, k'], scores float32 [N, k'], valid bool [N, k'] with ``k' = min(k, sum k_s)``; invalid slots
    (row -1, score -inf) last.  Used by in-process and cluster-served search alike, so both give the same bits.
    """
    cand_r = [np.where(v, r + off, -1) for (r, _, v), off in zip(answers, offsets)]
    cand_s = [np.where(v, s, -np.inf).astype(np.float32) for (_, s, v) in answers]
    r = np.concatenate(cand_r, axis=1)  # [N, S*k]
    s = np.concatenate(cand_s, axis=1)
    big = np.iinfo(np.int64).max  # invalid slots sort last
    order = np.lexsort((np.where(r >= 0, r, big), -s), axis=1)[:, :k]
    rows = np.take_along_axis(r, order, 1)
    scores = np.take_along_axis(s, order, 1)
    return rows, scores, rows >= 0


def _gather_target(shape: tuple[int, int], dtype: np.dtype) -> np.ndarray:
    """An empty ``shape`` array in RAM, or in an unlinked temporary file when larger than :data:`GATHER_RAM_BYTES`."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if nbytes <= GATHER_RAM_BYTES:
        return np.empty(shape, dtype)
    with tempfile.TemporaryFile(prefix="reco_ref-gather-") as fh:  # the mapping keeps the file until it is dropped
        return np.memmap(fh, dtype=dtype, mode="w+", shape=shape)


class ShardedArray:
    """A read-only ``[n, d]`` array whose rows lie in shards, in global row order.

    Reads: ``a[i]``, ``a[lo:hi]`` (any step), ``a[rows]`` (an integer array of any shape, negatives from the end, or
    a boolean mask [n]) -> ndarray in the stored dtype; each shard is asked once per read, for its sorted, distinct
    local rows.  ``np.asarray(a)`` gathers every row (:data:`GATHER_ROWS` rows per shard per request; into a
    memory-mapped temporary file above :data:`GATHER_RAM_BYTES`).  ``shape``, ``dtype``, ``ndim``, ``len``.

    Parameters
    ----------
    read : ``{shard: slice | int64 [m] ascending distinct local rows} -> {shard: ndarray [m, d]}`` — one call
        reads from every shard named (a served memory runs them in parallel on the workers)
    sizes : int [S] — rows per shard
    width, dtype : d and the stored dtype
    """

    ndim = 2

    def __init__(self, read: Callable[[dict], dict], sizes: Any, width: int, dtype: Any):
        self._read = read
        self.sizes = np.asarray(sizes, np.int64)  # [S]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)  # [S]
        self.shape = (int(self.sizes.sum()), int(width))
        self.dtype = np.dtype(dtype)

    @classmethod
    def of(cls, arrays: list[np.ndarray]) -> "ShardedArray":
        """The view of in-process arrays (each shard's memory map), in shard order."""
        def read(reqs: dict) -> dict:
            return {i: np.asarray(arrays[i][idx]) for i, idx in reqs.items()}

        return cls(read, [a.shape[0] for a in arrays], arrays[0].shape[1], arrays[0].dtype)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def __repr__(self) -> str:
        return f"ShardedArray(shape={self.shape}, dtype={self.dtype}, shards={len(self.sizes)})"

    def __getitem__(self, key: Any) -> np.ndarray:
        n = self.shape[0]
        if isinstance(key, tuple):  # a[rows, cols]: not needed by any reader; refused rather than misread as rows
            raise IndexError("a sharded array takes rows only (an integer, a slice, an integer or boolean array)")
        if isinstance(key, slice):
            lo, hi, step = key.indices(n)
            if step == 1:
                return self._range(lo, max(lo, hi))
            key = np.arange(lo, hi, step)
        if isinstance(key, (int, np.integer)) and not isinstance(key, (bool, np.bool_)):
            return self[np.array([key])][0]
        idx = np.asarray(key)
        if idx.size == 0 and idx.dtype.kind == "f":  # a[[]]: no rows (numpy reads an empty list as integers)
            idx = idx.astype(np.int64)
        if idx.dtype == bool:
            if idx.shape != (n,):
                raise IndexError(f"boolean index of shape {idx.shape} for an array of {n} rows")
            idx = np.flatnonzero(idx)
        if idx.dtype.kind not in "iu":
            raise IndexError("a sharded array takes rows only (an integer, a slice, an integer or boolean array)")
        flat = idx.reshape(-1).astype(np.int64)
        flat = np.where(flat < 0, flat + n, flat)
        if flat.size and (flat.min() < 0 or flat.max() >= n):
            raise IndexError(f"row index out of bounds for an array of {n} rows")
        return self._rows(flat).reshape(idx.shape + (self.shape[1],))

    def _rows(self, flat: np.ndarray) -> np.ndarray:
        """global rows int64 [m] (in range) -> [m, d], one request per shard for its distinct rows."""
        out = np.empty((flat.size, self.shape[1]), self.dtype)
        if not flat.size:
            return out
        shard = np.searchsorted(self.offsets, flat, side="right") - 1  # the last shard starting at or before the row
        asked = {}
        for i in np.unique(shard).tolist():
            pos = np.flatnonzero(shard == i)
            uniq, inverse = np.unique(flat[pos] - self.offsets[i], return_inverse=True)
            asked[i] = (pos, uniq, inverse.reshape(-1))
        got = self._read({i: uniq for i, (_, uniq, _) in asked.items()})
        for i, (pos, _, inverse) in asked.items():
            out[pos] = got[i][inverse]
        return out

    def _range(self, lo: int, hi: int) -> np.ndarray:
        """global rows [lo, hi) -> [hi - lo, d], each shard asked for its contiguous part."""
        out = np.empty((hi - lo, self.shape[1]), self.dtype)
        reqs = {}
        for i, (off, size) in enumerate(zip(self.offsets.tolist(), self.sizes.tolist())):
            a, b = max(lo, off), min(hi, off + size)
            if a < b:
                reqs[i] = slice(a - off, b - off)
        if reqs:
            got = self._read(reqs)
            for i, sl in reqs.items():
                out[self.offsets[i] + sl.start - lo:self.offsets[i] + sl.stop - lo] = got[i]
        return out

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        if copy is False:
            raise ValueError("a sharded array is read from its shards: it cannot be viewed without a copy")
        out = _gather_target(self.shape, self.dtype)
        for lo in range(0, int(self.sizes.max(initial=0)), GATHER_ROWS):  # every shard's next block, one request
            reqs = {i: slice(lo, min(lo + GATHER_ROWS, int(s))) for i, s in enumerate(self.sizes) if lo < s}
            got = self._read(reqs)
            for i, sl in reqs.items():
                out[self.offsets[i] + sl.start:self.offsets[i] + sl.stop] = got[i]
        return out if dtype is None else out.astype(dtype, copy=False)


class RowArrays:
    """``image``, ``text``, ``image_keys`` and ``vectors(modality)`` of a memory whose rows are read as
    :class:`ShardedArray` views (``self._array(name)``): the attributes a single :class:`Memory` has as memory maps."""

    key_dim: Any

    def _array(self, name: str) -> ShardedArray:
        raise NotImplementedError

    @property
    def image(self) -> ShardedArray:
        """[n, D] image embeddings, in global row order."""
        return self._array("image")

    @property
    def text(self) -> ShardedArray:
        """[n, D] caption embeddings, in global row order."""
        return self._array("text")

    @property
    def image_keys(self) -> ShardedArray | None:
        """[n, Dk] image search keys, or None when the memory has none."""
        return self._array("image_keys") if self.key_dim else None

    def vectors(self, modality: str) -> ShardedArray:
        """The rows ``modality``'s index is built on, as :meth:`Memory.vectors`: image keys (if any) or image
        embeddings; text embeddings."""
        if modality not in ("image", "text"):
            raise SearchError(f"modality: expected 'image' or 'text', got {modality!r}")
        if modality == "image":
            return self.image_keys if self.key_dim else self.image
        return self.text


class SpecProperties:
    """The memory-wide facts a sharded memory reads from its ``shards.json`` spec (``self.spec``)."""

    spec: dict

    @property
    def dim(self) -> int:
        return int(self.spec["embed_dim"])

    @property
    def key_dim(self) -> int | None:
        return self.spec["key_dim"]

    @property
    def dtype(self) -> str:
        return self.spec["dtype"]

    @property
    def fingerprint(self) -> str:
        return self.spec["encoder"]["fingerprint"]


class ShardedMemory(SpecProperties, RowArrays):
    """N :class:`Memory` shards with global row ids and the same search API as one memory."""

    def __init__(self, root: Path, spec: dict, shards: list[Memory]):
        self.root = root
        self.spec = spec
        self.shards = shards
        self.offsets = np.array([s["offset"] for s in spec["shards"]], np.int64)  # [S]
        self.sizes = np.array([len(m) for m in shards], np.int64)  # [S]
        self.manifest = {k: spec[k] for k in ("embed_dim", "key_dim", "dtype", "encoder", "counts")}

    @classmethod
    def open(cls, root: str | Path, *, verify: bool | str = True, **kwargs: Any) -> "ShardedMemory":
        """Open every shard (each fully validated like :meth:`Memory.open`) and check they fit together."""
        root = Path(root)
        spec = read_shards_spec(root)
        shards = []
        for i, s in enumerate(spec["shards"]):
            m = Memory.open(shard_path(root, spec, i), verify=verify, **kwargs)
            check_shard_fits(root, spec, i, len(m), m.manifest)
            shards.append(m)
        return cls(root, spec, shards)

    def __len__(self) -> int:
        return int(self.sizes.sum())

    def __repr__(self) -> str:
        return f"ShardedMemory({str(self.root)!r}, shards={len(self.shards)}, rows={len(self)}, dim={self.dim})"

    def search_dim(self, modality: str) -> int:
        return self.shards[0].search_dim(modality)

    def _array(self, name: str) -> ShardedArray:
        return ShardedArray.of([getattr(m, name) for m in self.shards])

    def _locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """global rows (>= 0) -> (shard index, local row)."""
        s = np.searchsorted(self.offsets, rows, side="right") - 1
        return s, rows - self.offsets[s]

    def search(self, queries: np.ndarray, modality: str = "image", k: int = 10, exact: bool = False,
               exclude: Any = None, ef: int | None = None, *, dup_threshold: Any = None,
               num_threads: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Same contract as :meth:`Memory.search`; rows are global ids."""
        q = check_queries(queries, self.search_dim(modality), f"{modality} index of {self.root}")
        nq = q.shape[0]
        excl = normalize_exclude(exclude, nq)  # [N, E] global ids
        answers = [m.search(q, modality=modality, k=k, exact=exact, exclude=local_exclude(excl, off, len(m)), ef=ef,
                            dup_threshold=dup_threshold, num_threads=num_threads)
                   for m, off in zip(self.shards, self.offsets)]
        return merge_topk(answers, self.offsets, k)

    def embeddings(self, modality: str, rows: np.ndarray) -> np.ndarray:
        """Like :meth:`Memory.embeddings` with global rows."""
        rows = np.asarray(rows)
        if rows.dtype.kind not in "iu":
            raise SearchError(f"rows: expected integer row ids, got dtype {rows.dtype}")
        flat = rows.reshape(-1).astype(np.int64)
        if (flat >= len(self)).any() or (flat < -1).any():
            raise SearchError(f"rows: ids must lie in [-1, {len(self) - 1}], found {flat.min()}..{flat.max()}")
        dim = self.key_dim if modality == "image_keys" else self.dim
        out = np.zeros((flat.size, dim), np.float32)
        ok = np.flatnonzero(flat >= 0)
        sh, local = self._locate(flat[ok])
        for i, m in enumerate(self.shards):
            sel = sh == i
            if sel.any():
                out[ok[sel]] = m.embeddings(modality, local[sel])
        return out.reshape(rows.shape + (dim,))

    def metadata(self, rows: Any) -> list[dict | None]:
        """Metadata of global rows (``row`` field global)."""
        flat = np.asarray(rows).reshape(-1).astype(np.int64)
        out: list[dict | None] = [None] * flat.size
        ok = np.flatnonzero(flat >= 0)
        sh, local = self._locate(flat[ok])
        for i, m in enumerate(self.shards):
            sel = np.flatnonzero(sh == i)
            if sel.size:
                for j, rec in zip(sel, m.metadata(local[sel])):
                    if rec is not None:
                        rec = dict(rec, row=int(rec["row"]) + int(self.offsets[i]))
                    out[int(ok[j])] = rec
        return out

    def failures(self) -> list[dict]:
        return [f for m in self.shards for f in m.failures()]

    def verify(self) -> None:
        for m in self.shards:
            m.verify()

    def info(self) -> dict:
        infos = [m.info() for m in self.shards]
        return {"root": str(self.root), "shards": len(self.shards), "rows": len(self),
                "items": self.spec["counts"]["items"], "failed": self.spec["counts"]["failed"],
                "embed_dim": self.dim, "key_dim": self.key_dim, "dtype": self.dtype, "encoder": self.spec["encoder"],
                "bytes_on_disk": sum(i["bytes_on_disk"] for i in infos),
                "shard_rows": [len(m) for m in self.shards]}
