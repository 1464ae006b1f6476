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

import json
import os
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, RecoError
from ..io import atomic_save_npz, load_npz

__all__ = ["FORMAT", "save_checkpoint", "load_checkpoint"]

FORMAT = "reco_ref.train.checkpoint"
VERSION = 1
STATE_KEY = "__state__"


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
    try:
        raw = load_npz(path)
    except (RecoError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint ({exc}); delete it to start over") from exc
    if STATE_KEY not in raw:
        raise CheckpointError(f"{path}: entry {STATE_KEY!r} missing, expected a {FORMAT} file")
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
