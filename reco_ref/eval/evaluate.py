"""What ``reco-ref eval`` and ``reco-ref query`` do, as library functions (the CLI only parses arguments).

::

    from reco_ref.eval.evaluate import evaluate_dataset, query
    result = evaluate_dataset("mem/flowers102-train", "../shared/data/flowers102/manifest.csv", "test")
    result = evaluate_dataset(..., fusion="none")     # no RECO: frozen, surrogate and k-NN vote only
    hits = query("mem/flowers102-train", image="rose.jpg", class_names=["rose", "tulip"])

Both check, before any heavy work, that the memory, the encoder and the fusion weights belong together
(fingerprint and dimension; one-line errors naming what differs), and use the shipped fusion weights
(:func:`reco_ref.reco.weights.default_weights_path`) when no ``fusion`` path is given.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import ParamsFormatError, RecoError
from .zeroshot import DEFAULT_ALPHA, check_mode, evaluate_zero_shot


def load_weights(fusion: str | os.PathLike | None, encoder: Any, *, allow_image_only: bool = False
                 ) -> tuple[Any, str]:
    """``(RecoWeights, path)``: ``fusion`` or the shipped weights of ``encoder``, checked against the encoder.

    ``fusion="none"`` gives ``(None, None)``: no RECO at all (the frozen encoder and the training-free references).
    ``allow_image_only``: also accept φ_I alone (:func:`reco_ref.eval.edge.save_image_weights`; then
    ``text`` is None), for ``query`` with precomputed class text.
    """
    from ..io import require_file
    from ..reco.weights import check_weights_match, default_weights_path, load_reco_weights

    if fusion is not None and str(fusion) == "none":
        return None, None
    if fusion is None:
        path = default_weights_path(encoder.name)
        if not path.is_file():
            raise ParamsFormatError(f"no shipped fusion weights for encoder {encoder.name!r} at {path} (not trained "
                                    "and shipped yet); pass --weights WEIGHTS.npz (written by reco-ref train)")
    else:
        path = Path(fusion)
    if path.exists() or path.is_symlink():  # a device or a pipe is refused before any reader opens it
        require_file(path)
    if allow_image_only:
        from .edge import load_fusion_weights

        w = load_fusion_weights(path)
    else:
        w = load_reco_weights(path)
    check_weights_match(w, encoder_fingerprint=encoder.fingerprint, dim=encoder.dim, where=f"--weights {path}")
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


def open_memory(memory: str | os.PathLike, encoder: Any, client: Any = None) -> Any:
    """Open (validate) a memory of any kind and refuse one built with another encoder (fingerprint / dim), or one
    of 0 rows (nothing to retrieve: :func:`reco_ref.checks.memory_rows`). ``client``: a ``distributed.Client``
    (``--scheduler``): the memory is served by its workers (:class:`reco_ref.memory.ServedMemory`)."""
    from ..checks import memory_rows
    from ..memory import open_memory as open_any

    mem = open_any(memory, client=client, encoder=encoder)
    memory_rows(mem)
    return mem


def evaluate_dataset(memory: str | os.PathLike, dataset: str | os.PathLike, split: str = "test", *,
                     fusion: str | os.PathLike | None = None, mode: str = "both", k: int = 10,
                     alpha: float = DEFAULT_ALPHA, templates: str | None = None, model: Any = "reco-mini",
                     backend: str = "numpy", cache_dir: str | os.PathLike | None = None, search: str = "uni",
                     fuse: str = "cross", dup_threshold: float | None = None, exact: bool = False,
                     batch_size: int = 1024, threads: int | None = None, progress: bool = False,
                     say: Callable[[str], None] | None = None, client: Any = None) -> dict:
    """Zero-shot evaluation of a dataset split against a memory: the issue-9 contract dict.

    ``client``: a ``distributed.Client`` (``--scheduler``): the memory is searched and read on its workers; the
    result is the same.

    Returns
    -------
    dict — :func:`reco_ref.eval.zeroshot.evaluate_zero_shot`'s result plus ``dataset``, ``split``, ``memory``,
    ``memory_rows``, ``fusion`` (the weights file), ``fusion_meta`` (what the weights say they were trained on),
    ``templates`` (name), ``template_list``, ``encoder``.
    """
    from ..checks import cap_k
    from ..encoders import load
    from .data import embed_split, labels_by_source, own_rows, read_split
    from ..reco.refine import check_backend
    from .templates import class_embeddings, resolve_templates

    say = say or (lambda _s: None)
    check_mode(mode)
    check_backend(backend)  # cuda without a device too, before any work
    ds = read_split(dataset, split)  # manifest errors before anything is loaded
    tname, tlist = resolve_templates(templates, ds.manifest)
    enc = load(model, threads=threads) if isinstance(model, (str, os.PathLike)) else model
    mem = open_memory(memory, enc, client)
    cap_k(k, mem, note=say)  # said once here; evaluate_zero_shot caps again and records k and k_requested
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

    from ..paths import file_problem

    p = Path(path)
    if not p.exists() and not p.is_symlink():
        raise FileNotFoundError(f"class names file not found: {p}")
    if not p.is_dir() and file_problem(p):  # a device never ends a read, a pipe blocks it
        raise RecoError(f"{p}: {file_problem(p)}; expected a class names file or a dataset manifest")
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
          fusion: str | os.PathLike | None = None, class_names: list[str] | None = None, k: int | None = None,
          top: int = 5, templates: str | None = None, model: Any = "reco-mini", backend: str = "numpy",
          threads: int | None = None, profile: bool = False, classes_manifest: str | os.PathLike | None = None,
          say: Callable[[str], None] | None = None, class_text: str | os.PathLike | None = None,
          client: Any = None) -> dict:
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

    ``k`` is capped at the memory's rows (a memory of n rows has n neighbours to give); ``say`` (e.g. a print to
    stderr) is told ``note: k = 10 capped at the memory's 3 rows`` when it is. ``k=None``: 10, or the k of
    ``class_text``.

    ``class_text``: a file of precomputed class text (``reco-ref class-text``, :mod:`reco_ref.eval.edge`): the
    frozen t_c and refined t̄_c of its class names, used instead of computing them, so that ``fusion`` may hold
    φ_I alone (``reco-ref export-image-weights``) for an image query. The class names, templates and k default to
    the file's; the file is refused when it was made for other weights, another encoder, another memory, another
    k, other class names or other templates. The scores are those of the same query with the full weights.

    Returns
    -------
    dict with ``query``, ``modality``, ``k`` (used), ``k_requested``, ``fusion``, ``neighbours`` (row, score,
    caption, source, label), and with classes ``frozen_top`` / ``reco_top`` (lists of ``{"class", "score"}``; ``reco_top`` and
    ``refined_minus_frozen_cosine`` only with fusion weights, i.e. not with ``fusion="none"``), ``class_text`` (the
    file) when one was given.
    """
    from ..checks import cap_k
    from ..encoders import load
    from .edge import check_class_text, class_text_arrays, load_class_text
    from ..reco.refine import check_backend, refine
    from .templates import resolve_templates

    if (image is None) == (text is None):
        raise RecoError("query: give exactly one of an image file or --text")
    ct = None
    if class_text is not None:  # read and checked against the arguments before any model is loaded
        if fusion is not None and str(fusion) == "none":
            raise RecoError("--class-text holds RECO's refined class text: give fusion weights, not --weights none")
        ct = load_class_text(class_text)
        if class_names:
            check_class_text(ct, class_names=class_names)
        class_names = list(ct["header"]["class_names"])
        if templates is not None or classes_manifest is not None:  # what the same query without the file would use
            check_class_text(ct, templates=resolve_templates(templates, classes_manifest)[1])
        k = ct["header"]["k"] if k is None else k
    k = 10 if k is None else k
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise RecoError(f"k: expected a positive integer, got {k!r}")
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise RecoError(f"top: expected a positive integer, got {top!r}")
    if text is not None and not text.strip():
        raise RecoError("--text: empty query text")
    if image is not None and not Path(image).is_file():
        from ..paths import file_problem

        problem = file_problem(image)
        if problem == "no such file":
            raise FileNotFoundError(f"query image not found: {image}")
        raise RecoError(f"query image {image}: {problem}")
    if profile and (image is None or not class_names or fusion == "none"):
        raise RecoError("--profile times an image's whole trip: give an image, --classes or --class-names (the "
                        "scoring step) and fusion weights (not --weights none)")
    check_backend(backend)  # cuda without a device too, before any work
    from ..fusion import gated_scores, relevance_of

    enc = load(model, threads=threads) if isinstance(model, (str, os.PathLike)) else model
    mem = open_memory(memory, enc, client)  # client: served by a Dask cluster (--scheduler)
    k_requested, k = k, cap_k(k, mem, note=say)
    weights, wpath = load_weights(fusion, enc, allow_image_only=True)
    if weights is not None and weights.text is None and (text is not None or (class_names and ct is None)):
        raise RecoError(f"--weights {wpath} holds φ_I alone: " + ("a text query needs φ_T (use the full weights)"
                        if text is not None else "rank classes with --class-text FILE (made by reco-ref class-text "
                        "with the full weights), or use the full weights"))
    if ct is not None:
        check_class_text(ct, encoder=enc, weights=weights, memory=mem, k=k)
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
    out = {"query": str(image) if image is not None else text, "modality": modality, "k": k,
           "k_requested": k_requested, "fusion": wpath, "memory": str(mem.root), "neighbours": neighbours}
    if weights is not None:
        refined, _, _, gate = refine(weights.phi(modality), mem, v, modality, search_queries=key, k=k,
                                     backend=backend, with_gate=True)
        if relevance_of(weights.phi(modality)) is not None:  # 1 = the bias kept the query (memory judged irrelevant)
            out["relevance_gate"] = float(gate[0])
        out["refined_minus_frozen_cosine"] = float(1.0 - (refined[0].astype(np.float64) @ v[0].astype(np.float64)))
    if class_names:
        if ct is not None:  # computed on the build machine by the same class_text_arrays, checked above
            out["templates"], out["class_text"] = ct["header"]["templates"], ct["path"]
            cls, cls_bar = ct["frozen"], ct["refined"]
        else:
            tname, tlist = resolve_templates(templates, classes_manifest)  # the dataset's set, as eval picks it
            out["templates"] = tname
            cls, cls_bar = class_text_arrays(enc, weights, mem, class_names, tlist, k=k, backend=backend)  # [C,D]
        sides: list = [("frozen_top", v[0], cls)]
        if weights is not None:
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
                   say: Callable[[str], None] | None = None, client: Any = None) -> dict:
    """Image↔text retrieval (Recall@1/5/10) on a pairs CSV (``image,caption[,split]``) against a memory.

    Returns :func:`reco_ref.eval.retrieval.evaluate_retrieval`'s result plus ``pairs``, ``split``, ``memory``,
    ``fusion``, ``excluded_own_rows``.
    """
    from ..checks import cap_k
    from ..encoders import load
    from ..memory import read_pairs_csv
    from .data import Split, embed_split, own_rows
    from ..reco.refine import check_backend
    from .retrieval import evaluate_retrieval

    say = say or (lambda _s: None)
    check_backend(backend)  # cuda without a device too, before any work
    items = read_pairs_csv(pairs, split=split)
    if not items:
        raise RecoError(f"{pairs}: no image-caption pairs" + (f" in split {split!r}" if split else ""))
    captions = [it["caption"] or "" for it in items]
    enc = load(model, threads=threads) if isinstance(model, (str, os.PathLike)) else model
    mem = open_memory(memory, enc, client)  # client: served by a Dask cluster (--scheduler)
    cap_k(k, mem, note=say)  # said once here; evaluate_retrieval caps again and records k and k_requested
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


