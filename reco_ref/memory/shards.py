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
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MemoryFormatError, SearchError
from ..io import atomic_write_json
from ..paths import plain_name
from . import format as fmt
from .search import check_queries, normalize_exclude
from .store import Memory

SHARDS_VERSION = 1


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


class ShardedMemory(SpecProperties):
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
