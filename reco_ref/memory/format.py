"""The on-disk memory format: file names, the manifest, its validation, and the atomic commit of a build.

A memory is a directory::

    manifest.json     written LAST; its presence means the memory is complete (see MANIFEST_KEYS)
    image.npy         [n, D]  float16 | float32, L2-normalised image embeddings (memory-mapped on load)
    text.npy          [n, D]  same dtype, L2-normalised text embeddings
    image_keys.npy    [n, Dk] optional: the encoder's image search key (CVPR 2023 "keys"); image.hnsw indexes it
    meta.sqlite       table ``rows(row, item, caption, source, label, split, tags)``, row = 0..n-1
    image.hnsw        hnswlib index (space "ip") over image_keys.npy if present else image.npy; labels = row ids
    text.hnsw         hnswlib index (space "ip") over text.npy
    failures.jsonl    one JSON object per input item that could not be encoded (item, source, error)

While a build or an ``add`` is running the directory also holds ``.build/`` (chunks, staged files, the
plan); a finished build removes it.  The manifest records sha256 and byte size of every file above, so
opening validates everything the memory consists of.

Commit protocol (why a kill -9 at any moment is safe): every final file is first written completely
into ``.build/staged/`` (each one atomically), then ``.build/COMMIT.json`` is written atomically listing
them, then each staged file is renamed over its final name, then ``manifest.json`` is written, then
``.build/`` is renamed to ``.trash-build.<pid>`` (one atomic step) and deleted.
A re-run that finds ``COMMIT.json`` rolls forward (renames are idempotent: a
staged file that is gone was already moved); one that finds no ``COMMIT.json`` redoes the staging from
the chunks, which are themselves atomic files.
"""

from __future__ import annotations

import contextlib
import math
import json
import os
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MemoryFormatError
from ..failpoints import failpoint
from ..io import TMP_PREFIX, atomic_write_json, fsync_dir, sha256_file

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
IMAGE = "image.npy"
TEXT = "text.npy"
IMAGE_KEYS = "image_keys.npy"
META = "meta.sqlite"
IMAGE_INDEX = "image.hnsw"
TEXT_INDEX = "text.hnsw"
FAILURES = "failures.jsonl"
BUILD_DIR = ".build"
COMMIT = "COMMIT.json"
SHARDS = "shards.json"
COMMIT_LOCK = ".commit.lock"  # readers hold it shared while they open; a commit holds it exclusively
READ_WAIT_S = 10.0  # how long a reader waits for a commit in progress before saying so
MAX_MANIFEST_BYTES = 64 << 20  # a manifest is a few KB; a bigger file is not one (and is not read into RAM)

DTYPES = ("float16", "float32")
# Keys every manifest must hold; validate_manifest checks each (name, type).
MANIFEST_KEYS = {
    "format_version": int,
    "embed_dim": int,
    "key_dim": (int, type(None)),
    "dtype": str,
    "encoder": dict,  # {"name": str, "fingerprint": hex str}
    "counts": dict,  # {"rows": n, "items": inputs seen, "failed": n_failed}
    "files": dict,  # {file name: {"sha256": hex, "bytes": int}}
    "hnsw": dict,  # {"image": {...}, "text": {...}} each {"M", "ef_construction", "space", "dim", "count", "vectors"}
}


def remove_tmp_files(folder: Path) -> None:
    """Delete leftovers of writes that were killed half-way (``.tmp-*`` files)."""
    if folder.is_dir():
        for p in folder.iterdir():
            if p.name.startswith(TMP_PREFIX) and p.is_file():
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()


