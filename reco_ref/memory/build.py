"""Build a memory (and ``add`` to one): streamed in chunks, resumable after ``kill -9``, atomic.

Life of a build (``out/`` is the memory directory)::

    out/.build/plan.json                  what is being built: item digest, encoder fingerprint, chunking, dtype,
                                          HNSW params.  A resumed run must match it field by field.
    out/.build/chunks/chunk_000000.npz    chunk c = items [c*chunk_size, (c+1)*chunk_size): encoded rows
                                          (item ids, image [m,D], text [m,D], keys) + failed items with
                                          their error.  Written atomically: a chunk file exists whole or not.
    out/.build/staged/*                   the final files, assembled from the chunks in chunk order
    out/.build/COMMIT.json -> renames -> manifest.json -> .build removed   (see :mod:`.format`)

A kill at any point leaves either whole chunk files (a re-run encodes only the missing chunks) or a
complete staging area; rows are the successful items in item order, so an interrupted-and-resumed build
produces the same bytes as an uninterrupted one.  RAM is bounded by one chunk plus one HNSW index
(the assembly streams chunk by chunk into the ``.npy`` files).

``add`` is the same pipeline with ``kind="add"``: new chunks are staged as *old rows + new rows*, the
HNSW indexes are loaded, grown with ``resize_index`` and extended with the new distinct vectors (an index
written before groups existed, holding every copy of a repeated vector, is rebuilt once), and the commit
replaces the files.
Until the commit the existing memory stays valid and openable.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from .. import __version__
from ..errors import MemoryFormatError, RecoError, ShapeError
from ..io import (atomic_open, atomic_path, atomic_save_npy, atomic_save_npz, atomic_write_json, atomic_write_text,
                  load_npy, load_npz)
from ..failpoints import failpoint
from . import format as fmt
from .estimate import estimate_build, format_estimate
from .index import hnsw_add, hnsw_build, hnsw_load, row_groups
from .limits import check_option
from .producers import DEFAULT_BATCH, NORM_TOL, ArrayProducer, EncoderProducer
from .sources import check_item_labels, items_digest
from .score_map import space_score_map
from .store import Memory

DEFAULT_CHUNK = 1024
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


def _check_plan(old: dict, new: dict, path: Path) -> None:
    for key in ("kind", "n_items", "items_sha256", "item_offset", "chunk_size", "dtype", "encoder", "hnsw",
                "base_manifest_sha256"):
        if old.get(key) != new.get(key):
            raise MemoryFormatError(
                f"{path}: cannot resume: {key} differs from the interrupted run (was {old.get(key)!r}, "
                f"now {new.get(key)!r}). Resume with the same inputs and options, or delete {path.parent} "
                "to start over"
            )


_CHUNK_KEYS = ("item", "image", "text", "image_keys", "failed_item", "failed_error")


def _chunk_path(build: Path, c: int) -> Path:
    return build / "chunks" / f"chunk_{c:06d}.npz"


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
    todo = [c for c in range(n_chunks) if not _chunk_path(build, c).is_file()]
    done_items = sum(min(cs, n - c * cs) for c in range(n_chunks)) - sum(min(cs, n - c * cs) for c in todo)
    if todo and done_items:
        log(f"resuming: {n_chunks - len(todo)} of {n_chunks} chunks already encoded")
    bar = tqdm(total=n, initial=done_items, disable=not progress, desc="encode", unit="item", leave=False)
    written = 0
    t0 = time.perf_counter()
    try:
        for c in todo:
            lo, hi = c * cs, min((c + 1) * cs, n)
            out = producer.produce(items[lo:hi], lo, plan["item_offset"])
            _check_rows(out, items, lo, plan["item_offset"], plan["encoder"]["name"])
            for k in ("image", "text", "image_keys"):
                if k in out:
                    out[k] = np.asarray(out[k], np.float32).astype(plan["dtype"])
            atomic_save_npz(_chunk_path(build, c), out)
            written += 1
            bar.update(hi - lo)
            if written == 1 and len(todo) > 1 and n >= ESTIMATE_MIN_ITEMS:
                rate = (hi - lo) / max(time.perf_counter() - t0, 1e-9)
                est = estimate_build(n, plan["encoder"]["dim"], key_dim=plan["encoder"]["key_dim"],
                                     dtype=plan["dtype"], M=plan["hnsw"]["M"],
                                     ef_construction=plan["hnsw"]["ef_construction"], encode_items_per_s=rate)
                log(format_estimate(est))
            failpoint("memory.chunk", written)
    finally:
        bar.close()


def _stage(root: Path, plan: dict, items: list[dict], *, base: dict | None, num_threads: int | None,
           log: Log) -> tuple[dict, list[str]]:
    """Assemble the final files into .build/staged/ from (base memory +) chunks; return (manifest, files)."""
    build = root / fmt.BUILD_DIR
    staged = build / "staged"
    staged.mkdir(parents=True, exist_ok=True)
    fmt.remove_tmp_files(staged)
    n_chunks = plan["n_chunks"]
    D, Dk, dtype = plan["encoder"]["dim"], plan["encoder"]["key_dim"], plan["dtype"]
    M, efc, seed = plan["hnsw"]["M"], plan["hnsw"]["ef_construction"], plan["hnsw"]["seed"]
    first_item = plan["item_offset"]

    # pass 1: which items became rows and which failed (small arrays only)
    new_rows: list[np.ndarray] = []
    failures: list[str] = []
    for c in range(n_chunks):
        z = _load_chunk(build, c, plan)
        new_rows.append(z["item"])
        for i, msg in zip(z["failed_item"].tolist(), z["failed_error"].tolist()):
            it = items[i - first_item]
            failures.append(json.dumps({"item": int(i), "source": it["source"], "error": msg}, sort_keys=True))
    item_of_row = np.concatenate(new_rows) if new_rows else np.zeros(0, np.int64)  # [m] item ids of new rows
    m = int(item_of_row.shape[0])
    n_old = base["manifest"]["counts"]["rows"] if base else 0
    n = n_old + m

    # embeddings: base rows (memmap) then chunk rows, streamed
    arrays = [(fmt.IMAGE, "image", D), (fmt.TEXT, "text", D)] + ([(fmt.IMAGE_KEYS, "image_keys", Dk)] if Dk else [])
    for fname, key, dim in arrays:
        blocks = list(_iter_base(base[key] if base else None)) if base else []
        _write_npy_stream(staged / fname, (n, dim), dtype, _chain(blocks, _iter_chunks(build, n_chunks, key)))

    # metadata (SQLite), row ids continue after the base rows
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

    # failure log: never silently dropped
    old_fail = (base["root"] / fmt.FAILURES).read_text() if base else ""
    atomic_write_text(staged / fmt.FAILURES, old_fail + "".join(f + "\n" for f in failures))
    if failures:
        log(f"{len(failures)} item(s) could not be encoded; listed in {root / fmt.FAILURES}")

    # HNSW indexes (labels = row ids), built on the staged memmaps; one element per distinct vector
    hnsw_meta, score_maps, group_files = {}, {}, []
    for modality, fname, dim in (("image", fmt.IMAGE_KEYS if Dk else fmt.IMAGE, Dk or D), ("text", fmt.TEXT, D)):
        vecs = load_npy(staged / fname)
        # the memory's own score scale, for fusion modules that read search scores relative to the searched memory
        # (memory/score_map.py); None where it is undefined (fewer than 2 distinct vectors)
        t0 = time.perf_counter()
        try:
            score_maps[modality] = list(space_score_map(vecs))
        except RecoError:
            score_maps[modality] = None
        log(f"{modality} score map: {score_maps[modality]} in {time.perf_counter() - t0:.1f}s")
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
        hnsw_meta[modality] = {"M": M, "ef_construction": efc, "seed": seed, "space": "ip", "dim": dim,
                               "count": int(reps.size), "vectors": fname}
        if reps.size < n:  # no file when every row is distinct: such a memory keeps the format it always had
            atomic_save_npy(staged / fmt.GROUPS[modality], groups)
            hnsw_meta[modality]["groups"] = fmt.GROUPS[modality]
            group_files.append(fmt.GROUPS[modality])

    files = [a[0] for a in arrays] + [fmt.META, fmt.FAILURES, fmt.IMAGE_INDEX, fmt.TEXT_INDEX] + group_files
    n_failed = len(failures) + (base["manifest"]["counts"]["failed"] if base else 0)
    n_items = plan["n_items"] + (base["manifest"]["counts"]["items"] if base else 0)
    history = list(base["manifest"].get("history", [])) if base else []
    history.append({"kind": plan["kind"], "items": plan["n_items"], "rows": m, "failed": len(failures),
                    "items_sha256": plan["items_sha256"], "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    manifest = {
        "format_version": fmt.FORMAT_VERSION,
        "embed_dim": D,
        "key_dim": Dk,
        "dtype": dtype,
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
    return manifest, files


def _chain(first: list, rest: Iterable) -> Iterable:
    yield from first
    yield from rest


@contextlib.contextmanager
def _exclusive(root: Path) -> Iterator[None]:
    """Hold an advisory lock on ``root/.lock`` so two builds/adds never write the same memory at once.

    The lock dies with its process (kill -9 included), so it never needs cleaning up.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: no protection against concurrent writers
        yield
        return
    root.mkdir(parents=True, exist_ok=True)
    # O_NOFOLLOW: a crafted .lock linking elsewhere must not make the build create or open a file outside the memory
    fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise MemoryFormatError(f"{root}: another build or add is writing this memory right now") from None
        yield
    finally:
        os.close(fd)


