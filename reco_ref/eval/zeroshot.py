r"""Zero-shot classification with a memory, side by side (docs/reco.md §4): frozen encoder, RECO, k-NN vote, surrogate.

.. math::

    \hat y = \arg\max_c \langle \tilde v, \tilde t_c \rangle, \qquad
    \tilde v = \begin{cases} \bar v = \varphi_I(v, T^M[\mathrm{kNN}(v)]) & \text{mode image, both} \\ v & \text{else}\end{cases},
    \quad
    \tilde t_c = \begin{cases} \bar t_c = \varphi_T(t_c, V^M[\mathrm{kNN}(t_c)]) & \text{mode text, both} \\ t_c & \text{else}\end{cases}

Every report holds four methods on the same queries, memory, prompts and neighbours:

* ``frozen`` — the encoder alone (mode ``none``);
* ``reco`` — the trained fusion modules (:class:`reco_ref.reco.weights.RecoWeights`), through
  :func:`reco_ref.reco.refine.refine`, enhancing the sides the mode names;
* ``surrogate`` — training-free [ours]: the same retrieval, ``x̄ = normalize(x + α · mean_j r_j)`` over the valid
  fed neighbours ``r_j`` (for an image query: the text embeddings of its k image neighbours), α default 1.0;
* ``knn_vote`` — the majority class of the k image→image neighbours (the memory's ceiling for a vote); the
  neighbours' classes come from the memory's ``label`` column or captions
  (:func:`reco_ref.eval.data.memory_class_labels`), or the entry is ``null`` with the reason.

**The relevance gate [ours].** When φ_I has the relevance bias, RECO's class scores in the modes that refine the
class text (``text``, ``both``) blend the refined and the frozen class text per query image:

.. math::

    s_{ic} = (1 - \rho_i)\,\langle \tilde v_i, \bar t_c \rangle + \rho_i\,\langle \tilde v_i, t_c \rangle

with ``ρ_i`` the image module's gate (:func:`reco_ref.fusion.relevance_gate`: 1 when its bias keeps the query
because no neighbour is close enough, 0 when it uses the memory). The class text is refined once for all queries
and cannot know whether a given query image is covered by the memory; a query that the memory does not cover
(a drawing against a photo memory) then compares with the frozen class text, as the image side already falls
back to its query — "do no harm". For a module without the bias ``ρ = 0`` and the scores are the paper's.

Because refining a side does not depend on the other, all four modes cost two refinements; ``by_mode`` reports
every mode for ``reco`` and ``surrogate``. When the evaluated images are themselves memory rows (e.g. the train
split), their own rows are excluded from every retrieval (``exclude``, from :func:`reco_ref.eval.data.own_rows`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..checks import cap_k, check_array
from ..errors import RecoError, ShapeError
from .metrics import classification_metrics, knn_vote_scores

MODES = ("none", "image", "text", "both")
#: surrogate weight of the neighbours' mean [ours]
DEFAULT_ALPHA = 1.0


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise RecoError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
    return mode


def surrogate_refine(memory: Any, queries: np.ndarray, query_modality: str, *, alpha: float = DEFAULT_ALPHA,
                     search_queries: np.ndarray | None = None, k: int = 10, search: str = "uni", fuse: str = "cross",
                     exclude: Any = None, dup_threshold: Any = None, batch_size: int = 1024, exact: bool = False
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""The untrained surrogate of RECO: add the mean of the fed neighbours, renormalise.

    .. math::

        \bar x = \frac{x + \alpha\, m}{\lVert x + \alpha\, m \rVert}, \qquad
        m = \frac{1}{|J|} \sum_{j \in J} r_j \quad (J = \text{valid slots};\ m = 0 \text{ if } J = \emptyset)

    Same retrieval as :func:`reco_ref.reco.refine.refine` (its ``retrieve_for``), same arguments.

    Returns
    -------
    refined : float32 [N, D] unit rows ; rows : int64 [N, k'] ; valid : bool [N, k'] — ``k' = min(k, len(memory))``
    """
    from ..reco.refine import retrieve_for

    q = check_array("queries [N,D]", queries, ndim=2)
    alpha = float(alpha)
    if not np.isfinite(alpha) or alpha < 0:
        raise RecoError(f"alpha: expected a finite number >= 0, got {alpha!r}")
    n, D = q.shape
    k = cap_k(k, memory)  # the search gives min(k, rows) columns; the arrays below hold exactly those
    out = np.empty((n, D), np.float32)
    rows = np.empty((n, k), np.int64)
    valid = np.empty((n, k), bool)
    excl = None if exclude is None else (exclude if isinstance(exclude, list) else np.asarray(exclude))
    for lo in range(0, n, batch_size):
        hi = min(n, lo + batch_size)
        nb, ok, r = retrieve_for(memory, q[lo:hi], query_modality,
                                 search_queries=None if search_queries is None else search_queries[lo:hi], k=k,
                                 search=search, fuse=fuse, exclude=None if excl is None else excl[lo:hi],
                                 dup_threshold=dup_threshold, exact=exact)  # [B,k,D], [B,k], [B,k]
        cnt = ok.sum(axis=1, keepdims=True).astype(np.float64)  # [B,1]
        mean = (nb.astype(np.float64) * ok[..., None]).sum(axis=1) / np.maximum(cnt, 1.0)  # [B,D]; 0 if none
        z = q[lo:hi].astype(np.float64) + alpha * mean  # [B,D]
        norm = np.linalg.norm(z, axis=1, keepdims=True)
        if (norm == 0).any():
            raise ShapeError("surrogate: a query plus alpha * its neighbours' mean is the zero vector")
        out[lo:hi] = z / norm
        rows[lo:hi], valid[lo:hi] = r, ok
    return out, rows, valid


