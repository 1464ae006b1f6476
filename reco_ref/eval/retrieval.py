r"""Image↔text retrieval with a memory (docs/reco.md §4): Recall@{1,5,10} both directions, each side optionally
enhanced.

For ``N`` image–caption pairs, image→text ranks the ``N`` captions for each image by ``⟨ṽ_i, t̃_j⟩`` and
text→image ranks the images for each caption; pair ``i`` is relevant to query ``i``, and so is every pair whose
caption is the same text (a caption written twice cannot be told apart). Sides are enhanced as in zero-shot
classification: ``image`` refines the images, ``text`` the captions, ``both`` both, ``none`` neither — with
RECO's trained modules and with the untrained surrogate. Pairs that are memory rows themselves (their image is
found in the memory, :func:`reco_ref.eval.data.own_rows`) have that row excluded from both of their retrievals.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..checks import cap_k, check_array
from ..errors import ShapeError
from .metrics import recall_at_k
from .zeroshot import DEFAULT_ALPHA, MODES, surrogate_refine

KS = (1, 5, 10)


def _recalls(v: np.ndarray, t: np.ndarray, relevant: np.ndarray) -> dict:
    sim = v.astype(np.float64) @ t.astype(np.float64).T  # [N,N] image × caption
    return {"image_to_text": recall_at_k(sim, relevant, KS), "text_to_image": recall_at_k(sim.T, relevant.T, KS)}


def evaluate_retrieval(memory: Any, image: np.ndarray, text: np.ndarray, captions: list[str], *,
                       keys: np.ndarray | None = None, weights: Any = None, k: int = 10,
                       alpha: float = DEFAULT_ALPHA, search: str = "uni", fuse: str = "cross", backend: str = "numpy",
                       exclude: np.ndarray | None = None, exact: bool = False, batch_size: int = 1024) -> dict:
    """Recall@1/5/10 image→text and text→image for frozen, surrogate and RECO, every enhancement mode.

    Parameters
    ----------
    image : float32 [N, D] ; text : float32 [N, D] — pair ``i`` is (image ``i``, caption ``i``)
    captions : N strings (equal strings are relevant to each other's images)
    keys : float32 [N, Dk] — image search keys where the memory indexes images by key
    weights : RecoWeights or None (``reco`` null)
    exclude : int64 [N] — the memory row of pair ``i`` (−1 none): dropped from both of its retrievals

    Returns
    -------
    dict — ``frozen`` ``{"image_to_text": {"R@1", "R@5", "R@10"}, "text_to_image": {...}}``, ``surrogate`` and
    ``reco`` as ``{mode: that}`` for mode in image | text | both, ``n``, ``k`` (used: at most the memory's rows),
    ``k_requested``, ``alpha``.
    """
    from ..reco.refine import refine

    image = check_array("image [N,D]", image, ndim=2)
    text = check_array("text [N,D]", text, ndim=2)
    if image.shape != text.shape or len(captions) != image.shape[0]:
        raise ShapeError(f"image {image.shape}, text {text.shape} and {len(captions)} captions must describe the same "
                         "N pairs")
    cap = np.array(captions, dtype=object)
    relevant = cap[:, None] == cap[None, :]  # [N,N] bool: same caption text
    relevant |= np.eye(len(captions), dtype=bool)
    k_requested, k = int(k), cap_k(k, memory)  # a memory of n rows gives at most n neighbours
    sq = keys if (keys is not None and memory.key_dim is not None) else image
    common = dict(k=k, search=search, fuse=fuse, exclude=exclude, batch_size=batch_size, exact=exact)
    refined = {"surrogate": {"image": surrogate_refine(memory, image, "image", alpha=alpha, search_queries=sq,
                                                       **common)[0],
                             "text": surrogate_refine(memory, text, "text", alpha=alpha, **common)[0]}}
    if weights is not None:
        refined["reco"] = {"image": refine(weights.image, memory, image, "image", search_queries=sq, backend=backend,
                                           **common)[0],
                           "text": refine(weights.text, memory, text, "text", backend=backend, **common)[0]}
    out: dict = {"n": int(image.shape[0]), "k": int(k), "k_requested": k_requested, "alpha": float(alpha),
                 "frozen": _recalls(image, text, relevant), "reco": None}
    for method, got in refined.items():
        out[method] = {m: _recalls(got["image"] if m in ("image", "both") else image,
                                   got["text"] if m in ("text", "both") else text, relevant)
                       for m in MODES if m != "none"}
    return out
