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
    text.groups.npy   optional int64 [n]: row -> its representative row (the smallest row with the same bytes),
    image.groups.npy  written when the indexed array holds identical rows; the index then holds one element
                      per distinct vector (labels = representative row ids) and ``hnsw.<modality>.count`` is
                      the number of distinct vectors, ``hnsw.<modality>.groups`` the file's name.  Without it
                      (no identical rows, or a memory written before it) the index holds every row.

While a build or an ``add`` is running the directory also holds ``.build/`` (chunks, staged files, the
plan); a finished build removes it.  The manifest records sha256 and byte size of every file above, so
opening validates everything the memory consists of.

Binding (``manifest["binding"]``, see :func:`binding_record`): a random id of the memory and, for each
array and ``meta.sqlite``, a sha256 of a deterministic sample of its rows keyed by that id.  The fast
open (``verify="size"``) recomputes these digests, so a file copied from another memory of the same
size, or rows reordered with a rebuilt index, are refused without hashing whole files.

Commit protocol (why a kill -9 at any moment is safe): every final file is first written completely
into ``.build/staged/`` (each one atomically), then ``.build/COMMIT.json`` is written atomically listing
them, then each staged file is renamed over its final name, then ``manifest.json`` is written, then
``.build/`` is renamed to ``.trash-build.<pid>`` (one atomic step) and deleted.
A re-run that finds ``COMMIT.json`` rolls forward (renames are idempotent: a
staged file that is gone was already moved), after checking that the record lists only the memory's own
file names and carries a valid manifest (:func:`read_commit`: a crafted ``../x`` is never replaced); one that finds no ``COMMIT.json`` redoes the staging from
the chunks, which are themselves atomic files.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import json
import os
import re
import shutil
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MemoryFormatError, RecoError
from ..failpoints import failpoint
from ..io import TMP_PREFIX, atomic_write_json, fsync_dir, sha256_file
from ..paths import plain_name, printable

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
IMAGE = "image.npy"
TEXT = "text.npy"
IMAGE_KEYS = "image_keys.npy"
META = "meta.sqlite"
IMAGE_INDEX = "image.hnsw"
TEXT_INDEX = "text.hnsw"
FAILURES = "failures.jsonl"
#: the row -> representative maps of indexes over arrays with identical rows (optional, see the module doc)
GROUPS = {"image": "image.groups.npy", "text": "text.groups.npy"}
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
        nofollow = getattr(os, "O_NOFOLLOW", 0)  # a crafted link must not create or open a file outside the memory
        fd = os.open(path, os.O_RDWR | os.O_CREAT | nofollow, 0o644) if not shared else os.open(path, os.O_RDONLY)
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


MAX_BUILD_JSON_BYTES = 64 << 20  # a plan or a commit record is a few KB (the commit carries one manifest)


def read_build_json(path: Path) -> dict:
    """A JSON object from a build-state file (``.build/plan.json``, ``.build/COMMIT.json``), or an error naming it."""
    try:
        size = path.stat().st_size
        if size > MAX_BUILD_JSON_BYTES:
            raise MemoryFormatError(f"{path}: {size} bytes, not a build-state file (at most {MAX_BUILD_JSON_BYTES})")
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise MemoryFormatError(f"{path}: not valid JSON (UTF-8) ({type(exc).__name__}: {exc}); delete "
                                f"{path.parent} to start the build over") from None
    if not isinstance(obj, dict):
        raise MemoryFormatError(f"{path}: expected a JSON object, found {type(obj).__name__}")
    return obj


#: the files a commit may move into a memory: exactly the memory's own files (never the manifest, never a path)
COMMIT_FILES = (IMAGE, TEXT, IMAGE_KEYS, META, IMAGE_INDEX, TEXT_INDEX, FAILURES)
#: the optional files a commit may also move (kept apart: ``paths.MEMORY_FILES`` mirrors COMMIT_FILES, the files
#: that mark a folder as a memory, which these never do alone)
OPTIONAL_COMMIT_FILES = tuple(GROUPS.values())


def read_commit(build: Path) -> dict:
    """Load and check ``.build/COMMIT.json`` before anything is moved: ``{"files": [names], "manifest": {...}}``.

    Every name in ``files`` is joined to the memory folder and replaced there, so each must be one of the
    memory's own file names (:data:`COMMIT_FILES`): a crafted entry such as ``../../notes.txt`` would make a
    ``--resume`` overwrite a file outside the memory. The manifest it carries is validated like one on disk
    (it is written as the memory's manifest).
    """
    path = build / COMMIT
    spec = read_build_json(path)
    files = spec.get("files")
    if not isinstance(files, list):
        raise MemoryFormatError(f"{path}: field 'files' must be a list of file names, found {type(files).__name__}")
    try:
        for i, name in enumerate(files):
            plain_name(name, f"{path}: files[{i}]", allowed=COMMIT_FILES + OPTIONAL_COMMIT_FILES)
    except RecoError as exc:
        raise MemoryFormatError(f"{exc}; delete {build} and re-run the build/add") from None
    validate_manifest(spec.get("manifest"), f"{path}: manifest")
    return spec


def _roll_forward_locked(root: Path, build: Path, commit: Path) -> None:
    spec = read_commit(build)
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
        _validate_binding(m["binding"], m, where)
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


# ----------------------------------------------------------------------------------------------------------
# binding: the arrays, the metadata and (through the arrays) the indexes belong to this memory
# ----------------------------------------------------------------------------------------------------------
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


def _validate_binding(b: Any, m: dict, where: Path | str) -> None:
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


def check_array_file(path: Path, a: np.ndarray, rows: int, dim: int, dtype: str) -> None:
    """Check a loaded (memory-mapped) embedding array against the manifest."""
    if a.ndim != 2 or a.shape != (rows, dim):
        raise MemoryFormatError(f"{path}: shape {a.shape}, manifest says ({rows}, {dim})")
    if a.dtype != np.dtype(dtype):
        raise MemoryFormatError(f"{path}: dtype {a.dtype}, manifest says {dtype}")


def open_meta(path: Path) -> sqlite3.Connection:
    """A read-only connection to the metadata database (kept by a :class:`Memory` for its lifetime)."""
    try:
        # a percent-encoded file URI: a raw "file:{path}" cuts the path at a '#' or '?' in a folder name
        return sqlite3.connect(f"{Path(path).absolute().as_uri()}?mode=ro", uri=True, check_same_thread=False)
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
