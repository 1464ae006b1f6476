"""The chunk half of a memory build (see :mod:`.build` for the life of a build): the plan a resumed run must
match, the chunk files under ``.build/chunks/`` (read back with their item ids checked), the streamed ``.npy``
writer that assembles them, and the encoding of the chunks still missing (every row checked finite and
unit-norm).  The chunk files, the plan comparison and the resume are the shared primitive of
:mod:`reco_ref.chunks`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from ..chunks import chunk_path, missing_chunks, plan_differences, write_chunks
from ..errors import MemoryFormatError, ShapeError
from ..failpoints import failpoint
from ..io import atomic_open, load_npz
from . import format as fmt
from .estimate import estimate_build, format_estimate
from .producers import NORM_TOL
from .sources import items_digest

ESTIMATE_MIN_ITEMS = 5000  # builds at least this big print a disk/RAM/time estimate after their first chunk

Log = Callable[[str], Any]


def _silent(msg: str) -> None:
    pass


# ----------------------------------------------------------------------------------------------------------
# plan
# ----------------------------------------------------------------------------------------------------------
def _make_plan(kind: str, items: list[dict], producer: Any, *, chunk_size: int, dtype: str, M: int,
               ef_construction: int, seed: int, item_offset: int, base_manifest_sha: str | None,
               resume_hint: str | None) -> dict:
    return {
        "kind": kind,
        "n_items": len(items),
        "items_sha256": items_digest(items) + producer.digest_extra,
        "item_offset": int(item_offset),
        "chunk_size": int(chunk_size),
        "n_chunks": -(-len(items) // chunk_size),
        "dtype": dtype,
        "encoder": producer.info,
        "hnsw": {"M": int(M), "ef_construction": int(ef_construction), "seed": int(seed)},
        "base_manifest_sha256": base_manifest_sha,
        "resume_hint": resume_hint,
    }


#: the plan's fields a resumed run must match (``resume_hint`` is only what to print)
_PLAN_MUST_MATCH = ("kind", "n_items", "items_sha256", "item_offset", "chunk_size", "dtype", "encoder", "hnsw",
                    "base_manifest_sha256")


def _check_plan(old: dict, new: dict, path: Path) -> None:
    diff = plan_differences(old, new, _PLAN_MUST_MATCH)
    if diff:
        key = diff[0]
        raise MemoryFormatError(
            f"{path}: cannot resume: {key} differs from the interrupted run (was {old.get(key)!r}, "
            f"now {new.get(key)!r}). Resume with the same inputs and options, or delete {path.parent} "
            "to start over"
        )


_CHUNK_KEYS = ("item", "image", "text", "image_keys", "failed_item", "failed_error")


def _chunk_path(build: Path, c: int) -> Path:
    return chunk_path(build / "chunks", c)


def _load_chunk(build: Path, c: int, plan: dict) -> dict[str, np.ndarray]:
    """Chunk ``c`` of a build, its item ids checked against the plan before they index the item list.

    A chunk file is read back from disk (possibly by a ``--resume`` long after it was written): an id outside
    the chunk's own items would silently give a row another item's caption and source (a negative one wraps).
    """
    z = load_npz(_chunk_path(build, c), names=_CHUNK_KEYS)
    lo = plan["item_offset"] + c * plan["chunk_size"]
    hi = min(lo + plan["chunk_size"], plan["item_offset"] + plan["n_items"])
    for key in ("item", "failed_item"):
        ids = z.get(key)
        if (ids is None or ids.ndim != 1 or ids.dtype.kind not in "iu"
                or (ids.size and (ids.min() < lo or ids.max() >= hi))):
            raise MemoryFormatError(f"{_chunk_path(build, c)}: entry {key!r} must hold this chunk's item ids in "
                                    f"[{lo}, {hi}); delete {build} to start over")
    return z


# ----------------------------------------------------------------------------------------------------------
# streamed writers
# ----------------------------------------------------------------------------------------------------------
def _write_npy_stream(path: Path, shape: tuple[int, int], dtype: str, blocks: Iterable[np.ndarray]) -> None:
    """Write an ``.npy`` of ``shape`` from row blocks without holding it in RAM (atomic, via io.atomic_open)."""
    dt = np.dtype(dtype)
    header = {"descr": np.lib.format.dtype_to_descr(dt), "fortran_order": False, "shape": tuple(int(s) for s in shape)}
    written = 0
    with atomic_open(path, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, header)
        for b in blocks:
            b = np.ascontiguousarray(b, dtype=dt)
            if b.ndim != 2 or b.shape[1] != shape[1]:
                raise ShapeError(f"{path.name}: block of shape {b.shape}, expected [*, {shape[1]}]")
            fh.write(b.tobytes())
            written += b.shape[0]
        if written != shape[0]:
            raise MemoryFormatError(f"{path.name}: wrote {written} rows, expected {shape[0]} (chunks changed?)")


def _iter_base(a: np.ndarray | None, block: int = 65536) -> Iterable[np.ndarray]:
    if a is None:
        return
    for lo in range(0, a.shape[0], block):
        yield a[lo:lo + block]


def _iter_chunks(build: Path, n_chunks: int, key: str) -> Iterable[np.ndarray]:
    for c in range(n_chunks):
        yield load_npz(_chunk_path(build, c), names=_CHUNK_KEYS)[key]


# ----------------------------------------------------------------------------------------------------------
# the pipeline
# ----------------------------------------------------------------------------------------------------------
def _check_rows(out: dict, items: list[dict], lo: int, offset: int, encoder: str) -> None:
    """Every row entering a memory is finite and unit-norm: the one guard for all producers.

    A NaN row would otherwise be indexed and later handed to the fusion layer as a valid neighbour.
    """
    for key in ("image", "text", "image_keys"):
        if key not in out:
            continue
        a = np.asarray(out[key], np.float32)  # [m, D]
        norms = np.linalg.norm(a, axis=1) if a.size else np.zeros(0, np.float32)  # [m]
        bad = ~np.isfinite(norms) | (np.abs(norms - 1) > NORM_TOL)
        if bad.any():
            j = int(np.argmax(bad))
            item = int(out["item"][j])
            raise ShapeError(f"encoder {encoder}: {key} embedding of item {item} ({items[item - offset - lo]['source']}) "
                             f"has L2 norm {norms[j]:.4g}, expected 1 (finite, unit-norm rows only)")


def _encode_chunks(build: Path, plan: dict, items: list[dict], producer: Any, progress: bool, log: Log) -> None:
    from tqdm import tqdm

    n, cs, n_chunks = plan["n_items"], plan["chunk_size"], plan["n_chunks"]
    (build / "chunks").mkdir(parents=True, exist_ok=True)
    fmt.remove_tmp_files(build / "chunks")
    todo = missing_chunks(build / "chunks", n_chunks)
    done_items = sum(min(cs, n - c * cs) for c in range(n_chunks)) - sum(min(cs, n - c * cs) for c in todo)
    if todo and done_items:
        log(f"resuming: {n_chunks - len(todo)} of {n_chunks} chunks already encoded")
    bar = tqdm(total=n, initial=done_items, disable=not progress, desc="encode", unit="item", leave=False)
    t0 = time.perf_counter()

    def produce(c: int) -> dict[str, np.ndarray]:
        lo, hi = c * cs, min((c + 1) * cs, n)
        out = producer.produce(items[lo:hi], lo, plan["item_offset"])
        _check_rows(out, items, lo, plan["item_offset"], plan["encoder"]["name"])
        for k in ("image", "text", "image_keys"):
            if k in out:
                out[k] = np.asarray(out[k], np.float32).astype(plan["dtype"])
        return out

    def written(c: int, k: int) -> None:
        m = min(cs, n - c * cs)  # items of chunk c
        bar.update(m)
        if k == 1 and len(todo) > 1 and n >= ESTIMATE_MIN_ITEMS:
            rate = m / max(time.perf_counter() - t0, 1e-9)
            est = estimate_build(n, plan["encoder"]["dim"], key_dim=plan["encoder"]["key_dim"],
                                 dtype=plan["dtype"], M=plan["hnsw"]["M"],
                                 ef_construction=plan["hnsw"]["ef_construction"], encode_items_per_s=rate)
            log(format_estimate(est))
        failpoint("memory.chunk", k)

    try:
        write_chunks(build / "chunks", todo, produce, after=written)
    finally:
        bar.close()
