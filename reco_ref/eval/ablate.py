r"""The paper's ablations as one command (``reco-ref ablate``): one JSON + one Markdown table.

Arms (each trained with the same recipe on the same training memories, then evaluated zero-shot, mode ``both``,
on a dataset's test split against its train memory — the protocol of ``reco-ref eval``):

* ``search_fuse`` — search ∈ {uni, cross} × fuse ∈ {cross, uni}: four trainings, each evaluated with its own
  combination (the paper: uni-search + cross-fusion best; cross-search a little; uni-fusion none);
* ``k`` — the uni/cross weights evaluated at every k in ``--ks`` (1, 5, 10, 20, 50), beside the untrained
  surrogate and the k-NN vote at the same k;
* ``mlp`` — the equal-parameter-count MLP (:mod:`reco_ref.train.mlp`) trained on the same neighbours with the
  same loss;
* ``small_memory`` — trained retrieving from a 1 % memory (``--small-memory``), evaluated with the full one.

Every arm's run lives in ``OUT/arm-<name>/`` with its checkpoints, so re-running the same command resumes where it
stopped. Rows hold top-1 / top-5 / mean per-class recall of the arm, and the frozen encoder's top-1 for reference.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import RecoError
from ..io import atomic_write_json, atomic_write_text
from .metrics import classification_metrics
from .report import markdown_table

ARMS = ("search_fuse", "k", "mlp", "small_memory")
COMBOS = (("uni", "cross"), ("cross", "cross"), ("uni", "uni"), ("cross", "uni"))


def mlp_refine(w: dict, memory: Any, queries: np.ndarray, modality: str, *, search_queries=None, k: int = 10,
               search: str = "uni", fuse: str = "cross", batch_size: int = 1024) -> np.ndarray:
    """The MLP control's refined embeddings: same retrieval as :func:`reco_ref.reco.refine.refine`."""
    from ..train.mlp import mlp_forward
    from ..reco.refine import retrieve_for

    out = np.empty(queries.shape, np.float32)
    for lo in range(0, len(queries), batch_size):
        hi = min(len(queries), lo + batch_size)
        nb, ok, _ = retrieve_for(memory, queries[lo:hi], modality, k=k, search=search, fuse=fuse,
                                 search_queries=None if search_queries is None else search_queries[lo:hi])
        out[lo:hi] = mlp_forward(w[modality], np.ascontiguousarray(queries[lo:hi], np.float32), nb, ok)[0]
    return out


def _eval_reco(weights, ev: dict, k: int, search: str, fuse: str, backend: str) -> dict:
    from .zeroshot import evaluate_zero_shot

    r = evaluate_zero_shot(ev["memory"], ev["image"], ev["labels"], ev["class_emb"], ev["class_names"],
                           keys=ev["keys"], weights=weights, mode="both", k=k, search=search, fuse=fuse,
                           backend=backend)
    return {"reco": r["reco"], "frozen": r["frozen"], "surrogate": r["surrogate"], "knn_vote": r["knn_vote"]}


def _eval_mlp(w: dict, ev: dict, k: int) -> dict:
    sq = ev["keys"] if ev["keys"] is not None and ev["memory"].key_dim else None
    v = mlp_refine(w, ev["memory"], ev["image"], "image", search_queries=sq, k=k)
    t = mlp_refine(w, ev["memory"], ev["class_emb"], "text", k=k)
    C = ev["class_emb"].shape[0]
    return {"reco": classification_metrics(v.astype(np.float64) @ t.astype(np.float64).T, ev["labels"], C),
            "frozen": classification_metrics(ev["image"].astype(np.float64) @ ev["class_emb"].astype(np.float64).T,
                                             ev["labels"], C)}


