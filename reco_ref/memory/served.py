"""A memory served by a Dask cluster: each shard opened once on a worker, searched there, merged here.

``open_memory(root, client=client)`` returns a :class:`ServedMemory`.  At open, shard ``i`` is assigned to
one worker (round robin over the workers present) and opened there by a task that keeps the opened
:class:`~reco_ref.memory.store.Memory` in that worker's state (``get_worker()``, keyed by this handle's
token), so its memory maps, SQLite connection and HNSW indexes stay resident between calls.  Every call
(``search``, ``embeddings``, ``metadata``, ``failures``, ``verify``, and the row reads of ``image``, ``text``,
``image_keys`` and ``vectors(modality)``: :class:`~reco_ref.memory.shards.ShardedArray` views) is one task per shard
involved,
pinned to the shard's worker (``allow_other_workers=False``: a shard's index is never loaded twice by a
worker that happens to be idle); the client merges with :func:`~reco_ref.memory.shards.merge_topk`, the
function in-process sharded search uses, so the answers are the same bits.  Row reads are gathered in global row
order: the same bits as the shards' memory maps.  ``shards`` (one :class:`ServedShard` per shard: its manifest and
rows) is what the readers that walk a sharded memory's shards use (the score map, the class-text digest), so they
read the same parts as in process.

Handles opened through a client are tracked per client: :func:`release_opened` (called by
:func:`~reco_ref.memory.opener.scheduler_client` when a verb's ``--scheduler`` run ends) closes every one still open.

Worker loss: while a call waits, the client checks every ``poll_s`` seconds that the workers it is waiting
on are still in the cluster.  A shard whose worker left is reassigned to the surviving worker holding the
fewest shards and the call is resubmitted for it; the task there re-opens the shard (same checks, same
row count) before answering.  After ``retries`` worker losses in one call (0 = fail at the first), or with
no worker left, the call raises :class:`~reco_ref.errors.SearchError` naming the shard and the worker —
never a partial answer.

``distributed`` is imported here only inside functions: a memory opened without a client never needs it.
"""

from __future__ import annotations

import threading
import uuid
import weakref
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MemoryFormatError, RecoError, SearchError
from . import format as fmt
from .search import check_queries, normalize_exclude
from .shards import (RowArrays, ShardedArray, SpecProperties, check_shard_fits, local_exclude, merge_topk,
                     read_shards_spec, shard_path)
from .store import Memory

CONNECT_TIMEOUT_S = 10.0  # a scheduler that does not answer within this is refused (CLI --scheduler)
POLL_S = 0.5  # how often a waiting call checks that its shards' workers are still there
_OPEN_LOCK = threading.Lock()  # two threads of one worker never open the same shard twice
_ROWS = "row read"  # the fan-out of a ShardedArray read (not a Memory method: see _call_task)
#: client -> {token: weak reference to its ServedMemory} for every memory opened through it and not yet closed;
#: by token, so that a handle dropped without close() still has its shards released (release_opened)
_OPENED: "weakref.WeakKeyDictionary[Any, dict[str, weakref.ref]]" = weakref.WeakKeyDictionary()


def connect(address: str, timeout: float | None = None) -> Any:
    """A ``distributed.Client`` on the scheduler at ``address``, or a one-line :class:`RecoError`.

    Raises RecoError when ``distributed`` is not installed, the address is malformed, or nothing answers
    within ``timeout`` seconds (default :data:`CONNECT_TIMEOUT_S`, read at call time).
    """
    timeout = CONNECT_TIMEOUT_S if timeout is None else timeout
    try:
        from distributed import Client
    except ImportError:
        raise RecoError("--scheduler needs dask.distributed: pip install 'reco_ref[dask]'") from None
    try:  # a malformed address is refused here: a Client that fails on it hangs 20 s in its own clean-up
        from distributed.comm import parse_address, parse_host_port

        scheme, loc = parse_address(str(address))
        if scheme in ("tcp", "tls"):
            parse_host_port(loc)
    except (ValueError, TypeError) as exc:
        raise RecoError(f"--scheduler {address}: not a Dask scheduler address like tcp://host:8786 "
                        f"({' '.join(str(exc).split())[:200]})") from None
    try:
        return Client(address, timeout=timeout, set_as_default=False)
    except (OSError, TimeoutError, ValueError, TypeError) as exc:
        why = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise RecoError(f"--scheduler {address}: no Dask scheduler answered within {timeout:g} s ({why})") from None


