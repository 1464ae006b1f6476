"""On-disk image-text memory: build (resumable, atomic), validate, search (HNSW + exact), shard, scale out.

Front door::

    from reco_ref.memory import open_memory, build_memory, read_pairs, retrieve
    items = read_pairs("pairs.csv")                       # or a dataset manifest / caption folder / .jsonl
    build_memory("mem/", items, reco_ref.encoders.load("reco-mini"), resume=True)
    mem = open_memory("mem/", encoder=enc)                # validates manifest, hashes, shapes, fingerprint
    rows, scores, valid = mem.search(q, modality="image", k=10, exclude=self_rows, dup_threshold=True)
    neighbours, valid, rows = retrieve(mem, q, "image", search="uni", fuse="cross", k=10)

Modules: :mod:`.format` (files, manifest, commit), :mod:`.sources` (pair readers), :mod:`.producers`
(encoder / precomputed arrays -> chunk rows), :mod:`.build` (chunks, resume, add), :mod:`.index`
(hnswlib + brute force), :mod:`.search` (exclusion, masks, the four retrieval combinations),
:mod:`.store` (:class:`Memory`, one directory), :mod:`.shards` (N shards, exact merge),
:mod:`.opener` (:func:`open_memory`: dispatches on the directory kind; ``client=`` serves it from a Dask cluster),
:mod:`.served` (:class:`ServedMemory`: shards resident on Dask workers), :mod:`.dask_build` (shards built on a Dask cluster), :mod:`.estimate` (disk/RAM/time),
:mod:`.score_map` (the memory's own score scale, read by memory-relative fusion modules),
:mod:`.synth` (benchmark vectors from real embeddings).
"""

from .build import add_arrays_to_memory, add_to_memory, build_memory, build_memory_from_arrays
from .estimate import estimate_build, format_estimate
from .format import FORMAT_VERSION
from .opener import memory_kind, open_memory, opened_memory, scheduler_client
from .search import DEFAULT_DUP_THRESHOLD, retrieve, search_index
from .served import ServedMemory
from .shards import ShardedMemory, write_shards_manifest
from .sources import read_caption_folder, read_pairs, read_pairs_csv, read_pairs_jsonl
from .store import Memory

__all__ = [
    "FORMAT_VERSION", "DEFAULT_DUP_THRESHOLD", "Memory", "memory_kind", "open_memory", "opened_memory", "scheduler_client", "ShardedMemory", "ServedMemory", "add_arrays_to_memory", "add_to_memory",
    "build_memory", "build_memory_from_arrays", "estimate_build", "format_estimate", "read_caption_folder",
    "read_pairs", "read_pairs_csv", "read_pairs_jsonl", "retrieve", "search_index", "write_shards_manifest",
]