def check_out_dir(out: str | Path, *, resume: bool = False) -> None:
    """Refuse to build at ``out`` when it is a file, or a non-empty folder that is not a memory.

    A build writes files named ``image.npy``, ``manifest.json``, ... into ``out``; in a folder of the
    user's own files it could replace one that happens to share a name, so it only goes into a new or
    empty folder, a (partial) memory, or a sharded memory's folder.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MemoryFormatError(f"{out}: is a file; --out must name a new or empty folder for the memory")
    if not out.is_dir():
        return
    names = {p.name for p in out.iterdir()}
    if names & {fmt.MANIFEST, fmt.BUILD_DIR, fmt.SHARDS}:
        return  # a memory, an interrupted build, or a sharded memory: the build decides (resume / refuse)
    foreign = sorted(n for n in names if n not in (".lock", fmt.COMMIT_LOCK) and not n.startswith(".trash-build"))
    if resume and all(n.startswith("shard_") for n in foreign):
        return  # an interrupted sharded build
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise MemoryFormatError(f"{out}: folder is not empty and is not a memory (holds {shown}); build into a "
                                "new or empty folder")


def check_captions(items: list[dict], where: str = "items") -> None:
    """Refuse pairs of which no caption can be embedded (every one missing, empty or whitespace).

    Such items all become failures and the memory would have no row; say so at the door, naming the cause,
    instead of building an empty memory. (Some blank captions are fine: those items are listed in
    ``failures.jsonl``.)
    """
    if items and not any(isinstance(it.get("caption"), str) and it["caption"].strip() for it in items):
        raise MemoryFormatError(
            f"{where}: no caption could be embedded: all {len(items)} captions are blank (missing, empty or "
            "whitespace); give each image a caption (the caption column, sidecar .txt files, or "
            "--caption-template for a dataset manifest)")


def _same_input_added(mem: Memory, items: list[dict], digest: str) -> None:
    """Refuse an add whose exact input (items digest) the memory's history already holds."""
    for h in mem.manifest.get("history", []):
        if h.get("items_sha256") == digest:
            raise MemoryFormatError(
                f"{mem.root}: these {len(items)} pairs were already added ({h.get('kind')} at {h.get('time')}); "
                "adding them again would duplicate rows (pass --allow-duplicates / allow_duplicates=True to do it "
                "anyway)")


