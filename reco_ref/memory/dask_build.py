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

Builds that stream (issue 23 item 2): :func:`build_sharded_pairs` never holds the item list on the client.  It
takes the pairs file's item count (one pass, :func:`~reco_ref.memory.sources.scan_pairs`, or given), cuts the
same ranges, and each task reads its own range of the file (:func:`~reco_ref.memory.sources.read_pairs_range`):
the same items, the same shards as :func:`build_sharded` on the whole list.  :func:`build_sharded_arrays` does
the same for precomputed ``.npy`` arrays: each task memory-maps the files and slices its rows.  A LocalCluster
started here runs worker processes (``processes=True``): encoders and index builds hold the GIL for parts of
their work, and a process per worker is what a real cluster has.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, NamedTuple

from ..errors import MemoryFormatError
from ..io import load_npy
from . import format as fmt
from .build import DEFAULT_CHUNK, build_memory, build_memory_from_arrays
from .producers import load_encoder
from .shards import ShardedMemory, write_shards_manifest
from .sources import read_pairs_range, scan_pairs

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


class PairsRanges:
    """The items of a pairs file as :func:`build_sharded` slices them, without reading them: ``len`` is their
    count, and ``[lo:hi]`` is a :class:`PairsRange` that the task reads itself (state: the file, its reader
    options, the count)."""

    def __init__(self, pairs: str | Path, source: dict, n_items: int):
        self.pairs, self.source, self.n_items = str(Path(pairs).absolute()), dict(source), int(n_items)

    def __len__(self) -> int:
        return self.n_items

    def __getitem__(self, sl: slice) -> "PairsRange":
        return PairsRange(self.pairs, self.source, int(sl.start), min(int(sl.stop), self.n_items))


class PairsRange(NamedTuple):
    """Items ``lo..hi-1`` of the pairs file ``pairs`` (``source``: :func:`~reco_ref.memory.sources.read_pairs`
    options): what a streamed build's task gets instead of its items."""

    pairs: str
    source: dict
    lo: int
    hi: int

    def read(self) -> list[dict]:
        items = read_pairs_range(self.pairs, self.lo, self.hi, **self.source)
        if len(items) != self.hi - self.lo:  # the file changed since it was counted: never build other items
            raise MemoryFormatError(f"{self.pairs}: holds {self.lo + len(items)} items now, {self.hi} or more when "
                                    "the build was planned; it changed during the build")
        return items


def _build_shard(items: list[dict] | PairsRange, shard_dir: str, encoder_spec: Any, kwargs: dict) -> dict:
    """One shard: its items (or its range of the pairs file, read here, on the worker), encoded and indexed."""
    if isinstance(items, PairsRange):
        items = items.read()
    enc = _worker_encoder(encoder_spec, kwargs.get("num_threads"))
    manifest = build_memory(shard_dir, items, enc, **kwargs)
    return manifest["counts"]


def _build_shard_arrays(arrays: dict, pairs: str | None, source: dict, lo: int, hi: int, shard_dir: str,
                        ident: dict, kwargs: dict) -> dict:
    """One shard of a build from arrays: rows ``lo..hi-1`` of the memory-mapped ``.npy`` files (and of the
    metadata pairs file, if any), sliced here, on the worker."""
    image, text = load_npy(arrays["image"])[lo:hi], load_npy(arrays["text"])[lo:hi]
    keys = load_npy(arrays["keys"])[lo:hi] if arrays.get("keys") else None
    items = read_pairs_range(pairs, lo, hi, **source) if pairs else None
    if items is not None and len(items) != hi - lo:
        raise MemoryFormatError(f"{pairs}: {lo + len(items)} rows of metadata for at least {hi} embedding rows")
    manifest = build_memory_from_arrays(shard_dir, image, text, keys=keys, items=items, item_offset=lo, **ident,
                                        **kwargs)
    return manifest["counts"]


def _start(out: Path, resume: bool) -> ShardedMemory | None:
    """The finished memory at ``out`` (a resume of a build that completed), None to build, or a refusal."""
    if (out / fmt.SHARDS).is_file():
        if not resume:
            raise MemoryFormatError(f"{out}: a sharded memory already exists here; choose another --out")
        return ShardedMemory.open(out, verify="size")
    if out.is_dir() and any(out.iterdir()) and not resume:
        raise MemoryFormatError(f"{out}: exists and is not empty (an interrupted sharded build? pass --resume)")
    return None


def _run_shards(out: Path, ranges: list[tuple[int, int]], submit_one: Any, *, client: Any, scheduler: str | None,
                n_workers: int, processes: bool, threads_per_worker: int, log: Any) -> ShardedMemory:
    """One task per range (``submit_one(client, shard_dir, lo, hi)`` -> future) on ``client``, the cluster at
    ``scheduler`` or a LocalCluster started here; then ``shards.json``."""
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
        futures = [submit_one(client, str(out / d), lo, hi) for d, (lo, hi) in zip(dirs, ranges)]
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


