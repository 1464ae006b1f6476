"""What a memory build or ``add`` refuses before it writes: a second writer on the same memory
(:func:`_exclusive`), an output folder of the user's own files (:func:`check_out_dir`), input of which no
caption can be embedded (:func:`check_captions`), and rows the memory already holds (an ``add`` of the same
input, or of pairs with the same source, caption and embeddings).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import MemoryFormatError
from . import format as fmt
from .build_chunks import _load_chunk
from .store import Memory

@contextlib.contextmanager
def _exclusive(root: Path) -> Iterator[None]:
    """Hold an advisory lock on ``root/.lock`` so two builds/adds never write the same memory at once.

    The lock dies with its process (kill -9 included), so it never needs cleaning up.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: no protection against concurrent writers
        yield
        return
    root.mkdir(parents=True, exist_ok=True)
    # O_NOFOLLOW: a crafted .lock linking elsewhere must not make the build create or open a file outside the memory
    fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise MemoryFormatError(f"{root}: another build or add is writing this memory right now") from None
        yield
    finally:
        os.close(fd)


def check_out_dir(out: str | Path, *, resume: bool = False) -> None:
    """Refuse to build at ``out`` when it is a file, or a non-empty folder that is not a memory.

    A build writes files named ``image.npy``, ``manifest.json``, ... into ``out``; in a folder of the
    user's own files it could replace one that happens to share a name, so it only goes into a new or
    empty folder, a (partial) memory, or a sharded memory's folder.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MemoryFormatError(f"{out}: is a file; --out must name a new or empty folder for the memory")
    if not out.is_dir():
        return
    names = {p.name for p in out.iterdir()}
    if names & {fmt.MANIFEST, fmt.BUILD_DIR, fmt.SHARDS}:
        return  # a memory, an interrupted build, or a sharded memory: the build decides (resume / refuse)
    foreign = sorted(n for n in names if n not in (".lock", fmt.COMMIT_LOCK) and not n.startswith(".trash-build"))
    if resume and all(n.startswith("shard_") for n in foreign):
        return  # an interrupted sharded build
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise MemoryFormatError(f"{out}: folder is not empty and is not a memory (holds {shown}); build into a "
                                "new or empty folder")


def check_captions(items: list[dict], where: str = "items", *, n: int | None = None) -> None:
    """Refuse pairs of which no caption can be embedded (every one missing, empty or whitespace).

    Such items all become failures and the memory would have no row; say so at the door, naming the cause,
    instead of building an empty memory. (Some blank captions are fine: those items are listed in
    ``failures.jsonl``.)  ``n``: how many items the input holds when ``items`` is only its first part
    (a sharded build's client scans the input without keeping it) and none of them has a caption.
    """
    if items and not any(isinstance(it.get("caption"), str) and it["caption"].strip() for it in items):
        raise MemoryFormatError(
            f"{where}: no caption could be embedded: all {n or len(items)} captions are blank (missing, empty or "
            "whitespace); give each image a caption (the caption column, sidecar .txt files, or "
            "--caption-template for a dataset manifest)")


def _same_input_added(mem: Memory, items: list[dict], digest: str) -> None:
    """Refuse an add whose exact input (items digest) the memory's history already holds."""
    for h in mem.manifest.get("history", []):
        if h.get("items_sha256") == digest:
            raise MemoryFormatError(
                f"{mem.root}: these {len(items)} pairs were already added ({h.get('kind')} at {h.get('time')}); "
                "adding them again would duplicate rows (pass --allow-duplicates / allow_duplicates=True to do it "
                "anyway)")


def _duplicate_candidates(mem: Memory, items: list[dict]) -> dict[tuple, list[int]]:
    """Rows of ``mem`` whose (source, caption) equals that of an item to add: {(source, caption): [rows]}."""
    wanted = {(it["source"], it["caption"]) for it in items}
    sources = sorted({src for src, _ in wanted})
    found: dict[tuple, list[int]] = {}
    try:
        con = fmt.open_meta(mem.root / fmt.META)  # a percent-encoded URI: folder names may hold '#' or '?'
        try:
            for lo in range(0, len(sources), 900):  # SQLite's bound-parameter limit
                part = sources[lo:lo + 900]
                q = f"SELECT row, source, caption FROM rows WHERE source IN ({','.join('?' * len(part))})"
                for r, src, cap in con.execute(q, part):
                    if (src, cap) in wanted:
                        found.setdefault((src, cap), []).append(int(r))
        finally:
            con.close()
    except sqlite3.Error as exc:
        raise MemoryFormatError(f"{mem.root / fmt.META}: damaged metadata database "
                                f"({' '.join(str(exc).split())[:300]})") from None
    return found


def _refuse_duplicates(build: Path, plan: dict, items: list[dict], mem: Memory, cand: dict[tuple, list[int]]) -> None:
    """A new row is a duplicate when a memory row has its source, caption AND bit-identical embeddings.

    (Source and caption alone are not enough: two folders may both hold ``img/001.jpg``.)  On a refusal
    the encoded chunks are discarded, so a re-run with ``allow_duplicates=True`` starts clean.
    """
    first, dups = plan["item_offset"], []
    for c in range(plan["n_chunks"]):
        z = _load_chunk(build, c, plan)
        for j, i in enumerate(z["item"].tolist()):
            it = items[i - first]
            for r in cand.get((it["source"], it["caption"]), ()):
                if np.array_equal(z["image"][j], mem.image[r]) and np.array_equal(z["text"][j], mem.text[r]):
                    dups.append((it["source"], r))
                    break
    if dups:
        shutil.rmtree(build, ignore_errors=True)
        src, r = dups[0]
        raise MemoryFormatError(
            f"{mem.root}: {len(dups)} of the pairs to add are already in the memory (same source, caption and "
            f"embeddings, e.g. {src!r} = row {r}); adding them would duplicate rows (pass --allow-duplicates / "
            "allow_duplicates=True to do it anyway)")
