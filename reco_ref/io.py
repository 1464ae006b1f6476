"""Every write to disk goes through here: temp file in the same directory, fsync, then rename.

A reader therefore sees either the old file or the new one, never a torn write, and a
``kill -9`` at any moment loses at most the file being written (its temp file is left behind
with a ``.tmp-`` prefix and is ignored / cleaned up by readers).

Every read of arrays goes through :func:`load_npz` / :func:`load_npy`, which never unpickle.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from .errors import RecoError

TMP_PREFIX = ".tmp-"


def _default_file_mode() -> int:
    # mkstemp creates 0600 files; a finished file should get the mode a plain open() would give (0666 & ~umask)
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def fsync_dir(path: Path) -> None:
    # Making the rename itself durable needs an fsync of the directory (POSIX); not possible on Windows.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temp path beside ``path``; on clean exit fsync that file and rename it over ``path``.

    For writers that only take a file name (``hnswlib.Index.save_index``, ``sqlite3.connect``); the temp
    file exists (empty) when yielded.  On an exception it is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=TMP_PREFIX + path.name + ".", dir=path.parent)
    tmp = Path(name)
    try:
        os.fchmod(fd, _default_file_mode())
        os.close(fd)
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """Open a temp file beside ``path``; on clean exit fsync it and rename it over ``path``.

    On an exception the temp file is removed and ``path`` is left untouched.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open supports 'wb' and 'w', got {mode!r}")
    with atomic_path(path) as tmp:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as fh:
            yield fh


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON atomically (stable bytes for hashing/diffs)."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """Save one array as ``.npy`` atomically (object arrays are refused: they would need pickle)."""
    array = np.asarray(array)
    if array.dtype.hasobject:
        raise RecoError(f"refusing to save object array to {path}: it would need pickle")
    with atomic_open(path, "wb") as fh:
        np.save(fh, array, allow_pickle=False)


def atomic_save_npz(path: str | os.PathLike, arrays: Mapping[str, np.ndarray], compressed: bool = False) -> None:
    """Save named arrays as ``.npz`` atomically."""
    for name, a in arrays.items():
        if np.asarray(a).dtype.hasobject:
            raise RecoError(f"refusing to save object array {name!r} to {path}: it would need pickle")
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    atomic_write_bytes(path, buf.getvalue())


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Load every array of an ``.npz`` into memory, never unpickling.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    RecoError
        If the file is not a readable npz or holds object arrays.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError) as exc:  # zipfile.BadZipFile is an OSError? no: handled below
        raise RecoError(f"{path}: not a readable .npz without pickle ({exc})") from exc
    except Exception as exc:  # zipfile.BadZipFile and friends
        raise RecoError(f"{path}: not a readable .npz ({type(exc).__name__}: {exc})") from exc


def load_npy(path: str | os.PathLike, mmap: bool = True) -> np.ndarray:
    """Load one ``.npy`` (memory-mapped read-only by default), never unpickling."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except Exception as exc:
        raise RecoError(f"{path}: not a readable .npy without pickle ({type(exc).__name__}: {exc})") from exc


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, streamed in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()
