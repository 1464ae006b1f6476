"""The on-disk memory format, and the atomic commit of a build.

This module holds the commit protocol (below) and re-exports every name of the format's other parts, so
``format.X`` names any of them: the file names (:mod:`.file_names`), the manifest and its checks
(:mod:`.manifest`), the row binding (:mod:`.binding`).

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
import os
import shutil
from pathlib import Path

from ..errors import MemoryFormatError, RecoError
from ..failpoints import failpoint
from ..io import TMP_PREFIX, atomic_write_json, fsync_dir, sha256_file
from ..paths import plain_name
# the format's other parts, re-exported so that ``format.X`` keeps naming every part of the format
from .binding import (BINDING_EDGE, BINDING_SAMPLE, BINDING_VERSION, MAX_BINDING_SAMPLE, array_digest, binding_files,
                      binding_record, binding_rows, check_binding, manifest_groups, meta_digest, open_meta,
                      sparse_reads)
from .file_names import (BUILD_DIR, COMMIT, COMMIT_FILES, COMMIT_LOCK, DTYPES, FAILURES, FORMAT_VERSION, GROUPS, IMAGE,
                         IMAGE_INDEX, IMAGE_KEYS, MANIFEST, MANIFEST_KEYS, MAX_MANIFEST_BYTES, META, META_COLUMNS,
                         OPTIONAL_COMMIT_FILES, SHARDS, TEXT, TEXT_INDEX)
from .manifest import (BUILD_FAILED, build_failure, check_array_file, check_fingerprint, check_files, check_finite,
                       check_meta, describe_partial, read_build_json, read_manifest, record_build_failure,
                       validate_manifest)

__all__ = [
    # file names (file_names.py)
    "BUILD_DIR", "COMMIT", "COMMIT_FILES", "COMMIT_LOCK", "DTYPES", "FAILURES", "FORMAT_VERSION", "GROUPS", "IMAGE",
    "IMAGE_INDEX", "IMAGE_KEYS", "MANIFEST", "MANIFEST_KEYS", "MAX_MANIFEST_BYTES", "META", "META_COLUMNS",
    "OPTIONAL_COMMIT_FILES", "SHARDS", "TEXT", "TEXT_INDEX",
    # the commit protocol (here)
    "READ_WAIT_S", "remove_tmp_files", "commit_lock", "commit_staged", "roll_forward", "read_commit", "file_record",
    # the manifest and its checks (manifest.py)
    "BUILD_FAILED", "build_failure", "check_array_file", "check_fingerprint", "check_files", "check_finite",
    "check_meta", "describe_partial", "read_build_json", "read_manifest", "record_build_failure", "validate_manifest",
    # the row binding (binding.py)
    "BINDING_EDGE", "BINDING_SAMPLE", "BINDING_VERSION", "MAX_BINDING_SAMPLE", "array_digest", "binding_files",
    "binding_record", "binding_rows", "check_binding", "manifest_groups", "meta_digest", "open_meta", "sparse_reads",
]

READ_WAIT_S = 10.0  # how long a reader waits for a commit in progress before saying so


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
