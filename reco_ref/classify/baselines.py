r"""The honest baselines every ``classify eval`` report carries beside the memory-attention classifier.

* **Logistic-regression probe** (the standard linear probe): multinomial logistic regression on the same image
  embeddings the classifier reads, no memory,

  .. math::

      \min_{W, b}\ \frac{1}{N}\sum_i -\log \operatorname{softmax}(x_i W + b)_{y_i} + \frac{\lambda}{2}\lVert W\rVert^2

  solved to convergence with L-BFGS (SciPy), float64. ``λ`` is chosen among :data:`PROBE_L2` on held-out rows of
  the *training* split (the validation split when the manifest has one, else 10 % of each class's train rows),
  never on the evaluated split; the probe is fitted on exactly the rows the classifier trained on (the validation
  rows only choose ``λ``, as they choose the classifier's epoch).
* **k-NN label vote** over the same memory: the majority class of the ``k`` nearest items by image search key
  (ties to the nearer), labels from the memory's ``label`` column or, failing that, from captions naming a class
  (:func:`reco_ref.eval.data.memory_class_labels`). It reads the memory rows' labels, which the attention
  classifier never sees — the memory's ceiling for a vote, not a like-for-like competitor.

Both report top-1 overall and per shot group, with the groups of the classifier's own training split.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import ShapeError
from .train import SHOT_GROUPS, shot_groups

__all__ = ["PROBE_L2", "fit_logistic_probe", "probe_logits", "knn_vote_predictions", "group_accuracy"]

#: L2 strengths the probe chooses among (on held-out training rows)
PROBE_L2 = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)
_MAXITER = 500


def _loss_grad(theta: np.ndarray, x: np.ndarray, y: np.ndarray, C: int, lam: float) -> tuple[float, np.ndarray]:
    """Mean cross-entropy + λ/2‖W‖² and its gradient; ``theta`` = [W (D·C), b (C)] flattened, float64."""
    N, D = x.shape
    W, b = theta[:D * C].reshape(D, C), theta[D * C:]
    z = x @ W + b  # [N, C]
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    loss = -np.log(p[np.arange(N), y] + 1e-300).mean() + 0.5 * lam * float((W * W).sum())
    p[np.arange(N), y] -= 1.0
    p /= N  # dL/dz [N, C]
    return loss, np.concatenate([(x.T @ p + lam * W).ravel(), p.sum(axis=0)])


def _fit(x: np.ndarray, y: np.ndarray, C: int, lam: float) -> tuple[np.ndarray, np.ndarray]:
    from scipy.optimize import minimize

    D = x.shape[1]
    res = minimize(_loss_grad, np.zeros(D * C + C), args=(x, y, C, lam), jac=True, method="L-BFGS-B",
                   options={"maxiter": _MAXITER})
    return res.x[:D * C].reshape(D, C), res.x[D * C:]


def fit_logistic_probe(x: np.ndarray, y: np.ndarray, classes: int, *, val: tuple[np.ndarray, np.ndarray] | None,
                       l2: tuple[float, ...] = PROBE_L2, refit_with_val: bool = True) -> dict:
    """Fit the probe on ``x`` [N, D], ``y`` [N]; choose ``λ`` on ``val = (x_val, y_val)`` by top-1, ties broken by
    the lower validation loss (the smallest ``λ`` when there is no validation row), and refit on ``x`` and the
    validation rows together (``refit_with_val=False``: on ``x`` only — when the validation rows must stay unseen,
    e.g. to choose the epoch of a classifier started from this probe).

    Returns ``{"W" [D, C], "b" [C], "l2", "val_top1" {λ: top-1}}`` (float64)."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.int64)
    if x.ndim != 2 or y.shape != (x.shape[0],) or x.shape[0] == 0:
        raise ShapeError(f"probe: features [N, D] and labels [N] expected, got {x.shape} and {y.shape}")
    if not np.isfinite(x).all():
        raise ShapeError("probe: non-finite features")
    scores: dict[float, float] = {}
    if val is not None and len(val[1]):
        xv, yv = np.asarray(val[0], np.float64), np.asarray(val[1], np.int64)
        losses: dict[float, float] = {}
        for lam in l2:
            W, b = _fit(x, y, classes, lam)
            z = xv @ W + b
            scores[lam] = float((z.argmax(1) == yv).mean())
            z = z - z.max(axis=1, keepdims=True)
            losses[lam] = float(-(z[np.arange(len(yv)), yv] - np.log(np.exp(z).sum(axis=1))).mean())
        # small validation sets tie often on top-1: the lower validation loss breaks ties (as the classifier's epochs)
        best = max(l2, key=lambda lam: (scores[lam], -losses[lam]))
        if refit_with_val:
            x, y = np.concatenate([x, xv]), np.concatenate([y, yv])
    else:
        best = l2[0]
    W, b = _fit(x, y, classes, best)
    return {"W": W, "b": b, "l2": float(best), "val_top1": {repr(k): v for k, v in scores.items()}}


def probe_logits(probe: dict, x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float64) @ probe["W"] + probe["b"]


def knn_vote_predictions(memory: Any, search: np.ndarray, class_names: list[str], k: int,
                         exclude: np.ndarray | None = None) -> tuple[np.ndarray | None, str]:
    """Predicted class [N] of the k-NN label vote (−1 where no neighbour has a class), or ``(None, why)``."""
    from ..eval.data import memory_class_labels
    from ..eval.metrics import knn_vote_scores

    rows, scores, valid = memory.search(np.ascontiguousarray(search, np.float32), modality="image", k=k,
                                        exclude=exclude)
    nb, how = memory_class_labels(memory, rows, class_names, None)
    if nb is None:
        return None, how
    votes = knn_vote_scores(nb, scores, valid, len(class_names))  # [N, C]
    pred = votes.argmax(axis=1)
    pred[~(valid & (nb >= 0)).any(axis=1)] = -1
    return pred.astype(np.int64), how


def group_accuracy(pred: np.ndarray, labels: np.ndarray, train_counts: list[int]) -> dict:
    """``{"top1", "many", "medium", "few"}`` of predictions ``pred`` [N] (None for an empty group)."""
    hit = np.asarray(pred) == np.asarray(labels)
    groups = shot_groups(train_counts)[labels]
    out = {"top1": float(hit.mean()) if hit.size else None}
    for g, name in enumerate(SHOT_GROUPS):
        sel = groups == g
        out[name] = float(hit[sel].mean()) if sel.any() else None
    return out