# ----------------------------------------------------------------------------------------------------------
# commit: staged files -> final names -> manifest
# ----------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def commit_lock(root: Path, *, shared: bool, wait_s: float | None = None):
    """Hold ``root/.commit.lock``: exclusive for a commit (blocks), shared for a reader (waits ``wait_s``,
    default :data:`READ_WAIT_S`).

    Why: a commit renames the staged files one by one and writes the manifest last; a reader that
    opened in between would pair an old manifest with new files.  A reader takes the lock shared for the
    moment it opens (manifest, arrays, descriptors of every file) and then holds a consistent snapshot.
    Readers that cannot create the lock file (read-only memory) and non-POSIX systems go without it.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    path = root / COMMIT_LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644) if not shared else os.open(path, os.O_RDONLY)
    except OSError:
        if not shared:
            raise
        yield  # no lock file (older memory, read-only folder): nothing to coordinate with
        return
    try:
        if not shared:
            fcntl.flock(fd, fcntl.LOCK_EX)
        else:
            import time

            deadline = time.monotonic() + (READ_WAIT_S if wait_s is None else wait_s)
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise MemoryFormatError(
                            f"{root}: being modified (a build or memory-add is committing its files right now); "
                            "try again when it has finished") from None
                    time.sleep(0.05)
        yield
    finally:
        os.close(fd)


def commit_staged(root: Path, manifest: dict, files: list[str]) -> None:
    """Move ``.build/staged/<f>`` over ``root/<f>`` for every f, then write the manifest (see module doc).

    ``manifest["files"]`` must already describe the staged files (hash computed on the staged copies).
    """
    build = root / BUILD_DIR
    with commit_lock(root, shared=False):  # readers never see COMMIT.json of a live commit
        atomic_write_json(build / COMMIT, {"files": files, "manifest": manifest})
        failpoint("memory.commit")
        _roll_forward_locked(root, build, build / COMMIT)


def roll_forward(root: Path) -> bool:
    """Finish an interrupted commit if ``.build/COMMIT.json`` exists; return whether one was finished."""
    build = root / BUILD_DIR
    commit = build / COMMIT
    if not commit.is_file():
        return False
    with commit_lock(root, shared=False):
        _roll_forward_locked(root, build, commit)
    return True


def _roll_forward_locked(root: Path, build: Path, commit: Path) -> None:
    spec = json.loads(commit.read_text())
    staged = build / "staged"
    for i, name in enumerate(spec["files"]):
        src = staged / name
        if src.exists():  # gone = already moved by the run that was killed
            os.replace(src, root / name)
            fsync_dir(root)
        if i == 0:
            failpoint("memory.commit-move")
    atomic_write_json(root / MANIFEST, spec["manifest"])
    failpoint("memory.manifest")
    # one atomic rename retires the whole build folder (plan, chunks, COMMIT); a kill before it just
    # repeats the (idempotent) roll-forward, a kill after it leaves only trash that the next run deletes
    trash = root / f".trash-build.{os.getpid()}"
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(build, trash)
    fsync_dir(root)
    shutil.rmtree(trash, ignore_errors=True)


def file_record(path: Path) -> dict:
    """``{"sha256": hex, "bytes": size}`` of one file."""
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


# ----------------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------------
def describe_partial(root: Path) -> str:
    """A message saying what an incomplete memory directory holds and how to resume it."""
    build = root / BUILD_DIR
    plan_path = build / "plan.json"
    msg = f"{root}: memory is incomplete (no {MANIFEST}"
    if plan_path.is_file():
        try:
            plan = json.loads(plan_path.read_text())
        except (OSError, ValueError):
            plan = {}
        n_chunks = int(plan.get("n_chunks", 0))
        done = len(list((build / "chunks").glob("chunk_*.npz"))) if (build / "chunks").is_dir() else 0
        kind = plan.get("kind", "build")
        msg += f"; a {kind} was interrupted with {done} of {n_chunks} chunks done"
        resume = plan.get("resume_hint")
        if resume:
            msg += f"). Resume it with: {resume}"
        else:
            msg += "). Resume it by re-running the same build with --resume (Python: resume=True)"
    elif (build / COMMIT).is_file():
        msg += "; a build was interrupted while committing). Re-run the build with --resume to finish it"
    else:
        msg += "). It is not a memory directory, or its build was interrupted before it started"
    return msg


def read_manifest(root: Path) -> dict:
    """Load and structurally validate ``manifest.json`` (types and versions; files are checked separately)."""
    path = root / MANIFEST
    if (root / BUILD_DIR / COMMIT).is_file():
        raise MemoryFormatError(
            f"{root}: a build/add was interrupted while committing its files; re-run it with --resume "
            "(Python: resume=True) to finish the commit"
        )
    if not path.is_file():
        if (root / BUILD_DIR).is_dir():
            raise MemoryFormatError(describe_partial(root))
        raise MemoryFormatError(f"{root}: not a memory directory ({MANIFEST} missing)")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise MemoryFormatError(f"{path}: {path.stat().st_size} bytes, not a manifest (at most {MAX_MANIFEST_BYTES})")
    try:
        m = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise MemoryFormatError(f"{path}: not valid JSON (UTF-8) ({type(exc).__name__}: {exc})") from None
    validate_manifest(m, path)
    # a pending (uncommitted) add leaves .build/ beside a complete manifest: the memory is valid as it is
    return m


def validate_manifest(m: Any, where: Path | str) -> None:
    """Check a manifest's fields, types and internal consistency; :class:`MemoryFormatError` names the field."""
    if not isinstance(m, dict):
        raise MemoryFormatError(f"{where}: expected a JSON object, found {type(m).__name__}")
    for key, typ in MANIFEST_KEYS.items():
        if key not in m:
            raise MemoryFormatError(f"{where}: field {key!r} missing")
        if not isinstance(m[key], typ) or isinstance(m[key], bool):
            raise MemoryFormatError(f"{where}: field {key!r} has type {type(m[key]).__name__}, expected {typ}")
    if m["format_version"] != FORMAT_VERSION:
        raise MemoryFormatError(
            f"{where}: format_version {m['format_version']} is not supported (this reco_ref reads {FORMAT_VERSION})"
        )
    if m["dtype"] not in DTYPES:
        raise MemoryFormatError(f"{where}: dtype {m['dtype']!r} not supported (expected one of {DTYPES})")
    if m["embed_dim"] <= 0:
        raise MemoryFormatError(f"{where}: embed_dim must be positive, found {m['embed_dim']}")
    enc = m["encoder"]
    for f in ("name", "fingerprint"):
        if not isinstance(enc.get(f), str):
            raise MemoryFormatError(f"{where}: field encoder.{f} missing or not a string")
    counts = m["counts"]
    for f in ("rows", "items", "failed"):
        if not isinstance(counts.get(f), int) or counts[f] < 0:
            raise MemoryFormatError(f"{where}: field counts.{f} missing or not a non-negative integer")
    if counts["rows"] + counts["failed"] != counts["items"]:
        raise MemoryFormatError(
            f"{where}: counts do not add up: rows {counts['rows']} + failed {counts['failed']} "
            f"!= items {counts['items']} (an input was dropped without being reported)"
        )
    required = [IMAGE, TEXT, META, IMAGE_INDEX, TEXT_INDEX, FAILURES] + ([IMAGE_KEYS] if m["key_dim"] else [])
    for f in required:
        rec = m["files"].get(f)
        if not isinstance(rec, dict) or not isinstance(rec.get("sha256"), str) or not isinstance(rec.get("bytes"), int):
            raise MemoryFormatError(f"{where}: files.{f} missing or lacks sha256/bytes")
    known = {IMAGE, TEXT, IMAGE_KEYS, META, IMAGE_INDEX, TEXT_INDEX, FAILURES}
    for f in m["files"]:
        if f not in known:  # a name like "../x" must never make open() read outside the memory
            raise MemoryFormatError(f"{where}: files lists {f!r}, which is not a memory file ({', '.join(sorted(known))})")
    if not isinstance(m.get("history", []), list):
        raise MemoryFormatError(f"{where}: field 'history' must be a list")
    for modality in ("image", "text"):
        h = m["hnsw"].get(modality)
        if not isinstance(h, dict):
            raise MemoryFormatError(f"{where}: hnsw.{modality} missing")
        for f in ("M", "ef_construction", "dim", "count"):
            if not isinstance(h.get(f), int) or h[f] < 0:
                raise MemoryFormatError(f"{where}: hnsw.{modality}.{f} missing or not a non-negative integer")
        if h.get("space") != "ip":
            raise MemoryFormatError(f"{where}: hnsw.{modality}.space is {h.get('space')!r}, expected 'ip'")
        if h["count"] != counts["rows"]:
            raise MemoryFormatError(
                f"{where}: hnsw.{modality}.count {h['count']} != counts.rows {counts['rows']}"
            )
    if "score_map" in m:  # optional (memories built before it lack it): {modality: [center, width] | null}
        sm = m["score_map"]
        if not isinstance(sm, dict) or set(sm) != {"image", "text"} or not all(
                v is None or (isinstance(v, list) and len(v) == 2
                              and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                                      for x in v) and v[1] > 0) for v in sm.values()):
            raise MemoryFormatError(f"{where}: field 'score_map' is {sm!r}, expected {{'image': [center, width > 0] "
                                    "or null, 'text': the same}")
    want_image_dim = m["key_dim"] or m["embed_dim"]
    if m["hnsw"]["image"]["dim"] != want_image_dim:
        raise MemoryFormatError(f"{where}: hnsw.image.dim {m['hnsw']['image']['dim']} != expected {want_image_dim}")
    if m["hnsw"]["text"]["dim"] != m["embed_dim"]:
        raise MemoryFormatError(f"{where}: hnsw.text.dim {m['hnsw']['text']['dim']} != embed_dim {m['embed_dim']}")