def make_class_text(memory: str | os.PathLike, class_names: list[str], *, templates: str | None = None,
                    classes_manifest: str | os.PathLike | None = None, k: int = 10,
                    fusion: str | os.PathLike | None = None, model: Any = "reco-mini", backend: str = "numpy",
                    threads: int | None = None, say: Callable[[str], None] | None = None
                    ) -> tuple[dict, np.ndarray, np.ndarray]:
    """Compute the class text a device needs to run ``query`` with φ_I alone (the build machine's step).

    Parameters are ``query``'s: the memory the device searches, the class names, ``templates`` (a set, a file,
    or None: the set ``eval`` uses for ``classes_manifest``'s dataset, else generic), ``k`` (capped at the
    memory's rows, as ``query`` caps it), the full RECO weights (default: the shipped weights of ``model``).

    Returns
    -------
    header : dict — the JSON header (see :func:`save_class_text`)
    frozen : float32 [C, D] — t_c
    refined : float32 [C, D] — t̄_c = φ_T(t_c, …)
    """
    from .. import __version__
    from ..checks import cap_k
    from ..encoders import load
    from ..reco.refine import check_backend
    from .edge import CLASS_TEXT_FORMAT, CLASS_TEXT_VERSION, class_text_arrays, memory_digest, weights_digests
    from .templates import resolve_templates

    if not class_names:
        raise RecoError("class-text: no class names (give --classes MANIFEST or --class-names FILE)")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise RecoError(f"k: expected a positive integer, got {k!r}")
    check_backend(backend)
    tname, tlist = resolve_templates(templates, classes_manifest)
    enc = load(model, threads=threads) if isinstance(model, (str, os.PathLike)) else model
    mem = open_memory(memory, enc)
    k_used = cap_k(k, mem, note=say)
    weights, wpath = load_weights(fusion, enc, allow_image_only=True)
    if weights is None:
        raise RecoError("class-text: refined class text needs fusion weights (not --weights none)")
    frozen, refined = class_text_arrays(enc, weights, mem, list(class_names), tlist, k=k_used, backend=backend)
    header = {"format": CLASS_TEXT_FORMAT, "format_version": CLASS_TEXT_VERSION,
              "created_by": f"reco_ref {__version__}", "class_names": list(class_names), "templates": tname,
              "template_list": list(tlist), "k": int(k_used), "k_requested": int(k), "backend": backend,
              "encoder": {"name": enc.name, "fingerprint": enc.fingerprint, "dim": int(enc.dim)},
              "fusion": dict(weights_digests(weights), source=os.path.basename(str(wpath))),
              "memory": {"name": Path(str(mem.root)).name, "rows": len(mem), "content_sha256": memory_digest(mem)}}
    return header, frozen, refined
