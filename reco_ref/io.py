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
from typing import Any, Iterable, Iterator, Mapping, NamedTuple

import numpy as np

from .errors import RecoError
from .paths import file_problem

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


NPZ_MAX_RATIO = 100  # an .npz may declare at most this many times its own size (plus NPZ_SLACK) uncompressed
NPZ_SLACK = 256 << 20


NPY_HEADER_MAX = 10000  # bytes of an .npy header's text; numpy's own max_header_size


class ArraySpec(NamedTuple):
    """What a caller expects of one array, checked against its ``.npy`` header before any data is read.

    ``shape``: a tuple whose items are a length or None (any length), or None (any shape); ``dtype``: a dtype
    or a tuple of accepted dtypes (None: any); ``kind``: accepted dtype kinds, e.g. ``"f"`` (None: any);
    ``max_bytes``: the largest data size accepted (None: no bound beyond the shape and dtype).
    """

    shape: tuple | None = None
    dtype: Any = None
    kind: str | None = None
    max_bytes: int | None = None


class EntryError(RecoError):
    """One entry of an ``.npz`` (or one ``.npy``) is unusable: ``entry`` names it (without ``.npy``), ``reason``
    says why (the message is ``"{path}: entry '{entry}' {reason}"``); ``pickled`` when it holds Python objects."""

    def __init__(self, path: Path | str, entry: str, reason: str, pickled: bool = False):
        super().__init__(f"{path}: entry {entry!r} {reason}")
        self.entry, self.reason, self.pickled = entry, reason, pickled