# ---- worker side -----------------------------------------------------------------------------------------
def _held(dask_worker: Any = None) -> dict:
    """This worker's resident shards ``{(token, path): Memory}`` (per-worker state, created on first use)."""
    if dask_worker is None:
        from distributed import get_worker

        dask_worker = get_worker()
    held = getattr(dask_worker, "_reco_ref_shards", None)
    if held is None:
        held = {}
        setattr(dask_worker, "_reco_ref_shards", held)
    return held


def _resident(token: str, path: str, open_kwargs: dict, rows: int) -> Any:
    """The shard at ``path`` opened on this worker for handle ``token`` (opened here on first use)."""
    held = _held()
    with _OPEN_LOCK:
        m = held.get((token, path))
        if m is None:
            m = Memory.open(path, **open_kwargs)
            if len(m) != rows:  # a re-open after a worker loss must find the shard the client merged against
                raise MemoryFormatError(f"{path}: holds {len(m)} rows, {rows} when the memory was opened; "
                                        "it changed since: open the memory again")
            held[(token, path)] = m
    return m


def _open_task(token: str, path: str, open_kwargs: dict) -> dict:
    """Open a shard on this worker and keep it; returns what the client checks (rows, manifest, info)."""
    m = Memory.open(path, **open_kwargs)
    with _OPEN_LOCK:
        _held()[(token, path)] = m
    return {"rows": len(m), "manifest": m.manifest, "info": m.info()}


def _call_task(token: str, path: str, open_kwargs: dict, rows: int, method: str, args: tuple, kwargs: dict) -> Any:
    m = _resident(token, path, open_kwargs, rows)
    if method == _ROWS:  # args = (array name, slice | int64 [m] local rows): a plain ndarray in the stored dtype
        name, idx = args
        return np.array(getattr(m, name)[idx])
    return getattr(m, method)(*args, **kwargs)


def _release(token: str, dask_worker: Any = None) -> int:
    """Drop this handle's shards from a worker (their files close when the Memory objects go)."""
    held = _held(dask_worker)
    with _OPEN_LOCK:
        gone = [key for key in held if key[0] == token]
        for key in gone:
            del held[key]
    return len(gone)