def build_sharded(out: str | Path, items: list[dict] | PairsRanges, encoder: Any, *, n_shards: int = 2,
                  client: Any = None, scheduler: str | None = None, n_workers: int = 2, processes: bool = True,
                  threads_per_worker: int = 1, resume: bool = False, chunk_size: int = DEFAULT_CHUNK,
                  batch_size: int = 64, dtype: str = "float32", M: int = 16, ef_construction: int = 200,
                  seed: int = 100, log: Any = None) -> ShardedMemory:
    """Build ``out/shard_XXX`` memories in parallel on Dask and write ``out/shards.json``.

    Parameters
    ----------
    items : the item list (``read_pairs(...)``), held here and sent to the tasks in slices; or
        :class:`PairsRanges`, whose slices the tasks read themselves (:func:`build_sharded_pairs`)
    encoder : encoder spec — a name (``"reco-mini"``), ``"module:factory"``, or a picklable callable
    client / scheduler : an existing ``distributed.Client``, or a scheduler address; neither = a
        LocalCluster of ``n_workers`` (``processes=True``: one process per worker, as on a real cluster;
        ``False``: threads in this process)
    resume : resume every shard that was interrupted (finished shards are kept)

    Returns
    -------
    ShardedMemory opened on ``out``
    """
    out = Path(out)
    done = _start(out, resume)
    if done is not None:
        return done
    kwargs = dict(resume=resume, chunk_size=chunk_size, batch_size=batch_size, dtype=dtype, M=M,
                  ef_construction=ef_construction, seed=seed, num_threads=threads_per_worker, progress=False)

    def submit_one(client: Any, shard_dir: str, lo: int, hi: int) -> Any:
        return client.submit(_build_shard, items[lo:hi], shard_dir, encoder, dict(kwargs, item_offset=lo),
                             pure=False)

    return _run_shards(out, shard_ranges(len(items), n_shards, chunk_size), submit_one, client=client,
                       scheduler=scheduler, n_workers=n_workers, processes=processes,
                       threads_per_worker=threads_per_worker, log=log)


def build_sharded_pairs(out: str | Path, pairs: str | Path, encoder: Any, *, split: str | None = None,
                        caption_template: str | None = None, allow_outside: bool = False,
                        n_items: int | None = None, **options: Any) -> ShardedMemory:
    """:func:`build_sharded` on the items of the pairs file ``pairs``, each task reading its own range of it.

    Parameters
    ----------
    pairs, split, caption_template, allow_outside : the input, as :func:`~reco_ref.memory.sources.read_pairs`;
        a path every worker can read
    n_items : its number of items, if already counted (else one pass here, holding no items)
    options : as :func:`build_sharded` (``n_shards``, ``client``, ``chunk_size``, ``dtype``, ...)

    Returns
    -------
    ShardedMemory opened on ``out``: the same shards, file for file, as :func:`build_sharded` on
    ``read_pairs(pairs, ...)``
    """
    source = dict(split=split, caption_template=caption_template, allow_outside=allow_outside)
    if n_items is None and not (Path(out) / fmt.SHARDS).is_file():
        n_items = scan_pairs(pairs, head=0, **source)[0]
    return build_sharded(out, PairsRanges(pairs, source, n_items or 0), encoder, **options)


def build_sharded_arrays(out: str | Path, image: str | Path, text: str | Path, *, name: str, fingerprint: str,
                         keys: str | Path | None = None, pairs: str | Path | None = None, split: str | None = None,
                         caption_template: str | None = None, allow_outside: bool = False,
                         normalize: bool = False, n_shards: int = 2, client: Any = None,
                         scheduler: str | None = None, n_workers: int = 2, processes: bool = True,
                         threads_per_worker: int = 1, resume: bool = False, chunk_size: int = 65536,
                         dtype: str = "float32", M: int = 16, ef_construction: int = 200, seed: int = 100,
                         log: Any = None) -> ShardedMemory:
    """Shards of a memory built from precomputed ``.npy`` arrays: each task memory-maps the files and builds
    :func:`~reco_ref.memory.build.build_memory_from_arrays` on its rows (global item ids).

    Parameters
    ----------
    image, text : ``.npy`` [n, D] files; keys : ``.npy`` [n, Dk] or None (paths every worker can read)
    name, fingerprint : the encoder that produced them
    pairs, split, caption_template, allow_outside : optional metadata, one item per row (read per range)
    n_shards : shards of about n / n_shards rows (contiguous; no chunk alignment is needed: rows are copied,
        not encoded)
    the rest : as :func:`build_sharded`

    Returns
    -------
    ShardedMemory opened on ``out``: row for row the memory ``build_memory_from_arrays`` makes of the whole arrays
    """
    out = Path(out)
    done = _start(out, resume)
    if done is not None:
        return done
    arrays = {"image": str(Path(image).absolute()), "text": str(Path(text).absolute()),
              "keys": str(Path(keys).absolute()) if keys else None}
    n = int(load_npy(arrays["image"]).shape[0])  # the header: nothing is read
    source = dict(split=split, caption_template=caption_template, allow_outside=allow_outside)
    if pairs:
        pairs = str(Path(pairs).absolute())
        n_meta = scan_pairs(pairs, head=0, **source)[0]
        if n_meta != n:
            raise MemoryFormatError(f"{pairs}: {n_meta} rows of metadata for {n} embedding rows")
    ident = {"name": name, "fingerprint": fingerprint, "normalize": normalize}
    kwargs = dict(resume=resume, chunk_size=chunk_size, dtype=dtype, M=M, ef_construction=ef_construction,
                  seed=seed, num_threads=threads_per_worker, progress=False)

    def submit_one(client: Any, shard_dir: str, lo: int, hi: int) -> Any:
        return client.submit(_build_shard_arrays, arrays, pairs, source, lo, hi, shard_dir, ident, kwargs,
                             pure=False)

    return _run_shards(out, shard_ranges(n, n_shards, 1), submit_one, client=client, scheduler=scheduler,
                       n_workers=n_workers, processes=processes, threads_per_worker=threads_per_worker, log=log)

