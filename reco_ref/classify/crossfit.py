r"""``--validation crossfit`` [ours]: every choice of a classifier run made on out-of-fold predictions.

Why. A long-tailed training split has few rows to spare: CUB-100-LT r50's tail-covering held-out rows are 88 (one
per class), where one row moves the class-mean top-1 by about 1.1 points. On those 88 rows the probe head plus the
score readout looked 4.6 points better than the readout alone; on the test split it was not (docs/classify.md).
Cross-fitting scores every candidate on *all* the training rows instead, each predicted by a model that never
trained on it:

1. **Folds.** Each class's rows are dealt round-robin, in a seeded order, over ``F`` folds (:func:`crossfit_folds`);
   a class with one row is never held out (it would not be trained at all) and never scored.
2. **The start.** For each candidate L2 of the logistic probe (``--head-init probe``) and each candidate start
   scale of the score readout (``--readout --readout-scale 0``), each fold's probe is fitted on the other folds and
   the start — head plus readout, ``W_o = 0`` — predicts the held-out fold. The pair with the best pooled class-mean
   top-1 is kept (ties: the lower pooled loss).
3. **The epoch.** From that start, one run per fold trains on the other folds with the full schedule and predicts
   its fold after every epoch (epoch 0 = the start, with a probe or prompts head). The epoch with the best pooled
   class-mean top-1 is kept (ties: the lower pooled loss).
4. **The final run** trains on all the training rows from the same start, with the same schedule, and stops at
   that epoch (0: the start itself, no training).

The score is :func:`~reco_ref.classify.train.balanced_top1` over the pooled out-of-fold predictions: each scored
class counts once, as on a class-balanced test. Cost: ``F + 1`` training runs, ``F × |L2| `` probe fits.
Interrupting is safe: each fold run has its own checkpoint (``OUT.fold<f>.ckpt.npz``), a finished fold's
predictions are kept in ``OUT.crossfit.json`` (atomic), and ``--resume`` continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..backends import blas_threads
from ..errors import CheckpointError, ShapeError
from ..io import atomic_write_text
from .items import _dims
from .reference import cross_entropy_forward
from .train import READOUT_SCALES, ClassifyConfig, _logits_many, balanced_top1, start_params, train_classifier, \
    with_readout_scale

__all__ = ["CROSSFIT_FOLDS", "crossfit_folds", "pooled_score", "crossfit_train", "crossfit_state_path",
           "crossfit_fold_checkpoint", "crossfit_leftovers", "crossfit_probe"]

#: folds of ``--validation crossfit``
CROSSFIT_FOLDS = 5


def crossfit_folds(labels: np.ndarray, folds: int = CROSSFIT_FOLDS, seed: int = 0) -> np.ndarray:
    """Fold of each row, int64 ``[N]`` in ``0 … folds−1``; ``−1`` for the row of a class with one row (always
    trained, never scored). Within a class the rows are dealt round-robin in a seeded order from a seeded first
    fold, so every fold holds ``⌊n_c/F⌋`` or ``⌈n_c/F⌉`` rows of class ``c`` and every class with two rows or
    more is scored."""
    labels = np.asarray(labels, np.int64)
    if folds < 2:
        raise ShapeError(f"crossfit: expected 2 or more folds, got {folds}")
    out = np.full(len(labels), -1, np.int64)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) < 2:
            continue
        rng = np.random.default_rng([seed, 0xCF, int(c)])
        out[idx[rng.permutation(len(idx))]] = (np.arange(len(idx)) + rng.integers(folds)) % folds
    return out


def pooled_score(pred: np.ndarray, labels: np.ndarray, folds: np.ndarray) -> float:
    """Class-mean top-1 of the out-of-fold predictions ``pred`` [N] over the scored rows (``folds >= 0``)."""
    scored = np.asarray(folds) >= 0
    return balanced_top1(np.asarray(pred)[scored], np.asarray(labels)[scored])


def crossfit_state_path(out: str | os.PathLike) -> Path:
    """The folds' record beside the weights file ``out`` (removed once the weights are written)."""
    return Path(str(out) + ".crossfit.json")


