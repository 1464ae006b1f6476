"""``reco-ref demo``, ``reco-ref eval``, ``reco-ref query`` — parsing only; the work is in :mod:`reco_ref.eval`."""

from __future__ import annotations

import argparse
import json
import sys

from ..checks import float_option, int_option
from ..checks import positive_int as _positive
from ..options import (ONNX_NOT_ATTACHED, add_backend, add_cache_dir, add_k, add_memory, add_scheduler,
                       add_threads, add_weights)
from ..paths import add_overwrite_option, check_output_dir, check_output_files

#: the files ``demo`` and ``ablate`` write at the top of their output folder (checked before any work)
DEMO_FILES = ("results.json", "neighbours.png", "comparison.png")
ABLATE_FILES = ("ablations.json", "ablations.md")


_nonnegative_float = float_option(0.0)  # --alpha
_cosine = float_option(-1.0, 1.0, lo_open=True)  # --dup-threshold: a cosine in (-1, 1]
#: the fusion backends these verbs offer: every registered one that runs without an attached graph
_BACKEND_EXCLUDE = {"onnx": ONNX_NOT_ATTACHED}
_THREADS_HELP = "ONNX Runtime / decode threads of the encoders (default all)"


# ---------------------------------------------------------------------------------------------- demo
def _run_demo(a: argparse.Namespace) -> int:
    from .demo import run_demo

    if a.out is not None:  # the default is a new temporary folder
        check_output_dir(a.out, DEMO_FILES, overwrite=a.overwrite)
    run_demo(out_dir=a.out, data=a.data, k=a.k, backend=a.backend, seed=a.seed, quiet=a.quiet, limit=a.limit,
             memory_limit=a.memory_limit, encoder=a.model, threads=a.threads, fusion=a.fusion,
             compare=not a.no_compare)
    return 0


# ---------------------------------------------------------------------------------------------- eval
def _eval_command(a: argparse.Namespace) -> str:
    """The command line that reproduces this evaluation (options at their defaults left out; paths as given)."""
    import shlex

    parts = ["reco-ref", "eval", "--memory", a.memory, "--dataset", a.dataset, "--split", a.split]
    for opt, value, default in (("--weights", a.fusion, None), ("--mode", a.mode, "both"), ("--k", a.k, 10),
                                ("--alpha", a.alpha, 1.0), ("--search", a.search, "uni"), ("--fuse", a.fuse, "cross"),
                                ("--dup-threshold", a.dup_threshold, None), ("--templates", a.templates, None),
                                ("--model", a.model, "reco-mini")):
        if value != default:
            parts += [opt, str(value)]
    if a.exact:
        parts.append("--exact")
    return " ".join(shlex.quote(str(x)) for x in parts)


def _run_eval(a: argparse.Namespace) -> int:
    from ..memory import scheduler_client
    from .data import cache_dir_option, default_cache_dir
    from .evaluate import evaluate_dataset
    from .report import markdown_table, method_rows, write_report

    say = (lambda s: None) if a.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    if (a.dataset is None) == (a.pairs is None):
        from ..errors import RecoError

        raise RecoError("give exactly one of --dataset MANIFEST.csv (zero-shot classification) or --pairs PAIRS.csv "
                        "(image-text retrieval)")
    check_output_files([p for p in (a.json, a.markdown, a.png) if p], overwrite=a.overwrite,
                       what="--json/--markdown/--png")
    cache_dir = cache_dir_option(a.cache_dir, default_cache_dir)
    if a.cache_dir is not None and cache_dir is not None:  # the cache folder is written too: never inside a memory
        check_output_dir(cache_dir, (), what="--cache-dir")
    if a.pairs is not None:
        return _run_retrieval(a, say, cache_dir)
    with scheduler_client(a.scheduler) as client:  # None without --scheduler: the memory opens here
        result = evaluate_dataset(a.memory, a.dataset, a.split, fusion=a.fusion, mode=a.mode, k=a.k, alpha=a.alpha,
                                  templates=a.templates, model=a.model, backend=a.backend,
                                  cache_dir=cache_dir, search=a.search,
                                  fuse=a.fuse, dup_threshold=a.dup_threshold, exact=a.exact, batch_size=a.batch_size,
                                  threads=a.threads, progress=not (a.quiet or a.no_progress), say=say, client=client)
    result["command"] = _eval_command(a)
    write_report(result, json_path=a.json, markdown_path=a.markdown, png_path=a.png)
    if not a.quiet:
        print(markdown_table(["method", "top1", "top5", "mean_per_class_recall"], method_rows(result)), end="")
        print(f"k-NN vote labels: {result['knn_vote_labels']}")
    return 0


