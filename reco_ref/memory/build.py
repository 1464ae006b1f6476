"""Build a memory (and ``add`` to one): streamed in chunks, resumable after ``kill -9``, atomic.

Life of a build (``out/`` is the memory directory)::

    out/.build/plan.json                  what is being built: item digest, encoder fingerprint, chunking, dtype,
                                          HNSW params.  A resumed run must match it field by field.
    out/.build/chunks/chunk_000000.npz    chunk c = items [c*chunk_size, (c+1)*chunk_size): encoded rows
                                          (item ids, image [m,D], text [m,D], keys) + failed items with
                                          their error.  Written atomically: a chunk file exists whole or not.
    out/.build/staged/*                   the final files, assembled from the chunks in chunk order
    out/.build/COMMIT.json -> renames -> manifest.json -> .build removed   (see :mod:`.format`)

A kill at any point leaves either whole chunk files (a re-run encodes only the missing chunks: the plan, chunk
files and resume check are the shared primitive of :mod:`reco_ref.chunks`, which ``encode`` uses too) or a
complete staging area; rows are the successful items in item order, so an interrupted-and-resumed build
produces the same bytes as an uninterrupted one.  RAM is bounded by one chunk plus one HNSW index
(the assembly streams chunk by chunk into the ``.npy`` files).

``add`` is the same pipeline with ``kind="add"``: new chunks are staged as *old rows + new rows*, the
HNSW indexes are loaded, grown with ``resize_index`` and extended with the new distinct vectors (an index
written before groups existed, holding every copy of a repeated vector, is rebuilt once), and the commit
replaces the files.
Until the commit the existing memory stays valid and openable.

The chunk half (plan, chunk files, encoding) lives in :mod:`.build_chunks`, what a build refuses before it
writes in :mod:`.build_checks`; here: the staging of the final files, the locked run, the public entry points.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .. import __version__
from ..chunks import PLAN
from ..errors import MemoryFormatError, RecoError, ShapeError
from ..io import atomic_path, atomic_save_npy, atomic_write_json, atomic_write_text, load_npy
from ..failpoints import failpoint
from . import format as fmt
# the chunk half and the refusals live in their own modules; check_captions is re-exported for the verbs, and
# hnsw_build / row_groups are looked up here (tests patch build.hnsw_build, build.row_groups)
from .build_checks import (_duplicate_candidates, _exclusive, _refuse_duplicates, _same_input_added, check_captions,
                           check_out_dir)
from .build_chunks import (Log, _check_plan, _encode_chunks, _iter_base, _iter_chunks, _load_chunk, _make_plan,
                           _silent, _write_npy_stream)
from .index import hnsw_add, hnsw_build, hnsw_load, row_groups
from .limits import check_option
from .producers import DEFAULT_BATCH, ArrayProducer, EncoderProducer
from .sources import check_item_labels, items_digest
from .score_map import space_score_map
from .store import Memory

DEFAULT_CHUNK = 1024


def _stage(root: Path, plan: dict, items: list[dict], *, base: dict | None, num_threads: int | None,
           log: Log) -> tuple[dict, list[str]]:
    """Assemble the final files into .build/staged/ from (base memory +) chunks; return (manifest, files)."""
    build = root / fmt.BUILD_DIR
    staged = build / "staged"
    staged.mkdir(parents=True, exist_ok=True)
    fmt.remove_tmp_files(staged)
    item_of_row, failures = _staged_rows(build, plan, items)
    n_old = base["manifest"]["counts"]["rows"] if base else 0
    n = n_old + int(item_of_row.shape[0])
    arrays = _stage_arrays(staged, build, plan, base, n)
    _stage_meta(staged, base, items, item_of_row, n_old, plan["item_offset"])

    # failure log: never silently dropped
    old_fail = (base["root"] / fmt.FAILURES).read_text() if base else ""
    atomic_write_text(staged / fmt.FAILURES, old_fail + "".join(f + "\n" for f in failures))
    if failures:
        log(f"{len(failures)} item(s) could not be encoded; listed in {root / fmt.FAILURES}")

    # HNSW indexes (labels = row ids), built on the staged memmaps; one element per distinct vector
    D, Dk = plan["encoder"]["dim"], plan["encoder"]["key_dim"]
    hnsw_meta, score_maps, group_files = {}, {}, []
    for modality, fname, dim in (("image", fmt.IMAGE_KEYS if Dk else fmt.IMAGE, Dk or D), ("text", fmt.TEXT, D)):
        hnsw_meta[modality], score_maps[modality], group_file = _stage_index(
            staged, modality, fname, dim, plan["hnsw"], n=n, n_old=n_old, base=base, num_threads=num_threads,
            log=log)
        if group_file is not None:
            group_files.append(group_file)

    files = [a[0] for a in arrays] + [fmt.META, fmt.FAILURES, fmt.IMAGE_INDEX, fmt.TEXT_INDEX] + group_files
    manifest = _staged_manifest(staged, plan, base, n=n, m=int(item_of_row.shape[0]), n_failed_new=len(failures),
                                hnsw_meta=hnsw_meta, score_maps=score_maps, group_files=group_files, files=files)
    return manifest, files


def _staged_rows(build: Path, plan: dict, items: list[dict]) -> tuple[np.ndarray, list[str]]:
    """Pass 1 over the chunks (small arrays only): the item id of every new row int64 [m], and one JSON line per
    item that failed."""
    first_item = plan["item_offset"]
    new_rows: list[np.ndarray] = []
    failures: list[str] = []
    for c in range(plan["n_chunks"]):
        z = _load_chunk(build, c, plan)
        new_rows.append(z["item"])
        for i, msg in zip(z["failed_item"].tolist(), z["failed_error"].tolist()):
            it = items[i - first_item]
            failures.append(json.dumps({"item": int(i), "source": it["source"], "error": msg}, sort_keys=True))
    item_of_row = np.concatenate(new_rows) if new_rows else np.zeros(0, np.int64)  # [m] item ids of new rows
    return item_of_row, failures


def _stage_arrays(staged: Path, build: Path, plan: dict, base: dict | None, n: int) -> list[tuple[str, str, int]]:
    """The embeddings [n, D] (and keys [n, Dk]): base rows (memmap) then chunk rows, streamed into staged .npy files;
    returns (file, chunk key, width) of each."""
    D, Dk, dtype = plan["encoder"]["dim"], plan["encoder"]["key_dim"], plan["dtype"]
    arrays = [(fmt.IMAGE, "image", D), (fmt.TEXT, "text", D)] + ([(fmt.IMAGE_KEYS, "image_keys", Dk)] if Dk else [])
    for fname, key, dim in arrays:
        blocks = list(_iter_base(base[key] if base else None)) if base else []
        _write_npy_stream(staged / fname, (n, dim), dtype, _chain(blocks, _iter_chunks(build, plan["n_chunks"], key)))
    return arrays


def _stage_meta(staged: Path, base: dict | None, items: list[dict], item_of_row: np.ndarray, n_old: int,
                first_item: int) -> None:
    """The metadata (SQLite): the base memory's rows, then one row per new row, row ids continuing after the base."""
    with atomic_path(staged / fmt.META) as tmp:
        if base:
            shutil.copyfile(base["root"] / fmt.META, tmp)
        con = sqlite3.connect(tmp)
        try:
            con.execute("PRAGMA journal_mode=OFF")
            con.execute("PRAGMA synchronous=OFF")
            con.execute("CREATE TABLE IF NOT EXISTS rows (row INTEGER PRIMARY KEY, item INTEGER NOT NULL, "
                        "caption TEXT, source TEXT, label INTEGER, split TEXT, tags TEXT)")
            con.executemany(
                "INSERT INTO rows VALUES (?,?,?,?,?,?,?)",
                ((n_old + r, int(i), items[i - first_item]["caption"], items[i - first_item]["source"],
                  items[i - first_item]["label"], items[i - first_item]["split"], items[i - first_item]["tags"])
                 for r, i in enumerate(item_of_row.tolist())))
            con.commit()
        finally:
            con.close()


