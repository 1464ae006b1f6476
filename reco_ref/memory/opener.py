"""The one opener: look at what a memory directory holds and open it with the class for that kind.

Kinds (decided from the files, nothing else):

* ``shards.json`` present -> :class:`~reco_ref.memory.shards.ShardedMemory` (N complete memories)
* otherwise               -> :class:`~reco_ref.memory.store.Memory` (``manifest.json``; an incomplete
  or foreign directory gets :class:`~reco_ref.errors.MemoryFormatError` saying what it holds)

Both kinds share the search API (``search``, ``embeddings``, ``metadata``, ``info``), so callers that
only read (the CLI, retrieval, evaluation) use :func:`open_memory` and never ask which kind they got.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import MemoryFormatError
from ..paths import file_problem
from . import format as fmt
from .shards import ShardedMemory
from .store import Memory


def memory_kind(root: str | Path) -> str:
    """``"sharded"`` or ``"single"`` for the directory ``root`` (from its files)."""
    return "sharded" if (Path(root) / fmt.SHARDS).is_file() else "single"


def open_memory(root: str | Path, **kwargs: Any) -> Memory | ShardedMemory:
    """Open and validate the memory at ``root``, whatever its kind; ``kwargs`` as :meth:`Memory.open`."""
    for name in (fmt.SHARDS, fmt.MANIFEST):  # a device or a pipe in their place is named, not called "missing"
        path = Path(root) / name
        if (path.exists() or path.is_symlink()) and file_problem(path):
            raise MemoryFormatError(f"{path}: {file_problem(path)}; a memory's {name} is a regular file")
    if memory_kind(root) == "sharded":
        return ShardedMemory.open(root, **kwargs)
    return Memory.open(root, **kwargs)
