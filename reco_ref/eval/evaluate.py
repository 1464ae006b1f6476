"""What ``reco-ref eval`` and ``reco-ref query`` do, as library functions (the CLI only parses arguments).

::

    from reco_ref.eval.evaluate import evaluate_dataset, query
    result = evaluate_dataset("mem/flowers102-train", "../shared/data/flowers102/manifest.csv", "test")
    result = evaluate_dataset(..., fusion="none")     # no RECO: frozen, surrogate and k-NN vote only
    hits = query("mem/flowers102-train", image="rose.jpg", class_names=["rose", "tulip"])

Both check, before any heavy work, that the memory, the encoder and the fusion weights belong together
(fingerprint and dimension; one-line errors naming what differs), and use the shipped fusion weights
(:func:`reco_ref.train.weights.default_weights_path`) when no ``fusion`` path is given.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import ParamsFormatError, RecoError
from .zeroshot import DEFAULT_ALPHA, check_mode, evaluate_zero_shot


def load_weights(fusion: str | os.PathLike | None, encoder: Any) -> tuple[Any, str]:
    """``(RecoWeights, path)``: ``fusion`` or the shipped weights of ``encoder``, checked against the encoder.

    ``fusion="none"`` gives ``(None, None)``: no RECO at all (the frozen encoder and the training-free references).
    """
    from ..train.weights import check_weights_match, default_weights_path, load_reco_weights

    if fusion is not None and str(fusion) == "none":
        return None, None
    if fusion is None:
        path = default_weights_path(encoder.name)
        if not path.is_file():
            raise ParamsFormatError(f"no shipped fusion weights for encoder {encoder.name!r} at {path} (not trained "
                                    "and shipped yet); pass --fusion WEIGHTS.npz (written by reco-ref train)")
    else:
        path = Path(fusion)
    w = load_reco_weights(path)
    check_weights_match(w, encoder_fingerprint=encoder.fingerprint, dim=encoder.dim, where=f"--fusion {path}")
    return w, str(path)


def weights_saw(weights: Any, manifest: str | os.PathLike) -> str:
    """Whether RECO weights saw the train split of the dataset ``manifest`` describes: ``"in-domain"``,
    ``"never saw"`` or ``"unknown"``.

    Read from ``meta["saw_datasets"]`` (``[{"name", "manifest_sha256"}]``, written by the rebuild script of the
    shipped weights), compared by the manifest's sha256; weights without that field (e.g. from ``reco-ref train``,
    whose memories need not come from a manifest) are ``"unknown"``."""
    saw = (weights.meta or {}).get("saw_datasets") if weights is not None else None
    if not isinstance(saw, list):
        return "unknown"
    from ..io import sha256_file

    digest = sha256_file(manifest)
    return "in-domain" if any(isinstance(e, dict) and e.get("manifest_sha256") == digest for e in saw) else "never saw"


def open_memory(memory: str | os.PathLike, encoder: Any) -> Any:
    """Open (validate) a memory and refuse one built with another encoder (fingerprint / dim)."""
    from ..memory import Memory

    return Memory.open(memory, encoder=encoder)


def evaluate_dataset(memory: str | os.PathLike, dataset: str | os.PathLike, split: str = "test", *,
                     fusion: str | os.PathLike | None = None, mode: str = "both", k: int = 10,
                     alpha: float = DEFAULT_ALPHA, templates: str | None = None, model: Any = "reco-mini",
                     backend: str = "numpy", cache_dir: str | os.PathLike | None = None, search: str = "uni",
                     fuse: str = "cross", dup_threshold: float | None = None, exact: bool = False,
                     batch_size: int = 1024, threads: int | None = None, progress: bool = False,
                     say: Callable[[str], None] | None = None) -> dict:
    """Zero-shot evaluation of a dataset split against a memory: the issue-9 contract dict.

    Returns
    -------
    dict — :func:`reco_ref.eval.zeroshot.evaluate_zero_shot`'s result plus ``dataset``, ``split``, ``memory``,
    ``memory_rows``, ``fusion`` (the weights file), ``fusion_meta`` (what the weights say they were trained on),
    ``templates`` (name), ``template_list``, ``encoder``.
    """
    from ..encoders import load
    from ..fusion import get_backend
    from .data import embed_split, labels_by_source, own_rows, read_split
    from .templates import class_embeddings, resolve_templates

    say = say or (lambda _s: None)
    check_mode(mode)
    get_backend(backend)
    ds = read_split(dataset, split)  # manifest errors before anything is loaded
    tname, tlist = resolve_templates(templates, ds.manifest)
    enc = load(model, threads=threads) if isinstance(model, (str, os.PathLike)) else model
    mem = open_memory(memory, enc)
    weights, wpath = load_weights(fusion, enc)
    say(f"{len(ds)} images, {ds.n_classes} classes from {ds.manifest} [{split}]; memory {mem.root}: {len(mem)} rows; "
        f"fusion {wpath or 'none (no RECO row)'}; templates {tname} ({len(tlist)})")
    cls = class_embeddings(enc, ds.class_names, tlist)  # [C,D]
    image, keys = embed_split(ds, enc, cache_dir=cache_dir, progress=progress)  # [N,D], [N,Dk] | None
    search_vectors = keys if (keys is not None and mem.key_dim is not None) else image
    own = own_rows(mem, search_vectors)  # [N] the memory row holding each image itself, -1 none
    n_own = int((own >= 0).sum())
    if n_own:
        say(f"{n_own} of {len(ds)} evaluated images are memory rows themselves: excluded from their own retrieval")
    stages = None
    if progress:
        from tqdm import tqdm

        stages = tqdm(total=2 if weights is None else 3, desc="eval", unit="stage")
    try:
        started: list[str] = []

        def tick(name: str) -> None:  # told when a stage starts: the previous one is done
            if stages is not None:
                if started:
                    stages.update(1)
                stages.set_postfix_str(name)
            started.append(name)

        result = evaluate_zero_shot(mem, image, ds.labels, cls, ds.class_names, keys=keys, weights=weights,
                                    mode=mode, k=k, alpha=alpha, search=search, fuse=fuse, backend=backend,
                                    exclude=own if n_own else None, dup_threshold=dup_threshold,
                                    labels_by_source=labels_by_source(ds.manifest), exact=exact,
                                    batch_size=batch_size, progress=tick)
        if stages is not None:
            stages.update(1)
    finally:
        if stages is not None:
            stages.close()
    return {**result, "fusion": wpath, "dataset": str(ds.manifest), "split": split, "memory": str(mem.root),
            "memory_rows": len(mem), "templates": tname, "template_list": list(tlist),
            "reco_weights_saw_dataset": None if weights is None else weights_saw(weights, ds.manifest),
            "fusion_meta": None if weights is None else {
                key: weights.meta.get(key) for key in ("trained_on", "recipe", "seed", "k", "search", "fuse",
                                                       "encoder_name") if key in weights.meta},
            "encoder": {"name": enc.name, "fingerprint": enc.fingerprint, "dim": int(enc.dim),
                        "key_dim": None if enc.key_dim is None else int(enc.key_dim)}}


def read_class_names(path: str | os.PathLike) -> list[str]:
    """Class names from a dataset manifest (``file,label,class_name,split``) or a text file, one name per line."""
    from .data import read_split

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"class names file not found: {p}")
    if p.is_dir() or p.suffix.lower() == ".csv":
        return read_split(p).class_names
    try:
        names = [s.strip() for s in p.read_text(encoding="utf-8").splitlines() if s.strip()]
    except UnicodeDecodeError:
        raise RecoError(f"{p}: class names file is not UTF-8 text") from None
    if not names:
        raise RecoError(f"{p}: no class names in it (expected one name per line)")
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise RecoError(f"{p}: class name {dup!r} appears twice")
    return names


def query(memory: str | os.PathLike, *, image: str | os.PathLike | None = None, text: str | None = None,
          fusion: str | os.PathLike | None = None, class_names: list[str] | None = None, k: int = 10,
          top: int = 5, templates: str | None = None, model: Any = "reco-mini", backend: str = "numpy",
          threads: int | None = None, profile: bool = False, classes_manifest: str | os.PathLike | None = None) -> dict:
    """One query (an image file or a text) against a memory: its neighbours and, with classes, top classes.

    Templates: ``templates`` (a set name or a file) or, when None / "auto", the set ``eval`` uses for the dataset
    of ``classes_manifest`` (the ``--classes`` manifest) — so ``query`` and ``eval`` rank with the same prompts;
    ``out["templates"]`` names the set used.

    ``profile=True`` (an image query with classes and fusion weights) adds ``profile``: the photo's trip timed step
    by step (decode, preprocess, image graph, search, fusion, scoring) at batch 1 and per image at batch 64, from
    :func:`reco_ref.eval.latency.profile_query`.

    Image: image→image search (by search key where the memory has keys), the refined ``v̄ = φ_I(v, T^M[kNN])``.
    Text: text→text search, ``t̄ = φ_T(t, V^M[kNN])``. With ``class_names``, the frozen and refined top-``top``
    classes by cosine with the template class embeddings (refined: both sides refined, mode ``both``).

    Returns
    -------
    dict with ``query``, ``modality``, ``k``, ``fusion``, ``neighbours`` (row, score, caption, source, label),
    and with classes ``frozen_top`` / ``reco_top`` (lists of ``{"class", "score"}``; ``reco_top`` and
    ``refined_minus_frozen_cosine`` only with fusion weights, i.e. not with ``fusion="none"``).
    """
    from ..encoders import load
    from ..fusion import get_backend
    from ..train.refine import refine
    from .templates import class_embeddings, resolve_templates

    if (image is None) == (text is None):
        raise RecoError("query: give exactly one of an image file or --text")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise RecoError(f"k: expected a positive integer, got {k!r}")
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise RecoError(f"top: expected a positive integer, got {top!r}")
    if text is not None and not text.strip():
        raise RecoError("--text: empty query text")
    if image is not None and not Path(image).is_file():
        raise FileNotFoundError(f"query image not found: {image}")
    if profile and (image is None or not class_names or fusion == "none"):
        raise RecoError("--profile times an image's whole trip: give an image, --classes or --class-names (the "
                        "scoring step) and fusion weights (not --fusion none)")
    get_backend(backend)
    from ..fusion import gated_scores, relevance_of

    enc = load(model, threads=threads) if isinstance(model, (str, os.PathLike)) else model
    mem = open_memory(memory, enc)
    weights, wpath = load_weights(fusion, enc)
    if image is not None:
        modality = "image"
        if mem.key_dim is not None:
            v, key = enc.encode_images([str(image)], with_keys=True)  # [1,D], [1,Dk]
        else:
            v = enc.encode_images([str(image)])
            key = v
    else:
        modality = "text"
        v = enc.encode_texts([text])  # [1,D]
        key = v
    rows, scores, valid = mem.search(key, modality=modality, k=k)  # [1,k]
    meta = mem.metadata(rows[0][valid[0]])
    neighbours = [{"row": int(m["row"]), "score": float(s), "caption": m["caption"], "source": m["source"],
                   "label": m["label"]} for m, s in zip(meta, scores[0][valid[0]])]
    out = {"query": str(image) if image is not None else text, "modality": modality, "k": k, "fusion": wpath,
           "memory": str(mem.root), "neighbours": neighbours}
    if weights is not None:
        refined, _, _, gate = refine(weights.phi(modality), mem, v, modality, search_queries=key, k=k,
                                     backend=backend, with_gate=True)
        if relevance_of(weights.phi(modality)) is not None:  # 1 = the bias kept the query (memory judged irrelevant)
            out["relevance_gate"] = float(gate[0])
        out["refined_minus_frozen_cosine"] = float(1.0 - (refined[0].astype(np.float64) @ v[0].astype(np.float64)))
    if class_names:
        tname, tlist = resolve_templates(templates, classes_manifest)  # the dataset's set, as eval picks it
        out["templates"] = tname
        cls = class_embeddings(enc, class_names, tlist)  # [C,D]
        sides: list = [("frozen_top", v[0], cls)]
        if weights is not None:
            cls_bar, _, _ = refine(weights.text, mem, cls, "text", k=k, backend=backend)  # [C,D]
            # an image query blends refined and frozen class text by its gate (fusion.gated_scores)
            sides.append(("reco_top", refined[0], cls_bar, gate if modality == "image" else None))
        top = min(top, len(class_names))
        for name, a, b, *g in sides:
            s = gated_scores(a[None], b, cls, g[0] if g else None)[0]  # [C]
            order = np.argsort(-s, kind="stable")[:top]
            out[name] = [{"class": class_names[c], "score": float(s[c])} for c in order]
        if profile:
            from .latency import profile_query

            # class embeddings do not depend on the photo: refined once above, scored per photo inside the profile
            out["profile"] = profile_query([str(image)], enc, mem, weights.image, cls_bar, k=k, batch=64,
                                           backend=backend, repeats=3, class_frozen=cls)
    return out


def evaluate_pairs(memory: str | os.PathLike, pairs: str | os.PathLike, split: str | None = None, *,
                   fusion: str | os.PathLike | None = None, k: int = 10, alpha: float = DEFAULT_ALPHA,
                   model: Any = "reco-mini", backend: str = "numpy", cache_dir: str | os.PathLike | None = None,
                   search: str = "uni", fuse: str = "cross", exact: bool = False, batch_size: int = 1024,
                   threads: int | None = None, progress: bool = False,
                   say: Callable[[str], None] | None = None) -> dict:
    """Image↔text retrieval (Recall@1/5/10) on a pairs CSV (``image,caption[,split]``) against a memory.

    Returns :func:`reco_ref.eval.retrieval.evaluate_retrieval`'s result plus ``pairs``, ``split``, ``memory``,
    ``fusion``, ``excluded_own_rows``.
    """
    from ..encoders import load
    from ..fusion import get_backend
    from ..memory import read_pairs_csv
    from .data import Split, embed_split, own_rows
    from .retrieval import evaluate_retrieval

    say = say or (lambda _s: None)
    get_backend(backend)
    items = read_pairs_csv(pairs, split=split)
    if not items:
        raise RecoError(f"{pairs}: no image-caption pairs" + (f" in split {split!r}" if split else ""))
    captions = [it["caption"] or "" for it in items]
    enc = load(model, threads=threads) if isinstance(model, (str, os.PathLike)) else model
    mem = open_memory(memory, enc)
    weights, wpath = load_weights(fusion, enc)
    say(f"{len(items)} pairs from {pairs}" + (f" [{split}]" if split else "") + f"; memory {mem.root}: {len(mem)} rows; "
        f"fusion {wpath}")
    ds = Split(manifest=Path(pairs), split=split, files=[it["image"] for it in items],
               labels=np.zeros(len(items), np.int64), class_names=[])
    image, keys = embed_split(ds, enc, cache_dir=cache_dir, progress=progress)
    text = enc.encode_texts(captions)
    own = own_rows(mem, keys if (keys is not None and mem.key_dim is not None) else image)
    n_own = int((own >= 0).sum())
    r = evaluate_retrieval(mem, image, text, captions, keys=keys, weights=weights, k=k, alpha=alpha, search=search,
                           fuse=fuse, backend=backend, exclude=own if n_own else None, exact=exact,
                           batch_size=batch_size)
    return {**r, "task": "retrieval", "pairs": str(pairs), "split": split, "memory": str(mem.root), "fusion": wpath,
            "excluded_own_rows": n_own, "search": search, "fuse": fuse}