def crossfit_fold_checkpoint(out: str | os.PathLike, fold: int) -> Path:
    """The checkpoint of fold ``fold``'s run beside the weights file ``out`` (removed when the fold is done)."""
    return Path(str(out) + f".fold{fold}.ckpt.npz")


def crossfit_leftovers(out: str | os.PathLike) -> list[Path]:
    """What an interrupted cross-fitting run of ``out`` left to resume from: its record and fold checkpoints."""
    return [q for q in (crossfit_state_path(out), *(crossfit_fold_checkpoint(out, f) for f in range(CROSSFIT_FOLDS)))
            if q.exists()]


def crossfit_train(image: np.ndarray, search: np.ndarray | None, labels: np.ndarray, classes: int, memory: Any,
                   cfg: ClassifyConfig, *, out: str | os.PathLike, exclude: np.ndarray | None = None,
                   class_text: np.ndarray | None = None, row_labels: np.ndarray | None = None,
                   head_fit: Callable[[np.ndarray, float], tuple] | None = None, l2_grid: tuple = (None,),
                   fixed_head: tuple | None = None, resume: bool = False, progress: bool = True,
                   log: Callable[[str], Any] | None = None, folds: int = CROSSFIT_FOLDS) -> tuple[dict, dict]:
    """Train with every choice made by cross-fitting (module docstring); returns ``(params, info)`` as
    :func:`~reco_ref.classify.train.train_classifier` does, with ``info["crossfit"]`` the record of each choice.

    Parameters
    ----------
    image, search, labels, exclude, memory, class_text, row_labels : as :func:`train_classifier`, all training rows
    head_fit : ``(rows, l2) → (W [D, C], b [C])`` — the probe head fitted on those training rows with that L2
        (``--head-init probe``), or None
    l2_grid : the L2 values ``head_fit`` is tried with (``(None,)`` without a probe)
    fixed_head : a head that does not depend on the rows (``--head-init prompts``), or None
    out : the weights file; the fold runs' checkpoints and the folds' record sit beside it
    """
    if cfg.validation != "crossfit":
        raise ShapeError(f"crossfit_train: cfg.validation is {cfg.validation!r}, expected 'crossfit'")
    say = log or (lambda _m: None)
    N, D = image.shape
    fold = crossfit_folds(labels, folds, cfg.seed)
    scored = fold >= 0
    if not scored.any():
        raise ShapeError("crossfit: no class has two training rows; nothing can be held out")
    dims = _dims(memory, cfg.values) if cfg.memory else (None, None)
    if cfg.readout and cfg.readout_values == "label":
        class_text = np.eye(classes, dtype=np.float32)
    scales = ((cfg.readout_scale,) if cfg.readout_scale else READOUT_SCALES) if cfg.readout else (None,)
    has_head = head_fit is not None or fixed_head is not None
    say(f"cross-fitting: {folds} folds of the {N} training rows ({int(scored.sum())} scored; "
        f"{int((~scored).sum())} of classes with one row always trained)")

    def head_for(rows: np.ndarray, l2) -> tuple | None:
        if head_fit is not None:
            return head_fit(rows, l2)
        return fixed_head

    def best_of(grid: dict):  # the best pooled top-1, ties to the lower pooled loss
        return max(grid, key=lambda key: (grid[key][0], -grid[key][1]))

    # 2. the start: (L2, scale) on pooled out-of-fold predictions of the start itself
    fold_heads: dict = {}  # fold → the best L2's head so far (its fold runs start there: not fitted twice)
    if has_head or len(scales) > 1:
        grid: dict = {}
        for l2 in l2_grid:
            preds = {sv: np.full(N, -1, np.int64) for sv in scales}
            loss = dict.fromkeys(scales, 0.0)
            heads = {}
            for f in range(folds):
                tr, te = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
                if not te.size:  # fewer rows than folds in every class: this fold holds none
                    continue
                heads[f] = head_for(tr, l2)
                p = start_params(cfg, D, classes, dims, class_text=class_text, head=heads[f])
                with blas_threads(1):  # one retrieval of the fold's items for every scale
                    lgs = _logits_many([with_readout_scale(p, sv) for sv in scales] if cfg.readout else [p], cfg,
                                       memory, image[te], None if search is None else search[te],
                                       None if exclude is None else exclude[te], row_labels=row_labels)
                for sv, lg in zip(scales, lgs):
                    preds[sv][te] = lg.argmax(1)
                    loss[sv] += cross_entropy_forward(lg.astype(np.float64), labels[te])[0] * len(te)
            for sv in scales:
                grid[(l2, sv)] = (pooled_score(preds[sv], labels, fold), loss[sv] / scored.sum())
            if best_of(grid)[0] == l2:
                fold_heads = heads
        l2_best, sv_best = best_of(grid)
        say("cross-fitted start: " + ", ".join(
            (f"L2 {l2:g}" if l2 is not None else "") + (" " if l2 is not None and sv is not None else "")
            + (f"scale {sv:g}" if sv is not None else "") + f" → {a:.3f}" for (l2, sv), (a, _) in grid.items())
            + f"; kept " + " ".join(x for x in ((f"L2 {l2_best:g}" if l2_best is not None else ""),
                                              (f"scale {sv_best:g}" if sv_best is not None else "")) if x))
    else:
        grid, l2_best, sv_best = {}, None, scales[0]
    run_cfg = dataclasses.replace(cfg, readout_scale=float(sv_best)) if cfg.readout else cfg

    # 3. the epoch: one run per fold, every epoch's predictions of the held-out fold pooled
    state_path = crossfit_state_path(out)
    identity = {"config": cfg.fingerprint(), "folds": folds, "rows": int(N), "l2": l2_best, "scale": sv_best}
    state = {"identity": identity, "done": {}}
    if state_path.exists():
        if not resume:
            raise CheckpointError(f"{state_path}: a cross-fitting record exists; pass resume (--resume) to continue "
                                  "it, or remove it")
        try:
            old = json.loads(state_path.read_text())
        except ValueError:
            raise CheckpointError(f"{state_path}: not a readable cross-fitting record; remove it") from None
        if old.get("identity") != identity:
            raise CheckpointError(f"{state_path}: the record of another run (configuration, rows or start); "
                                  "remove it to start over")
        state = old
    for f in range(folds):
        if str(f) in state["done"]:
            say(f"fold {f + 1}/{folds}: done before (resumed)")
            continue
        tr, te = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
        if not te.size:  # nothing to predict: no run (its record stays empty)
            say(f"fold {f + 1}/{folds}: holds no row (every class has fewer rows than folds): skipped")
            state["done"][str(f)] = {"rows": [], "epochs": {}}
            continue
        say(f"fold {f + 1}/{folds}: training on {len(tr)} rows, predicting {len(te)}")
        sl = lambda a, rows: None if a is None else a[rows]  # noqa: E731
        _, info = train_classifier(image[tr], sl(search, tr), labels[tr], classes, memory, run_cfg,
                                   exclude=sl(exclude, tr),
                                   val=(image[te], sl(search, te), labels[te], sl(exclude, te)),
                                   checkpoint=crossfit_fold_checkpoint(out, f), resume=resume,
                                   progress=progress, log=None, class_text=class_text,
                                   head=fold_heads[f] if f in fold_heads else head_for(tr, l2_best),
                                   row_labels=row_labels, keep_val_pred=True)
        state["done"][str(f)] = {"rows": te.tolist(),
                                 "epochs": {str(h["epoch"]): [h["val_pred"], h["val_loss_sum"]]
                                            for h in info["history"] if "val_pred" in h}}
        atomic_write_text(state_path, json.dumps(state))
        crossfit_fold_checkpoint(out, f).unlink(missing_ok=True)
    epochs = sorted({int(e) for d in state["done"].values() for e in d["epochs"]})
    by_epoch = {}
    for e in epochs:
        pred = np.full(N, -1, np.int64)
        loss = 0.0
        for d in state["done"].values():
            if not d["rows"]:
                continue
            pred[np.asarray(d["rows"], np.int64)] = d["epochs"][str(e)][0]
            loss += d["epochs"][str(e)][1]
        by_epoch[e] = (pooled_score(pred, labels, fold), loss / scored.sum())
    best_epoch = max(by_epoch, key=lambda e: (by_epoch[e][0], -by_epoch[e][1]))
    say("cross-fitted epochs: " + ", ".join(f"{e} → {a:.3f}" for e, (a, _) in by_epoch.items())
        + f"; kept {best_epoch}")

    # 4. the final run: all training rows, the same start and schedule, stopped at the kept epoch
    params, info = train_classifier(image, search, labels, classes, memory, run_cfg, exclude=exclude, val=None,
                                    checkpoint=Path(str(out) + ".ckpt.npz"), resume=resume, progress=progress,
                                    log=say, class_text=class_text, head=head_for(np.arange(N), l2_best),
                                    row_labels=row_labels, stop_after=best_epoch)
    record = {"folds": folds, "scored_rows": int(scored.sum()),
              "start_grid": [{"l2": l2, "scale": sv, "top1": a, "loss": lo} for (l2, sv), (a, lo) in grid.items()],
              "l2": l2_best, "readout_scale": sv_best,
              "by_epoch": {str(e): {"top1": a, "loss": lo} for e, (a, lo) in by_epoch.items()}}
    info.update(best_epoch=int(best_epoch), val_top1=by_epoch[best_epoch][0], crossfit=record,
                history=[{"epoch": e, "val_top1": a, "val_loss": lo} for e, (a, lo) in by_epoch.items()])
    if cfg.readout:
        info.update(readout_scale_start=float(sv_best),
                    readout_scale_val={f"{sv:g}": [a, lo] for (l2, sv), (a, lo) in grid.items() if l2 == l2_best})
    return params, info  # the caller removes the record (crossfit_state_path) once the weights are written


