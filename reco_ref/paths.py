"""Where shipped files live, where a verb may write, and how file-derived text is shown.

The repository's top-level ``weights/`` folder holds everything the package needs offline (reco-mini's ONNX
pair and config, tokenizer vocabularies, licences).  An editable install (``pip install -e .``) or a source
checkout finds it beside the package; ``RECO_REF_WEIGHTS`` points elsewhere (e.g. a copied folder on an edge
device).

Every verb that writes files checks its outputs here first (:func:`check_output_files`,
:func:`check_output_dir`): never inside a memory, never over an existing file unless ``--overwrite``. A file
name read from a file on disk goes through :func:`plain_name` before it is joined to a folder. Text from files
printed on the terminal goes through :func:`printable`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterable

from .errors import RecoError


def weights_dir() -> Path:
    """The folder of shipped weights: ``$RECO_REF_WEIGHTS`` if set, else ``<repo>/weights``."""
    env = os.environ.get("RECO_REF_WEIGHTS")
    path = Path(env) if env else Path(__file__).resolve().parents[1] / "weights"
    if not path.is_dir():
        raise RecoError(
            f"weights folder not found at {path}: install reco_ref from a source checkout "
            "(pip install -e .) or set RECO_REF_WEIGHTS to a copy of the repository's weights/ folder"
        )
    return path


def weights_file(*parts: str) -> Path:
    """A file inside :func:`weights_dir`, with an error naming it when it is missing."""
    path = weights_dir().joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(f"shipped file missing: {path} (the repository's weights/ folder is incomplete)")
    return path


# ----------------------------------------------------------------------------------------------------------
# names read from files on disk; where outputs may go; what is shown on the terminal
# ----------------------------------------------------------------------------------------------------------
# How a memory folder is recognised (the names of reco_ref.memory.format, repeated here because this shared
# helper imports no room; tests/fuzz/test_fuzz_paths.py keeps the two in step).
MEMORY_MANIFEST = "manifest.json"
MEMORY_SHARDS = "shards.json"
MEMORY_BUILD_DIR = ".build"
MEMORY_FILES = ("image.npy", "text.npy", "image_keys.npy", "meta.sqlite", "image.hnsw", "text.hnsw", "failures.jsonl")
_BUILD_STATE = ("plan.json", "COMMIT.json")


def plain_name(name: Any, where: str, *, allowed: Iterable[str] | None = None) -> str:
    """Check a file name read from a file on disk before it is joined to that file's folder.

    Such a name must stay inside the folder: a plain name (no ``/`` or ``\\``, not ``.``/``..``, not
    absolute, no NUL) and, when ``allowed`` is given, one of those names.

    Parameters
    ----------
    name : the value read (anything: the file may be crafted)
    where : the file and field it was read from, for the message (``".build/COMMIT.json: files[2]"``)
    allowed : the names that field may hold, or None for any plain name

    Returns
    -------
    str : ``name`` unchanged

    Raises
    ------
    RecoError
        Naming ``where``, what was found and what is expected.
    """
    if not isinstance(name, str):
        raise RecoError(f"{where}: expected a file name (a string), found {type(name).__name__}")
    if (not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name
            or os.path.isabs(name) or Path(name).drive):
        raise RecoError(f"{where}: file name {name!r} leaves its folder; expected a plain name without "
                        "separators or '..'")
    if allowed is not None:
        allowed = sorted(allowed)
        if name not in allowed:
            raise RecoError(f"{where}: file name {name!r} is not one of the expected {', '.join(allowed)}")
    return name


def is_memory_dir(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is a memory: complete (its manifest beside a memory file), being built (``.build/``
    with a plan or a commit), or sharded (``shards.json``)."""
    d = Path(folder)
    if (d / MEMORY_SHARDS).is_file():
        return True
    if (d / MEMORY_MANIFEST).is_file() and any((d / f).exists() for f in MEMORY_FILES):
        return True
    return any((d / MEMORY_BUILD_DIR / f).is_file() for f in _BUILD_STATE)


def memory_containing(path: str | os.PathLike) -> Path | None:
    """The memory folder that ``path`` is (or lies inside), symbolic links resolved; None when none."""
    p = Path(path).resolve()
    for d in (p, *p.parents):
        if d.is_dir() and is_memory_dir(d):
            return d
    return None


def _refuse_inside_memory(path: Path, what: str) -> None:
    mem = memory_containing(path)
    if mem is not None:
        raise RecoError(f"{what} {path}: lies inside the memory {mem}; a memory holds only its own files (writing "
                        "there would corrupt it): choose an output outside it")