def _scores(img: np.ndarray, cls: np.ndarray) -> np.ndarray:
    return img.astype(np.float64) @ cls.astype(np.float64).T  # [N,C]


def evaluate_zero_shot(memory: Any, image: np.ndarray, labels: np.ndarray, class_emb: np.ndarray,
                       class_names: list[str], *, keys: np.ndarray | None = None, weights: Any = None,
                       mode: str = "both", k: int = 10, alpha: float = DEFAULT_ALPHA, search: str = "uni",
                       fuse: str = "cross", backend: str = "numpy", exclude: np.ndarray | None = None,
                       dup_threshold: Any = None, labels_by_source: dict[str, int] | None = None,
                       exact: bool = False, batch_size: int = 1024, progress: Any = None) -> dict:
    """Zero-shot top-1 / top-5 / mean per-class recall of frozen, RECO, surrogate and the k-NN vote.

    Parameters
    ----------
    memory : Memory | ShardedMemory — what all methods retrieve from
    image : float32 [N, D] — the evaluated images' embeddings
    labels : int [N] — their classes, 0..C-1
    class_emb : float32 [C, D] — template class embeddings (:func:`reco_ref.eval.templates.class_embeddings`)
    class_names : C names (to map memory captions to classes for the vote)
    keys : float32 [N, Dk] — the images' search keys where the memory indexes images by key
    weights : RecoWeights or None (``reco`` is then null)
    mode : none | image | text | both — which sides RECO and the surrogate enhance
    k : neighbours per query (every method), capped at the memory's rows (the result's ``k`` is the one used,
        ``k_requested`` the one asked for)
    alpha : surrogate weight
    search, fuse : retrieval combination (docs/reco.md §1) for RECO and the surrogate; the vote always searches
        image→image
    exclude : int64 [N] — the memory row holding each image itself (−1 none), from ``own_rows``
    labels_by_source : dataset manifest file → label (ties the memory's label column to the dataset)
    progress : callable(str) or None — told the name of each stage as it starts

    Returns
    -------
    dict — ``frozen``, ``reco``, ``surrogate``, ``knn_vote`` (each ``{"top1", "top5", "mean_per_class_recall"}``
    or None), ``knn_vote_labels`` (how the neighbours' classes were found, or why not), ``by_mode``, ``n``,
    ``classes``, ``k``, ``k_requested``, ``mode``, ``alpha``, ``search``, ``fuse``, ``backend``, ``excluded_own_rows``,
    ``chance``.
    """
    check_mode(mode)
    k_requested, k = _check_k(k, memory)  # every method retrieves min(k, rows) neighbours
    image, class_emb, labels, search_q = _checked_inputs(memory, image, labels, class_emb, class_names, keys)
    N, C = image.shape[0], class_emb.shape[0]
    say = progress or (lambda _s: None)
    common = dict(k=k, search=search, fuse=fuse, dup_threshold=dup_threshold, batch_size=batch_size, exact=exact)
    img_kw = dict(common, search_queries=search_q if search == "uni" else None, exclude=exclude)
    if weights is not None:
        from ..reco.weights import check_weights_match

        check_weights_match(weights, encoder_fingerprint=memory.fingerprint, dim=memory.dim, where="fusion weights")

    out: dict = {"n": int(N), "classes": int(C), "k": int(k), "k_requested": k_requested, "mode": mode,
                 "alpha": float(alpha), "search": search, "fuse": fuse, "backend": backend, "chance": 1.0 / C,
                 "excluded_own_rows": 0 if exclude is None else int((np.asarray(exclude) >= 0).sum())}
    out["frozen"] = classification_metrics(_scores(image, class_emb), labels, C)
    sides, gates = _refined_sides(memory, image, class_emb, weights, alpha=alpha, backend=backend, img_kw=img_kw,
                                  common=common, say=say)
    by_mode = _metrics_by_mode(sides, gates, image, class_emb, labels)
    out["surrogate"] = by_mode["surrogate"][mode]
    out["reco"] = by_mode["reco"][mode] if "reco" in by_mode else None
    out["by_mode"] = by_mode
    if gates["reco"] is not None:  # how often the image module's bias kept the query (the memory judged irrelevant)
        out["reco_gate"] = {"mean": float(gates["reco"].mean()), "median": float(np.median(gates["reco"])),
                            "above_half": float((gates["reco"] > 0.5).mean())}

    say("knn_vote")
    out["knn_vote"], out["knn_vote_labels"] = _knn_vote(
        memory, search_q, labels, class_names, k=k, exact=exact, exclude=exclude, dup_threshold=dup_threshold,
        labels_by_source=labels_by_source)
    return out