def _stage_index(staged: Path, modality: str, fname: str, dim: int, hnsw: dict, *, n: int, n_old: int,
                 base: dict | None, num_threads: int | None, log: Log) -> tuple[dict, list | None, str | None]:
    """One modality's score map and HNSW index over the staged vectors ``fname`` [n, dim] (the first ``n_old`` rows
    the base memory's), one element per distinct vector -> (its manifest ``hnsw`` entry, its score map or None,
    its groups file or None)."""
    M, efc, seed = hnsw["M"], hnsw["ef_construction"], hnsw["seed"]
    vecs = load_npy(staged / fname)
    # the memory's own score scale, for fusion modules that read search scores relative to the searched memory
    # (memory/score_map.py); None where it is undefined (fewer than 2 distinct vectors)
    t0 = time.perf_counter()
    try:
        score_map = list(space_score_map(vecs))
    except RecoError:
        score_map = None
    log(f"{modality} score map: {score_map} in {time.perf_counter() - t0:.1f}s")
    t0 = time.perf_counter()
    # Identical rows (template captions: ~60 per caption) share one index element (index.row_groups): exact
    # for duplicates where HNSW over the copies loses most same-caption neighbours, and a smaller index.
    # The map is a pure function of the bytes, so an add keeps every old row's representative.
    groups = row_groups(vecs)  # [n] row -> representative
    reps = np.flatnonzero(groups == np.arange(n))  # [c] the rows indexed
    old_reps = int(np.searchsorted(reps, n_old))  # representatives among the base rows
    if base and base["manifest"]["hnsw"][modality]["count"] == old_reps:
        # the base index holds exactly those (checked at load): extend it with the new distinct vectors
        index = hnsw_load(base["root"] / f"{modality}.hnsw", dim, expect_count=old_reps, expect_M=M,
                          expect_ef_construction=efc, max_elements=reps.size, vectors=vecs[:n_old],
                          groups=groups[:n_old] if old_reps < n_old else None)
        hnsw_add(index, vecs, 0, num_threads=num_threads, rows=reps[old_reps:])
    else:
        if base:  # written before the groups (one element per row, identical rows included): re-index once
            log(f"{modality}.hnsw: the memory's index holds every row of its {n_old - old_reps} repeated "
                "vectors; rebuilding it over the distinct vectors")
        index = hnsw_build(vecs, M=M, ef_construction=efc, num_threads=num_threads, seed=seed, rows=reps)
    log(f"{modality}.hnsw: {reps.size} distinct of {n} vectors indexed in {time.perf_counter() - t0:.1f}s")
    with atomic_path(staged / f"{modality}.hnsw") as tmp:
        index.save_index(str(tmp))
    del index, vecs
    meta = {"M": M, "ef_construction": efc, "seed": seed, "space": "ip", "dim": dim, "count": int(reps.size),
            "vectors": fname}
    if reps.size < n:  # no file when every row is distinct: such a memory keeps the format it always had
        atomic_save_npy(staged / fmt.GROUPS[modality], groups)
        meta["groups"] = fmt.GROUPS[modality]
        return meta, score_map, fmt.GROUPS[modality]
    return meta, score_map, None


