"""The row binding of a memory: the arrays, the metadata and (through the arrays) the indexes belong to it.

``manifest["binding"]`` (see :func:`binding_record`) holds a random id of the memory and, for each array and
``meta.sqlite``, a sha256 of a deterministic sample of its rows keyed by that id; the fast open
(``verify="size"``) recomputes them (:func:`check_binding`).  Also here: :func:`open_meta`, the read-only
connection to the metadata database that the digest and the checks of :mod:`.manifest` read through.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MemoryFormatError
from .file_names import IMAGE, IMAGE_KEYS, META, META_COLUMNS, TEXT

BINDING_VERSION = 1
BINDING_SAMPLE = 1024  # strided rows sampled per file (plus BINDING_EDGE rows at each end)
BINDING_EDGE = 16
MAX_BINDING_SAMPLE = 1 << 16  # bound on the manifest's recorded sample sizes (a crafted one cannot ask for more)
_HEX = re.compile(r"[0-9a-f]+")


def binding_files(key_dim: int | None, groups: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The files a manifest's ``binding.digests`` covers: the arrays present (embeddings, keys, ``groups``:
    the groups files of :func:`manifest_groups`) and, last, ``meta.sqlite``."""
    return [IMAGE, TEXT] + ([IMAGE_KEYS] if key_dim else []) + list(groups) + [META]


def manifest_groups(m: dict) -> list[str]:
    """The groups files a (validated) manifest names, image first; empty for a memory without identical rows."""
    return [m["hnsw"][mod]["groups"] for mod in ("image", "text") if "groups" in m["hnsw"][mod]]


def binding_rows(n: int, sample: int = BINDING_SAMPLE, edge: int = BINDING_EDGE) -> np.ndarray:
    """Row ids whose content the binding digests cover: int64 ``[s]``, sorted, unique.

    Every row when ``n <= sample + 2*edge``; otherwise the first and last ``edge`` rows and ``sample``
    rows spread evenly over ``0..n-1``.  Why a sample: hashing whole arrays on every open costs a full
    read of multi-GB files; a sample catches a file copied from another memory or rows reordered (any
    sampled row that moves), at the cost of ~``sample`` row reads.  A change confined to unsampled rows
    of a big memory is left to full verification (``verify=True``).
    """
    n = int(n)
    if n <= sample + 2 * edge:
        return np.arange(n, dtype=np.int64)
    spread = np.linspace(0, n - 1, num=sample).round().astype(np.int64)
    ends = np.concatenate([np.arange(edge), np.arange(n - edge, n)]).astype(np.int64)
    return np.unique(np.concatenate([ends, spread]))


def _binding_hash(memory_id: str, name: str, rows: np.ndarray) -> "hashlib._Hash":
    h = hashlib.sha256(f"reco_ref binding v{BINDING_VERSION}|{memory_id}|{name}|".encode())
    h.update(np.asarray(rows, "<i8").tobytes())
    return h


@contextlib.contextmanager
def sparse_reads(a: np.ndarray):
    """While inside, page faults on the memmap ``a`` read only the touched pages (``MADV_RANDOM``).

    Why: a sample of scattered rows read through a memory map otherwise pulls the kernel's read-around
    window (~128 KiB) per row; on a cold 1 GB ``.npy`` 1054 sampled rows took 0.55-0.7 s that way (about
    a full read of the file) and 0.07-0.08 s with this advice.  The advice is reset afterwards, so later
    sequential reads (exact search, full verification) keep their read-ahead.  A no-op for other arrays.
    """
    import mmap

    mm = getattr(a, "_mmap", None)
    advise = isinstance(mm, mmap.mmap) and hasattr(mm, "madvise") and hasattr(mmap, "MADV_RANDOM")
    if advise:
        with contextlib.suppress(OSError, ValueError):
            mm.madvise(mmap.MADV_RANDOM)
    try:
        yield
    finally:
        if advise:
            with contextlib.suppress(OSError, ValueError):
                mm.madvise(mmap.MADV_NORMAL)


def array_digest(a: np.ndarray, rows: np.ndarray, memory_id: str, name: str, block: int = 4096) -> str:
    """sha256 of the sampled ``rows`` of ``a [n, D]`` (memmap ok: only those rows are read), its shape and
    dtype, keyed by ``memory_id`` and the file ``name``."""
    h = _binding_hash(memory_id, name, rows)
    h.update(f"{a.shape}|{a.dtype.str}|".encode())
    with sparse_reads(a):
        for lo in range(0, len(rows), block):
            h.update(np.ascontiguousarray(a[rows[lo:lo + block]]).tobytes())
    return h.hexdigest()


def meta_digest(con: sqlite3.Connection, rows: np.ndarray, memory_id: str) -> str:
    """sha256 of the sampled ``rows`` of table ``rows`` (every column, by row id), keyed by ``memory_id``.

    Raises ``sqlite3.Error`` on a damaged database (the caller names the file).
    """
    h = _binding_hash(memory_id, META, rows)
    ids = [int(r) for r in rows]
    for lo in range(0, len(ids), 900):  # SQLite's bound-parameter limit
        part = ids[lo:lo + 900]
        q = (f"SELECT {', '.join(META_COLUMNS)} FROM rows WHERE row IN ({','.join('?' * len(part))}) "
             "ORDER BY row")
        for rec in con.execute(q, part):
            h.update(repr(tuple(rec)).encode("utf-8", "surrogatepass") + b"\n")  # repr: typed and unambiguous
    return h.hexdigest()