def run_ablation(sources: Sequence[dict], val: Sequence[Any], ev: dict, out: str | Path, config, *,
                 small_memory: Any = None, ks: Sequence[int] = (1, 5, 10, 20, 50), arms: Sequence[str] = ARMS,
                 meta: dict | None = None, progress: bool = True, command: str | None = None,
                 note: Any = None) -> dict:
    """Train and evaluate every arm; write ``OUT/ablations.json`` and ``OUT/ablations.md``; return the result.

    ``ev`` = ``{"memory", "image" [N,D], "keys" [N,Dk] | None, "labels" [N], "class_emb" [C,D], "class_names",
    "name"}`` — the evaluated dataset. ``sources`` / ``val`` / ``config`` as :func:`reco_ref.train.loop.train`.

    Every k evaluated is capped at the evaluated memory's rows (a row's ``k`` is the k used, ``k_requested`` the
    one asked for); ``note`` (e.g. a print to stderr) is told once per capped value. An evaluated memory of 0 rows
    is refused before any arm trains.
    """
    from dataclasses import replace

    from ..checks import cap_k, memory_rows
    from ..train.checkpoint import run_lock
    from ..train.loop import step0_weights, train

    memory_rows(ev["memory"])  # before hours of training, not after
    noted: set[int] = set()

    def used_k(k: int) -> int:  # the k a row is evaluated with; the cap said once per value
        first = k not in noted
        noted.add(k)
        return cap_k(k, ev["memory"], note=note if first else None)

    bad = [a for a in arms if a not in ARMS]
    if bad:
        raise RecoError(f"arms: unknown {bad}; expected some of {list(ARMS)}")
    if "small_memory" in arms and small_memory is None:
        raise RecoError("arm small_memory needs --small-memory (a 1 % memory of the training pairs)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []

    def fit(name: str, cfg, srcs) -> Any:
        run = out / f"arm-{name}"
        with run_lock(run):  # a second ablate (or train) on the same arm stops at once instead of mixing files
            return train(srcs, run, cfg, val=val, meta=meta, resume=(run / "checkpoint.npz").exists(),
                         progress=progress).best

    def row(arm: str, variant: str, cfg, k: int, r: dict, memory_at_training: str = "100 %") -> None:
        k_used = used_k(k)
        if k_used < k:
            variant += f"; k capped at the memory's {k_used} rows"
        rows.append({"arm": arm, "variant": variant, "model": cfg.model, "search": cfg.search, "fuse": cfg.fuse,
                     "k": k_used, "k_requested": int(k), "memory_at_training": memory_at_training,
                     **{f"{m}": r["reco"][m] for m in ("top1", "top5", "mean_per_class_recall")},
                     "frozen_top1": r["frozen"]["top1"],
                     "surrogate_top1": (r.get("surrogate") or {}).get("top1"),
                     "knn_vote_top1": (r.get("knn_vote") or {}).get("top1")})

    main_w = None
    if "search_fuse" in arms or "k" in arms:
        combos = COMBOS if "search_fuse" in arms else COMBOS[:1]
        for search, fuse in combos:
            cfg = replace(config, search=search, fuse=fuse, model="reco")
            w = fit(f"{search}-{fuse}", cfg, sources)
            if (search, fuse) == ("uni", "cross"):
                main_w = w
            if "search_fuse" in arms:
                row("search_fuse", f"search={search} fuse={fuse}", cfg, cfg.k,
                    _eval_reco(w, ev, cfg.k, search, fuse, cfg.backend))
    if main_w is not None:  # learned vs untrained: the same layer at step 0 (same init, same score map)
        cfg = replace(config, model="reco", search="uni", fuse="cross")
        row("untrained", "the uni/cross layer at step 0 (its init, untrained)", cfg, cfg.k,
            _eval_reco(step0_weights(main_w, cfg), ev, cfg.k, "uni", "cross", cfg.backend))
    if "k" in arms:
        cfg = replace(config, model="reco", search="uni", fuse="cross")
        for k in ks:
            row("k", f"k={k} (trained at k={cfg.k})", cfg, int(k), _eval_reco(main_w, ev, int(k), "uni", "cross",
                                                                                cfg.backend))
    if "mlp" in arms:
        # the control trains every one of its arrays (it has no relevance bias and no copy init to keep); when the
        # RECO recipe trains only the relevance scalars at a scalar-sized rate, the control gets the full-matrix
        # rate and decay of the TrainConfig defaults instead (lr 0.05 on 7 M weights diverges)
        extra = {}
        if config.train_groups == "relevance":
            d = type(config)()
            extra = dict(lr=min(config.lr, d.lr), weight_decay=d.weight_decay)
        cfg = replace(config, model="mlp", search="uni", fuse="cross", init="identity", relevance=False,
                      train_groups="all", hold_threshold=False, **extra)
        w = fit("mlp", cfg, sources)
        row("mlp", "equal-size MLP control", cfg, cfg.k, _eval_mlp(w, ev, cfg.k))
    if "small_memory" in arms:
        cfg = replace(config, model="reco", search="uni", fuse="cross")
        srcs = [dict(s, retrieval=small_memory) for s in sources]
        w = fit("small-memory", cfg, srcs)
        row("small_memory", f"trained with {len(small_memory)} memory rows, evaluated with {len(ev['memory'])}",
            cfg, cfg.k, _eval_reco(w, ev, cfg.k, "uni", "cross", cfg.backend), memory_at_training="1 %")
    result = {"dataset": ev.get("name"), "n": int(len(ev["labels"])), "classes": int(ev["class_emb"].shape[0]),
              "recipe": config.to_json(), "command": command, "rows": rows}
    atomic_write_json(out / "ablations.json", result)
    atomic_write_text(out / "ablations.md", ablation_markdown(result))
    return result


def ablation_markdown(result: dict) -> str:
    """The ablation table (one row per arm/variant)."""
    header = ["arm", "variant", "memory at training", "top1", "top5", "mean per-class recall", "frozen top1",
              "surrogate top1", "k-NN vote top1"]
    body = [[r["arm"], r["variant"], r["memory_at_training"], r["top1"], r["top5"], r["mean_per_class_recall"],
             r["frozen_top1"], r["surrogate_top1"], r["knn_vote_top1"]] for r in result["rows"]]
    title = f"# RECO ablations — {result.get('dataset')} (n={result['n']}, {result['classes']} classes)\n\n"
    cmd = f"\nCommand: `{result['command']}`\n" if result.get("command") else ""
    return title + markdown_table(header, body) + cmd


def _eval_rows(a: Any, path: str, n: int, dim: int, split: str) -> np.ndarray:
    """Precomputed eval-split vectors (``--eval-embeddings`` / ``--eval-keys``): ``[n, dim]`` float unit rows."""
    from ..memory.search import check_queries

    a = np.asarray(a)
    if a.ndim != 2 or a.dtype.kind != "f":
        raise RecoError(f"{path}: expected a 2-D float array [{n}, {dim}] (one row per {split} image), found "
                        f"{a.dtype} {a.shape}")
    if a.shape[0] != n:
        raise RecoError(f"{path}: {a.shape[0]} rows, the {split} split has {n}")
    try:
        return check_queries(a, dim, "eval memory")
    except RecoError as exc:
        raise RecoError(f"{path}: {exc}") from None


def ablate_command(a: argparse.Namespace) -> dict:
    """``reco-ref ablate``: parse-level objects → :func:`run_ablation`."""
    from ..checks import memory_rows
    from ..io import load_npy
    from ..memory import Memory
    from ..memory.producers import load_encoder
    from ..train.commands import check_config, config_from_args, sources_from_args, val_sets_from_args
    from .data import embed_split, read_split
    from .templates import class_embeddings, resolve_templates

    cfg = check_config(config_from_args(a))
    try:
        ks = [int(x) for x in a.ks.split(",") if x.strip()]
    except ValueError:
        raise RecoError(f"--ks: expected comma-separated integers, got {a.ks!r}") from None
    if not ks or min(ks) < 1:
        raise RecoError(f"--ks: expected positive integers, got {a.ks!r}")
    arms = list(ARMS) if a.arms == "all" else [x.strip() for x in a.arms.split(",") if x.strip()]
    encoder = load_encoder(a.model)
    sources = sources_from_args(a)
    check_config(cfg, dim=int(sources[0]["pairs"].dim))  # --heads must divide the width, before any arm trains
    val = val_sets_from_args(a, encoder)
    mem = Memory.open(a.eval_memory, verify="size")
    memory_rows(mem)
    split = read_split(a.eval_dataset, a.eval_split)
    if a.eval_embeddings:
        # checked here, before any arm trains: a wrong file used to surface after the training, as a dim error or
        # a "fusion output not finite" (an integer array of zeros), or as a row count (a 1-D array)
        image = _eval_rows(load_npy(a.eval_embeddings), a.eval_embeddings, len(split), mem.dim, a.eval_split)
        keys = None
        if mem.key_dim is not None:
            if not a.eval_keys:
                raise RecoError(f"{mem.root} indexes images by search keys (key_dim {mem.key_dim}): pass --eval-keys "
                                "with the eval split's image keys beside --eval-embeddings")
            keys = _eval_rows(load_npy(a.eval_keys), a.eval_keys, len(split), mem.key_dim, a.eval_split)
    else:
        image, keys = embed_split(split, encoder, progress=not a.no_progress)
    _, templates = resolve_templates(None, a.eval_dataset)
    ev = {"memory": mem, "image": image, "keys": keys, "labels": split.labels, "name": str(a.eval_dataset),
          "class_names": split.class_names, "class_emb": class_embeddings(encoder, split.class_names, templates)}
    small = Memory.open(a.small_memory, verify="size") if a.small_memory else None
    if small is not None:
        memory_rows(small)
    meta = {"command": "reco-ref " + " ".join(sys.argv[1:])}
    res = run_ablation(sources, val, ev, a.out, cfg, small_memory=small, ks=ks, arms=arms, meta=meta,
                       progress=not a.no_progress, command=meta["command"],
                       note=lambda m: print(m, file=sys.stderr, flush=True))
    print(json.dumps({"out": str(Path(a.out) / "ablations.md"), "rows": len(res["rows"])}))
    return res