def _run_retrieval(a: argparse.Namespace, say, cache_dir) -> int:
    from ..memory import scheduler_client
    from .evaluate import evaluate_pairs
    from .report import RETRIEVAL_HEADER, markdown_table, retrieval_rows, write_retrieval_report

    split = None if a.split in ("", "all") else a.split
    with scheduler_client(a.scheduler) as client:
        r = evaluate_pairs(a.memory, a.pairs, split, fusion=a.fusion, k=a.k, alpha=a.alpha, model=a.model,
                           backend=a.backend, cache_dir=cache_dir,
                           search=a.search, fuse=a.fuse, exact=a.exact, batch_size=a.batch_size, threads=a.threads,
                           progress=not (a.quiet or a.no_progress), say=say, client=client)
    write_retrieval_report(r, json_path=a.json, markdown_path=a.markdown, png_path=a.png)
    if not a.quiet:
        print(markdown_table(RETRIEVAL_HEADER, retrieval_rows(r)), end="")
    return 0


# --------------------------------------------------------------------------------------------- query
def _run_query(a: argparse.Namespace) -> int:
    from ..io import atomic_write_json
    from ..memory import scheduler_client
    from ..paths import printable
    from .evaluate import query, read_class_names

    if a.classes and a.class_names:
        from ..errors import RecoError

        raise RecoError("give --classes or --class-names, not both")
    if a.json and a.json != "-":
        check_output_files([a.json], overwrite=a.overwrite, what="--json")
    names = read_class_names(a.classes or a.class_names) if (a.classes or a.class_names) else None
    with scheduler_client(a.scheduler) as client:
        r = query(a.memory, image=a.image, text=a.text, fusion=a.fusion, class_names=names, k=a.k, top=a.top,
                  templates=a.templates, model=a.model, backend=a.backend, threads=a.threads, profile=a.profile,
                  classes_manifest=a.classes, say=lambda s: print(s, file=sys.stderr, flush=True),
                  class_text=a.class_text, client=client)
    if a.json == "-":
        print(json.dumps(r, indent=1, ensure_ascii=False))
        return 0
    if a.json:
        atomic_write_json(a.json, r)
    # captions and sources come from the memory, class names from a file: printed escaped (paths.printable)
    print(f"{r['modality']} query {r['query']!r}: {len(r['neighbours'])} neighbours in {printable(r['memory'])} "
          f"(fusion {printable(r['fusion'])})")
    for nb in r["neighbours"]:
        print(f"  {nb['score']:.3f}  row {nb['row']:<7d} {str(nb['caption'])[:70]!r}  {printable(nb['source'])}")
    if "frozen_top" in r:
        refined = r.get("reco_top") or [None] * len(r["frozen_top"])
        print(f"  {'frozen top classes':36s} {'refined (RECO) top classes' if r.get('reco_top') else ''}")
        for f, g in zip(r["frozen_top"], refined):
            right = f"{g['score']:.3f} {printable(g['class'][:29])}" if g else ""
            print(f"  {f['score']:.3f} {printable(f['class'][:29]):30s} {right}")
    if "profile" in r:
        from .latency import format_profile

        print(format_profile(r["profile"]))
    return 0


def register(subparsers) -> None:
    """The verbs of this room, in the order ``reco-ref --help`` lists them: demo, eval, query, ablate."""
    _register_demo(subparsers)
    _register_eval(subparsers)
    _register_query(subparsers)
    register_ablate(subparsers)


