r"""One photo's trip, timed step by step: decode, preprocess, image graph, search, fusion, scoring.

:func:`profile_query` answers the edge user's question — how long does one photo take to become a refined
prediction — and how much of that a batch would amortise. It times the same six steps twice:

* **batch 1**: one image, alone (what ``reco-ref query`` does for one photo);
* **batch B** (default 64): B images through the same steps at once, reported **per image** (total / B).

=============  ===============================================================================================
step           what runs
=============  ===============================================================================================
decode         open + decode to 8-bit RGB (:func:`reco_ref.encoders.images.decode_image`, Pillow)
preprocess     resize + centre crop + normalise into the graph's input tensor (the encoder's own pipeline)
image graph    ONNX Runtime on the image tower, L2 normalisation of embedding (and search key)
search         k-NN in the memory's image index + gathering the neighbours' text embeddings
               (:func:`reco_ref.memory.retrieve`, search ``uni``, fuse ``cross``: the paper's setting)
fusion         φ_I on the query and its neighbours (:func:`reco_ref.fusion.fusion_forward`, any ``backend``)
scoring        ``argmax_c <v̄, t̄_c>`` against the (already refined) class text embeddings
=============  ===============================================================================================

Each step's time is the median over ``repeats`` runs (the first, warm-up run is not counted), in
milliseconds from :func:`time.perf_counter`. Steps run one after another, single-threaded in Python;
ONNX Runtime and BLAS use their own threads as configured (the encoder's ``threads``).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import RecoError

__all__ = ["STEPS", "profile_query", "format_profile"]

#: The steps, in trip order (keys of the returned ``batch1_ms`` / ``batch_ms_per_image``).
STEPS = ("decode", "preprocess", "image graph", "search", "fusion", "scoring")


def _median_ms(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    out = fn()  # warm-up (first-call allocations, lazy session/graph creation); also the value passed on
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times)), out


def _trip(images: Sequence[Any], encoder, memory, phi_image, class_emb: np.ndarray, k: int, backend: str,
          repeats: int, class_frozen: np.ndarray | None = None, score_map: Any = None
          ) -> tuple[dict[str, float], np.ndarray]:
    """Time the six steps on ``images`` (one batch); returns ({step: ms for the whole batch}, predictions [N])."""
    from ..encoders.images import decode_image
    from ..encoders.preprocess import crop_bytes, normalize_batch
    from ..fusion import fusion_forward, gated_scores, relevance_gate, relevance_of, score_features
    from ..memory import retrieve

    cfg = encoder.config.image
    max_pixels = getattr(encoder, "max_pixels", cfg.max_pixels)
    ms: dict[str, float] = {}
    ms["decode"], rgb = _median_ms(lambda: [decode_image(im, max_pixels=max_pixels, exif_transpose=cfg.exif_transpose,
                                                         alpha=cfg.alpha) for im in images], repeats)  # fmt: skip
    ms["preprocess"], pixels = _median_ms(lambda: normalize_batch([crop_bytes(im, cfg) for im in rgb], cfg), repeats)
    ms["image graph"], (v, key) = _median_ms(lambda: encoder.run_image_graph(pixels), repeats)  # [N,D], [N,Dk]|None
    q_search = key if key is not None and getattr(memory, "key_dim", None) else v
    ms["search"], (r, mask, _rows, scores) = _median_ms(
        lambda: retrieve(memory, q_search, "image", search="uni", fuse="cross", k=k, with_scores=True),
        repeats)  # [N,k,D], [N,k], [N,k], [N,k]
    ms["fusion"], (v_bar, _) = _median_ms(lambda: fusion_forward(phi_image, v, r, mask, backend=backend,
                                                                 scores=scores, score_map=score_map), repeats)
    if class_frozen is not None and relevance_of(phi_image) is not None:  # with the relevance gate, as eval scores
        def score():
            gate = relevance_gate(phi_image, score_features(phi_image, scores, mask, score_map=score_map), mask)
            return np.argmax(gated_scores(v_bar, class_emb, class_frozen, gate), axis=1)

        ms["scoring"], pred = _median_ms(score, repeats)  # [N]
    else:
        ms["scoring"], pred = _median_ms(lambda: np.argmax(v_bar @ class_emb.T, axis=1), repeats)  # [N]
    return ms, pred


def profile_query(images: Sequence[Any], encoder, memory, phi_image, class_emb: np.ndarray, *, k: int = 10,
                  batch: int = 64, backend: str = "numpy", repeats: int = 5,
                  class_frozen: np.ndarray | None = None) -> dict:
    """Per-step latency of one photo at batch 1 and per image at batch ``batch``.

    Parameters
    ----------
    images : sequence of image paths or PIL images, at least one
        ``images[0]`` is the photo timed at batch 1; the batch run takes ``batch`` images cycling through
        ``images`` (pass one to time the same photo ``batch`` times).
    encoder : EncoderPair (:func:`reco_ref.encoders.load`)
    memory : Memory (or ShardedMemory) built with the same encoder
    phi_image : FusionParams — φ_I
    class_emb : float32 [C, D] — the class text embeddings the refined image is scored against (refine them
        with φ_T once beforehand: they do not depend on the photo)
    class_frozen : float32 [C, D], optional — the frozen class text; with a relevance φ_I the scoring step then
        blends it in by the image's relevance gate, as evaluation does (:func:`reco_ref.fusion.gated_scores`)
    k : neighbours per query
    batch : size of the comparison batch (``0`` skips it)
    backend : fusion backend (``"numpy"``, ``"numba"``, ``"onnx"``, ...)
    repeats : timed runs per step (median reported; one extra warm-up run per step)

    Returns
    -------
    dict
        ``batch1_ms`` {step: ms}, ``batch1_total_ms``, ``batch_ms_per_image`` {step: ms} and
        ``batch_total_ms_per_image`` (absent when ``batch`` is 0), ``batch``, ``k``, ``backend``, ``encoder``
        (name), ``prediction`` (class index of ``images[0]``), ``steps`` (:data:`STEPS`).
    """
    images = list(images)
    if not images:
        raise RecoError("images: expected at least one image to profile")
    for name, v in (("k", k), ("repeats", repeats)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise RecoError(f"{name}: expected a positive integer, got {v!r}")
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 0:
        raise RecoError(f"batch: expected an integer >= 0, got {batch!r}")
    class_emb = np.asarray(class_emb, np.float32)
    if class_emb.ndim != 2 or class_emb.shape[1] != encoder.dim:
        raise RecoError(f"class_emb: shape {class_emb.shape}, expected [C, {encoder.dim}] (the encoder's dim)")
    from ..reco.refine import searched_score_map

    smap = searched_score_map(phi_image, memory, "image")  # a property of the memory (in its manifest): not timed
    if class_frozen is not None:
        class_frozen = np.asarray(class_frozen, np.float32)
        if class_frozen.shape != class_emb.shape:
            raise RecoError(f"class_frozen: shape {class_frozen.shape}, expected {class_emb.shape} (as class_emb)")
    one, pred = _trip(images[:1], encoder, memory, phi_image, class_emb, k, backend, repeats, class_frozen, smap)
    out = {"steps": STEPS, "k": int(k), "backend": backend, "encoder": getattr(encoder, "name", "?"),
           "batch1_ms": one, "batch1_total_ms": float(sum(one.values())), "prediction": int(pred[0]),
           "batch": int(batch)}  # fmt: skip
    if batch:
        many = [images[i % len(images)] for i in range(batch)]
        ms, _ = _trip(many, encoder, memory, phi_image, class_emb, k, backend, repeats, class_frozen, smap)
        per = {s: v / batch for s, v in ms.items()}
        out["batch_ms_per_image"] = per
        out["batch_total_ms_per_image"] = float(sum(per.values()))
    return out


def format_profile(p: dict) -> str:
    """A small fixed-width table of :func:`profile_query`'s result (the ``reco-ref query --profile`` lines)."""
    b = p.get("batch", 0) and "batch_ms_per_image" in p
    head = f"{'step':12s} {'batch 1 ms':>11s}" + (f" {'batch ' + str(p['batch']) + ' ms/img':>16s} {'ratio':>6s}" if b else "")
    lines = [f"one photo, encoder {p['encoder']}, k={p['k']}, fusion backend {p['backend']}", head]
    for s in p["steps"]:
        row = f"{s:12s} {p['batch1_ms'][s]:11.2f}"
        if b:
            per = p["batch_ms_per_image"][s]
            row += f" {per:16.3f} {p['batch1_ms'][s] / per if per > 0 else float('inf'):6.1f}"
        lines.append(row)
    total = f"{'total':12s} {p['batch1_total_ms']:11.2f}"
    if b:
        total += f" {p['batch_total_ms_per_image']:16.3f} {p['batch1_total_ms'] / p['batch_total_ms_per_image']:6.1f}"
    lines.append(total)
    return "\n".join(lines)