def _dims(shape) -> str:
    return "(" + ", ".join("*" if d is None else str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def spec_problem(shape: tuple[int, ...], dtype: np.dtype, nbytes: int, spec: Any) -> str | None:
    """Why an array of ``shape``/``dtype`` (``nbytes`` of data) does not match ``spec`` (an :class:`ArraySpec` or
    a ``(shape, dtype)`` tuple), or None when it does."""
    spec = ArraySpec(*spec) if not isinstance(spec, ArraySpec) else spec
    if spec.dtype is not None:
        want = spec.dtype if isinstance(spec.dtype, tuple) else (spec.dtype,)
        if dtype not in [np.dtype(d) for d in want]:
            return f"has dtype {dtype}, expected {' or '.join(str(np.dtype(d)) for d in want)}"
    if spec.kind is not None and dtype.kind not in spec.kind:
        kinds = {"f": "float", "i": "signed integer", "u": "unsigned integer", "b": "bool", "c": "complex"}
        return f"has dtype {dtype}, expected {' or '.join(kinds.get(k, k) for k in spec.kind)}"
    if spec.shape is not None and (len(shape) != len(spec.shape) or any(
            w is not None and w != d for w, d in zip(spec.shape, shape))):
        return f"has shape {shape}, expected {_dims(spec.shape) if None in spec.shape else tuple(spec.shape)}"
    if spec.max_bytes is not None and nbytes > spec.max_bytes:
        return f"declares {nbytes} bytes of data (shape {shape} {dtype}), more than the {spec.max_bytes} expected"
    return None


def _npy_header(fh: Any, where: str) -> tuple[tuple[int, ...], np.dtype, int, str]:
    """Read an ``.npy`` header from ``fh`` -> (shape, dtype, data bytes it promises, order); no data is read.

    The header's length field is checked before its text is read (numpy reads the text first, up to 4 GiB
    for a version 2 header, and only then compares it with its limit).
    """
    try:
        version = np.lib.format.read_magic(fh)
        read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read is None:
            raise ValueError(f"format version {version} not supported")
        raw_len = fh.read(2 if version == (1, 0) else 4)
        if len(raw_len) != (2 if version == (1, 0) else 4):
            raise EOFError("the file ends inside the header length")
        if int.from_bytes(raw_len, "little") > NPY_HEADER_MAX:
            raise ValueError(f"header of {int.from_bytes(raw_len, 'little')} bytes, more than {NPY_HEADER_MAX}")
        text = fh.read(int.from_bytes(raw_len, "little"))
        shape, fortran, dtype = read(io.BytesIO(raw_len + text))  # a literal dict (ast.literal_eval): never unpickles
    except Exception as exc:  # numpy raises ValueError / EOFError / SyntaxError on mangled headers
        raise RecoError(f"{where}: not a readable .npy header ({type(exc).__name__}: {exc})") from None
    if dtype.hasobject:
        raise RecoError(f"{where}: holds Python objects (dtype {dtype}); refusing: it would need pickle")
    count = 1
    for d in shape:
        count *= int(d)
    return tuple(int(d) for d in shape), dtype, count * dtype.itemsize, "F" if fortran else "C"


def require_file(path: Path) -> None:
    """Refuse an input that is not a regular file: missing (:class:`FileNotFoundError`), a broken link, or a
    device / pipe / folder (:class:`RecoError` saying which: reading ``/dev/zero`` never ends)."""
    if path.is_file():
        return
    problem = file_problem(path) or "no such file"
    if problem == "no such file":
        raise FileNotFoundError(f"no such file: {path}")
    if problem.startswith("broken"):
        raise FileNotFoundError(f"{path}: {problem}")
    raise RecoError(f"{path}: {problem}")


def _name_list(names: Iterable[str], limit: int = 12) -> str:
    names = sorted(names)
    return str(names[:limit])[:-1] + (f", … {len(names) - limit} more]" if len(names) > limit else "]")


def load_npz(path: str | os.PathLike, names: Iterable[str] | None = None,
             max_bytes: int | None = None, *, expect: Mapping[str, Any] | None = None,
             only: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Load the arrays of an ``.npz`` into memory, never unpickling, checking before decompressing.

    Before any entry's data is decompressed: every entry name must be in ``names`` (when given) and end in
    ``.npy``; the declared total must stay within ``max_bytes`` (default: ``NPZ_MAX_RATIO`` times the file's
    size plus ``NPZ_SLACK``), so a small crafted file cannot make the reader allocate gigabytes; and every
    entry's ``.npy`` header must promise exactly its declared uncompressed size and, with ``expect``, match
    what the caller expects. A caller that knows its arrays passes ``expect``, so an entry declaring more
    than that is refused from its header, whatever the file's size.

    Parameters
    ----------
    expect : mapping of entry name -> :class:`ArraySpec` (or ``(shape, dtype)``), optional
        The arrays the caller expects. Any other entry is refused (:class:`EntryError`, ``unexpected``);
        an expected entry that is missing is not (the caller says what a missing one means).
    only : iterable of entry names, optional
        Read only these entries (their headers checked as above); the others are left unread. For a file
        whose header entry says what the others must be: read it first, then the rest with ``expect``.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    EntryError
        An entry that is unexpected, does not match ``expect``, holds objects, or whose header is unreadable
        or disagrees with its size (a :class:`RecoError` naming the entry).
    RecoError
        If the file is not a readable npz, holds entries outside ``names``, or declares more data than allowed.
    """
    import zipfile
    import zlib

    path = Path(path)
    require_file(path)
    allowed = None if names is None else {f"{n}.npy" for n in names}
    wanted = None if only is None else {f"{n}.npy" for n in only}
    limit = max_bytes if max_bytes is not None else NPZ_MAX_RATIO * path.stat().st_size + NPZ_SLACK
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            total = 0
            for info in infos:
                if not info.filename.endswith(".npy") or (allowed is not None and info.filename not in allowed):
                    want = "" if allowed is None else f" (expected only {', '.join(sorted(allowed))})"
                    raise RecoError(f"{path}: unexpected entry {info.filename!r}{want}")
                total += info.file_size
            if total > limit:
                raise RecoError(f"{path}: entries declare {total} bytes uncompressed, more than the {limit} allowed "
                                f"for a {path.stat().st_size}-byte file (a decompression bomb?)")
            infos = [i for i in infos if wanted is None or i.filename in wanted]
            plan = []  # every header is checked before any entry's data is read
            for info in infos:
                name = info.filename[:-4]
                if expect is not None and name not in expect:
                    raise EntryError(path, name, f"unexpected, expected only {_name_list(expect)}")
                try:
                    with zf.open(info) as fh:
                        shape, dtype, nbytes, order = _npy_header(fh, "")
                        offset = fh.tell()
                except RecoError as exc:
                    raise EntryError(path, name, str(exc)[2:], pickled="Python objects" in str(exc)) from None
                except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError, zlib.error) as exc:
                    raise EntryError(path, name, f"unreadable ({type(exc).__name__}: {exc})") from None
                if offset + nbytes != info.file_size:
                    raise EntryError(path, name, f"header promises {nbytes} data bytes for shape {shape}, the "
                                                 f"entry holds {info.file_size - offset}")
                problem = None if expect is None else spec_problem(shape, dtype, nbytes, expect[name])
                if problem:
                    raise EntryError(path, name, problem + " (refused from its header, before reading it)")
                plan.append((info, name, shape, dtype, nbytes, order))
            out = {}
            for info, name, shape, dtype, nbytes, order in plan:
                data = bytearray(nbytes)  # writeable, exactly the promised size
                try:
                    with zf.open(info) as fh:
                        _npy_header(fh, "")
                        got = fh.readinto(data)
                except (zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error) as exc:  # a bad CRC, cut data
                    raise EntryError(path, name, f"unreadable ({type(exc).__name__}: {exc})") from None
                if got != nbytes:
                    raise EntryError(path, name, f"ends before its {nbytes} data bytes")
                out[name] = np.frombuffer(data, dtype=dtype).reshape(shape, order=order)
            return out
    except RecoError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
        raise RecoError(f"{path}: not a readable .npz ({type(exc).__name__}: {exc})") from None


def load_npy(path: str | os.PathLike, mmap: bool = True, *, expect: Any = None) -> np.ndarray:
    """Load one ``.npy`` (memory-mapped read-only by default), never unpickling.

    The header is checked against the file size first, so a crafted header cannot make the reader
    allocate more than the file holds, and against ``expect`` (an :class:`ArraySpec` or ``(shape, dtype)``)
    when given, before any data is read.
    """
    path = Path(path)
    require_file(path)
    with open(path, "rb") as fh:
        shape, dtype, nbytes, _ = _npy_header(fh, str(path))
        offset = fh.tell()
    size = path.stat().st_size
    if offset + nbytes != size:
        raise RecoError(f"{path}: header promises {nbytes} data bytes for shape {shape} {dtype}, the file holds "
                        f"{size - offset} (truncated or crafted)")
    problem = None if expect is None else spec_problem(shape, dtype, nbytes, expect)
    if problem:
        raise RecoError(f"{path}: array {problem}")
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


def list_files(folder: str | os.PathLike, suffixes: Iterable[str]) -> list[Path]:
    """Every file under ``folder`` (recursively, symlinks followed) whose suffix is in ``suffixes``, sorted.

    Symbolic links are followed, but a link that leads back into a folder already on the walk (a loop)
    raises :class:`RecoError` naming it instead of being skipped without a trace; an entry with an
    image suffix that is not a regular file is listed, so the decoder reports it as a failure with its name
    and what it is (:func:`reco_ref.paths.file_problem`): a broken link (target missing, or a loop of file
    links), or a device, named pipe or socket ("not a regular file": a link to ``/dev/zero`` is not broken,
    and reading it would never end).
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a directory")
    want = {s.lower() for s in suffixes}
    out: list[Path] = []

    def walk(d: Path, seen: frozenset) -> None:
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as exc:
            raise RecoError(f"{d}: cannot list folder ({exc.strerror or exc})") from None
        for e in entries:
            p = Path(e.path)
            try:
                is_dir = e.is_dir(follow_symlinks=True)
            except OSError:  # ELOOP / too many levels: a loop of links
                is_dir = False
            if is_dir:
                st = p.stat()
                ident = (st.st_dev, st.st_ino)
                if ident in seen:
                    raise RecoError(f"{p}: symbolic link loop (leads back to a folder above it); remove the link "
                                    "or point it elsewhere")
                walk(p, seen | {ident})
            elif p.suffix.lower() in want:
                out.append(p)

    st = root.stat()
    walk(root, frozenset({(st.st_dev, st.st_ino)}))
    return sorted(out)