def check_output_files(paths: Iterable[str | os.PathLike], *, overwrite: bool = False,
                       what: str = "--out") -> list[Path]:
    """Check the files a verb is about to write, before it writes any of them.

    Refused: an output inside a memory folder (always), a folder or a non-regular file in an output's place
    (always), and an existing file unless ``overwrite`` (``--overwrite``): a verb never replaces a file it
    was not told to replace.

    Parameters
    ----------
    paths : every file the verb will write (the main output and its sidecars)
    overwrite : existing files may be replaced
    what : the option that named them, for the message (``"--out"``, ``"--json"``)

    Returns
    -------
    list of Path : ``paths``

    Raises
    ------
    RecoError
        One line naming the first refused path and what to do.
    """
    out = [Path(p) for p in paths]
    existing = []
    for p in out:
        _refuse_inside_memory(p, what)
        if p.is_dir():
            raise RecoError(f"{what} {p}: is a folder; name the output file")
        if p.exists() or p.is_symlink():
            if not p.is_file():
                raise RecoError(f"{what} {p}: {file_problem(p)}; name a new file")
            existing.append(p)
    if existing and not overwrite:
        names = ", ".join(str(p) for p in existing[:4])
        names += f" and {len(existing) - 4} more" if len(existing) > 4 else ""
        raise RecoError(f"{what}: {names} already exist{'s' if len(existing) == 1 else ''}; pass --overwrite to "
                        "replace, or choose another output")
    return out


def check_output_dir(folder: str | os.PathLike, names: Iterable[str], *, overwrite: bool = False,
                     resume_from: str | None = None, what: str = "--out") -> Path:
    """Check an output folder and the files ``names`` a verb will write into it, before it writes any.

    Refused: a folder inside (or being) a memory, a file in the folder's place, and, unless ``overwrite``,
    any of ``names`` already present.

    Parameters
    ----------
    folder : the output folder (it may not exist yet)
    names : the files the verb writes at its top
    overwrite : existing files among ``names`` may be replaced (``--overwrite``)
    resume_from : a file whose presence in ``folder`` marks an interrupted run of the verb (``checkpoint.npz``):
        the verb's own resume logic then decides (continue with ``--resume``, or refuse), not this check
    what : the option that named the folder, for the message

    Returns
    -------
    Path : ``folder``
    """
    d = Path(folder)
    if d.exists() and not d.is_dir():
        raise RecoError(f"{what} {d}: is a file; name a folder for the output")
    _refuse_inside_memory(d, what)
    if resume_from is None or not (d / resume_from).is_file():
        check_output_files([d / plain_name(n, "output name") for n in names], overwrite=overwrite, what=what)
    return d


def add_overwrite_option(parser: Any, *, what: str = "its output files") -> None:
    """``--overwrite`` on a verb's parser: the one flag that lets a verb replace existing files."""
    parser.add_argument("--overwrite", action="store_true", help=f"replace {what} if they exist (default: refuse)")


def file_problem(path: str | os.PathLike) -> str:
    """Why ``path`` cannot be read as a regular file, in words for an error message ("" when it can).

    Distinguishes a missing file, a broken symbolic link (its target missing, or a loop of links), a folder,
    and a file that is not a regular one (a device such as ``/dev/zero``, a named pipe, a socket), naming the
    target of a link. Reading a device never ends and opening a pipe blocks, so neither is a usable input.
    """
    import stat

    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        if p.is_symlink():
            return "broken symbolic link (its target is missing, or links form a loop)"
        return "no such file"
    mode = st.st_mode
    if stat.S_ISREG(mode):
        return ""
    via = f", reached through a symbolic link to {os.path.realpath(p)}" if p.is_symlink() else ""
    if stat.S_ISDIR(mode):
        return f"is a folder, not a file{via}"
    kind = ("a character device" if stat.S_ISCHR(mode) else "a block device" if stat.S_ISBLK(mode)
            else "a named pipe" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a special file")
    return f"not a regular file ({kind}{via})"


# C0 and C1 controls, DEL, the line/paragraph separators, bidirectional overrides and isolates, lone surrogates
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def printable(text: Any) -> str:
    """``text`` safe to print on a terminal: control characters shown escaped (``\\x1b``, ``\\n``, ``\\u202e``).

    For every string a verb prints that comes from a file (a memory's captions, sources, its plan's resume
    hint, a file name): an escape sequence in it must not drive the user's terminal. Other characters,
    non-ASCII letters included, are kept as they are.
    """
    return _UNPRINTABLE.sub(lambda m: m.group().encode("unicode_escape", "backslashreplace").decode("ascii"), str(text))
