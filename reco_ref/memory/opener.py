"""The one opener: look at what a memory directory holds and open it with the class for that kind.

Kinds (decided from the files, nothing else):

* ``shards.json`` present -> :class:`~reco_ref.memory.shards.ShardedMemory` (N complete memories)
* otherwise               -> :class:`~reco_ref.memory.store.Memory` (``manifest.json``; an incomplete
  or foreign directory gets :class:`~reco_ref.errors.MemoryFormatError` saying what it holds)

With ``client=`` (a ``dask.distributed.Client``) either kind is served by the cluster instead:
:class:`~reco_ref.memory.served.ServedMemory`, each shard resident on a worker (:mod:`.served`).

All share the search API (``search``, ``embeddings``, ``metadata``, ``info``), so callers that
only read (the CLI, retrieval, evaluation) use :func:`open_memory` and never ask which kind they got.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ..errors import MemoryFormatError
from ..paths import file_problem
from . import format as fmt
from .served import ServedMemory, connect, release_opened
from .shards import ShardedMemory
from .store import Memory


def memory_kind(root: str | Path) -> str:
    """``"sharded"`` or ``"single"`` for the directory ``root`` (from its files)."""
    return "sharded" if (Path(root) / fmt.SHARDS).is_file() else "single"


def open_memory(root: str | Path, client: Any = None, **kwargs: Any) -> Any:
    """Open and validate the memory at ``root``, whatever its kind; ``kwargs`` as :meth:`Memory.open`.

    Parameters
    ----------
    client : None (open here, in this process) or a ``dask.distributed.Client``: each shard is then
        opened on a worker and stays there (:class:`~reco_ref.memory.served.ServedMemory`; ``retries=``
        and ``poll_s=`` are its options).  ``distributed`` is imported only in that case.

    Returns
    -------
    Memory | ShardedMemory | ServedMemory
    """
    for name in (fmt.SHARDS, fmt.MANIFEST):  # a device or a pipe in their place is named, not called "missing"
        path = Path(root) / name
        if (path.exists() or path.is_symlink()) and file_problem(path):
            raise MemoryFormatError(f"{path}: {file_problem(path)}; a memory's {name} is a regular file")
    if client is not None:
        return ServedMemory.open(root, client, **kwargs)
    if memory_kind(root) == "sharded":
        return ShardedMemory.open(root, **kwargs)
    return Memory.open(root, **kwargs)


@contextmanager
def scheduler_client(scheduler: str | None) -> Iterator[Any]:
    """What a verb's ``--scheduler ADDRESS`` gives the functions it calls as ``client=``: None without an address
    (memories open in this process), else a ``distributed.Client`` connected to it (a bad address is a one-line error
    within :data:`~reco_ref.memory.served.CONNECT_TIMEOUT_S`).

    On exit every memory opened through the client and still open is closed (its shards leave the workers:
    :func:`~reco_ref.memory.served.release_opened`) and the client closed; the cluster keeps running.
    """
    if not scheduler:
        yield None
        return
    client = connect(scheduler)
    try:
        yield client
    finally:
        try:
            release_opened(client)
        finally:
            client.close()


@contextmanager
def opened_memory(root: str | Path, scheduler: str | None = None, **kwargs: Any) -> Iterator[Any]:
    """What a verb with ``--scheduler`` opens: the memory here, or served by the Dask scheduler at ``scheduler``
    (:func:`scheduler_client`: released on exit)."""
    with scheduler_client(scheduler) as client:
        yield open_memory(root, client=client, **kwargs)