def check_files(root: Path, m: dict, verify: str | bool = True) -> None:
    """Check every file the manifest lists: existence, byte size, and (``verify=True``) sha256.

    ``verify="size"`` checks sizes only (seconds saved on multi-GB memories; use :meth:`Memory.verify`
    later for the full check); ``verify=False`` checks existence only.
    """
    if verify not in (True, False, "size", "sha256"):
        raise MemoryFormatError(f"verify must be True/'sha256', 'size' or False, got {verify!r}")
    for name, rec in sorted(m["files"].items()):
        p = root / name
        if not p.is_file():
            raise MemoryFormatError(f"{p}: file listed in {MANIFEST} is missing")
        if verify is False:
            continue
        size = p.stat().st_size
        if size != rec["bytes"]:
            raise MemoryFormatError(f"{p}: size {size} bytes, manifest says {rec['bytes']} (truncated or replaced)")
        if verify in (True, "sha256"):
            digest = sha256_file(p)
            if digest != rec["sha256"]:
                raise MemoryFormatError(f"{p}: sha256 {digest[:16]}… does not match manifest {rec['sha256'][:16]}…")


def check_array_file(path: Path, a: np.ndarray, rows: int, dim: int, dtype: str) -> None:
    """Check a loaded (memory-mapped) embedding array against the manifest."""
    if a.ndim != 2 or a.shape != (rows, dim):
        raise MemoryFormatError(f"{path}: shape {a.shape}, manifest says ({rows}, {dim})")
    if a.dtype != np.dtype(dtype):
        raise MemoryFormatError(f"{path}: dtype {a.dtype}, manifest says {dtype}")