def _staged_manifest(staged: Path, plan: dict, base: dict | None, *, n: int, m: int, n_failed_new: int,
                     hnsw_meta: dict, score_maps: dict, group_files: list[str], files: list[str]) -> dict:
    """The manifest of the staged memory: ``n`` rows (``m`` of them new), counts, files, indexes, binding, history."""
    D, Dk = plan["encoder"]["dim"], plan["encoder"]["key_dim"]
    n_failed = n_failed_new + (base["manifest"]["counts"]["failed"] if base else 0)
    n_items = plan["n_items"] + (base["manifest"]["counts"]["items"] if base else 0)
    history = list(base["manifest"].get("history", [])) if base else []
    history.append({"kind": plan["kind"], "items": plan["n_items"], "rows": m, "failed": n_failed_new,
                    "items_sha256": plan["items_sha256"], "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return {
        "format_version": fmt.FORMAT_VERSION,
        "embed_dim": D,
        "key_dim": Dk,
        "dtype": plan["dtype"],
        "encoder": {"name": plan["encoder"]["name"], "fingerprint": plan["encoder"]["fingerprint"]},
        "counts": {"rows": n, "items": n_items, "failed": n_failed},
        "files": {f: fmt.file_record(staged / f) for f in files},
        "hnsw": hnsw_meta,
        "score_map": score_maps,
        # sampled-row digests that the fast open checks; an add keeps the memory's id (format.binding_record)
        "binding": fmt.binding_record(staged, Dk, ((base["manifest"].get("binding") or {}).get("memory_id")
                                                   if base else None), groups=group_files),
        "created_by": f"reco_ref {__version__}",
        "history": history,
    }


def _chain(first: list, rest: Iterable) -> Iterable:
    yield from first
    yield from rest



def _run(root: Path, kind: str, items: list[dict], producer: Any, **kw: Any) -> dict:
    root = Path(root)
    check_item_labels(items)  # before anything is written: a label SQLite cannot store failed at the commit
    if kind == "build":
        check_out_dir(root, resume=kw.get("resume", False))
    elif not root.is_dir():
        raise MemoryFormatError(f"{root}: no such memory directory")
    with _exclusive(root):
        return _run_locked(root, kind, items, producer, **kw)


def _run_locked(root: Path, kind: str, items: list[dict], producer: Any, *, resume: bool, chunk_size: int,
                dtype: str, M: int, ef_construction: int, seed: int, num_threads: int | None, progress: bool,
                item_offset: int, resume_hint: str | None, log: Log | None, allow_duplicates: bool = False) -> dict:
    log = log or _silent
    chunk_size, M, ef_construction, seed, num_threads = _checked_options(dtype, chunk_size, M, ef_construction, seed,
                                                                         num_threads)
    root = Path(root)
    build = root / fmt.BUILD_DIR
    _clear_build_area(root, build)

    if (build / fmt.COMMIT).is_file():
        if not resume:
            raise MemoryFormatError(f"{root}: an interrupted {kind} is committing; re-run with --resume (resume=True)")
        fmt.roll_forward(root)
        log(f"{root}: finished the interrupted commit")
        return json.loads((root / fmt.MANIFEST).read_text())

    add = None
    if kind == "add":
        add = _open_add_base(root, build, items, producer, dtype=dtype, seed=seed, resume=resume,
                             allow_duplicates=allow_duplicates, log=log)
        if add.done is not None:
            return add.done
        M, ef_construction, seed = add.hnsw
        item_offset = add.item_offset
    elif (root / fmt.MANIFEST).is_file():
        if resume and not build.is_dir():
            log(f"{root}: already complete")
            return json.loads((root / fmt.MANIFEST).read_text())
        raise MemoryFormatError(f"{root}: a memory already exists here; use add (reco-ref memory-add) to extend "
                                "it, or choose another --out")

    plan = _make_plan(kind, items, producer, chunk_size=chunk_size, dtype=dtype, M=M, ef_construction=ef_construction,
                      seed=seed, item_offset=item_offset, base_manifest_sha=add.base_sha if add else None,
                      resume_hint=resume_hint)
    _start_plan(root, build, plan, kind=kind, resume=resume, log=log)

    (build / fmt.BUILD_FAILED).unlink(missing_ok=True)  # this attempt supersedes an earlier failure
    try:
        _encode_chunks(build, plan, items, producer, progress, log)
        if add and add.dup_candidates:
            _refuse_duplicates(build, plan, items, add.mem, add.dup_candidates)
        manifest, files = _stage(root, plan, items, base=add.base if add else None, num_threads=num_threads, log=log)
    except Exception as exc:
        # the chunks stay for a resume; the note makes the next run say "failed (why)", not "interrupted"
        fmt.record_build_failure(build, exc)
        raise
    if add is not None:
        add.base = None  # release the memmaps of the files about to be replaced
    failpoint("memory.staged")
    fmt.commit_staged(root, manifest, files)
    return manifest


def _checked_options(dtype: str, chunk_size: int, M: int, ef_construction: int, seed: int,
                     num_threads: int | None) -> tuple[int, int, int, int, int | None]:
    """The build's numeric options checked against their ranges (:mod:`.limits`); the dtype one of fmt.DTYPES."""
    if dtype not in fmt.DTYPES:
        raise MemoryFormatError(f"dtype {dtype!r} not supported (expected one of {fmt.DTYPES})")
    chunk_size, M, ef_construction = (check_option(k, v) for k, v in (
        ("chunk_size", chunk_size), ("M", M), ("ef_construction", ef_construction)))
    seed = check_option("seed", seed)
    if num_threads is not None:
        num_threads = check_option("threads", num_threads)
    return chunk_size, M, ef_construction, seed, num_threads


def _clear_build_area(root: Path, build: Path) -> None:
    """Refuse build folders that are links (a build writes and deletes there), and drop old trash folders."""
    for d in (build, build / "chunks", build / "staged"):  # the build writes and deletes there: its own folders
        if d.is_symlink():
            raise MemoryFormatError(f"{d}: is a symbolic link to {os.path.realpath(d)}; a build writes only inside "
                                    "the memory folder: remove the link")
    for trash in root.glob(".trash-build*"):
        shutil.rmtree(trash, ignore_errors=True)


@dataclass
class _AddBase:
    """What an add builds on: the open memory, its arrays (``base``), the digest of its manifest, the HNSW
    parameters it was built with, its first new item id and the rows that may repeat the new items."""

    mem: Memory
    base: dict | None
    base_sha: str
    hnsw: tuple[int, int, int]  # M, ef_construction, seed
    item_offset: int
    dup_candidates: dict = field(default_factory=dict)
    done: dict | None = None  # the manifest, when this very add was already committed


def _open_add_base(root: Path, build: Path, items: list[dict], producer: Any, *, dtype: str, seed: int, resume: bool,
                   allow_duplicates: bool, log: Log) -> _AddBase:
    """Open the memory an add extends and check the encoder, dtype and input against it."""
    mem = Memory.open(root, verify="size", allow_fingerprint_mismatch=True)
    if mem.fingerprint != producer.info["fingerprint"] or mem.dim != producer.info["dim"] \
            or mem.key_dim != producer.info["key_dim"]:
        raise MemoryFormatError(
            f"{root}: cannot add with encoder {producer.info['name']!r} (fingerprint "
            f"{producer.info['fingerprint'][:16]}…, dim {producer.info['dim']}, key_dim {producer.info['key_dim']}): "
            f"the memory was built with {mem.manifest['encoder']['name']!r} ({mem.fingerprint[:16]}…, "
            f"dim {mem.dim}, key_dim {mem.key_dim})")
    if mem.dtype != dtype:
        raise MemoryFormatError(f"{root}: memory dtype is {mem.dtype}, add asked for {dtype}")
    h = mem.manifest["hnsw"]["text"]
    add = _AddBase(mem=mem, hnsw=(h["M"], h["ef_construction"], h.get("seed", seed)),
                   base={"root": root, "manifest": mem.manifest, "image": mem.image, "text": mem.text,
                         "image_keys": mem.image_keys},
                   base_sha=fmt.sha256_file(root / fmt.MANIFEST), item_offset=mem.manifest["counts"]["items"])
    last = (mem.manifest.get("history") or [{}])[-1]
    if resume and not build.is_dir() and last.get("kind") == "add" and \
            last.get("items_sha256") == items_digest(items) + producer.digest_extra:
        log(f"{root}: this add was already committed")
        add.done = mem.manifest
        return add
    if not allow_duplicates:
        _same_input_added(mem, items, items_digest(items) + producer.digest_extra)
        add.dup_candidates = _duplicate_candidates(mem, items)
    if producer.info["name"] != mem.manifest["encoder"]["name"]:
        # same fingerprint = same weights; the memory keeps the name it was built under
        log(f"{root}: encoder name {producer.info['name']!r} differs from the memory's "
            f"{mem.manifest['encoder']['name']!r} (same fingerprint); the memory keeps its name")
        producer.info = dict(producer.info, name=mem.manifest["encoder"]["name"])
    return add


def _start_plan(root: Path, build: Path, plan: dict, *, kind: str, resume: bool, log: Log) -> None:
    """Write the plan of a fresh run, or check a resumed run against the interrupted one's (refusing a pending run
    without ``resume``)."""
    plan_path = build / PLAN
    chunks_dir = build / "chunks"
    if plan_path.is_file() and not resume and not (chunks_dir.is_dir() and any(chunks_dir.glob("chunk_*.npz"))):
        # an earlier run stopped before finishing its first chunk (e.g. on bad input): nothing to keep
        shutil.rmtree(build)
        log(f"{root}: discarded an earlier attempt that had not encoded anything yet")
    if plan_path.is_file():
        if not resume:
            failed = fmt.build_failure(build)
            raise MemoryFormatError(fmt.describe_partial(root) if kind == "build" else
                                    f"{root}: an add that {f'failed ({failed})' if failed else 'was interrupted'} is "
                                    "pending; re-run it with --resume (resume=True), or delete "
                                    f"{build} to drop it (the memory itself is intact)")
        _check_plan(fmt.read_build_json(plan_path), plan, plan_path)
    else:
        if build.is_dir():  # killed before the plan was written: nothing worth keeping
            shutil.rmtree(build)
        atomic_write_json(plan_path, plan)


# ----------------------------------------------------------------------------------------------------------
# public entry points
# ----------------------------------------------------------------------------------------------------------
def build_memory(out: str | Path, items: list[dict], encoder: Any, *, resume: bool = False,
                 chunk_size: int = DEFAULT_CHUNK, batch_size: int = DEFAULT_BATCH, dtype: str = "float32",
                 M: int = 16, ef_construction: int = 200, seed: int = 100, num_threads: int | None = None,
                 progress: bool = True, item_offset: int = 0, resume_hint: str | None = None,
                 log: Log | None = None, overlap_captions: bool = False) -> dict:
    """Build a memory at ``out`` from ``items`` (see :mod:`.sources`) encoded by ``encoder``.

    Parameters
    ----------
    out : directory to create (the memory)
    items : list of item dicts (``read_pairs(...)``), in row order
    encoder : an encoder pair (``reco_ref.encoders.load("reco-mini")`` or the same duck type:
        ``encode_images``, ``encode_texts``, ``dim``, ``key_dim``, ``name``, ``fingerprint``)
    resume : continue an interrupted build at ``out`` (refused if inputs/options differ from the plan)
    chunk_size : items per atomic chunk file (the unit of resumption)
    dtype : ``"float32"`` or ``"float16"`` storage of the embeddings
    M, ef_construction, seed : hnswlib build parameters (recorded in the manifest)
    item_offset : id of the first item (shards of one input use global item ids)
    overlap_captions : encode each chunk's captions on a background thread while its images encode (same
        bytes; needs an encoder declaring ``concurrent_towers = True``, as ``EncoderPair`` does). Off by
        default: on 2 busy cores the two towers slow each other down (docs/edge.md)

    Returns
    -------
    dict : the manifest written
    """
    producer = EncoderProducer(encoder, batch_size, overlap_captions=overlap_captions)
    return _run(Path(out), "build", items, producer, resume=resume,
                chunk_size=chunk_size, dtype=dtype, M=M, ef_construction=ef_construction, seed=seed,
                num_threads=num_threads, progress=progress, item_offset=item_offset, resume_hint=resume_hint,
                log=log)


def build_memory_from_arrays(out: str | Path, image: np.ndarray, text: np.ndarray, *, name: str, fingerprint: str,
                             keys: np.ndarray | None = None, items: list[dict] | None = None,
                             normalize: bool = False, resume: bool = False, chunk_size: int = 65536,
                             dtype: str = "float32", M: int = 16, ef_construction: int = 200, seed: int = 100,
                             num_threads: int | None = None, progress: bool = True, resume_hint: str | None = None,
                             log: Log | None = None, item_offset: int = 0) -> dict:
    """Build a memory from precomputed embeddings ``image [n,D]``, ``text [n,D]`` (+ ``keys [n,Dk]``).

    ``name`` / ``fingerprint`` identify the encoder that produced them (``encoder.fingerprint``); the
    memory refuses other encoders at open.  ``items`` gives optional metadata per row (caption, source,
    label, split, tags); without it captions are empty and sources are ``array:<item>``.  Rows must be
    L2-normalised (|norm-1| <= 1e-3) unless ``normalize=True``.  ``item_offset``: the item id of row 0
    (a shard of bigger arrays: its rows ``item_offset..`` of them, global item ids as in :func:`build_memory`).
    """
    n = image.shape[0]
    items = items if items is not None else [
        {"image": "", "caption": "", "source": f"array:{item_offset + i}", "label": None, "split": None,
         "tags": None} for i in range(n)]
    if len(items) != n:
        raise ShapeError(f"items: {len(items)} metadata rows for {n} embedding rows")
    producer = ArrayProducer(image, text, keys=keys, name=name, fingerprint=fingerprint, normalize=normalize)
    return _run(Path(out), "build", items, producer, resume=resume, chunk_size=chunk_size, dtype=dtype, M=M,
                ef_construction=ef_construction, seed=seed, num_threads=num_threads, progress=progress,
                item_offset=item_offset, resume_hint=resume_hint, log=log)


def _finish_pending_commit(root: Path, resume: bool) -> None:
    """An add killed mid-commit is finished (rolled forward) by a resumed add before anything else."""
    if resume and (root / fmt.BUILD_DIR / fmt.COMMIT).is_file():
        fmt.roll_forward(root)


def add_to_memory(root: str | Path, items: list[dict], encoder: Any, *, resume: bool = False,
                  chunk_size: int = DEFAULT_CHUNK, batch_size: int = DEFAULT_BATCH, num_threads: int | None = None,
                  progress: bool = True, resume_hint: str | None = None, log: Log | None = None,
                  allow_duplicates: bool = False, overlap_captions: bool = False) -> dict:
    """Append ``items`` to the memory at ``root`` (same encoder required); resumable and atomic like a build.

    New rows get ids ``len(memory)..``; the HNSW indexes are grown with ``resize_index`` and extended.
    The memory's dtype, HNSW parameters and encoder name are kept.  Pairs the memory already holds
    (the same input again, or rows with the same source and caption) are refused unless
    ``allow_duplicates=True``.  ``overlap_captions``: as in :func:`build_memory`.
    """
    _finish_pending_commit(Path(root), resume)
    dtype = Memory.open(root, verify=False, allow_fingerprint_mismatch=True).dtype
    producer = EncoderProducer(encoder, batch_size, overlap_captions=overlap_captions)
    return _run(Path(root), "add", items, producer, resume=resume, chunk_size=chunk_size,
                dtype=dtype, M=16, ef_construction=200, seed=100, num_threads=num_threads, progress=progress,
                item_offset=0, resume_hint=resume_hint, log=log, allow_duplicates=allow_duplicates)


def add_arrays_to_memory(root: str | Path, image: np.ndarray, text: np.ndarray, *, name: str, fingerprint: str,
                         keys: np.ndarray | None = None, items: list[dict] | None = None, normalize: bool = False,
                         resume: bool = False, chunk_size: int = 65536, num_threads: int | None = None,
                         progress: bool = True, log: Log | None = None, allow_duplicates: bool = False) -> dict:
    """Append precomputed embeddings to an existing memory (see :func:`build_memory_from_arrays`)."""
    _finish_pending_commit(Path(root), resume)
    mem = Memory.open(root, verify=False, allow_fingerprint_mismatch=True)
    n = image.shape[0]
    items = items if items is not None else [
        {"image": "", "caption": "", "source": f"array:{len(mem) + i}", "label": None, "split": None, "tags": None}
        for i in range(n)]
    producer = ArrayProducer(image, text, keys=keys, name=name, fingerprint=fingerprint, normalize=normalize)
    return _run(Path(root), "add", items, producer, resume=resume, chunk_size=chunk_size, dtype=mem.dtype, M=16,
                ef_construction=200, seed=100, num_threads=num_threads, progress=progress, item_offset=0,
                resume_hint=None, log=log, allow_duplicates=allow_duplicates)
