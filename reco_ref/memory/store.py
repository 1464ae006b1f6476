"""Open a memory directory: validate it fully, memory-map its arrays, search it.

:meth:`Memory.open` checks, in order: no interrupted build/commit (else a message saying how to resume),
the manifest's fields and versions, every listed file's size and sha256 (``verify=``), the arrays'
shapes and dtypes against the manifest, the SQLite row ids, the binding (sampled rows of every array
and of the metadata against the manifest's digests, and the indexes' stored vectors at those rows
against the arrays; any ``verify`` but False), and the encoder in use (fingerprint and dim;
``allow_fingerprint_mismatch=True`` overrides).  HNSW indexes are loaded on first use and checked
against the recorded build parameters (count, M, ef_construction).

Identical rows (a memory captioned from class templates): the manifest names a groups file per index
(``text.groups.npy``: each row's representative row), the index holds one element per distinct vector,
and a search expands each element found to all its rows (:class:`~reco_ref.memory.index.HnswIndex`).  The
map is loaded and checked at open (structure always; its sampled rows against the vectors with the
binding), and in full when the index is loaded.

Readers during a writer: :meth:`Memory.open` runs under the shared commit lock (:func:`.format.commit_lock`),
so it never pairs an old manifest with new files, and it keeps descriptors of every file it will read
later (the arrays are memory-mapped, the SQLite file and the two index files are held open).  A commit
replaces files by rename, so a handle keeps reading the files of the manifest it opened — a consistent
snapshot — until it is dropped; open the memory again to see an ``add``.  (On systems without
``/proc/self/fd`` an index loaded after a commit is refused with a "changed since it was opened" error.)
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MemoryFormatError, RecoError, SearchError
from ..io import load_npy
from . import format as fmt
from .exact import ExactIndex
from .index import HnswIndex, check_hnsw_header, check_hnsw_sample, hnsw_load
from .row_groups import check_groups
from .search import MODALITIES, search_index


class Memory:
    """An opened memory: ``len(m)``, ``m.image`` / ``m.text`` / ``m.image_keys`` (read-only memmaps
    ``[n,D]``), ``m.search(...)``, ``m.embeddings(...)``, ``m.metadata(...)``.
    """

    def __init__(self, root: Path, manifest: dict, image: np.ndarray, text: np.ndarray,
                 image_keys: np.ndarray | None, num_threads: int | None = None, fds: dict | None = None,
                 meta_con: sqlite3.Connection | None = None, stamp: tuple | None = None,
                 groups: dict[str, np.ndarray] | None = None):
        self.root = root
        self.manifest = manifest
        self.image = image  # [n, D] memmap
        self.text = text  # [n, D] memmap
        self.image_keys = image_keys  # [n, Dk] memmap or None
        self.num_threads = num_threads
        self._hnsw: dict[str, HnswIndex] = {}
        self._exact: dict[str, ExactIndex] = {}  # exact indexes over groups of identical rows (kept: see index())
        self._lock = threading.Lock()
        self._fds = fds or {}  # {"image.hnsw": fd, "text.hnsw": fd}: the files of the opened manifest
        self._meta_con = meta_con  # read-only SQLite connection to the opened meta.sqlite
        self._stamp = stamp  # manifest.json identity at open (inode, mtime, size)
        self.groups = groups or {}  # {modality: int64 [n] row -> representative} where the index dedups rows

    def __del__(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass
        con = getattr(self, "_meta_con", None)
        if con is not None:
            con.close()

    # ---- opening ---------------------------------------------------------------------------------------
    @classmethod
    def open(cls, root: str | Path, *, encoder: Any = None, fingerprint: str | None = None,
             embed_dim: int | None = None, allow_fingerprint_mismatch: bool = False,
             verify: bool | str = True, num_threads: int | None = None) -> "Memory":
        """Open and validate the single memory at ``root`` (:func:`~reco_ref.memory.open_memory` opens any kind).

        Parameters
        ----------
        encoder : the encoder in use (``.fingerprint``, ``.dim``), or give ``fingerprint`` / ``embed_dim``;
            a mismatch raises :class:`MemoryFormatError` unless ``allow_fingerprint_mismatch=True``.
        verify : True / "sha256" (default: hash every file), "size" (sizes only — fast on multi-GB
            memories; run :meth:`verify` later), False (existence only).
        num_threads : hnswlib query threads (default: ``$RECO_REF_THREADS`` or all cores).
        """
        root = Path(root)
        if (root / fmt.SHARDS).is_file():
            raise MemoryFormatError(f"{root}: a sharded memory ({fmt.SHARDS}); open it with "
                                    "reco_ref.memory.open_memory (any kind) or ShardedMemory.open")
        if not root.is_dir():
            raise MemoryFormatError(f"{root}: no such memory directory")
        with fmt.commit_lock(root, shared=True):
            return cls._open_locked(root, encoder=encoder, fingerprint=fingerprint, embed_dim=embed_dim,
                                    allow_fingerprint_mismatch=allow_fingerprint_mismatch, verify=verify,
                                    num_threads=num_threads)

    @classmethod
    def _open_locked(cls, root: Path, *, encoder: Any, fingerprint: str | None, embed_dim: int | None,
                     allow_fingerprint_mismatch: bool, verify: bool | str, num_threads: int | None) -> "Memory":
        stamp = _stamp(root / fmt.MANIFEST)
        m = fmt.read_manifest(root)
        fmt.check_files(root, m, verify)
        rows, D, Dk, dtype = m["counts"]["rows"], m["embed_dim"], m["key_dim"], m["dtype"]
        arrays = {}
        for name, dim in ((fmt.IMAGE, D), (fmt.TEXT, D)) + (((fmt.IMAGE_KEYS, Dk),) if Dk else ()):
            try:
                a = load_npy(root / name, mmap=True)
            except Exception as exc:
                raise MemoryFormatError(f"{root / name}: cannot be read as .npy ({exc})") from exc
            fmt.check_array_file(root / name, a, rows, dim, dtype)
            if verify in (True, "sha256"):
                fmt.check_finite(root / name, a)
            arrays[name] = a
        indexed = {"image": arrays.get(fmt.IMAGE_KEYS, arrays[fmt.IMAGE]), "text": arrays[fmt.TEXT]}
        groups = {}
        for modality in ("image", "text"):
            h = m["hnsw"][modality]
            if "groups" in h:  # read whole (8 B a row), never unpickled; its structure is cheap to check
                path = root / h["groups"]
                try:
                    g = load_npy(path, mmap=False, expect=((rows,), np.int64))
                except RecoError as exc:
                    raise MemoryFormatError(" ".join(str(exc).split())) from None
                check_groups(g, count=h["count"], name=str(path))
                arrays[h["groups"]] = groups[modality] = g
        con = fmt.open_meta(root / fmt.META)
        fds = {}
        try:
            fmt.check_meta(root / fmt.META, rows, con=con)
            for modality in ("image", "text"):
                h = m["hnsw"][modality]
                check_hnsw_header(root / f"{modality}.hnsw", dim=h["dim"], count=h["count"], M=h["M"],
                                  ef_construction=h["ef_construction"])
            if verify is not False:
                # the binding (a few sampled rows per file, whatever the mode): a file copied from another
                # memory, or rows reordered with a rebuilt index, keep every size but not these digests
                fmt.check_binding(root, m, arrays, con)
                b = m.get("binding") or {}
                sample = {"sample": b.get("sample", fmt.BINDING_SAMPLE), "edge": b.get("edge", fmt.BINDING_EDGE)}
                for modality, vecs in indexed.items():
                    # elements sampled over the index (fewer than the rows when identical rows share one)
                    elements = fmt.binding_rows(m["hnsw"][modality]["count"], **sample)
                    check_hnsw_sample(root / f"{modality}.hnsw", vecs, elements, groups=groups.get(modality))
                    if modality in groups:  # sampled rows really are copies of their representative
                        check_groups(groups[modality], count=m["hnsw"][modality]["count"],
                                     name=str(root / m["hnsw"][modality]["groups"]), vectors=vecs,
                                     rows=fmt.binding_rows(rows, **sample))
            fmt.check_fingerprint(root, m, encoder=encoder, fingerprint=fingerprint, embed_dim=embed_dim,
                                  allow_mismatch=allow_fingerprint_mismatch)
            for f in (fmt.IMAGE_INDEX, fmt.TEXT_INDEX):
                fds[f] = os.open(root / f, os.O_RDONLY)
        except BaseException:
            con.close()
            for fd in fds.values():
                os.close(fd)
            raise
        if _stamp(root / fmt.MANIFEST) != stamp:  # no lock file (older memory) and a commit ran meanwhile
            raise MemoryFormatError(f"{root}: being modified (its manifest changed while it was opened); try again")
        return cls(root, m, arrays[fmt.IMAGE], arrays[fmt.TEXT], arrays.get(fmt.IMAGE_KEYS), num_threads,
                   fds=fds, meta_con=con, stamp=stamp, groups=groups)

    def verify(self) -> None:
        """Full sha256 check of every file and finiteness of every array (what ``open(verify=True)`` does)."""
        fmt.check_files(self.root, self.manifest, True)
        for name, a in ((fmt.IMAGE, self.image), (fmt.TEXT, self.text), (fmt.IMAGE_KEYS, self.image_keys)):
            if a is not None:
                fmt.check_finite(self.root / name, a)

    def check_encoder(self, encoder: Any, allow_mismatch: bool = False) -> None:
        """Refuse ``encoder`` if its fingerprint or dim differs from the memory's."""
        fmt.check_fingerprint(self.root, self.manifest, encoder=encoder, allow_mismatch=allow_mismatch)

    # ---- properties ------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.manifest["counts"]["rows"])

    def __repr__(self) -> str:
        return (f"Memory({str(self.root)!r}, rows={len(self)}, dim={self.dim}, key_dim={self.key_dim}, "
                f"dtype={self.dtype}, encoder={self.manifest['encoder']['name']!r})")

    @property
    def dim(self) -> int:
        return int(self.manifest["embed_dim"])

    @property
    def key_dim(self) -> int | None:
        return self.manifest["key_dim"]

    @property
    def dtype(self) -> str:
        return self.manifest["dtype"]

    @property
    def fingerprint(self) -> str:
        return self.manifest["encoder"]["fingerprint"]

    def search_dim(self, modality: str) -> int:
        """Dimension a query for ``modality``'s index must have (the key dim for images when keys exist)."""
        return int(self.manifest["hnsw"][_check_modality(modality)]["dim"])

    # ---- indexes ---------------------------------------------------------------------------------------
    def vectors(self, modality: str) -> np.ndarray:
        """The array ``modality``'s index is built on: image keys (if any) or image embeddings; text embeddings."""
        modality = _check_modality(modality)
        if modality == "image":
            return self.image_keys if self.image_keys is not None else self.image
        return self.text

    def index(self, modality: str, exact: bool = False) -> HnswIndex | ExactIndex:
        """The HNSW index of ``modality`` (loaded once, checked against the manifest), or the exact one."""
        modality = _check_modality(modality)
        if exact and modality not in self.groups:
            return ExactIndex(self.vectors(modality))
        if exact:
            with self._lock:  # built once: the group table sorts every row id
                if modality not in self._exact:
                    g = self.groups[modality]
                    # the audit trusts no unchecked map: every row against its representative (one read)
                    check_groups(g, count=self.manifest["hnsw"][modality]["count"],
                                 name=str(self.root / self.manifest["hnsw"][modality]["groups"]),
                                 vectors=self.vectors(modality), rows="all")
                    self._exact[modality] = ExactIndex(self.vectors(modality), groups=g)
                return self._exact[modality]
        with self._lock:
            if modality not in self._hnsw:
                h = self.manifest["hnsw"][modality]
                name = f"{modality}.hnsw"
                source = _fd_path(self._fds.get(name))
                if source is None and _stamp(self.root / fmt.MANIFEST) != self._stamp:
                    raise MemoryFormatError(f"{self.root}: changed since it was opened (a build or memory-add "
                                            "committed); open it again")
                groups = self.groups.get(modality)  # None: one element per row (no identical rows, older memory)
                idx = hnsw_load(self.root / name, h["dim"], expect_count=h["count"], expect_M=h["M"],
                                expect_ef_construction=h["ef_construction"], vectors=self.vectors(modality),
                                source=source, groups=groups)
                self._hnsw[modality] = HnswIndex(idx, self.vectors(modality), groups=groups)
            return self._hnsw[modality]

    def search(self, queries: np.ndarray, modality: str = "image", k: int = 10, exact: bool = False,
               exclude: Any = None, ef: int | None = None, *, dup_threshold: Any = None,
               num_threads: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """k nearest memory rows to each query in the ``modality`` index.

        Parameters
        ----------
        queries : [N, D] float16/32/64, L2-normalised (``|‖q‖-1| <= 1e-2``, else refused; the zero vector
            too); D = :meth:`search_dim` (``modality``'s index)
        modality : "image" | "text" — the index searched (image→image: image queries; image→text etc. is
            cross-modal search: pass image embeddings with ``modality="text"``)
        k : neighbours per query
        exact : brute force (audit) instead of HNSW; same API and outputs
        exclude : row ids to drop per query: int [N] (self-exclusion, -1 = none), int [N,E], or a list of
            N arrays
        ef : HNSW beam width for this call (default max(k, 50)); larger = higher recall, slower
        dup_threshold : None (off), True (= 0.98, docs/reco.md §1) or a cosine: drop rows scoring >= it
        num_threads : hnswlib threads for this call

        Returns
        -------
        rows : int64 [N, k'] — row ids, −1 in invalid slots; ``k' = min(k, len(self))`` (capped, not padded)
        scores : float32 [N, k'] — cosine similarity, −inf in invalid slots
        valid : bool [N, k'] — False where fewer than k' rows survive (exclusions, duplicates)
        """
        if (modality == "image" and self.key_dim and isinstance(queries, np.ndarray) and queries.ndim == 2
                and queries.shape[1] == self.dim != self.key_dim):
            raise SearchError(
                f"queries [N,D]: D={self.dim} is the embedding dim, but {self.root} indexes images by the encoder's "
                f"image search keys (key_dim {self.key_dim}): image queries must be encoder.encode_image_keys(...); "
                "text queries cannot search this index (search modality='text' for text→text)"
            )
        idx = self.index(modality, exact=exact)
        return search_index(idx, queries, k, exclude=exclude, dup_threshold=dup_threshold, ef=ef,
                            num_threads=num_threads or self.num_threads,
                            what=f"{'exact' if exact else 'HNSW'} {modality} index of {self.root}")

    # ---- gathering -------------------------------------------------------------------------------------
    def embeddings(self, modality: str, rows: np.ndarray, *, stored: bool = False) -> np.ndarray:
        """Embeddings of ``rows`` (any shape, −1 = missing) -> float32 ``rows.shape + (D,)``, zeros where missing.

        ``modality``: "image", "text" or "image_keys".  ``stored=True``: in the memory's own dtype instead
        (float16 rows stay float16: what a served shard sends, half the bytes; the cast to float32 is exact).
        """
        src = {"image": self.image, "text": self.text, "image_keys": self.image_keys}.get(modality)
        if src is None:
            raise SearchError(f"modality {modality!r}: expected 'image', 'text' or 'image_keys' (keys only when "
                              "the memory has them)")
        rows = np.asarray(rows)
        if rows.dtype.kind not in "iu":
            raise SearchError(f"rows: expected integer row ids, got dtype {rows.dtype}")
        flat = rows.reshape(-1).astype(np.int64)
        ok = flat >= 0
        if (flat >= len(self)).any() or (flat < -1).any():
            raise SearchError(f"rows: ids must lie in [-1, {len(self) - 1}], found {flat.min()}..{flat.max()}")
        dtype = src.dtype if stored else np.float32
        out = np.zeros((flat.size, src.shape[1]), dtype)
        sel = flat[ok]
        if sel.size:
            order = np.argsort(sel, kind="stable")  # sorted gathers read the memmap sequentially
            out_ok = np.empty((sel.size, src.shape[1]), dtype)
            out_ok[order] = src[sel[order]]
            finite = np.isfinite(out_ok).all(1)
            if not finite.all():  # never hand a NaN row to the fusion layer as a valid neighbour
                raise MemoryFormatError(f"{self.root}: {modality} row {int(sel[np.argmin(finite)])} holds NaN/inf; "
                                        "the memory is corrupt (run memory-info for a full check, then rebuild)")
            out[ok] = out_ok
        return out.reshape(rows.shape + (src.shape[1],))

    def metadata(self, rows: Any) -> list[dict | None]:
        """Metadata dicts (row, item, caption, source, label, split, tags) of ``rows`` (None for −1)."""
        flat = [int(r) for r in np.asarray(rows).reshape(-1)]
        if any(r >= len(self) or r < -1 for r in flat):
            raise SearchError(f"rows: ids must lie in [-1, {len(self) - 1}]")
        with self._lock:  # one connection, the one of the opened manifest (a snapshot across commits)
            con = self._meta_con
            con.row_factory = sqlite3.Row
            wanted = sorted({r for r in flat if r >= 0})
            found = {}
            try:
                for lo in range(0, len(wanted), 900):  # SQLite's bound-parameter limit
                    part = wanted[lo:lo + 900]
                    q = f"SELECT * FROM rows WHERE row IN ({','.join('?' * len(part))})"
                    for rec in con.execute(q, part):
                        found[rec["row"]] = dict(rec)
            except sqlite3.Error as exc:  # e.g. a caption that is no longer UTF-8: the file is damaged
                raise MemoryFormatError(f"{self.root / fmt.META}: damaged metadata database "
                                        f"({' '.join(str(exc).split())[:300]})") from None
        if any(found.get(r) is None for r in wanted):
            raise MemoryFormatError(f"{self.root / fmt.META}: rows missing from the metadata database")
        return [found.get(r) if r >= 0 else None for r in flat]

    def failures(self) -> list[dict]:
        """The items that could not be encoded (item id, source, error)."""
        path = self.root / fmt.FAILURES
        out = []
        try:
            for lineno, line in enumerate(path.read_bytes().decode("utf-8").splitlines(), 1):
                if line.strip():
                    rec = json.loads(line)
                    if not isinstance(rec, dict):
                        raise ValueError(f"line {lineno} is not a JSON object")
                    out.append(rec)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise MemoryFormatError(f"{path}: not a failure log of JSON lines ({type(exc).__name__}: {exc})") from None
        return out

    def info(self) -> dict:
        """Summary for ``reco-ref memory-info``."""
        files = self.manifest["files"]
        return {
            "root": str(self.root), "rows": len(self), "items": self.manifest["counts"]["items"],
            "failed": self.manifest["counts"]["failed"], "embed_dim": self.dim, "key_dim": self.key_dim,
            "dtype": self.dtype, "encoder": self.manifest["encoder"], "hnsw": self.manifest["hnsw"],
            "bytes_on_disk": sum(f["bytes"] for f in files.values()),
            "files": {k: v["bytes"] for k, v in sorted(files.items())},
        }


def _stamp(path: Path) -> tuple | None:
    """Identity of a file for "did it change?": (inode, mtime ns, size); an atomic replace changes it."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _fd_path(fd: int | None) -> str | None:
    """A path that reads the file behind ``fd`` even after it was renamed over (Linux ``/proc``), or None."""
    if fd is None:
        return None
    p = f"/proc/self/fd/{fd}"
    return p if os.path.exists(p) else None


def _check_modality(modality: str) -> str:
    if modality not in MODALITIES:
        raise SearchError(f"modality: expected 'image' or 'text', got {modality!r}")
    return modality