def open_meta(path: Path) -> sqlite3.Connection:
    """A read-only connection to the metadata database (kept by a :class:`Memory` for its lifetime)."""
    try:
        return sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
    except sqlite3.Error as exc:
        raise MemoryFormatError(f"{path}: not a readable metadata database ({exc})") from exc


META_COLUMNS = ("row", "item", "caption", "source", "label", "split", "tags")


def check_meta(path: Path, rows: int, con: sqlite3.Connection | None = None) -> None:
    """Check the SQLite metadata: integrity, table ``rows`` with its columns, row ids exactly 0..rows-1."""
    own = con is None
    try:
        con = con or open_meta(path)
        try:
            ok = con.execute("PRAGMA quick_check").fetchone()
            if not ok or ok[0] != "ok":
                detail = " ".join(str(ok[0]).split()) if ok else "no answer"
                raise MemoryFormatError(f"{path}: damaged metadata database ({detail[:300]})")
            cols = [r[1] for r in con.execute("PRAGMA table_info(rows)")]
            if tuple(cols) != META_COLUMNS:
                raise MemoryFormatError(f"{path}: table rows has columns {cols}, expected {list(META_COLUMNS)}")
            n, lo, hi = con.execute("SELECT COUNT(*), MIN(row), MAX(row) FROM rows").fetchone()
        finally:
            if own:
                con.close()
    except sqlite3.Error as exc:
        raise MemoryFormatError(f"{path}: not a readable metadata database ({' '.join(str(exc).split())})") from exc
    if n != rows or (rows and (lo, hi) != (0, rows - 1)):
        raise MemoryFormatError(f"{path}: holds {n} rows with ids {lo}..{hi}, manifest says {rows} rows 0..{rows - 1}")


def check_finite(path: Path, a: np.ndarray, block: int = 65536) -> None:
    """Every value of the (memory-mapped) array ``a`` is finite, read in row blocks (bounded RAM)."""
    for lo in range(0, a.shape[0], block):
        part = np.asarray(a[lo:lo + block])
        if not np.isfinite(part).all():
            r = lo + int(np.argmin(np.isfinite(part).all(1)))
            raise MemoryFormatError(f"{path}: row {r} holds NaN/inf (the memory is corrupt; rebuild it)")


def check_fingerprint(root: Path, m: dict, encoder: Any = None, fingerprint: str | None = None,
                      embed_dim: int | None = None, allow_mismatch: bool = False) -> None:
    """Refuse a memory built with a different encoder than the one in use.

    ``encoder`` is any object with ``.fingerprint`` and ``.dim`` (an EncoderPair); or pass ``fingerprint``
    / ``embed_dim`` directly.  ``allow_mismatch=True`` turns the refusal off (you then compare embeddings
    from different spaces: only sensible for debugging).
    """
    if encoder is not None:
        fingerprint = getattr(encoder, "fingerprint", fingerprint)
        embed_dim = getattr(encoder, "dim", embed_dim)
    if allow_mismatch:
        return
    if embed_dim is not None and int(embed_dim) != m["embed_dim"]:
        raise MemoryFormatError(
            f"{root}: memory embed_dim is {m['embed_dim']} but the encoder in use has dim {embed_dim}; "
            "rebuild the memory with this encoder (or pass allow_fingerprint_mismatch=True)"
        )
    if fingerprint is not None and fingerprint != m["encoder"]["fingerprint"]:
        raise MemoryFormatError(
            f"{root}: memory was built with encoder {m['encoder']['name']!r} fingerprint "
            f"{m['encoder']['fingerprint'][:16]}…, the encoder in use has fingerprint {fingerprint[:16]}…; "
            "its embeddings live in another space. Rebuild the memory with this encoder "
            "(or pass allow_fingerprint_mismatch=True / --allow-fingerprint-mismatch to override)"
        )
