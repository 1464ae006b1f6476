"""The manifest of a memory and the checks of what it lists: read and validate ``manifest.json``, check the
files, arrays, metadata and encoder against it; say what an incomplete memory holds (a build's failure note).

The file names come from :mod:`.file_names`, the binding check from :mod:`.binding`; :mod:`.format`
re-exports every name here.
"""

from __future__ import annotations

import contextlib
import json
import math
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np

from ..chunks import read_state_json
from ..errors import MemoryFormatError
from ..io import atomic_write_json, sha256_file
from ..paths import printable
from .binding import open_meta, validate_binding
from .file_names import (BUILD_DIR, COMMIT, DTYPES, FAILURES, FORMAT_VERSION, GROUPS, IMAGE, IMAGE_INDEX, IMAGE_KEYS,
                         MANIFEST, MANIFEST_KEYS, MAX_MANIFEST_BYTES, META, META_COLUMNS, TEXT, TEXT_INDEX)

def read_build_json(path: Path) -> dict:
    """A JSON object from a build-state file (``.build/plan.json``, ``.build/COMMIT.json``), or an error naming it
    (the reader of every job's state files, :func:`reco_ref.chunks.read_state_json`)."""
    return read_state_json(path, error=MemoryFormatError, remedy=f"delete {path.parent} to start the build over")



BUILD_FAILED = "failed.json"  # .build/failed.json: {"error": one line} of a build/add that stopped on an error


def record_build_failure(build: Path, exc: BaseException) -> None:
    """Note in ``build/failed.json`` why a build or add stopped on an error (not a kill), so that the next run
    can say "failed (...)" instead of "was interrupted".  Only where a plan exists (otherwise there is nothing
    a next run keeps); best effort: a full disk may be the very error."""
    if not (build / "plan.json").is_file():
        return
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    with contextlib.suppress(OSError):
        atomic_write_json(build / BUILD_FAILED, {"error": text[:500]})


def build_failure(build: Path) -> str | None:
    """The error recorded by :func:`record_build_failure` (escaped for printing), or None."""
    if not (build / BUILD_FAILED).is_file():
        return None
    try:
        err = read_build_json(build / BUILD_FAILED).get("error")
    except (OSError, MemoryFormatError):
        return None
    return printable(err[:500]) if isinstance(err, str) else None


def describe_partial(root: Path) -> str:
    """A message saying what an incomplete memory directory holds and how to resume it."""
    build = root / BUILD_DIR
    plan_path = build / "plan.json"
    msg = f"{root}: memory is incomplete (no {MANIFEST}"
    if plan_path.is_file():
        try:
            plan = read_build_json(plan_path)
        except (OSError, MemoryFormatError):
            plan = {}  # a damaged plan: the resumed run says what is wrong with it
        n_chunks = plan.get("n_chunks")
        n_chunks = n_chunks if isinstance(n_chunks, int) and not isinstance(n_chunks, bool) else "?"
        done = len(list((build / "chunks").glob("chunk_*.npz"))) if (build / "chunks").is_dir() else 0
        kind = plan.get("kind") if plan.get("kind") in ("build", "add") else "build"
        failed = build_failure(build)  # stopped on an error (recorded), not killed: say which
        msg += f"; a {kind} {f'failed ({failed})' if failed else 'was interrupted'} with {done} of {n_chunks} chunks done"
        resume = plan.get("resume_hint")
        if resume and isinstance(resume, str):
            # the hint is read from a file: shown escaped, so a crafted plan cannot drive the terminal
            msg += f"). Resume it with: {printable(resume)}"
        else:
            msg += "). Resume it by re-running the same build with --resume (Python: resume=True)"
        if failed:
            msg += f"; or, if the input must change, delete {root} to start over"
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
    known = {IMAGE, TEXT, IMAGE_KEYS, META, IMAGE_INDEX, TEXT_INDEX, FAILURES, *GROUPS.values()}
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
        if "groups" not in h:
            if h["count"] != counts["rows"]:
                raise MemoryFormatError(
                    f"{where}: hnsw.{modality}.count {h['count']} != counts.rows {counts['rows']}"
                )
        else:  # one element per distinct vector, the rows mapped to them by the groups file
            if h["groups"] != GROUPS[modality] or h["groups"] not in m["files"]:
                raise MemoryFormatError(f"{where}: hnsw.{modality}.groups is {h['groups']!r:.60}, expected "
                                        f"{GROUPS[modality]!r} listed in files")
            if not 1 <= h["count"] < counts["rows"]:
                raise MemoryFormatError(f"{where}: hnsw.{modality}.count {h['count']} with a groups file must lie "
                                        f"in [1, counts.rows {counts['rows']})")
        if GROUPS[modality] in m["files"] and h.get("groups") != GROUPS[modality]:
            raise MemoryFormatError(f"{where}: files lists {GROUPS[modality]!r} but hnsw.{modality}.groups does not "
                                    "name it")
    if "score_map" in m:  # optional (memories built before it lack it): {modality: [center, width] | null}
        sm = m["score_map"]
        if not isinstance(sm, dict) or set(sm) != {"image", "text"} or not all(
                v is None or (isinstance(v, list) and len(v) == 2
                              and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                                      for x in v) and v[1] > 0) for v in sm.values()):
            raise MemoryFormatError(f"{where}: field 'score_map' is {sm!r}, expected {{'image': [center, width > 0] "
                                    "or null, 'text': the same}")
    if "binding" in m:  # optional: memories written before it lack it (see check_binding for the rule)
        validate_binding(m["binding"], m, where)
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
            raise MemoryFormatError(f"{p}: file listed in {MANIFEST} is {'not a regular file' if p.exists() or p.is_symlink() else 'missing'}")
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
