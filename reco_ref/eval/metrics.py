r"""Evaluation metrics (docs/reco.md §4): zero-shot prediction, top-k accuracy, mean per-class recall, the k-NN
label vote, and Recall@K for image↔text retrieval.

Every ranking here breaks ties the same way: by score, then by the lower index (a stable sort of ``-scores``), so
``top-1`` is exactly ``argmax`` (NumPy's ``argmax`` returns the first maximum) and a tie never counts as a hit for
more than one candidate. ::

    from reco_ref.eval.metrics import classification_metrics, knn_vote_scores, recall_at_k
    m = classification_metrics(scores, labels, n_classes)      # {"top1", "top5", "mean_per_class_recall"}
"""

from __future__ import annotations

import numpy as np

from ..errors import ShapeError

#: the k of the ``top5`` metric (named in the issue-9 contract)
TOP5 = 5


def _labels(labels, n: int, what: str = "labels") -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != n or labels.dtype.kind not in "iu":
        raise ShapeError(f"{what}: expected int [{n}], got {labels.dtype} {labels.shape}")
    return labels.astype(np.int64)


def rank_of(scores: np.ndarray, target: np.ndarray) -> np.ndarray:
    r"""0-based rank of column ``target[i]`` in row ``i`` of ``scores`` (ties: lower index ranks first).

    .. math::

        \mathrm{rank}_i = \#\{c : s_{ic} > s_{i,y_i}\} + \#\{c < y_i : s_{ic} = s_{i,y_i}\}

    Parameters
    ----------
    scores : float [N,C]
    target : int [N], values in 0..C-1

    Returns
    -------
    int64 [N]
    """
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ShapeError(f"scores: expected [N,C], got shape {scores.shape}")
    target = _labels(target, scores.shape[0], "target")
    if target.size and (target.min() < 0 or target.max() >= scores.shape[1]):
        raise ShapeError(f"target: values must lie in 0..{scores.shape[1] - 1}, found {target.min()}..{target.max()}")
    s_y = scores[np.arange(scores.shape[0]), target][:, None]  # [N,1]
    higher = (scores > s_y).sum(axis=1)  # [N]
    cols = np.arange(scores.shape[1])[None, :]  # [1,C]
    tied_before = ((scores == s_y) & (cols < target[:, None])).sum(axis=1)  # [N]
    return (higher + tied_before).astype(np.int64)