def crossfit_probe(x: np.ndarray, y: np.ndarray, classes: int, *, seed: int = 0, folds: int = CROSSFIT_FOLDS,
                   l2: tuple | None = None) -> dict:
    """The logistic-probe baseline under the same rule: ``λ`` with the best pooled out-of-fold class-mean top-1
    (ties: the lower pooled loss), then fitted on all the rows. Returns :func:`~.baselines.fit_logistic_probe`'s
    dict, with ``val_top1`` the pooled score of each ``λ``."""
    from .baselines import PROBE_L2, fit_logistic_probe

    l2 = PROBE_L2 if l2 is None else l2
    x, y = np.asarray(x, np.float64), np.asarray(y, np.int64)
    fold = crossfit_folds(y, folds, seed)
    scores: dict = {}
    for lam in l2:
        pred, loss = np.full(len(y), -1, np.int64), 0.0
        for f in range(folds):
            tr, te = fold != f, fold == f
            if not te.any():
                continue
            p = fit_logistic_probe(x[tr], y[tr], classes, val=None, l2=(lam,))
            z = x[te] @ p["W"] + p["b"]
            pred[te] = z.argmax(1)
            loss += cross_entropy_forward(z, y[te])[0] * int(te.sum())
        scores[lam] = (pooled_score(pred, y, fold), loss)
    best = max(l2, key=lambda lam: (scores[lam][0], -scores[lam][1]))
    out = fit_logistic_probe(x, y, classes, val=None, l2=(best,))
    out["val_top1"] = {repr(k): v[0] for k, v in scores.items()}
    return out