def _check_k(k: Any, memory: Any) -> tuple[int, int]:
    """``(k asked for, k used = min(k, the memory's rows))``; a one-line error for a k that is not a positive int."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise RecoError(f"k: expected a positive integer, got {k!r}")
    return int(k), cap_k(k, memory)


def _checked_inputs(memory: Any, image: np.ndarray, labels: np.ndarray, class_emb: np.ndarray,
                    class_names: list[str], keys: np.ndarray | None) -> tuple[np.ndarray, ...]:
    """The inputs checked against each other and the memory -> (image [N,D], class_emb [C,D], labels int64 [N],
    the image search vectors [N,D] or the keys [N,Dk] where the memory indexes images by key)."""
    image = check_array("image [N,D]", image, ndim=2)
    class_emb = check_array("class_emb [C,D]", class_emb, ndim=2)
    N, C = image.shape[0], class_emb.shape[0]
    if class_emb.shape[1] != image.shape[1]:
        raise ShapeError(f"class_emb: dim {class_emb.shape[1]}, image embeddings have {image.shape[1]}")
    if image.shape[1] != memory.dim:
        raise ShapeError(f"image embeddings: dim {image.shape[1]}, the memory {memory.root} holds dim {memory.dim}")
    if len(class_names) != C:
        raise ShapeError(f"class_names: {len(class_names)} names for {C} class embeddings")
    labels = np.asarray(labels, np.int64)
    if labels.shape != (N,):
        raise ShapeError(f"labels: shape {labels.shape}, expected ({N},)")
    search_q = keys if (keys is not None and memory.key_dim is not None) else image
    if search_q.shape[1] != memory.search_dim("image"):
        raise ShapeError(f"image search vectors: dim {search_q.shape[1]}, the memory's image index has dim "
                         f"{memory.search_dim('image')} (pass the images' search keys)")
    return image, class_emb, labels, search_q


def _refined_sides(memory: Any, image: np.ndarray, class_emb: np.ndarray, weights: Any, *, alpha: float,
                   backend: str, img_kw: dict, common: dict, say: Any) -> tuple[dict, dict]:
    """Both sides refined once by the surrogate and (with ``weights``) by RECO -> (``{method: {"image": [N,D],
    "text": [C,D]}}``, ``{method: the image module's gate [N] or None}``); ``reco`` is empty without weights."""
    from ..reco.refine import refine

    sides: dict[str, dict[str, np.ndarray]] = {"surrogate": {}, "reco": {}}
    gates: dict[str, np.ndarray | None] = {"surrogate": None, "reco": None}
    say("surrogate")
    sides["surrogate"]["image"] = surrogate_refine(memory, image, "image", alpha=alpha, **img_kw)[0]
    sides["surrogate"]["text"] = surrogate_refine(memory, class_emb, "text", alpha=alpha, **common)[0]
    if weights is not None:
        say("reco")
        sides["reco"]["image"], _, _, gate = refine(weights.image, memory, image, "image", backend=backend,
                                                    with_gate=True, **img_kw)
        gates["reco"] = gate if gate.any() else None
        sides["reco"]["text"] = refine(weights.text, memory, class_emb, "text", backend=backend, **common)[0]
    return sides, gates


def _metrics_by_mode(sides: dict, gates: dict, image: np.ndarray, class_emb: np.ndarray, labels: np.ndarray) -> dict:
    """Every mode of every refined method: the refined side where the mode names it, the frozen one elsewhere."""
    from ..fusion import gated_scores

    C = class_emb.shape[0]
    by_mode: dict[str, dict] = {}
    for method, got in sides.items():
        if not got:
            continue
        by_mode[method] = {}
        for m in MODES:
            v = got["image"] if m in ("image", "both") else image
            t = got["text"] if m in ("text", "both") else class_emb
            g = gates[method] if m in ("text", "both") else None
            by_mode[method][m] = classification_metrics(gated_scores(v, t, class_emb, g), labels, C)
    return by_mode


def _knn_vote(memory: Any, search_q: np.ndarray, labels: np.ndarray, class_names: list[str], *, k: int, exact: bool,
              exclude: np.ndarray | None, dup_threshold: Any, labels_by_source: dict[str, int] | None
              ) -> tuple[dict | None, str]:
    """The majority class of the k image→image neighbours -> (its metrics or None, how the classes were found
    or why not)."""
    C = len(class_names)
    rows, scores, valid = memory.search(search_q, modality="image", k=k, exact=exact, exclude=exclude,
                                        dup_threshold=dup_threshold)  # [N,k] each
    from .data import memory_class_labels

    nb_labels, how = memory_class_labels(memory, rows, class_names, labels_by_source)
    if nb_labels is None:
        return None, f"not computed: {how}"
    votes = knn_vote_scores(nb_labels, scores, valid, C)  # [N,C]
    abstain = ~(valid & (nb_labels >= 0)).any(axis=1)
    metrics = classification_metrics(votes, labels, C, abstain=abstain)
    metrics["abstained"] = int(abstain.sum())
    return metrics, how