def zero_shot(image_emb: np.ndarray, class_emb: np.ndarray) -> np.ndarray:
    """``argmax_c ⟨v, t_c⟩`` (docs/reco.md §4): image_emb [N,D], class_emb [C,D] -> int64 [N]."""
    return np.argmax(image_emb @ class_emb.T, axis=1).astype(np.int64)


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, k: int, abstain: np.ndarray | None = None) -> float:
    r"""Fraction of rows whose true class is among the ``k`` highest scores.

    .. math::

        \mathrm{top}k = \frac{1}{N} \sum_i [\mathrm{rank}_i < k]

    ``abstain`` (bool [N]) marks rows with no prediction at all (e.g. a k-NN vote without a valid neighbour):
    they count as misses. N = 0 gives 0.0.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ShapeError(f"k: expected a positive integer, got {k!r}")
    scores = np.asarray(scores)
    if scores.shape[0] == 0:
        return 0.0
    hit = rank_of(scores, labels) < k
    if abstain is not None:
        hit &= ~np.asarray(abstain, bool)
    return float(hit.mean())


def mean_per_class_recall(pred: np.ndarray, labels: np.ndarray, n_classes: int) -> float:
    r"""Mean over the classes present in ``labels`` of the fraction of their rows predicted correctly.

    .. math::

        \mathrm{MPCR} = \frac{1}{|\mathcal{C}|} \sum_{c \in \mathcal{C}}
            \frac{\#\{i : y_i = c,\ \hat y_i = c\}}{\#\{i : y_i = c\}},
        \qquad \mathcal{C} = \{c : \exists i,\ y_i = c\}

    Classes with no row are left out (their recall is undefined); ``pred = -1`` (no prediction) is a miss.
    """
    labels = np.asarray(labels)
    pred = _labels(pred, labels.shape[0], "pred")
    labels = _labels(labels, pred.shape[0])
    if labels.size == 0:
        return 0.0
    support = np.bincount(labels, minlength=n_classes).astype(np.float64)  # [C]
    correct = np.bincount(labels[pred == labels], minlength=n_classes).astype(np.float64)  # [C]
    present = support > 0
    return float((correct[present] / support[present]).mean())


def classification_metrics(scores: np.ndarray, labels: np.ndarray, n_classes: int,
                           abstain: np.ndarray | None = None) -> dict:
    """``{"top1", "top5", "mean_per_class_recall"}`` of a score matrix ``[N,C]`` (top-1 = first argmax).

    ``abstain`` (bool [N]): rows without a prediction, counted as misses everywhere.
    """
    scores = np.asarray(scores)
    if scores.ndim != 2 or scores.shape[1] != n_classes:
        raise ShapeError(f"scores: expected [N,{n_classes}], got shape {scores.shape}")
    labels = _labels(labels, scores.shape[0])
    pred = np.argmax(scores, axis=1).astype(np.int64) if scores.shape[0] else np.zeros(0, np.int64)
    if abstain is not None:
        pred[np.asarray(abstain, bool)] = -1
    return {"top1": topk_accuracy(scores, labels, 1, abstain),
            "top5": topk_accuracy(scores, labels, TOP5, abstain),
            "mean_per_class_recall": mean_per_class_recall(pred, labels, n_classes)}


def knn_vote_scores(labels: np.ndarray, scores: np.ndarray, valid: np.ndarray, n_classes: int) -> np.ndarray:
    r"""Vote matrix of the k-NN label vote: votes per class plus a tie-breaking share of their summed cosine.

    .. math::

        V_{ic} = \#\{j : \ell_{ij} = c\} + \frac{\sum_{j : \ell_{ij} = c} s_{ij}}{2(2k+1)}

    over valid slots only. A count is an integer and a summed cosine lies in ``[-k, k]``, so the scaled sum lies
    strictly inside ``(-1/2, 1/2)`` and can only break ties between equal counts, never overturn one.

    Parameters
    ----------
    labels : int [N,k] — neighbours' labels (any value where invalid; −1 = unlabelled, no vote)
    scores : float [N,k] — cosines
    valid : bool [N,k]
    n_classes : C

    Returns
    -------
    float64 [N,C]
    """
    labels = np.asarray(labels)
    valid = np.asarray(valid, bool) & (labels >= 0)  # an unlabelled neighbour casts no vote
    N = labels.shape[0]
    votes = np.zeros((N, n_classes), np.float64)  # [N,C]
    sums = np.zeros((N, n_classes), np.float64)  # [N,C]
    qi, kj = np.nonzero(valid)
    np.add.at(votes, (qi, labels[qi, kj]), 1.0)
    np.add.at(sums, (qi, labels[qi, kj]), np.asarray(scores)[qi, kj].astype(np.float64))
    k = max(labels.shape[1], 1)
    return votes + sums / (2.0 * (2 * k + 1))


def knn_vote(labels: np.ndarray, scores: np.ndarray, valid: np.ndarray, n_classes: int) -> np.ndarray:
    """Majority label of the valid neighbours; ties go to the class with the larger summed cosine.

    Arguments as :func:`knn_vote_scores`. Returns int64 [N]: the predicted label, −1 for a query without any valid
    (labelled) neighbour.
    """
    votes = knn_vote_scores(labels, scores, valid, n_classes)  # [N,C]
    pred = np.argmax(votes, axis=1)
    pred[~(np.asarray(valid, bool) & (np.asarray(labels) >= 0)).any(axis=1)] = -1
    return pred.astype(np.int64)


def recall_at_k(sim: np.ndarray, relevant: np.ndarray, ks: tuple[int, ...] = (1, 5, 10)) -> dict:
    r"""Recall@K of a retrieval: the fraction of queries with a relevant candidate among their ``K`` best.

    .. math::

        \mathrm{R@}K = \frac{1}{N_q} \sum_i \big[\min_{j \in \mathrm{rel}(i)} \mathrm{rank}_{ij} < K\big]

    Parameters
    ----------
    sim : float [Nq,Nc] — query × candidate similarities
    relevant : int [Nq] (the one relevant candidate per query) or bool [Nq,Nc] (several, e.g. five captions per
        image); a query without any relevant candidate is an error (its recall is undefined)
    ks : the K values

    Returns
    -------
    dict ``{"R@1": float, "R@5": float, ...}``
    """
    sim = np.asarray(sim)
    if sim.ndim != 2:
        raise ShapeError(f"sim: expected [Nq,Nc], got shape {sim.shape}")
    nq, nc = sim.shape
    relevant = np.asarray(relevant)
    if relevant.ndim == 1:
        gt = _labels(relevant, nq, "relevant")
        if gt.size and (gt.min() < 0 or gt.max() >= nc):
            raise ShapeError(f"relevant: candidate ids must lie in 0..{nc - 1}, found {gt.min()}..{gt.max()}")
        mask = np.zeros((nq, nc), bool)
        mask[np.arange(nq), gt] = True
    else:
        if relevant.shape != (nq, nc) or relevant.dtype != np.bool_:
            raise ShapeError(f"relevant: expected int [{nq}] or bool [{nq},{nc}], got {relevant.dtype} {relevant.shape}")
        mask = relevant
    if not mask.any(axis=1).all():
        raise ShapeError(f"relevant: query {int(np.flatnonzero(~mask.any(axis=1))[0])} has no relevant candidate")
    order = np.argsort(-sim, axis=1, kind="stable")  # [Nq,Nc] candidates, best first; ties by lower index
    rel_sorted = np.take_along_axis(mask, order, axis=1)  # [Nq,Nc]
    first = np.argmax(rel_sorted, axis=1)  # [Nq] rank of the best-ranked relevant candidate
    out = {}
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ShapeError(f"ks: expected positive integers, got {k!r}")
        out[f"R@{int(k)}"] = float((first < k).mean()) if nq else 0.0
    return out
