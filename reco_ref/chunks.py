"""Resumable chunked writing, shared by ``encode`` and the memory builds: a plan, chunk files, the missing ones.

A long job that writes its result in chunks keeps, in a folder of its own::

    plan.json            what is being written (the inputs' digest, the model, the chunk size, ...)
    chunk_000000.npz     chunk c, written atomically (reco_ref.io): it exists whole or not at all

so a run killed at any point (``kill -9`` included) resumes by checking its plan against the one found
(:func:`read_state_json`, :func:`plan_differences`) and writing only the chunks that are missing
(:func:`missing_chunks`, :func:`write_chunks`); a chunk is never half there, so an interrupted-and-resumed run
gives the bytes of an uninterrupted one. ::

    todo = missing_chunks(folder, n_chunks)                  # [c, ...] the chunk files not (yet) written
    write_chunks(folder, todo, lambda c: {"emb": encode(items_of(c))}, after=lambda c, k: bar.update())

The policy stays with each caller: ``encode`` (:mod:`reco_ref.encoders.stream`, folder ``<out>.parts/``) resumes
by default, discards its folder on ``--restart`` and writes its outputs file by file; a memory build or add
(:mod:`reco_ref.memory.build`, ``.build/`` with the chunks in ``.build/chunks/``) resumes only when asked, records
why it failed, checks each chunk's item ids when it reads it back, and commits its staged files as one
(:mod:`reco_ref.memory.format`). A shared helper: imports no room.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np

from .errors import RecoError
from .io import atomic_save_npz

__all__ = ["PLAN", "MAX_STATE_BYTES", "chunk_path", "missing_chunks", "write_chunks", "read_state_json",
           "plan_differences"]

PLAN = "plan.json"  # the plan's file name, in the folder of a job's state
MAX_STATE_BYTES = 64 << 20  # a plan or a commit record is a few KB (a memory's commit carries one manifest)


def chunk_path(folder: str | os.PathLike, c: int) -> Path:
    """The file of chunk ``c`` (0-based) in ``folder``: ``chunk_000000.npz``, ... (sorting by name sorts by c)."""
    return Path(folder) / f"chunk_{c:06d}.npz"


def missing_chunks(folder: str | os.PathLike, n_chunks: int) -> list[int]:
    """The chunks of ``0..n_chunks-1`` whose file is not in ``folder``, in order: what a (resumed) run writes."""
    return [c for c in range(n_chunks) if not chunk_path(folder, c).is_file()]


def write_chunks(folder: str | os.PathLike, todo: Iterable[int], produce: Callable[[int], Mapping[str, np.ndarray]],
                 *, after: Callable[[int, int], None] | None = None) -> None:
    """Write chunk ``c`` of ``todo`` as ``produce(c)`` (name → array), each file atomically, in order.

    ``after(c, k)`` runs once chunk ``c`` is on disk, the ``k``-th written by this call (1-based): progress,
    an estimate after the first chunk, a crash point for the tests. A run killed inside ``produce`` or the
    write leaves the earlier chunks whole and no file for ``c``.
    """
    for k, c in enumerate(todo, 1):
        atomic_save_npz(chunk_path(folder, c), produce(c))
        if after is not None:
            after(c, k)


def read_state_json(path: str | os.PathLike, *, error: type[RecoError] = RecoError, remedy: str = "") -> dict:
    """The JSON object of a job's state file (a plan, a commit record), or ``error`` naming the file.

    At most :data:`MAX_STATE_BYTES` are read (a crafted 100 MB file is refused by its size); ``remedy`` (e.g.
    ``"delete X to start over"``) ends the message when the file is not valid JSON.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_STATE_BYTES:
            raise error(f"{path}: {size} bytes, not a build-state file (at most {MAX_STATE_BYTES})")
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        if isinstance(exc, RecoError):
            raise
        raise error(f"{path}: not valid JSON (UTF-8) ({type(exc).__name__}: {exc})" + (f"; {remedy}" if remedy else "")
                    ) from None
    if not isinstance(obj, dict):
        raise error(f"{path}: expected a JSON object, found {type(obj).__name__}")
    return obj


def plan_differences(found: Mapping, plan: Mapping, keys: Iterable[str] | None = None) -> list[str]:
    """The keys (``keys``, default every key of either plan) on which a plan found on disk and this run's differ;
    ``[]``: the run may resume."""
    keys = sorted(set(plan) | set(found)) if keys is None else list(keys)
    return [k for k in keys if found.get(k) != plan.get(k)]
