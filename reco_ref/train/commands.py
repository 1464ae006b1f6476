"""What ``reco-ref train`` does, as plain functions (the CLI module only parses arguments)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ..checks import check_float, check_int, memory_rows
from ..datasets import read_split
from ..errors import RecoError
from ..template_fmt import check_templates
from ..memory import open_memory as open_any
from ..reco.refine import check_backend
from .checkpoint import run_lock
from .loop import TrainConfig, TrainResult, ValSet, class_text_embeddings, train
from .pairs import labels_of

#: seeds seed numpy's generators (any integer >= 0 would do); the range keeps them plain 32-bit values
SEED_MAX = 2**32 - 1

DEFAULT_TEMPLATES = ("a photo of a {}.",)


def class_names_of(manifest: str | Path) -> list[str]:
    """Class names indexed by label, from a dataset manifest (``file,label,class_name,split``; every split), checked
    by the one manifest reader (:func:`reco_ref.datasets.read_split`)."""
    return read_split(manifest).class_names


def _aligned(values: list | None, n: int, flag: str, of: str) -> list:
    if not values:
        return [None] * n
    if len(values) != n:
        raise RecoError(f"{flag}: given {len(values)} time(s), expected once per {of} ({n})")
    return list(values)


def open_memory(path: str, client: Any = None) -> Any:
    """Open a training, retrieval or validation memory of any kind; one of 0 rows is refused (nothing to train on or
    retrieve). ``client``: a ``distributed.Client`` (``--scheduler``): served by its workers."""
    mem = open_any(path, client=client, verify="size")
    memory_rows(mem)
    return mem


def check_config(cfg: TrainConfig, dim: int | None = None) -> TrainConfig:
    """``cfg.check()`` plus what it does not check: the seed, and (given the embedding width ``dim``) that the
    fusion layer's heads divide it. One :class:`RecoError` naming the option.

    ``--seed -1`` reached numpy ("expected non-negative integer") and ``--heads 7`` on 32-d embeddings the fusion
    config ("heads=7 does not divide dim=32"), both as unexpected errors; ``--backend cuda`` without a device
    failed at the first step (:func:`check_backend`).
    """
    cfg.check()
    check_int("--seed", cfg.seed, 0, SEED_MAX, error=RecoError)
    for backend in {cfg.backend, cfg.loss_backend}:
        check_backend(backend)
    if dim is not None and cfg.model == "reco" and int(dim) % int(cfg.heads):
        divisors = [h for h in (1, 2, 4, 8, 12, 16) if int(dim) % h == 0]
        raise RecoError(f"--heads {cfg.heads} does not divide the memories' embedding dim {int(dim)} (each head gets "
                        f"dim / heads channels); choose a divisor such as {', '.join(map(str, divisors))}")
    return cfg


def sources_from_args(a: argparse.Namespace, client: Any = None) -> list[dict]:
    retr = _aligned(a.retrieval, len(a.memory), "--retrieval", "--memory")
    weights = _aligned(a.weight, len(a.memory), "--weight", "--memory")
    for w in weights:  # a share of batches: 0 or less collapsed the epoch to one step, NaN failed at save time
        if w is not None:
            check_float("--weight", w, 0.0, lo_open=True, error=RecoError)
    out = []
    for mem, r, w in zip(a.memory, retr, weights):
        pairs = open_memory(mem, client)
        retrieval = None if r in (None, "same") else open_memory(r, client)
        out.append({"pairs": pairs, "retrieval": retrieval, "name": Path(mem).name, "weight": w})
    return out


def val_sets_from_args(a: argparse.Namespace, encoder: Any = None, client: Any = None) -> list[ValSet]:
    if not a.val_memory:
        for flag in ("val_retrieval", "val_classes"):
            if getattr(a, flag):
                raise RecoError(f"--{flag.replace('_', '-')} needs --val-memory")
        return []
    n = len(a.val_memory)
    # plain '{}' / '{class_name}' only: train.loop fills them with str.format (a width '{:>900000000}' = 3.7 GB)
    templates = list(check_templates(a.template or list(DEFAULT_TEMPLATES), "--template"))
    retr = _aligned(a.val_retrieval, n, "--val-retrieval", "--val-memory")
    classes = _aligned(a.val_classes, n, "--val-classes", "--val-memory")
    if any(c is None for c in classes):
        raise RecoError("--val-classes: a dataset manifest naming the classes is required for each --val-memory")
    if any(r is None for r in retr):
        raise RecoError("--val-retrieval: the memory each --val-memory retrieves from is required (the training rows)")
    if encoder is None:
        from ..memory.producers import load_encoder

        encoder = load_encoder(a.model)
    out = []
    for mem, r, c in zip(a.val_memory, retr, classes):
        pairs = open_memory(mem, client)
        labels = labels_of(pairs)
        names = class_names_of(c)
        if labels.max() >= len(names):
            raise RecoError(f"{mem}: label {labels.max()} but {c} names only {len(names)} classes")
        out.append(ValSet(Path(mem).name, pairs, open_memory(r, client), labels,
                          class_text_embeddings(encoder, names, templates)))
    return out


def config_from_args(a: argparse.Namespace, **override) -> TrainConfig:
    """A :class:`TrainConfig` from the recipe options of ``train``/``ablate`` (see ``train.cli.add_recipe_args``)."""
    kw = dict(k=a.k, search=a.search, fuse=a.fuse, dup_threshold_image=a.dup_threshold_image,
              dup_threshold_text=a.dup_threshold_text, unique_captions=not a.allow_repeated_captions,
              exact_search=a.exact, batch_size=a.batch_size, epochs=a.epochs, steps_per_epoch=a.steps_per_epoch, lr=a.lr, min_lr=a.min_lr,
              warmup_steps=a.warmup_steps, weight_decay=a.weight_decay, heads=a.heads, seed=a.seed,
              backend=a.backend, checkpoint_every=a.checkpoint_every, select_on=a.select_on,
              init=a.init, alpha=a.alpha, relevance=a.relevance, rel_beta=a.rel_beta, rel_gamma=a.rel_gamma, rel_map=a.rel_map,
              train_groups=a.train_groups, irrelevant_fraction=a.irrelevant_fraction,
              hold_threshold=a.hold_threshold)
    kw.update(override)
    return TrainConfig(**kw)


def train_command(a: argparse.Namespace) -> TrainResult:
    """``reco-ref train``; with ``--scheduler`` every memory it names is served by that Dask cluster (same weights)."""
    from ..memory import scheduler_client

    with scheduler_client(getattr(a, "scheduler", None)) as client:
        return _train_command(a, client)


def _train_command(a: argparse.Namespace, client: Any) -> TrainResult:
    cfg: TrainConfig = check_config(config_from_args(a, model=a.control))
    sources = sources_from_args(a, client)
    check_config(cfg, dim=int(sources[0]["pairs"].dim))
    vals = val_sets_from_args(a, client=client)
    meta = {"command": "reco-ref " + " ".join(sys.argv[1:]),
            "trained_on": [{"memory": str(s["pairs"].root), "rows": len(s["pairs"]),
                            "retrieval": str(s["retrieval"].root) if s["retrieval"] is not None else "same"}
                           for s in sources],
            "validation": [{"memory": str(v.pairs.root), "retrieval": str(v.retrieval.root)} for v in vals]}
    with run_lock(a.out):  # one run per folder: a second one stops here, naming this run's pid
        if cfg.model == "reco":  # the disk a run takes, said before it starts
            from ..fusion.params import param_shapes

            D = int(sources[0]["pairs"].dim)
            shapes = param_shapes(D, cfg.mlp_ratio, cfg.heads if cfg.relevance else None)
            n = 2 * sum(int(np.prod(s)) for s in shapes.values())
            w = 4 * n  # bytes: float32, both modules

            def size(b: float) -> str:
                return f"{b / 1e6:.0f} MB" if b >= 1e6 else f"{b / 1e3:.0f} kB"

            # a relevance-only run checkpoints only what trains: β, γ per head per module, τ, and their moments
            ck = 3 * 4 * (4 * cfg.heads + 1) if cfg.train_groups == "relevance" else 3 * w
            print(f"this run writes about {size(2 * w + ck)} to {a.out}: best.npz and last.npz ({size(w)} each) and "
                  f"checkpoint.npz ({size(ck)}: the trained parameters and AdamW's two moments, for --resume; "
                  "delete it once the run is done)", flush=True)
        res = train(sources, a.out, cfg, val=vals, meta=meta, resume=a.resume, progress=not a.no_progress)
    best = res.best_record or {}
    print(f"trained {res.steps} steps; kept epoch {best.get('epoch', cfg.epochs)} "
          f"(validation top1 {best.get('top1', float('nan')):.4f}, loss {best.get('loss', float('nan')):.4f}) "
          f"-> {Path(a.out) / 'best.npz'}", file=sys.stderr)
    return res