def _duplicate_candidates(mem: Memory, items: list[dict]) -> dict[tuple, list[int]]:
    """Rows of ``mem`` whose (source, caption) equals that of an item to add: {(source, caption): [rows]}."""
    wanted = {(it["source"], it["caption"]) for it in items}
    sources = sorted({src for src, _ in wanted})
    found: dict[tuple, list[int]] = {}
    try:
        con = fmt.open_meta(mem.root / fmt.META)  # a percent-encoded URI: folder names may hold '#' or '?'
        try:
            for lo in range(0, len(sources), 900):  # SQLite's bound-parameter limit
                part = sources[lo:lo + 900]
                q = f"SELECT row, source, caption FROM rows WHERE source IN ({','.join('?' * len(part))})"
                for r, src, cap in con.execute(q, part):
                    if (src, cap) in wanted:
                        found.setdefault((src, cap), []).append(int(r))
        finally:
            con.close()
    except sqlite3.Error as exc:
        raise MemoryFormatError(f"{mem.root / fmt.META}: damaged metadata database "
                                f"({' '.join(str(exc).split())[:300]})") from None
    return found


def _refuse_duplicates(build: Path, plan: dict, items: list[dict], mem: Memory, cand: dict[tuple, list[int]]) -> None:
    """A new row is a duplicate when a memory row has its source, caption AND bit-identical embeddings.

    (Source and caption alone are not enough: two folders may both hold ``img/001.jpg``.)  On a refusal
    the encoded chunks are discarded, so a re-run with ``allow_duplicates=True`` starts clean.
    """
    first, dups = plan["item_offset"], []
    for c in range(plan["n_chunks"]):
        z = _load_chunk(build, c, plan)
        for j, i in enumerate(z["item"].tolist()):
            it = items[i - first]
            for r in cand.get((it["source"], it["caption"]), ()):
                if np.array_equal(z["image"][j], mem.image[r]) and np.array_equal(z["text"][j], mem.text[r]):
                    dups.append((it["source"], r))
                    break
    if dups:
        shutil.rmtree(build, ignore_errors=True)
        src, r = dups[0]
        raise MemoryFormatError(
            f"{mem.root}: {len(dups)} of the pairs to add are already in the memory (same source, caption and "
            f"embeddings, e.g. {src!r} = row {r}); adding them would duplicate rows (pass --allow-duplicates / "
            "allow_duplicates=True to do it anyway)")


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
    if dtype not in fmt.DTYPES:
        raise MemoryFormatError(f"dtype {dtype!r} not supported (expected one of {fmt.DTYPES})")
    chunk_size, M, ef_construction = (check_option(k, v) for k, v in (
        ("chunk_size", chunk_size), ("M", M), ("ef_construction", ef_construction)))
    seed = check_option("seed", seed)
    if num_threads is not None:
        num_threads = check_option("threads", num_threads)
    root = Path(root)
    build = root / fmt.BUILD_DIR
    for d in (build, build / "chunks", build / "staged"):  # the build writes and deletes there: its own folders
        if d.is_symlink():
            raise MemoryFormatError(f"{d}: is a symbolic link to {os.path.realpath(d)}; a build writes only inside "
                                    "the memory folder: remove the link")
    for trash in root.glob(".trash-build*"):
        shutil.rmtree(trash, ignore_errors=True)

    if (build / fmt.COMMIT).is_file():
        if not resume:
            raise MemoryFormatError(f"{root}: an interrupted {kind} is committing; re-run with --resume (resume=True)")
        fmt.roll_forward(root)
        log(f"{root}: finished the interrupted commit")
        return json.loads((root / fmt.MANIFEST).read_text())

    base = None
    base_sha = None
    dup_candidates: dict = {}
    if kind == "add":
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
        M, ef_construction, seed = h["M"], h["ef_construction"], h.get("seed", seed)
        base = {"root": root, "manifest": mem.manifest, "image": mem.image, "text": mem.text,
                "image_keys": mem.image_keys}
        base_sha = fmt.sha256_file(root / fmt.MANIFEST)
        item_offset = mem.manifest["counts"]["items"]
        last = (mem.manifest.get("history") or [{}])[-1]
        if resume and not build.is_dir() and last.get("kind") == "add" and \
                last.get("items_sha256") == items_digest(items) + producer.digest_extra:
            log(f"{root}: this add was already committed")
            return mem.manifest
        if not allow_duplicates:
            _same_input_added(mem, items, items_digest(items) + producer.digest_extra)
            dup_candidates = _duplicate_candidates(mem, items)
        if producer.info["name"] != mem.manifest["encoder"]["name"]:
            # same fingerprint = same weights; the memory keeps the name it was built under
            log(f"{root}: encoder name {producer.info['name']!r} differs from the memory's "
                f"{mem.manifest['encoder']['name']!r} (same fingerprint); the memory keeps its name")
            producer.info = dict(producer.info, name=mem.manifest["encoder"]["name"])
    elif (root / fmt.MANIFEST).is_file():
        if resume and not build.is_dir():
            log(f"{root}: already complete")
            return json.loads((root / fmt.MANIFEST).read_text())
        raise MemoryFormatError(f"{root}: a memory already exists here; use add (reco-ref memory-add) to extend "
                                "it, or choose another --out")

    plan = _make_plan(kind, items, producer, chunk_size=chunk_size, dtype=dtype, M=M, ef_construction=ef_construction,
                      seed=seed, item_offset=item_offset, base_manifest_sha=base_sha, resume_hint=resume_hint)
    plan_path = build / "plan.json"
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

    (build / fmt.BUILD_FAILED).unlink(missing_ok=True)  # this attempt supersedes an earlier failure
    try:
        _encode_chunks(build, plan, items, producer, progress, log)
        if dup_candidates:
            _refuse_duplicates(build, plan, items, mem, dup_candidates)
        manifest, files = _stage(root, plan, items, base=base, num_threads=num_threads, log=log)
    except Exception as exc:
        # the chunks stay for a resume; the note makes the next run say "failed (why)", not "interrupted"
        fmt.record_build_failure(build, exc)
        raise
    if base is not None:
        del base  # release the memmaps of the files about to be replaced
    failpoint("memory.staged")
    fmt.commit_staged(root, manifest, files)
    return manifest


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
                             log: Log | None = None) -> dict:
    """Build a memory from precomputed embeddings ``image [n,D]``, ``text [n,D]`` (+ ``keys [n,Dk]``).

    ``name`` / ``fingerprint`` identify the encoder that produced them (``encoder.fingerprint``); the
    memory refuses other encoders at open.  ``items`` gives optional metadata per row (caption, source,
    label, split, tags); without it captions are empty and sources are ``array:<row>``.  Rows must be
    L2-normalised (|norm-1| <= 1e-3) unless ``normalize=True``.
    """
    n = image.shape[0]
    items = items if items is not None else [
        {"image": "", "caption": "", "source": f"array:{i}", "label": None, "split": None, "tags": None}
        for i in range(n)]
    if len(items) != n:
        raise ShapeError(f"items: {len(items)} metadata rows for {n} embedding rows")
    producer = ArrayProducer(image, text, keys=keys, name=name, fingerprint=fingerprint, normalize=normalize)
    return _run(Path(out), "build", items, producer, resume=resume, chunk_size=chunk_size, dtype=dtype, M=M,
                ef_construction=ef_construction, seed=seed, num_threads=num_threads, progress=progress,
                item_offset=0, resume_hint=resume_hint, log=log)


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

