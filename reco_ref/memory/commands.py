"""What the ``reco-ref`` memory verbs do, as plain functions (the CLI module only parses arguments).

Each function takes keyword arguments, prints its user-facing lines through ``log`` and returns an
exit code or a result dict; errors are raised as :mod:`reco_ref.errors` types.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import MemoryFormatError, SearchError, ShapeError
from ..io import load_npy
from ..paths import file_problem, memory_containing, printable
from .build import (add_arrays_to_memory, add_to_memory, build_memory, build_memory_from_arrays, check_captions,
                    check_out_dir)
from .estimate import estimate_build, format_estimate
from .opener import opened_memory
from .plan import format_plan, plan_for
from .producers import load_encoder
from .sources import read_pairs, scan_pairs


def _err(msg: str) -> None:
    # the lines name the user's folders and the memory's files: a control character in a name is shown escaped
    print(printable(msg), file=sys.stderr)


def estimate_for_items(items: list[dict], encoder: Any, *, sample: int = 32, dtype: str = "float32", M: int = 16,
                       ef_construction: int = 200, n_items: int | None = None) -> dict:
    """Estimate a build of ``items``: encode a sample to measure the rate, size the files from the formats.
    ``n_items``: the input's size when ``items`` is only its first part (a sharded build's scan)."""
    sample_items = [it for it in items[:sample] if it.get("caption") is not None]
    rate = None
    if sample_items:
        t0 = time.perf_counter()
        encoder.encode_images([it["image"] for it in sample_items], on_error="skip")
        encoder.encode_texts([it["caption"] for it in sample_items])
        rate = len(sample_items) / max(time.perf_counter() - t0, 1e-9)
    cap = float(np.mean([len((it.get("caption") or "").encode()) for it in items[:1000]])) if items else 0.0
    src = float(np.mean([len(it["source"].encode()) for it in items[:1000]])) if items else 0.0
    n = len(items) if n_items is None else n_items
    return estimate_build(n, int(encoder.dim), key_dim=getattr(encoder, "key_dim", None), dtype=dtype,
                          M=M, ef_construction=ef_construction, caption_bytes=cap, source_bytes=src,
                          encode_items_per_s=rate)


def plan_text(rows: int, shards: int, **kwargs: Any) -> str:
    """``build-memory --estimate-only --rows N --shards S``: the plan for a memory of ``rows`` pairs
    (:func:`.plan.plan_for`, ``kwargs`` as there), as printed."""
    return format_plan(plan_for(rows, shards, **kwargs))


def _metadata_items(pairs: str | None, n: int, split: str | None, template: str | None,
                    allow_outside_paths: bool = False) -> list[dict] | None:
    if not pairs:
        return None
    items = read_pairs(pairs, split=split, caption_template=template, allow_outside=allow_outside_paths)
    if len(items) != n:
        raise MemoryFormatError(f"{pairs}: {len(items)} rows of metadata for {n} embedding rows")
    return items


def _embeddings_file(path: str) -> np.ndarray:
    """A precomputed embeddings ``.npy`` (memory-mapped): 2-D float, or an error naming the file."""
    a = load_npy(path)
    if a.ndim != 2 or a.dtype.kind != "f":
        raise ShapeError(f"{path}: expected a 2-D float array [n, D] of embeddings, found {a.dtype} {a.shape}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ShapeError(f"{path}: empty embeddings array {a.shape}")
    return a


def _array_inputs(image_embeddings: str | None, text_embeddings: str | None, image_keys: str | None,
                  model: str, encoder_name: str | None, encoder_fingerprint: str | None, pairs: str | None,
                  split: str | None, template: str | None, allow_outside_paths: bool = False):
    """Precomputed arrays (memory-mapped) + their metadata rows + the encoder identity they claim.

    Returns ``(image [n,D], text [n,D], keys [n,Dk] | None, items | None, name, fingerprint)``.
    """
    if not (image_embeddings and text_embeddings):
        raise MemoryFormatError("--image-embeddings and --text-embeddings go together")
    image, text = _embeddings_file(image_embeddings), _embeddings_file(text_embeddings)
    keys = _embeddings_file(image_keys) if image_keys else None
    if encoder_fingerprint is None:
        enc = load_encoder(model)
        encoder_name, encoder_fingerprint = enc.name, enc.fingerprint
    items = _metadata_items(pairs, image.shape[0], split, template, allow_outside_paths)
    return image, text, keys, items, encoder_name or "unknown", encoder_fingerprint


def _no_pairs(pairs: str, split: str | None, what: str) -> MemoryFormatError:
    """The error for a pairs source that yields no rows (with ``--split``: none of that split)."""
    return MemoryFormatError(f"{pairs}: no pairs to {what}" + (f" in split {split!r} (check --split)" if split else ""))


def _check_overlap(overlap: bool, arrays: Any, sharded: Any) -> None:
    """--overlap-captions changes how captions are encoded: refuse it where nothing is encoded here."""
    if overlap and arrays:
        raise MemoryFormatError("--overlap-captions: precomputed arrays are not encoded; drop the option")
    if overlap and sharded:
        raise MemoryFormatError("--overlap-captions: not available for sharded (Dask) builds; drop the option")


def build(*, out: str, pairs: str | None = None, model: str = "reco-mini", resume: bool = False,
          split: str | None = None, caption_template: str | None = None, dtype: str = "float32",
          chunk_size: int | None = None, batch_size: int = 64, M: int = 16, ef_construction: int = 200,
          threads: int | None = None, shards: int = 1, scheduler: str | None = None, workers: int = 2,
          image_embeddings: str | None = None, text_embeddings: str | None = None, image_keys: str | None = None,
          encoder_name: str | None = None, encoder_fingerprint: str | None = None, normalize: bool = False,
          estimate_only: bool = False, progress: bool = True, resume_hint: str | None = None,
          max_pixels: int | None = None, allow_outside_paths: bool = False, overlap_captions: bool = False,
          log: Callable[[str], Any] = _err) -> int:
    """``reco-ref build-memory``: from pairs (CSV / manifest / JSONL / caption folder) or from arrays."""
    _check_overlap(overlap_captions, image_embeddings or text_embeddings, shards > 1 or scheduler)
    check_out_dir(out, resume=resume)
    inside = memory_containing(Path(out).absolute().parent)
    if inside is not None:  # its files would sit among another memory's (a shard's place is the builder's to choose)
        raise MemoryFormatError(f"--out {out}: lies inside the memory {inside}; build a memory outside any other")
    common = dict(dtype=dtype, M=M, ef_construction=ef_construction, num_threads=threads, progress=progress,
                  resume_hint=resume_hint, log=log, resume=resume)
    sharded = shards > 1 or scheduler
    source = dict(split=split, caption_template=caption_template, allow_outside=allow_outside_paths)
    if image_embeddings or text_embeddings:
        image, text, keys, items, encoder_name, encoder_fingerprint = _array_inputs(
            image_embeddings, text_embeddings, image_keys, model, encoder_name, encoder_fingerprint,
            None if sharded else pairs, split, caption_template, allow_outside_paths)
        log(format_estimate(estimate_build(image.shape[0], image.shape[1], key_dim=None if keys is None else
                                           keys.shape[1], dtype=dtype, M=M, ef_construction=ef_construction)))
        if estimate_only:
            return 0
        if sharded:  # each task memory-maps the arrays and reads its own rows (and metadata range)
            from .dask_build import build_sharded_arrays

            mem = build_sharded_arrays(out, image_embeddings, text_embeddings, keys=image_keys, name=encoder_name,
                                       fingerprint=encoder_fingerprint, pairs=pairs, normalize=normalize,
                                       n_shards=shards, scheduler=scheduler, n_workers=workers, resume=resume,
                                       chunk_size=chunk_size or 65536, dtype=dtype, M=M,
                                       ef_construction=ef_construction, log=log, **source)
            log(f"{out}: {mem.info()['rows']} rows")
            return 0
        m = build_memory_from_arrays(out, image, text, keys=keys, items=items, name=encoder_name,
                                     fingerprint=encoder_fingerprint, normalize=normalize,
                                     chunk_size=chunk_size or 65536, **common)
        log(f"{out}: {m['counts']['rows']} rows")
        return 0
    if not pairs:
        raise MemoryFormatError("build-memory needs --pairs (or --image-embeddings and --text-embeddings)")
    if sharded:  # one pass that keeps the first 1,000 items only: the tasks read their own ranges
        n_items, any_caption, items = scan_pairs(pairs, **source)
    else:
        items = read_pairs(pairs, **source)
        n_items, any_caption = len(items), None
    if not n_items:
        raise _no_pairs(pairs, split, "build from")
    if not any_caption:  # a scan that found a caption has nothing to refuse (its first items may all be blank)
        check_captions(items, pairs, n=n_items)
    encoder = load_encoder(model, max_pixels=max_pixels)
    est = estimate_for_items(items, encoder, dtype=dtype, M=M, ef_construction=ef_construction, n_items=n_items)
    log(format_estimate(est))
    if estimate_only:
        return 0
    t0 = time.perf_counter()
    if sharded:
        from .dask_build import build_sharded_pairs

        mem = build_sharded_pairs(out, pairs, model, n_items=n_items, n_shards=shards, scheduler=scheduler,
                                  n_workers=workers, resume=resume, chunk_size=chunk_size or 1024,
                                  batch_size=batch_size, dtype=dtype, M=M, ef_construction=ef_construction, log=log,
                                  **source)
        info = mem.info()
    else:
        m = build_memory(out, items, encoder, chunk_size=chunk_size or 1024, batch_size=batch_size,
                         overlap_captions=overlap_captions, **common)
        info = {"rows": m["counts"]["rows"], "failed": m["counts"]["failed"]}
    log(f"{out}: {info['rows']} rows, {info['failed']} failed (see failures.jsonl) in "
        f"{time.perf_counter() - t0:.1f}s")
    if info["rows"] == 0 and info["failed"]:  # issue 20: exit 0 here let a script go on to a query that must fail
        raise MemoryFormatError(f"{out}: every item failed to encode ({info['failed']} listed in {out}/failures.jsonl)"
                                "; the memory was written but holds 0 rows, so nothing can search it")
    return 0


def add(*, memory: str, pairs: str | None = None, model: str = "reco-mini", resume: bool = False,
        split: str | None = None, caption_template: str | None = None, chunk_size: int | None = None,
        batch_size: int = 64, threads: int | None = None, image_embeddings: str | None = None,
        text_embeddings: str | None = None, image_keys: str | None = None, encoder_name: str | None = None,
        encoder_fingerprint: str | None = None, normalize: bool = False, progress: bool = True,
        resume_hint: str | None = None, max_pixels: int | None = None, allow_outside_paths: bool = False,
        allow_duplicates: bool = False, overlap_captions: bool = False, log: Callable[[str], Any] = _err) -> int:
    """``reco-ref memory-add``: append pairs (or arrays) to an existing memory."""
    _check_overlap(overlap_captions, image_embeddings or text_embeddings, False)
    if image_embeddings or text_embeddings:
        image, text, keys, items, encoder_name, encoder_fingerprint = _array_inputs(
            image_embeddings, text_embeddings, image_keys, model, encoder_name, encoder_fingerprint, pairs, split,
            caption_template, allow_outside_paths)
        m = add_arrays_to_memory(memory, image, text, keys=keys, items=items, name=encoder_name,
                                 fingerprint=encoder_fingerprint, normalize=normalize, resume=resume,
                                 chunk_size=chunk_size or 65536, num_threads=threads, progress=progress, log=log,
                                 allow_duplicates=allow_duplicates)
    else:
        if not pairs:
            raise MemoryFormatError("memory-add needs --pairs (or --image-embeddings and --text-embeddings)")
        items = read_pairs(pairs, split=split, caption_template=caption_template, allow_outside=allow_outside_paths)
        if not items:  # an add of nothing (a mistyped --split) exited 0 as if it had added the file's pairs
            raise _no_pairs(pairs, split, "add")
        check_captions(items, pairs)
        m = add_to_memory(memory, items, load_encoder(model, max_pixels=max_pixels), resume=resume,
                          chunk_size=chunk_size or 1024, batch_size=batch_size, num_threads=threads, progress=progress,
                          resume_hint=resume_hint, log=log, allow_duplicates=allow_duplicates,
                          overlap_captions=overlap_captions)
    log(f"{memory}: now {m['counts']['rows']} rows ({m['counts']['failed']} failed items in total)")
    return 0


def info(*, memory: str, verify: str = "sha256", scheduler: str | None = None) -> dict:
    """``reco-ref memory-info``: validate and summarise a memory (with ``scheduler``: on that cluster's workers)."""
    v: bool | str = {"sha256": True, "size": "size", "none": False}[verify]
    with opened_memory(memory, scheduler, verify=v, allow_fingerprint_mismatch=True) as mem:
        return mem.info()


def search(*, memory: str, text: list[str] | None = None, image: list[str] | None = None, modality: str | None = None,
           k: int = 5, exact: bool = False, ef: int | None = None, model: str = "reco-mini",
           allow_fingerprint_mismatch: bool = False, max_pixels: int | None = None,
           verify: str = "size", scheduler: str | None = None) -> list[list[dict]]:
    """``reco-ref memory-search``: embed text or image queries with ``model`` and list the neighbours.

    With ``scheduler`` (a Dask scheduler address) the memory is searched on that cluster's workers; the
    queries are encoded here and the answer is the same.
    """
    if text and image:
        raise SearchError("memory-search takes --text or --image queries, not both")
    for path in image or ():  # before any encoder reads it: a named pipe blocks the read, a device never ends it
        problem = file_problem(path)
        if problem:
            raise SearchError(f"--image {path}: {problem}")
    enc = load_encoder(model, max_pixels=max_pixels)
    with opened_memory(memory, scheduler, encoder=enc, verify={"sha256": True}.get(verify, verify),
                       allow_fingerprint_mismatch=allow_fingerprint_mismatch) as mem:
        return _search_open(mem, memory, enc, text, image, modality, k, exact, ef)


def _search_open(mem: Any, memory: str, enc: Any, text: list[str] | None, image: list[str] | None,
                 modality: str | None, k: int, exact: bool, ef: int | None) -> list[list[dict]]:
    if text:
        if modality == "image" and mem.key_dim:
            raise SearchError(
                f"{memory} indexes images by the encoder's image search keys (key_dim {mem.key_dim}), which text "
                "queries cannot be compared with; search the text index (--modality text, the default for --text)")
        if any(not t.strip() for t in text):
            raise SearchError("--text: empty or whitespace-only query")
        q = np.asarray(enc.encode_texts(list(text)), np.float32)
        modality = modality or "text"
    elif image:
        if (modality or "image") == "image" and mem.key_dim:
            q = np.asarray(enc.encode_image_keys(list(image)), np.float32)
        else:
            q = np.asarray(enc.encode_images(list(image)), np.float32)
        modality = modality or "image"
    else:
        raise MemoryFormatError("memory-search needs --text or --image queries")
    rows, scores, valid = mem.search(q, modality=modality, k=k, exact=exact, ef=ef)
    metas = iter(mem.metadata(rows[valid]))  # one look-up for every query (one round trip when served)
    return [[dict(next(metas) or {}, score=float(sc)) for sc in s[v]] for s, v in zip(scores, valid)]


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str)


def resume_hint_from_argv(argv: list[str]) -> str:
    """The command line to resume this run: the same arguments plus ``--resume``, quoted for a POSIX shell
    (a path with a space stays one argument when the line is pasted back)."""
    import shlex

    args = [a for a in argv if a != "--resume"]
    return shlex.join(["reco-ref", *args, "--resume"])


__all__ = ["build", "add", "info", "search", "estimate_for_items", "resume_hint_from_argv", "dumps"]