def _register_demo(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="encode → memory → search → fuse → evaluate on shipped sample data (offline, about half a "
                "minute)",
        description="Run the whole pipeline step by step on the shipped OpenClipart sample (weights/demo) or on a "
                    "dataset folder with manifest.csv (--data), print each step, write results.json.")
    p.add_argument("--out", help="folder for memory/, results.json, neighbours.png (default: a new temp folder)")
    p.add_argument("--data", help="dataset folder with manifest.csv (file,label,class_name,split), e.g. "
                                  "../shared/data/flowers102: train split = memory, test split = queries")
    p.add_argument("--limit", type=_positive, default=100, help="--data: query images from the test split "
                                                                 "(class-balanced; default 100)")
    p.add_argument("--memory-limit", type=_positive, default=None,
                   help="--data: memory rows from the train split (class-balanced; default all)")
    add_k(p, default=10, help="neighbours per query (default 10)")
    add_backend(p, exclude=_BACKEND_EXCLUDE)
    p.add_argument("--model", default="reco-mini", help="encoder name or folder holding encoder.json")
    p.add_argument("--seed", type=int_option(0, 2**32 - 1), default=0,
                   help="seed of the fusion init and the --data subsets, 0 … 2³²−1")
    add_threads(p, help=_THREADS_HELP)
    add_weights(p, help="trained RECO weights .npz shown beside the untrained layers (default: the shipped weights "
                        "when present; 'none': untrained only)")
    p.add_argument("--no-compare", action="store_true",
                   help="skip step 6 (the flag memory weights/demo-entities and the frozen / RECO / surrogate / "
                        "1-NN / k-NN comparison on flags and clip-art, comparison.png)")
    p.add_argument("--quiet", action="store_true", help="print nothing (results.json is still written)")
    add_overwrite_option(p, what="OUT's results.json and pictures")
    p.set_defaults(func=_run_demo)


def _register_eval(subparsers) -> None:
    e = subparsers.add_parser(
        "eval", help="zero-shot classification of a dataset split with a memory: frozen / RECO / k-NN vote / surrogate",
        description="Zero-shot classification of one split of a dataset manifest (file,label,class_name,split) with "
                    "prompt templates, against a memory built by `reco-ref build-memory`; reports side by side the "
                    "frozen encoder, RECO (trained fusion weights), the untrained surrogate normalize(v + α·mean of "
                    "the neighbours' fed embeddings) and the k-NN label vote over the memory: top1, top5, "
                    "mean_per_class_recall. Images that are memory rows themselves are excluded from their own "
                    "retrieval.")
    add_memory(e, help="memory directory (reco-ref build-memory)")
    add_scheduler(e, what="search and read it there (same results)")
    e.add_argument("--dataset", help="dataset manifest CSV (or its folder): zero-shot classification")
    e.add_argument("--pairs", help="instead of --dataset: a pairs CSV (image,caption[,split]) for image↔text "
                                   "retrieval, Recall@1/5/10 both directions")
    e.add_argument("--split", default="test", help="split to evaluate (default test; with --pairs 'all' = every row)")
    add_weights(e, help="RECO weights .npz (default: the shipped weights of --model; 'none': no RECO row, only the "
                        "frozen encoder and the training-free references)")
    e.add_argument("--mode", default="both", choices=("none", "image", "text", "both"),
                   help="sides RECO and the surrogate enhance (default both; by_mode in the JSON has all four)")
    add_k(e, default=10, help="neighbours per query, every method (default 10)")
    e.add_argument("--alpha", type=_nonnegative_float, default=1.0, help="surrogate weight α (default 1.0)")
    e.add_argument("--search", default="uni", choices=("uni", "cross"), help="RECO/surrogate search (default uni)")
    e.add_argument("--fuse", default="cross", choices=("uni", "cross"), help="RECO/surrogate fusion (default cross)")
    e.add_argument("--dup-threshold", type=_cosine, default=None,
                   help="also drop memory rows with cosine >= this to the query (default off)")
    e.add_argument("--templates", default=None,
                   help="prompt template set: auto (by dataset name; default), flowers, birds, generic, single, or a "
                        "file with one template per line ({} = class name)")
    e.add_argument("--json", help="write the result JSON here")
    e.add_argument("--markdown", help="write a Markdown table here")
    e.add_argument("--png", help="write a PNG bar chart here")
    add_backend(e, exclude=_BACKEND_EXCLUDE)
    add_cache_dir(e, alias=True, help="embedding cache folder (default $RECO_REF_CACHE; unset = none; 'off' = none; "
                                      "old spelling --cache)")
    e.add_argument("--model", default="reco-mini", help="encoder name or folder holding encoder.json")
    e.add_argument("--exact", action="store_true", help="brute-force search instead of HNSW")
    e.add_argument("--batch-size", type=_positive, default=1024, help="queries per retrieval+fusion batch")
    add_threads(e, help=_THREADS_HELP)
    e.add_argument("--no-progress", action="store_true", help="no progress bars")
    e.add_argument("--quiet", action="store_true", help="print nothing (files are still written)")
    add_overwrite_option(e, what="the --json/--markdown/--png files")
    e.set_defaults(func=_run_eval)