# ---- client side -----------------------------------------------------------------------------------------
class ServedMemory(SpecProperties, RowArrays):
    """A memory whose shards live on Dask workers; same read API as :class:`~reco_ref.memory.ShardedMemory`.

    State (why a class): the client, the shard → worker placement, which changes when a worker is lost,
    and the token naming this handle's resident shards on the workers.
    """

    def __init__(self, root: Path, client: Any, spec: dict, paths: list[str], infos: list[dict],
                 placement: list[str], token: str, open_kwargs: dict, *, single: bool, retries: int,
                 poll_s: float):
        self.root = root
        self.client = client
        self.spec = spec
        self.paths = paths  # [S] shard folders, as the workers open them
        self.placement = placement  # [S] worker address holding each shard
        self.offsets = np.array([s["offset"] for s in spec["shards"]], np.int64)  # [S]
        self.sizes = np.array([s["rows"] for s in spec["shards"]], np.int64)  # [S]
        self.manifest = infos[0]["manifest"] if single else {k: spec[k] for k in
                                                             ("embed_dim", "key_dim", "dtype", "encoder", "counts")}
        self.retries = retries
        self.poll_s = poll_s
        self._infos = [i["info"] for i in infos]
        self._manifests = [i["manifest"] for i in infos]  # [S] each shard's manifest (files, score map)
        self._hnsw = infos[0]["manifest"]["hnsw"]
        self._token = token
        self._open_kwargs = open_kwargs
        self._single = single  # a one-directory memory served whole: its answer is passed through unmerged

    @classmethod
    def open(cls, root: str | Path, client: Any, *, encoder: Any = None, retries: int = 1, poll_s: float = POLL_S,
             **kwargs: Any) -> "ServedMemory":
        """Open every shard of the memory at ``root`` on ``client``'s workers and check they fit together.

        Parameters
        ----------
        root : a sharded memory (``shards.json``) or a single memory (served as one shard); a path every
            worker can read
        client : ``distributed.Client``
        encoder : the encoder in use; only its fingerprint and dim travel (an ONNX session is not picklable)
        retries : worker losses one call survives (each re-opens the lost worker's shards on the survivors)
            before it fails; 0 = fail at the first loss
        kwargs : as :meth:`Memory.open` (``verify``, ``fingerprint``, ``allow_fingerprint_mismatch``, ...)
        """
        root = Path(root)
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise SearchError(f"retries: expected an integer >= 0, got {retries!r}")
        if encoder is not None:
            kwargs.setdefault("fingerprint", getattr(encoder, "fingerprint", None))
            kwargs.setdefault("embed_dim", getattr(encoder, "dim", None))
        single = not (root / fmt.SHARDS).is_file()
        if single:
            if not root.is_dir():
                raise MemoryFormatError(f"{root}: no such memory directory")
            paths = [str(root.absolute())]
        else:
            spec = read_shards_spec(root)
            paths = [str(shard_path(root, spec, i).absolute()) for i in range(len(spec["shards"]))]
        workers = _alive(client)
        if not workers:
            raise SearchError(f"{root}: the Dask cluster has no workers to hold its shards")
        placement = [workers[i % len(workers)] for i in range(len(paths))]
        token = uuid.uuid4().hex
        futures = [client.submit(_open_task, token, p, kwargs, workers=[w], allow_other_workers=False, pure=False)
                   for p, w in zip(paths, placement)]
        try:
            infos = client.gather(futures)
        except BaseException:
            _release_all(client, token)
            raise
        if single:
            spec = {"shards": [{"dir": ".", "rows": infos[0]["rows"], "offset": 0}],
                    **{k: infos[0]["manifest"][k] for k in ("embed_dim", "key_dim", "dtype", "encoder", "counts")}}
        else:
            try:
                for i, inf in enumerate(infos):
                    check_shard_fits(root, spec, i, inf["rows"], inf["manifest"])
            except BaseException:
                _release_all(client, token)
                raise
        mem = cls(root, client, spec, paths, infos, placement, token, kwargs, single=single, retries=retries,
                  poll_s=poll_s)
        _OPENED.setdefault(client, {})[token] = weakref.ref(mem)
        return mem

    def close(self) -> None:
        """Release this handle's shards on the workers (the client itself stays open: it is the caller's)."""
        if self._token is not None:
            _release_all(self.client, self._token)
            _OPENED.get(self.client, {}).pop(self._token, None)
            self._token = None

    def __enter__(self) -> "ServedMemory":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __len__(self) -> int:
        return int(self.sizes.sum())

    def __repr__(self) -> str:
        return (f"ServedMemory({str(self.root)!r}, shards={len(self.paths)}, rows={len(self)}, dim={self.dim}, "
                f"workers={len(set(self.placement))})")

    def search_dim(self, modality: str) -> int:
        if modality not in ("image", "text"):
            raise SearchError(f"modality: expected 'image' or 'text', got {modality!r}")
        return int(self._hnsw[modality]["dim"])

    @property
    def shards(self) -> list["ServedShard"] | None:
        """One :class:`ServedShard` per shard (what :class:`~reco_ref.memory.ShardedMemory` has as ``shards``);
        None for a single memory served whole (a :class:`~reco_ref.memory.Memory` has no shards either)."""
        if self._single:
            return None
        return [ServedShard(self, i, m) for i, m in enumerate(self._manifests)]

    def _array(self, name: str, shard: int | None = None) -> ShardedArray:
        """``name`` ("image", "text", "image_keys") of every shard, or of ``shard`` alone, read on the workers."""
        width = self.key_dim if name == "image_keys" else self.dim
        which = list(range(len(self.paths))) if shard is None else [int(shard)]

        def read(reqs: dict) -> dict:
            res = self._fan_out(_ROWS, {which[j]: ((name, idx), {}) for j, idx in reqs.items()})
            return {j: res[which[j]] for j in reqs}

        return ShardedArray(read, self.sizes[which], width, self.dtype)

    # ---- fan-out ---------------------------------------------------------------------------------------
    def _fan_out(self, method: str, calls: dict[int, tuple[tuple, dict]]) -> dict[int, Any]:
        """Run ``Memory.<method>(*args, **kwargs)`` on each shard ``i`` of ``calls`` where it is resident.

        Returns ``{i: result}`` for every shard asked, or raises: a task's own error as it is, a lost
        worker as :class:`SearchError` once ``self.retries`` worker losses are spent.
        """
        if self._token is None:
            raise SearchError(f"{self.root}: this served memory was closed; open it again")
        from distributed import wait
        from distributed.client import FutureCancelledError

        def submit(i: int) -> Any:
            args, kwargs = calls[i]
            return self.client.submit(_call_task, self._token, self.paths[i], self._open_kwargs, int(self.sizes[i]),
                                      method, args, kwargs, workers=[self.placement[i]], allow_other_workers=False,
                                      pure=False)

        futures = {i: submit(i) for i in calls}
        moves, done = 0, False
        try:
            while True:
                killed = None
                try:
                    with self.client.as_current():  # distributed.wait asks default_client(): ours, not another
                        wait(list(futures.values()), timeout=self.poll_s)
                    out = dict(zip(futures, self.client.gather(list(futures.values()))))
                    done = True
                    return out
                except TimeoutError:  # still running (or waiting for a worker that has gone: checked below)
                    pass
                except Exception as exc:
                    if not isinstance(exc, FutureCancelledError) and type(exc).__name__ != "KilledWorker":
                        raise  # the task's own error (bad k, ...): the caller's
                    killed = exc  # dropped by the scheduler: fine only if its worker left (re-run below)
                alive = _alive(self.client)
                lost = [i for i in futures if self.placement[i] not in alive]
                if killed is not None and not lost:  # dropped on a live worker: never loop on it
                    raise SearchError(f"{self.root}: a {method} task was lost with its worker "
                                      f"({' '.join(str(killed).split())[:200]}); no answer returned")
                if lost and (moves >= self.retries or not alive):
                    i = lost[0]
                    raise SearchError(
                        f"{self.root}: shard {i} ({self.paths[i]}) was on Dask worker {self.placement[i]}, "
                        f"which left the cluster during a {method}; no answer returned"
                        + ("; no worker is left" if not alive else
                           f" (after {moves} re-open(s) elsewhere)" if self.retries else
                           " (retries=0: open with retries>=1 to re-open lost shards on another worker)"))
                if lost:
                    moves += 1  # one worker loss (all of its shards) is one retry
                for i in lost:
                    load = [self.placement.count(w) for w in alive]
                    self.placement[i] = alive[int(np.argmin(load))]  # the survivor holding the fewest shards
                    futures[i].cancel()
                    futures[i] = submit(i)  # the task there re-opens the shard before answering
        finally:
            if not done:  # nothing of a failed call keeps running on the cluster
                self.client.cancel(list(futures.values()))

    # ---- the read API ----------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, modality: str = "image", k: int = 10, exact: bool = False,
               exclude: Any = None, ef: int | None = None, *, dup_threshold: Any = None,
               num_threads: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Same contract as :meth:`Memory.search`; rows are global ids.

        Parameters
        ----------
        queries : [N, D] float, L2-normalised; D = :meth:`search_dim` (checked here, before any task)
        modality, k, exact, exclude, ef, dup_threshold, num_threads : as :meth:`Memory.search`

        Returns
        -------
        rows int64 [N, k'], scores float32 [N, k'], valid bool [N, k'] — the bits in-process search returns
        """
        q = check_queries(queries, self.search_dim(modality), f"{modality} index of {self.root}")
        excl = normalize_exclude(exclude, q.shape[0])  # [N, E] global ids
        kw = dict(modality=modality, k=k, exact=exact, ef=ef, dup_threshold=dup_threshold, num_threads=num_threads)
        calls = {i: ((q,), dict(kw, exclude=local_exclude(excl, int(off), int(n))))
                 for i, (off, n) in enumerate(zip(self.offsets, self.sizes))}
        res = self._fan_out("search", calls)
        answers = [res[i] for i in range(len(self.paths))]
        if self._single:
            return answers[0]
        return merge_topk(answers, self.offsets, k)

    def _locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """global rows (>= 0) int64 [M] -> (shard index [M], local row [M])."""
        s = np.searchsorted(self.offsets, rows, side="right") - 1
        return s, rows - self.offsets[s]

    def embeddings(self, modality: str, rows: np.ndarray) -> np.ndarray:
        """Like :meth:`Memory.embeddings` with global rows: ``rows`` any shape (−1 = missing) ->
        float32 ``rows.shape + (D,)``, zeros where missing; one task per shard that holds asked rows."""
        rows = np.asarray(rows)
        if rows.dtype.kind not in "iu":
            raise SearchError(f"rows: expected integer row ids, got dtype {rows.dtype}")
        if modality not in ("image", "text", "image_keys") or (modality == "image_keys" and not self.key_dim):
            raise SearchError(f"modality {modality!r}: expected 'image', 'text' or 'image_keys' (keys only when "
                              "the memory has them)")
        flat = rows.reshape(-1).astype(np.int64)
        if flat.size and ((flat >= len(self)).any() or (flat < -1).any()):
            raise SearchError(f"rows: ids must lie in [-1, {len(self) - 1}], found {flat.min()}..{flat.max()}")
        dim = self.key_dim if modality == "image_keys" else self.dim
        out = np.zeros((flat.size, dim), np.float32)
        ok = np.flatnonzero(flat >= 0)
        sh, local = self._locate(flat[ok])
        sel = {i: sh == i for i in np.unique(sh).tolist()}
        # the workers send rows in the stored dtype (float16 memories: half the bytes); cast here, exactly
        res = self._fan_out("embeddings", {i: ((modality, local[m]), {"stored": True}) for i, m in sel.items()})
        for i, m in sel.items():
            out[ok[m]] = res[i]
        return out.reshape(rows.shape + (dim,))

    def metadata(self, rows: Any) -> list[dict | None]:
        """Metadata of global rows (``row`` field global; None for −1), one task per shard involved."""
        flat = np.asarray(rows).reshape(-1).astype(np.int64)
        if flat.size and ((flat >= len(self)).any() or (flat < -1).any()):
            raise SearchError(f"rows: ids must lie in [-1, {len(self) - 1}]")
        out: list[dict | None] = [None] * flat.size
        ok = np.flatnonzero(flat >= 0)
        sh, local = self._locate(flat[ok])
        sel = {i: np.flatnonzero(sh == i) for i in np.unique(sh).tolist()}
        res = self._fan_out("metadata", {i: ((local[j],), {}) for i, j in sel.items()})
        for i, j in sel.items():
            for jj, rec in zip(j, res[i]):
                if rec is not None and not self._single:
                    rec = dict(rec, row=int(rec["row"]) + int(self.offsets[i]))
                out[int(ok[jj])] = rec
        return out

    def failures(self) -> list[dict]:
        res = self._fan_out("failures", {i: ((), {}) for i in range(len(self.paths))})
        return [f for i in range(len(self.paths)) for f in res[i]]

    def verify(self) -> None:
        """Full sha256 check of every shard, each on the worker holding it."""
        self._fan_out("verify", {i: ((), {}) for i in range(len(self.paths))})

    def info(self) -> dict:
        """What the in-process memory's ``info()`` says, plus ``served``: the scheduler and the placement."""
        served = {"scheduler": self.client.scheduler_info().get("address"),
                  "placement": dict(zip((s["dir"] for s in self.spec["shards"]), self.placement))}
        if self._single:
            return dict(self._infos[0], served=served)
        return {"root": str(self.root), "shards": len(self.paths), "rows": len(self),
                "items": self.spec["counts"]["items"], "failed": self.spec["counts"]["failed"],
                "embed_dim": self.dim, "key_dim": self.key_dim, "dtype": self.dtype, "encoder": self.spec["encoder"],
                "bytes_on_disk": sum(i["bytes_on_disk"] for i in self._infos),
                "shard_rows": [int(n) for n in self.sizes], "served": served}


class ServedShard(RowArrays):
    """Shard ``i`` of a :class:`ServedMemory` as the readers that walk a memory's shards see one
    (:func:`~reco_ref.memory.score_map.memory_score_map`, :func:`reco_ref.eval.edge.memory_digest`): its ``root``,
    ``manifest`` and rows (``image``, ``text``, ``image_keys``, ``vectors``), read from the worker holding it."""

    def __init__(self, served: ServedMemory, i: int, manifest: dict):
        self._served, self._i = served, i
        self.root = Path(served.paths[i])
        self.manifest = manifest
        self.key_dim = served.key_dim

    def __len__(self) -> int:
        return int(self._served.sizes[self._i])

    def _array(self, name: str) -> ShardedArray:
        return self._served._array(name, shard=self._i)


def release_opened(client: Any) -> int:
    """Close every :class:`ServedMemory` opened through ``client`` and not closed, dropped ones included (their shards
    leave the workers); returns how many.  What a verb's ``--scheduler`` run does on exit: the library functions it
    calls open memories deep inside, and none of them stays resident on the cluster after the command."""
    opened = _OPENED.pop(client, {})
    for token, ref in opened.items():
        mem = ref()
        if mem is not None:
            mem.close()  # marks the handle closed: a later call says so instead of re-opening shards
        else:
            _release_all(client, token)
    return len(opened)


def _alive(client: Any) -> list[str]:
    """Addresses of the workers in the cluster now (one scheduler round trip), sorted."""
    return sorted(client.nthreads())


def _release_all(client: Any, token: str) -> None:
    try:
        client.run(_release, token)
    except Exception:  # a worker gone or a client closed: nothing of ours is left there to release
        pass


__all__ = ["ServedMemory", "ServedShard", "connect", "release_opened", "CONNECT_TIMEOUT_S"]
