"""Build a sharded memory on Dask: one task per shard (encode + per-shard HNSW), each worker its own encoder.

``build_sharded(out, items, "reco-mini", n_shards=4)`` starts a ``dask.distributed.LocalCluster``
(2 workers by default) unless given ``client=`` or ``scheduler="tcp://host:8786"`` (a real cluster; the
output folder must then be on a filesystem every worker sees).  Each task is
:func:`~reco_ref.memory.build.build_memory` on a contiguous slice of the items with global item ids,
so every shard is an ordinary, resumable memory; ``shards.json`` is written once all succeed.

The encoder travels as a *spec* (a name like ``"reco-mini"``, a ``"module:factory"`` string or a
picklable zero-argument callable); each worker turns it into an encoder once and keeps it, so each
holds its own ONNX Runtime session (sessions are neither picklable nor meant to be shared).

Shard boundaries are multiples of ``chunk_size``: the shards' chunks are then exactly the chunks of a
single-machine build, so the embeddings are bit-identical to it.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from ..errors import MemoryFormatError
from . import format as fmt
from .build import DEFAULT_CHUNK, build_memory
from .producers import load_encoder
from .shards import ShardedMemory, write_shards_manifest

_LOCAL = threading.local()  # encoder cache when a task runs outside a Dask worker


def shard_ranges(n_items: int, n_shards: int, chunk_size: int = DEFAULT_CHUNK) -> list[tuple[int, int]]:
    """Contiguous item ranges ``[lo, hi)`` for ``n_shards`` shards, cut at multiples of ``chunk_size``.

    Fewer ranges come back when there are fewer chunks than shards (a shard is never empty).
    """
    if n_shards < 1:
        raise MemoryFormatError(f"n_shards must be >= 1, got {n_shards}")
    n_chunks = -(-n_items // chunk_size)
    per = -(-n_chunks // n_shards) if n_chunks else 0
    out = []
    for s in range(n_shards):
        lo, hi = s * per * chunk_size, min((s + 1) * per * chunk_size, n_items)
        if lo < hi:
            out.append((lo, hi))
    return out


def _worker_encoder(spec: Any, threads: int | None = None) -> Any:
    """The encoder of this worker for ``spec``, created on first use (one per worker)."""
    try:
        from distributed import get_worker

        holder = get_worker()
    except (ImportError, ValueError):
        holder = _LOCAL
    cache = getattr(holder, "_reco_ref_encoders", None)
    if cache is None:
        cache = {}
        setattr(holder, "_reco_ref_encoders", cache)
    key = spec if isinstance(spec, str) else repr(spec)
    if key not in cache:
        cache[key] = load_encoder(spec, threads=threads)
    return cache[key]


def _build_shard(items: list[dict], shard_dir: str, encoder_spec: Any, kwargs: dict) -> dict:
    enc = _worker_encoder(encoder_spec, kwargs.get("num_threads"))
    manifest = build_memory(shard_dir, items, enc, **kwargs)
    return manifest["counts"]


def build_sharded(out: str | Path, items: list[dict], encoder: Any, *, n_shards: int = 2, client: Any = None,
                  scheduler: str | None = None, n_workers: int = 2, processes: bool = False,
                  threads_per_worker: int = 1, resume: bool = False, chunk_size: int = DEFAULT_CHUNK,
                  batch_size: int = 64, dtype: str = "float32", M: int = 16, ef_construction: int = 200,
                  seed: int = 100, log: Any = None) -> ShardedMemory:
    """Build ``out/shard_XXX`` memories in parallel on Dask and write ``out/shards.json``.

    Parameters
    ----------
    encoder : encoder spec — a name (``"reco-mini"``), ``"module:factory"``, or a picklable callable
    client / scheduler : an existing ``distributed.Client``, or a scheduler address; neither = a
        LocalCluster of ``n_workers`` (``processes=False``: threads in this process — robust on small CI
        machines; ONNX Runtime releases the GIL while it runs)
    resume : resume every shard that was interrupted (finished shards are kept)

    Returns
    -------
    ShardedMemory opened on ``out``
    """
    out = Path(out)
    if (out / fmt.SHARDS).is_file():
        if not resume:
            raise MemoryFormatError(f"{out}: a sharded memory already exists here; choose another --out")
        return ShardedMemory.open(out, verify="size")
    if out.is_dir() and any(out.iterdir()) and not resume:
        raise MemoryFormatError(f"{out}: exists and is not empty (an interrupted sharded build? pass --resume)")
    ranges = shard_ranges(len(items), n_shards, chunk_size)
    if not ranges:
        raise MemoryFormatError("no items to build a memory from")
    own = None
    if client is None:
        from distributed import Client, LocalCluster

        if scheduler:
            client = own = Client(scheduler)
        else:
            cluster = LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker, processes=processes,
                                   dashboard_address=None)
            client = own = Client(cluster)
    try:
        dirs = [f"shard_{i:03d}" for i in range(len(ranges))]
        futures = []
        for d, (lo, hi) in zip(dirs, ranges):
            kwargs = dict(resume=resume, chunk_size=chunk_size, batch_size=batch_size, dtype=dtype, M=M,
                          ef_construction=ef_construction, seed=seed, num_threads=threads_per_worker,
                          progress=False, item_offset=lo)
            futures.append(client.submit(_build_shard, items[lo:hi], str(out / d), encoder, kwargs, pure=False))
        counts = client.gather(futures)
        if log:
            for d, c in zip(dirs, counts):
                log(f"{d}: {c['rows']} rows, {c['failed']} failed")
    finally:
        if own is not None:
            cluster = getattr(own, "cluster", None)
            own.close()
            if cluster is not None:
                cluster.close()
    write_shards_manifest(out, dirs)
    return ShardedMemory.open(out, verify="size")