def _register_query(subparsers) -> None:
    q = subparsers.add_parser(
        "query", help="one image or text against a memory: neighbours, frozen and refined top classes",
        description="Search a memory with one image file (image→image) or --text (text→text); print the "
                    "neighbours with captions and scores and, with --classes/--class-names, the frozen and the "
                    "RECO-refined top classes.")
    q.add_argument("image", nargs="?", help="query image file (or use --text)")
    q.add_argument("--text", help="query text instead of an image")
    add_memory(q)
    add_scheduler(q, what="search and read it there (same results)")
    add_weights(q, help="RECO weights .npz (default: the shipped weights of --model; 'none': no refining)")
    q.add_argument("--classes", help="dataset manifest whose class names to rank")
    q.add_argument("--class-names", help="text file, one class name per line")
    q.add_argument("--templates", default=None, help="template set or file for the class embeddings (default: the set "
                   "eval uses for the --classes dataset, else generic)")
    q.add_argument("--class-text", metavar="FILE",
                   help="precomputed class text (reco-ref class-text): its classes are ranked, and --weights may hold "
                        "φ_I alone (reco-ref export-image-weights); refused when made for other weights, encoder, "
                        "memory or k")
    add_k(q, default=None, help="neighbours (default 10, or the --class-text file's)")
    q.add_argument("--top", type=_positive, default=5, help="classes listed (default 5)")
    q.add_argument("--json", help="write the result JSON here ('-' : JSON to stdout only)")
    add_backend(q, exclude=_BACKEND_EXCLUDE)
    q.add_argument("--model", default="reco-mini", help="encoder name or folder holding encoder.json")
    add_threads(q, help=_THREADS_HELP)
    q.add_argument("--profile", action="store_true",
                   help="time the photo's trip step by step (decode, preprocess, image graph, search, fusion, scoring) at "
                        "batch 1 and per image at batch 64")
    add_overwrite_option(q, what="the --json file")
    q.set_defaults(func=_run_query)


def _run_ablate(a: argparse.Namespace) -> int:
    from .ablate import ablate_command

    # the arms' run folders (OUT/arm-*) resume from their checkpoints; the tables at the top are replaced only
    # when told to
    check_output_dir(a.out, ABLATE_FILES, overwrite=a.overwrite)
    ablate_command(a)
    return 0


def register_ablate(subparsers) -> None:
    """``reco-ref ablate``: trains each arm with the train room's recipe/data options, evaluates it here."""
    from ..train.cli import add_data_args, add_recipe_args

    p = subparsers.add_parser(
        "ablate", help="the paper's ablations as one table: search × fuse, k, the MLP control, 1 %% memory",
        description="Train each ablation arm on the training memories, evaluate every arm zero-shot on a dataset's "
                    "test split against its train memory, write OUT/ablations.json and OUT/ablations.md.")
    add_data_args(p)
    add_recipe_args(p)
    p.add_argument("--eval-memory", required=True, help="memory evaluated against (the evaluated dataset's train split)")
    p.add_argument("--eval-dataset", required=True, help="dataset manifest of the evaluated dataset")
    p.add_argument("--eval-split", default="test", help="split whose images are the queries (default test)")
    p.add_argument("--eval-embeddings", help="precomputed image embeddings .npy of the eval split rows "
                                             "(default: encode the images)")
    p.add_argument("--eval-keys", help="precomputed image search keys .npy of the eval split rows")
    p.add_argument("--small-memory", help="1 %% memory the '1 %% at training' arm retrieves from while training")
    p.add_argument("--ks", default="1,5,10,20,50", help="k values evaluated (default 1,5,10,20,50)")
    p.add_argument("--arms", default="all", help="comma list of arms: search_fuse,k,mlp,small_memory (default all)")
    p.add_argument("--out", required=True, help="output folder")
    add_overwrite_option(p, what="OUT/ablations.json and OUT/ablations.md")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_ablate)
