"""Training checkpoints: one atomic ``.npz`` with the weights, the AdamW state and the loop's position.

Layout (never pickled; read back through :func:`reco_ref.io.load_npz`):

* ``p.<name>`` — every trained array (``image.w_q`` … ``text.e_neighbor``, ``tau``; or the MLP's names);
* ``o.<key>`` — the AdamW state (``o.step``, ``o.m.<name>``, ``o.v.<name>``, see :mod:`reco_ref.train.optim`);
* ``__state__`` — uint8 UTF-8 JSON: ``format``, ``version``, ``config_hash`` (config + data digest), ``step``,
  ``epoch``, ``pos`` (next batch of the epoch), ``best`` and ``history`` (validation records).

The RNG state is the pair (seed, epoch): each epoch's batch plan is a pure function of it
(:func:`reco_ref.train.pairs.epoch_batches`) and nothing else in a step draws random numbers, so
``(epoch, pos)`` restores the stream exactly. A run killed at any instant loses at most the steps since its
last checkpoint; the rename in :func:`reco_ref.io.atomic_save_npz` means the file is always whole.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import CheckpointError, RecoError
from ..io import ArraySpec, atomic_save_npz, load_npz

__all__ = ["FORMAT", "LOCK", "save_checkpoint", "load_checkpoint", "run_lock"]

FORMAT = "reco_ref.train.checkpoint"
VERSION = 1
STATE_KEY = "__state__"
STATE_MAX_BYTES = 64 << 20  # the JSON state: run identity, position, validation history (KBs)
#: held exclusively by the run writing a run folder (its pid inside); dies with the process, kill -9 included
LOCK = ".train.lock"


@contextlib.contextmanager
def run_lock(out: str | os.PathLike) -> Iterator[None]:
    """Hold ``out/.train.lock`` exclusively for a training run, so two runs never write one folder.

    Two runs on one folder used to both exit 0 with their checkpoints, logs and weights interleaved (both
    start before either has written ``checkpoint.npz``; two ``--resume`` runs both continue from it). The
    second run now stops at once with one line naming the folder and the holder's pid. The lock is an advisory
    ``flock``: the kernel drops it when its holder exits, however it exits, so it never needs cleaning up; the
    file stays (as a memory's ``.commit.lock`` does). A folder this call created is removed again when the run
    fails before writing anything into it.

    Raises
    ------
    CheckpointError
        Another process holds the lock, or ``out`` is a file.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: is a file; --out must name a folder for the run")
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no protection against a second run
        yield
        return
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    failed = False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            who = f"pid {holder}" if holder.isdigit() else "pid unknown"
            raise CheckpointError(f"{out}: another train run ({who}) is writing this folder right now (it holds "
                                  f"{LOCK}); wait for it to finish, or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        try:
            yield
        except BaseException:
            failed = True
            raise
    finally:
        os.close(fd)
        if failed and created and [p.name for p in out.iterdir()] == [LOCK]:
            with contextlib.suppress(OSError):  # nothing of the run was written: leave no empty folder behind
                path.unlink()
                out.rmdir()


def save_checkpoint(path: str | os.PathLike, params: dict[str, np.ndarray], opt: dict[str, np.ndarray],
                    state: dict) -> None:
    """Write ``params`` (flat name → array), ``opt`` (AdamW state) and ``state`` (JSON-able) atomically."""
    blob = json.dumps(dict(state, format=FORMAT, version=VERSION), sort_keys=True).encode("utf-8")
    arrays = {STATE_KEY: np.frombuffer(blob, np.uint8)}
    arrays.update({f"p.{k}": np.asarray(v) for k, v in params.items()})
    arrays.update({f"o.{k}": np.asarray(v) for k, v in opt.items()})
    atomic_save_npz(path, arrays)


def load_checkpoint(path: str | os.PathLike, params: dict[str, np.ndarray], opt: dict[str, np.ndarray],
                    config_hash: str) -> dict:
    """Restore ``params`` and ``opt`` **in place** from ``path``; return the state dict.

    Raises
    ------
    CheckpointError
        Naming the file and the entry: unreadable, another format, a different run configuration or data
        (``config_hash``), a missing / unexpected / mis-shaped array.
    """
    path = Path(path)
    # Read the state alone first (its run identity decides before any array does), then the arrays, each header
    # checked against the array it restores before any data is read: a checkpoint cannot make the reader
    # allocate more than this run's own parameters and optimiser state.
    state_spec = {STATE_KEY: ArraySpec((None,), np.uint8, max_bytes=STATE_MAX_BYTES)}
    try:
        raw = load_npz(path, only=[STATE_KEY], expect=state_spec)
    except (RecoError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint ({exc}); delete it to start over") from exc
    if STATE_KEY not in raw:
        raise CheckpointError(f"{path}: entry {STATE_KEY!r} missing: not a {FORMAT} file (an older format?); "
                              "delete it to start over")
    try:
        state = json.loads(raw.pop(STATE_KEY).tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: entry {STATE_KEY!r} is not UTF-8 JSON ({exc})") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT or state.get("version") != VERSION:
        raise CheckpointError(f"{path}: header is not {FORMAT} version {VERSION}")
    if state.get("config_hash") != config_hash:
        raise CheckpointError(f"{path}: written by a run with another configuration or other data (config hash "
                              f"{str(state.get('config_hash'))[:12]}…, this run {config_hash[:12]}…); use the same "
                              f"arguments, or another --out, or delete the checkpoint")
    want = {f"p.{k}": v for k, v in params.items()} | {f"o.{k}": v for k, v in opt.items()}
    expect = state_spec | {key: ArraySpec(np.shape(v), np.asarray(v).dtype) for key, v in want.items()}
    try:
        raw = load_npz(path, expect=expect)
    except (RecoError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint ({exc}); delete it to start over") from exc
    raw.pop(STATE_KEY)
    missing = sorted(set(want) - set(raw))
    extra = sorted(set(raw) - set(want))
    if missing or extra:
        raise CheckpointError(f"{path}: entries missing {missing[:5]} / unexpected {extra[:5]}")
    for key, dst in want.items():
        src = raw[key]
        if src.shape != dst.shape or src.dtype != dst.dtype:
            raise CheckpointError(f"{path}: entry {key!r} has shape {src.shape} {src.dtype}, expected {dst.shape} "
                                  f"{dst.dtype}")
        if not np.isfinite(src).all():
            raise CheckpointError(f"{path}: entry {key!r} holds NaN/inf")
    for key, dst in want.items():
        dst[...] = raw[key]
    return state