def binding_record(folder: Path, key_dim: int | None, memory_id: str | None = None,
                   groups: list[str] | tuple[str, ...] = ()) -> dict:
    """The ``binding`` manifest field for the (staged) memory files in ``folder``.

    ``memory_id``: the memory's id (an ``add`` keeps it); None draws a new random one (a new memory).
    ``groups``: the groups files written (:func:`manifest_groups` of the manifest being written).
    """
    from ..io import load_npy

    memory_id = memory_id or uuid.uuid4().hex
    digests = {}
    n = 0
    for name in binding_files(key_dim, groups)[:-1]:
        a = load_npy(folder / name, mmap=True)
        digests[name] = array_digest(a, binding_rows(a.shape[0]), memory_id, name)
        n = a.shape[0]
        del a
    con = open_meta(folder / META)
    try:
        digests[META] = meta_digest(con, binding_rows(n), memory_id)
    finally:
        con.close()
    return {"version": BINDING_VERSION, "memory_id": memory_id, "sample": BINDING_SAMPLE, "edge": BINDING_EDGE,
            "digests": digests}


def validate_binding(b: Any, m: dict, where: Path | str) -> None:
    expect = "{'version': 1, 'memory_id': 32 hex digits, 'sample': int, 'edge': int, 'digests': {file: sha256}}"
    if not isinstance(b, dict) or set(b) != {"version", "memory_id", "sample", "edge", "digests"}:
        raise MemoryFormatError(f"{where}: field 'binding' is malformed (expected {expect})")
    if b["version"] != BINDING_VERSION or isinstance(b["version"], bool):
        raise MemoryFormatError(f"{where}: binding.version {b['version']!r} is not supported "
                                f"(this reco_ref reads {BINDING_VERSION})")
    mid = b["memory_id"]
    if not (isinstance(mid, str) and len(mid) == 32 and _HEX.fullmatch(mid)):
        raise MemoryFormatError(f"{where}: binding.memory_id must be 32 hex digits, found {mid!r:.60}")
    for f, lo in (("sample", 1), ("edge", 0)):
        v = b[f]
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= MAX_BINDING_SAMPLE:
            raise MemoryFormatError(f"{where}: binding.{f} must be an integer in [{lo}, {MAX_BINDING_SAMPLE}], "
                                    f"found {v!r:.60}")
    d, want = b["digests"], binding_files(m["key_dim"], manifest_groups(m))
    if not isinstance(d, dict) or sorted(d) != sorted(want) or not all(
            isinstance(v, str) and len(v) == 64 and _HEX.fullmatch(v) for v in d.values()):
        found = sorted(d) if isinstance(d, dict) else type(d).__name__
        raise MemoryFormatError(f"{where}: binding.digests must map {', '.join(want)} to sha256 hex digests, "
                                f"found {found!r:.200}")


def check_binding(root: Path, m: dict, arrays: dict[str, np.ndarray], con: sqlite3.Connection) -> None:
    """Recompute the manifest's binding digests from the opened arrays and metadata; refuse a mismatch.

    Rule for memories written before the binding existed (no ``binding`` field): nothing to compare
    with, so the check is skipped and such a memory opens as before (its files are then bound only by
    full verification, ``verify=True``, which hashes every file); a ``memory-add`` writes the field.
    Recomputing a digest at open instead would only bless whatever files are there.
    """
    b = m.get("binding")
    if b is None:
        return
    n = m["counts"]["rows"]
    rows = binding_rows(n, b["sample"], b["edge"])
    why = ("the file belongs to another memory, or its rows were changed or reordered; the memory's files do "
           "not belong together: rebuild the memory or restore the file")
    for name in binding_files(m["key_dim"], manifest_groups(m))[:-1]:  # arrays: embeddings, keys, groups maps
        if array_digest(arrays[name], rows, b["memory_id"], name) != b["digests"][name]:
            raise MemoryFormatError(f"{root / name}: sampled rows differ from the manifest's binding digest ({why})")
    try:
        got = meta_digest(con, rows, b["memory_id"])
    except sqlite3.Error as exc:
        raise MemoryFormatError(f"{root / META}: damaged metadata database ({' '.join(str(exc).split())[:300]})"
                                ) from None
    if got != b["digests"][META]:
        raise MemoryFormatError(f"{root / META}: sampled rows differ from the manifest's binding digest ({why})")


def open_meta(path: Path) -> sqlite3.Connection:
    """A read-only connection to the metadata database (kept by a :class:`Memory` for its lifetime)."""
    try:
        # a percent-encoded file URI: a raw "file:{path}" cuts the path at a '#' or '?' in a folder name
        return sqlite3.connect(f"{Path(path).absolute().as_uri()}?mode=ro", uri=True, check_same_thread=False)
    except sqlite3.Error as exc:
        raise MemoryFormatError(f"{path}: not a readable metadata database ({exc})") from exc
