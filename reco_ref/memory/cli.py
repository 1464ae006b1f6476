"""``reco-ref build-memory | memory-add | memory-info | memory-search`` — parsing only; see :mod:`.commands`."""

from __future__ import annotations

import argparse
import sys

from ..checks import float_option, int_option
from ..errors import RecoError
from ..options import add_index_threads, add_k, add_memory_positional, add_resume, add_scheduler, memory_dir
from .limits import LIMITS


def _int(name: str):
    """argparse type for the numeric option ``name``: its range from :data:`.limits.LIMITS`."""
    return int_option(*LIMITS[name])


def _build_args(p: argparse.ArgumentParser, *, add: bool = False) -> None:
    p.add_argument("--pairs", help="pairs CSV (image,caption), dataset manifest (file,label,class_name,split), "
                                   ".jsonl, or a folder of images with sidecar .txt captions")
    p.add_argument("--model", default="reco-mini", help="encoder name, folder, or module:factory (default reco-mini)")
    add_resume(p)
    p.add_argument("--split", help="keep only rows of this split")
    p.add_argument("--caption-template", help='captions for a dataset manifest, e.g. "a photo of a {class_name}."')
    p.add_argument("--chunk-size", type=_int("chunk_size"), help="items per atomic chunk (default 1024; 65536 for arrays)")
    p.add_argument("--batch-size", type=_int("batch_size"), default=64, help="encoder batch size")
    add_index_threads(p, type=_int("threads"))
    p.add_argument("--image-embeddings", help="precomputed image embeddings .npy [n,D] (instead of encoding)")
    p.add_argument("--text-embeddings", help="precomputed text embeddings .npy [n,D]")
    p.add_argument("--image-keys", help="precomputed image search keys .npy [n,Dk] (optional)")
    p.add_argument("--encoder-name", help="name of the encoder that produced the arrays")
    p.add_argument("--encoder-fingerprint", help="fingerprint of that encoder (default: --model's)")
    p.add_argument("--normalize", action="store_true", help="L2-normalise precomputed arrays")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--max-pixels", type=_int("max_pixels"),
                   help="largest accepted image (width*height); default from the encoder's encoder.json")
    p.add_argument("--overlap-captions", action="store_true",
                   help="encode each chunk's captions beside its images (same bytes; pays only with idle cores)")
    p.add_argument("--allow-outside-paths", action="store_true",
                   help="accept pairs whose image path is absolute or leaves the pairs file's folder (../)")
    if add:
        p.add_argument("--allow-duplicates", action="store_true",
                       help="add pairs even if the memory already holds rows with the same source and caption")
    if not add:
        p.add_argument("--out", help="memory directory to create (required, except for a plan: --rows)")
        p.add_argument("--dtype", default="float32", choices=("float32", "float16"), help="embedding storage")
        p.add_argument("--M", type=_int("M"), default=16, help="HNSW M (default 16)")
        p.add_argument("--ef-construction", type=_int("ef_construction"), default=200, help="HNSW ef_construction (default 200)")
        p.add_argument("--shards", type=_int("shards"), default=1,
                       help="build N shards on Dask, each task reading its own rows of --pairs or of the arrays "
                            "(default 1: no Dask)")
        p.add_argument("--scheduler", help="Dask scheduler address (default: a LocalCluster)")
        p.add_argument("--workers", type=_int("workers"), default=2, help="LocalCluster workers (default 2)")
        p.add_argument("--estimate-only", action="store_true", help="print the disk/RAM/time estimate and stop")
        # the plan for a memory of N pairs (reco_ref/memory/plan.py, docs/scale.md): no input is read
        p.add_argument("--rows", type=_int("rows"), help="with --estimate-only: plan a memory of N pairs in --shards "
                       "shards from measured per-row figures (docs/scale.md); no --pairs or arrays needed")
        p.add_argument("--dim", type=_int("dim"), help="plan: embedding dim (default: the measured 768)")
        p.add_argument("--worker-ram", type=float_option(0, lo_open=True), default=64.0,
                       help="plan: RAM of one worker machine in GiB (default 64)")
        p.add_argument("--encode-rate", type=float_option(0, lo_open=True),
                       help="plan: encoder pairs/s of one worker (default: reco-mini on the measuring CPU)")


