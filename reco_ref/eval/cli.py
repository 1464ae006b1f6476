"""``reco-ref demo`` — parsing only; the work is :func:`reco_ref.eval.demo.run_demo`."""

from __future__ import annotations

import argparse


def _run_demo(a: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(out_dir=a.out, data=a.data, k=a.k, backend=a.backend, seed=a.seed, quiet=a.quiet, limit=a.limit,
             memory_limit=a.memory_limit, encoder=a.model, threads=a.threads)
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="encode → memory → search → fuse → evaluate on shipped sample data (offline, seconds)",
        description="Run the whole pipeline step by step on the shipped OpenClipart sample (weights/demo) or on a "
                    "dataset folder with manifest.csv (--data), print each step, write results.json.")
    p.add_argument("--out", help="folder for memory/, results.json, neighbours.png (default: a new temp folder)")
    p.add_argument("--data", help="dataset folder with manifest.csv (file,label,class_name,split), e.g. "
                                  "../shared/data/flowers102: train split = memory, test split = queries")
    p.add_argument("--limit", type=_positive, default=100, help="--data: query images from the test split "
                                                                 "(class-balanced; default 100)")
    p.add_argument("--memory-limit", type=_positive, default=None,
                   help="--data: memory rows from the train split (class-balanced; default all)")
    p.add_argument("-k", type=_positive, default=10, help="neighbours per query (default 10)")
    p.add_argument("--backend", default="numpy", choices=("numpy", "numba", "cuda"), help="fusion backend")
    p.add_argument("--model", default="reco-mini", help="encoder name or folder holding encoder.json")
    p.add_argument("--seed", type=int, default=0, help="seed of the fusion init and the --data subsets")
    p.add_argument("--threads", type=_positive, default=None, help="ONNX Runtime / decode threads (default all)")
    p.add_argument("--quiet", action="store_true", help="print nothing (results.json is still written)")
    p.set_defaults(func=_run_demo)