def _common(a: argparse.Namespace) -> dict:
    from .commands import resume_hint_from_argv

    return dict(pairs=a.pairs, model=a.model, resume=a.resume, split=a.split, caption_template=a.caption_template,
                chunk_size=a.chunk_size, batch_size=a.batch_size, threads=a.threads,
                image_embeddings=a.image_embeddings, text_embeddings=a.text_embeddings, image_keys=a.image_keys,
                encoder_name=a.encoder_name, encoder_fingerprint=a.encoder_fingerprint, normalize=a.normalize,
                progress=not a.no_progress, resume_hint=resume_hint_from_argv(sys.argv[1:]), max_pixels=a.max_pixels,
                allow_outside_paths=a.allow_outside_paths, overlap_captions=a.overlap_captions)


def _run_plan(a: argparse.Namespace) -> int:
    from . import commands

    if not a.estimate_only:
        raise RecoError("--rows N plans a memory without building it: add --estimate-only")
    given = [o for o, v in (("--pairs", a.pairs), ("--image-embeddings", a.image_embeddings),
                            ("--text-embeddings", a.text_embeddings), ("--out", a.out)) if v]
    if given:
        raise RecoError(f"--rows N plans a memory of N pairs and reads no input: drop {', '.join(given)}")
    print(commands.plan_text(a.rows, a.shards, dim=a.dim, dtype=a.dtype, M=a.M, worker_ram_gib=a.worker_ram,
                             threads_per_worker=a.threads, encode_pairs_per_s=a.encode_rate))
    return 0


def _run_build(a: argparse.Namespace) -> int:
    from . import commands

    if a.rows is not None:
        return _run_plan(a)
    if not a.out:
        raise RecoError("build-memory: --out DIR is required (only a plan, --estimate-only --rows N, goes without)")

    return commands.build(out=a.out, dtype=a.dtype, M=a.M, ef_construction=a.ef_construction, shards=a.shards,
                          scheduler=a.scheduler, workers=a.workers, estimate_only=a.estimate_only, **_common(a))


def _run_add(a: argparse.Namespace) -> int:
    from . import commands

    return commands.add(memory=memory_dir(a), allow_duplicates=a.allow_duplicates, **_common(a))


def _run_info(a: argparse.Namespace) -> int:
    from . import commands

    print(commands.dumps(commands.info(memory=memory_dir(a), verify=a.verify, scheduler=a.scheduler)))
    return 0


def _run_search(a: argparse.Namespace) -> int:
    from . import commands

    res = commands.search(memory=memory_dir(a), text=a.text, image=a.image, modality=a.modality, k=a.k, exact=a.exact,
                          ef=a.ef, model=a.model, allow_fingerprint_mismatch=a.allow_fingerprint_mismatch,
                          max_pixels=a.max_pixels, verify=a.verify, scheduler=a.scheduler)
    print(commands.dumps(res))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build-memory", help="build an image-text memory (resumable; --shards N on Dask)")
    _build_args(p)
    p.set_defaults(func=_run_build)

    p = sub.add_parser("memory-add", help="append pairs to an existing memory (resumable, atomic)")
    add_memory_positional(p)
    _build_args(p, add=True)
    p.set_defaults(func=_run_add)

    p = sub.add_parser("memory-info", help="validate a memory and print its summary (JSON)")
    add_memory_positional(p)
    p.add_argument("--verify", default="sha256", choices=("sha256", "size", "none"),
                   help="file check: full sha256 (default), sizes only, or existence only")
    add_scheduler(p, what="check and summarise it there")
    p.set_defaults(func=_run_info)

    p = sub.add_parser("memory-search", help="search a memory with text or image queries (JSON)")
    add_memory_positional(p)
    p.add_argument("--text", nargs="+", help="text queries")
    p.add_argument("--image", nargs="+", help="image files as queries")
    p.add_argument("--modality", choices=("image", "text"), help="index searched (default: the query's)")
    add_k(p, type=_int("k"), default=5, help="neighbours per query (default 5)")
    p.add_argument("--exact", action="store_true", help="brute force instead of HNSW")
    p.add_argument("--ef", type=_int("ef"), help="HNSW beam width")
    p.add_argument("--model", default="reco-mini", help="encoder (must match the memory's fingerprint)")
    p.add_argument("--allow-fingerprint-mismatch", action="store_true", help="search anyway (debugging)")
    p.add_argument("--max-pixels", type=_int("max_pixels"), help="largest accepted query image (width*height)")
    p.add_argument("--verify", default="size", choices=("sha256", "size"),
                   help="file check before searching: sizes + index structure (default; see docs/bad_inputs.md "
                        "for what it skips) or full sha256 of every file")
    add_scheduler(p)
    p.set_defaults(func=_run_search)
