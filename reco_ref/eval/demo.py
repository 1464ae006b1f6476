r"""``reco-ref demo``: the whole pipeline, step by step, on shipped sample data, offline, in seconds.

::

    from reco_ref.eval.demo import run_demo       # also importable as reco_ref.demo.run_demo
    results = run_demo()                          # shipped OpenClipart sample (weights/demo), reco-mini
    results = run_demo(data="../shared/data/flowers102", limit=100)   # a dataset manifest folder

Steps (each a function below, each printed with its timing by :func:`run_demo`):

1. :func:`step_encode` — the frozen encoder pair (default ``reco-mini``) embeds the memory's images and captions
   and the query images; ``v = f_I(image)``, ``t = f_T(caption)``, L2-normalised ``[N,D]`` (+ image search keys
   ``[N,Dk]`` where the encoder has them).
2. :func:`step_memory` — :func:`reco_ref.memory.build_memory_from_arrays` writes an on-disk memory (npy + SQLite +
   one HNSW index per modality) from those arrays; :meth:`reco_ref.memory.Memory.open` validates it.
3. :func:`step_search` — image→image: each query image's ``k`` nearest memory images, with their captions.
4. :func:`step_fuse` (docs/reco.md §1–§2) — each query is fed the *text* embeddings of its neighbours through
   :func:`reco_ref.fusion.fusion_forward`; class prompts are fed the *image* embeddings of theirs. The fusion
   layers here are **untrained**: at initialisation they are the identity (``W_o, b_o, W_2, b_2, e_q = 0``),
   so ``refined == frozen``; the demo measures ``max |refined − frozen|`` instead of assuming it, and prints
   the RECO loss (docs/reco.md §3) that training would start from. :func:`step_trained` then refines the same queries
   and prompts with trained weights (``fusion=``, or the shipped ones when present) for comparison.
5. :func:`step_evaluate` (docs/reco.md §4) — zero-shot classification of the queries with one prompt per class,
   ``argmax_c ⟨v, t_c⟩``; the same with the (untrained, identity) fusion layers; and a retrieval baseline:
   the majority category of the ``k`` image→image neighbours (ties: larger summed cosine). Chance ``1/C``
   and the majority-class rate are printed beside them.

Outputs in ``out_dir`` (a fresh temporary folder by default, kept and printed): ``memory/``, ``results.json``
(atomic) and the pictures ``neighbours.png`` (a query and its neighbours per row) and, with step 6,
``comparison.png`` (:func:`reco_ref.eval.demo_compare.comparison_figure`). The pictures need matplotlib, the
``demo`` extra (``python3 -m pip install -e ".[demo]"``, README's first command). The last printed line says where
they are (``pictures: /abs/neighbours.png, /abs/comparison.png``) or, without matplotlib, that none were drawn
and which extra draws them (:data:`NO_MATPLOTLIB`).

Data: ``data=None`` uses ``weights/demo/pairs.csv`` (``image,caption,category,label,split,source``; split
``memory`` / ``query``), prompts ``"a drawing of a {category}."``. ``data=DIR`` takes a dataset folder with
``manifest.csv`` (``file,label,class_name,split``): the ``train`` split is the memory (captions ``"a photo of a
{class_name}."``), up to ``limit`` rows of the ``test`` split are the queries, prompts ``"a photo of a
{class_name}."`` (:func:`reco_ref.eval.data.shipped_data`, :func:`reco_ref.eval.data.manifest_data`).
"""

from __future__ import annotations

import io
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..checks import cap_k, check_int
from ..errors import MemoryFormatError, RecoError
from ..io import atomic_write_bytes, atomic_write_json
from .data import manifest_data, shipped_data
from .metrics import knn_vote, zero_shot
from .report import short

FUSION_HEADS = 8  # docs/reco.md §2 default
IDENTITY_TOL = 1e-6  # |refined − frozen| at init: 0 up to float32 re-normalisation of a unit vector
LOSS_BATCH = 256  # rows of the memory used for the "loss at initialisation" line (one training batch)

Say = Callable[..., None]
# the demo's last line when matplotlib is missing (one line: what is missing, what to install)
NO_MATPLOTLIB = ('pictures: none, matplotlib is not installed; the demo extra draws neighbours.png and comparison.png: '
                 'python3 -m pip install -e ".[demo]"')


def have_matplotlib() -> bool:
    """True where the pictures can be drawn: the imports :func:`figure` and ``comparison_figure`` make succeed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------------------------------- printing
def printer(quiet: bool) -> Say:
    """``print`` that flushes, or a no-op when ``quiet``."""
    return (lambda *a, **k: None) if quiet else (lambda *a, **k: print(*a, **k, flush=True))


def figure(path: Path, examples: list[dict], n_cols: int) -> bool:
    """A query and its first neighbours per row -> PNG at ``path`` (atomic). False without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    from PIL import Image

    rows = len(examples)
    fig = Figure(figsize=(1.9 * (n_cols + 1), 2.2 * rows), dpi=100)
    FigureCanvasAgg(fig)  # a canvas of our own: no pyplot, no global backend state
    for r, ex in enumerate(examples):
        cells = [(ex["image"], f"query: {ex['category']}", "black")] + [
            (nb["image"], f"{nb['score']:.2f} {nb['category']}", "green" if nb["same"] else "red")
            for nb in ex["neighbours"][:n_cols]]
        for c, (img, title, colour) in enumerate(cells):
            ax = fig.add_subplot(rows, n_cols + 1, r * (n_cols + 1) + c + 1)
            with Image.open(img) as im:
                ax.imshow(np.asarray(im.convert("RGB")))
            ax.set_title(short(title, 24), fontsize=8, color=colour)
            ax.set_axis_off()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return True


# ---------------------------------------------------------------------------------------------- steps
def _steps_of(say: Say, total: int) -> Say:
    """``say`` with the five core steps' headers ``[i/5]`` numbered out of ``total`` (the comparison adds one)."""
    def out(m: str) -> None:
        say(m.replace("/5] ", f"/{total}] ", 1) if m.startswith("\n[") else m)

    return out


def step_encode(ds: dict, encoder: Any, threads: int | None, say: Say, timing: dict) -> dict:
    """Step 1: embed memory images + captions, query images, class prompts. Returns the arrays by name."""
    from ..encoders import load

    n_mem, n_q, C = len(ds["memory"]), len(ds["queries"]), len(ds["class_names"])
    t = time.perf_counter()
    enc = load(encoder, threads=threads) if isinstance(encoder, (str, Path)) else encoder
    timing["load_encoder"] = time.perf_counter() - t
    say(f"\n[1/5] encode  {enc.name}: D={enc.dim}, image search key Dk={enc.key_dim}, fingerprint "
        f"{enc.fingerprint[:12]}… (loaded in {timing['load_encoder']:.2f} s)")
    # an encoder with an image search key (config image.key_output) searches images by key (contract)
    key_output = getattr(getattr(getattr(enc, "config", None), "image", None), "key_output", None)
    with_keys = bool(key_output) or getattr(enc, "key_dim", None) is not None
    t = time.perf_counter()
    mem_paths = [it["image"] for it in ds["memory"]]
    q_paths = [it["image"] for it in ds["queries"]]
    got = enc.encode_images(mem_paths + q_paths, with_keys=with_keys)
    img, keys = got if with_keys else (got, None)  # [M+Q,D], [M+Q,Dk] or None
    timing["encode_images"] = time.perf_counter() - t
    t = time.perf_counter()
    mem_txt = enc.encode_texts([it["caption"] for it in ds["memory"]])  # [M,D]
    cls_txt = enc.encode_texts([ds["prompt"].format(c) for c in ds["class_names"]])  # [C,D]
    timing["encode_texts"] = time.perf_counter() - t
    say(f"      {n_mem + n_q} images in {timing['encode_images']:.2f} s "
        f"({(n_mem + n_q) / max(timing['encode_images'], 1e-9):.0f}/s); {n_mem + C} texts in "
        f"{timing['encode_texts']:.2f} s ({(n_mem + C) / max(timing['encode_texts'], 1e-9):.0f}/s)")
    say(f"      v = f_I(image) {[n_q, img.shape[1]]} float32, t = f_T(caption) {list(mem_txt.shape)}, "
        f"‖v‖ = 1 (max |‖v‖−1| = {np.abs(np.linalg.norm(img, axis=1) - 1).max():.1e})")
    return {"enc": enc, "with_keys": with_keys, "mem_paths": mem_paths, "q_paths": q_paths,
            "mem_img": img[:n_mem], "q_img": img[n_mem:], "mem_txt": mem_txt, "cls_txt": cls_txt,
            "mem_keys": keys[:n_mem] if with_keys else None, "q_keys": keys[n_mem:] if with_keys else None}


def step_memory(ds: dict, e: dict, mem_dir: Path, say: Say, timing: dict) -> Any:
    """Step 2: write the memory from the step-1 arrays and open (validate) it."""
    from ..memory import Memory, build_memory_from_arrays

    enc = e["enc"]
    t = time.perf_counter()
    build_memory_from_arrays(mem_dir, e["mem_img"], e["mem_txt"], keys=e["mem_keys"], name=enc.name,
                             fingerprint=enc.fingerprint, items=ds["memory"], progress=False)
    mem = Memory.open(mem_dir, encoder=enc)
    timing["build_memory"] = time.perf_counter() - t
    info = mem.info()
    say(f"\n[2/5] memory  {mem_dir}: {len(mem)} rows, {info['bytes_on_disk'] / 1e6:.2f} MB "
        f"({', '.join(sorted(info['files']))}); built + opened + sha256-verified in {timing['build_memory']:.2f} s")
    say(f"      image index on {'keys' if e['with_keys'] else 'embeddings'} (dim {mem.search_dim('image')}), text "
        f"index on embeddings (dim {mem.search_dim('text')}), HNSW M={info['hnsw']['image']['M']}")
    return mem


def step_search(ds: dict, e: dict, mem: Any, k: int, seed: int, n_show: int, say: Say, timing: dict) -> dict:
    """Step 3: image→image search of the queries; neighbour precision; a few printed examples."""
    n_q = len(ds["queries"])
    q_search = e["q_keys"] if e["with_keys"] else e["q_img"]  # what the image index holds
    t = time.perf_counter()
    rows, scores, valid = mem.search(q_search, modality="image", k=k)  # [Q,k] each
    timing["search"] = time.perf_counter() - t
    meta = mem.metadata(rows)
    nb_labels = np.array([m["label"] if m and m["label"] is not None else -1 for m in meta],
                         np.int64).reshape(rows.shape)  # [Q,k]
    y = ds["query_labels"]  # [Q]
    same = (nb_labels == y[:, None]) & valid  # [Q,k]
    precision = float(same.sum() / max(valid.sum(), 1))
    mem_labels = np.array([it["label"] for it in ds["memory"]], np.int64)
    chance_precision = float(np.mean([(mem_labels == c).mean() for c in y])) if n_q else 0.0
    say(f"\n[3/5] search  image→image, k={k}: {n_q} queries in {timing['search'] * 1e3:.1f} ms; "
        f"neighbours sharing the query's class: {precision:.2f} (chance {chance_precision:.2f})")
    show: list[int] = []
    for i in np.random.default_rng(seed).permutation(n_q):  # one query per class, seeded
        if len(show) < n_show and y[i] not in {y[j] for j in show}:
            show.append(int(i))
    examples = []
    for i in show:
        name = ds["class_names"][y[i]]
        say(f"      query {Path(e['q_paths'][i]).name} [{name}]")
        nbs = []
        for j in range(k):
            if not valid[i, j]:
                continue
            m = meta[i * k + j]
            cat = ds["class_names"][m["label"]] if m["label"] is not None else "?"
            nbs.append({"row": int(rows[i, j]), "score": float(scores[i, j]), "caption": m["caption"],
                        "category": cat, "same": bool(same[i, j]), "image": e["mem_paths"][int(rows[i, j])]})
            if j < 5:
                mark = "✓" if same[i, j] else "✗"
                say(f"        {scores[i, j]:.3f}  {mark} {cat:18.18s} \"{short(m['caption'])}\"")
        examples.append({"query": ds["queries"][i]["source"], "image": e["q_paths"][i], "category": name,
                         "neighbours": nbs})
    return {"q_search": q_search, "rows": rows, "scores": scores, "valid": valid, "nb_labels": nb_labels,
            "precision": precision, "chance_precision": chance_precision, "examples": examples}


def step_fuse(e: dict, s: dict, mem: Any, k: int, backend: str, seed: int, say: Say, timing: dict) -> dict:
    """Step 4: untrained φ_I, φ_T (identity at init) on the queries and prompts; the RECO loss at init."""
    from ..fusion import fusion_forward, init_params
    from ..memory import retrieve
    from ..train.losses import DEFAULT_TAU, infonce_forward, reco_loss_forward

    enc, q_img, cls_txt = e["enc"], e["q_img"], e["cls_txt"]
    t = time.perf_counter()
    phi_i = init_params(enc.dim, heads=FUSION_HEADS, seed=seed)  # φ_I
    phi_t = init_params(enc.dim, heads=FUSION_HEADS, seed=seed + 1)  # φ_T
    # image query: image→image search, fed the neighbours' TEXT embeddings (docs/reco.md §1, the paper's setting)
    r_txt, m_txt, _ = retrieve(mem, s["q_search"], "image", search="uni", fuse="cross", k=k)  # [Q,k,D], [Q,k]
    v_bar, _ = fusion_forward(phi_i, q_img, r_txt, mask=m_txt, backend=backend)  # [Q,D]
    # class prompt: text→text search, fed the neighbours' IMAGE embeddings
    r_img, m_img, _ = retrieve(mem, cls_txt, "text", search="uni", fuse="cross", k=k)  # [C,k,D], [C,k]
    t_bar, _ = fusion_forward(phi_t, cls_txt, r_img, mask=m_img, backend=backend)  # [C,D]
    timing["fusion"] = time.perf_counter() - t
    d_img = float(np.abs(v_bar - q_img).max())
    d_txt = float(np.abs(t_bar - cls_txt).max())
    # the layer's output normalisation z / sqrt(Σ z²), same arithmetic, applied to the bare query: at init the
    # layer's output IS this, bit for bit (Y[:,0] = x + exact zeros)
    n_img = q_img / np.sqrt((q_img * q_img).sum(axis=-1, keepdims=True))
    n_txt = cls_txt / np.sqrt((cls_txt * cls_txt).sum(axis=-1, keepdims=True))
    bits = bool(np.array_equal(v_bar, n_img) and np.array_equal(t_bar, n_txt))
    dn = float(max(np.abs(v_bar - n_img).max(), np.abs(t_bar - n_txt).max()))
    if not (d_img <= IDENTITY_TOL and d_txt <= IDENTITY_TOL):  # would be a bug in the fusion layer's init
        raise RecoError(f"identity at init violated: max |refined − frozen| = {max(d_img, d_txt):.2e} "
                        f"(expected <= {IDENTITY_TOL:.0e}: the untrained layer must return its query)")
    # the loss training would start from, on one batch of memory pairs (self-excluded: a row must not
    # retrieve itself, docs/reco.md §1)
    n_mem = e["mem_img"].shape[0]
    sel = np.sort(np.random.default_rng(seed).permutation(n_mem)[:LOSS_BATCH])
    v_m, t_m = e["mem_img"][sel], e["mem_txt"][sel]  # [B,D]
    ks = e["mem_keys"][sel] if e["with_keys"] else v_m
    nb_t, mk_t, _ = retrieve(mem, ks, "image", k=k, exclude=sel, dup_threshold=True)
    nb_i, mk_i, _ = retrieve(mem, t_m, "text", k=k, exclude=sel, dup_threshold=True)
    vb_m, _ = fusion_forward(phi_i, v_m, nb_t, mask=mk_t, backend=backend)
    tb_m, _ = fusion_forward(phi_t, t_m, nb_i, mask=mk_i, backend=backend)
    loss, lcache = reco_loss_forward(vb_m, tb_m, v_m, t_m, DEFAULT_TAU)
    frozen_loss, _ = infonce_forward(v_m, t_m, DEFAULT_TAU)
    say(f"\n[4/5] fuse    φ_I, φ_T: one pre-LN transformer layer each (D={enc.dim}, {FUSION_HEADS} heads), "
        f"backend={backend}, UNTRAINED (identity at init: W_o, b_o, W_2, b_2, e_q = 0)")
    say(f"      image queries fed their neighbours' text embeddings [Q,k,D] = {list(r_txt.shape)}; class prompts "
        f"fed their neighbours' image embeddings {list(r_img.shape)} ({timing['fusion'] * 1e3:.0f} ms)")
    say(f"      max |v̄ − v| = {d_img:.1e}, max |t̄_c − t_c| = {d_txt:.1e}  → refined == frozen, as it must be "
        "before training")
    say(f"      (against the layer's own normalize(query): max |Δ| = {dn:.1e}, bit-identical: {bits}; a 1e-8 "
        "difference is float32 rounding of re-normalising a unit vector)")
    say(f"      RECO loss at init on {len(sel)} memory pairs: {loss:.4f} = 3 × InfoNCE(v, t) = "
        f"3 × {frozen_loss:.4f} (training, a later step, lowers it)")
    return {"v_bar": v_bar, "t_bar": t_bar, "summary": {
        "backend": backend, "heads": FUSION_HEADS, "trained": False,
        "max_abs_refined_minus_frozen_image": d_img, "max_abs_refined_minus_frozen_text": d_txt,
        "max_abs_refined_minus_normalized_query": dn, "bit_identical_to_normalized_query": bits,
        "reco_loss_init": float(loss), "reco_loss_terms": [float(x) for x in lcache["terms"]],
        "infonce_frozen": float(frozen_loss), "loss_batch": int(len(sel))}}


def step_trained(e: dict, s: dict, mem: Any, k: int, backend: str, fusion: Any, say: Say, timing: dict) -> dict | None:
    """Step 4b: the trained fusion weights (``fusion`` path, or the shipped ones when present), refining the queries
    and the class prompts exactly as step 4 does with the untrained layers. None when there are no weights."""
    from ..reco.refine import refine
    from ..reco.weights import check_weights_match, default_weights_path, load_reco_weights

    enc = e["enc"]
    if fusion is not None and str(fusion) == "none":
        return None
    path = Path(fusion) if fusion is not None else default_weights_path(enc.name)
    if fusion is None and not path.is_file():
        say(f"      (no shipped trained fusion weights at {path} yet: only the untrained layers are shown)")
        return None
    w = load_reco_weights(path)
    check_weights_match(w, encoder_fingerprint=enc.fingerprint, dim=enc.dim, where=f"fusion weights {path}")
    t = time.perf_counter()
    v_bar, _, _, gate = refine(w.image, mem, e["q_img"], "image", search_queries=s["q_search"], k=k,
                               backend=backend, with_gate=True)
    t_bar = refine(w.text, mem, e["cls_txt"], "text", k=k, backend=backend)[0]
    timing["fusion_trained"] = time.perf_counter() - t
    say(f"      trained φ_I, φ_T from {path}: mean cosine(v̄, v) = "
        f"{float((v_bar * e['q_img']).sum(axis=1).mean()):.3f} ({timing['fusion_trained'] * 1e3:.0f} ms)")
    return {"v_bar": v_bar, "t_bar": t_bar, "gate": gate, "path": str(path)}


def step_evaluate(ds: dict, e: dict, s: dict, f: dict, k: int, say: Say, trained: dict | None = None) -> dict:
    """Step 5: top-1 of zero-shot (frozen, untrained RECO), the k-NN vote, chance and the majority class."""
    y = ds["query_labels"]
    n_q, C = y.size, len(ds["class_names"])
    pred_frozen = zero_shot(e["q_img"], e["cls_txt"])
    pred_reco = zero_shot(f["v_bar"], f["t_bar"])
    pred_knn = knn_vote(s["nb_labels"], s["scores"], s["valid"], C)
    preds = [("zero_shot_frozen", pred_frozen), ("zero_shot_reco_untrained", pred_reco), ("knn_vote", pred_knn)]
    if trained is not None:
        from ..fusion import gated_scores  # the relevance gate blends refined and frozen class text per query

        g = gated_scores(trained["v_bar"], trained["t_bar"], e["cls_txt"], trained.get("gate"))
        preds.append(("zero_shot_reco_trained", np.argmax(g, axis=1)))
    acc = {name: float((p == y).mean()) if n_q else 0.0 for name, p in preds}
    chance = 1.0 / C
    majority = float(np.bincount(y, minlength=C).max() / n_q) if n_q else 0.0
    same_preds = bool(np.array_equal(pred_frozen, pred_reco))
    say(f"\n[5/5] evaluate  {n_q} held-out query images, {C} classes, prompts \"{ds['prompt']}\"")
    table = [
        ("zero-shot, frozen encoder", acc["zero_shot_frozen"]),
        ("zero-shot, RECO with untrained φ (identity)", acc["zero_shot_reco_untrained"]),
    ] + ([("zero-shot, RECO with trained φ", acc["zero_shot_reco_trained"])] if trained is not None else []) + [
        (f"retrieval baseline: {k}-NN vote (image→image)", acc["knn_vote"]),
        ("chance (1/C)", chance),
        ("majority class", majority),
    ]
    say(f"      {'method':48s} top-1")
    for name, value in table:
        say(f"      {name:48s} {value:.3f}" + (f"  ({int(round(value * n_q))}/{n_q})" if "chance" not in name else ""))
    say(f"      untrained RECO predictions identical to frozen: {same_preds}")
    return {**acc, "chance": chance, "majority": majority, "n_queries": n_q, "reco_untrained_equals_frozen": same_preds}


def step_compare(ds: dict, e: dict, mem: Any, out: Path, k: int, backend: str, threads: int | None,
                 trained: dict | None, say: Say, timing: dict) -> dict:
    """Step 6: the flag memory next to the clip-art; frozen / surrogate / 1-NN / k-NN vote / RECO query by query."""
    from ..reco.weights import load_reco_weights
    from .demo_compare import comparison_figure, compare_methods, entities_data, report_lines

    t = time.perf_counter()
    w = load_reco_weights(trained["path"]) if trained is not None else None
    flags = entities_data()
    quiet = printer(True)
    e_f = step_encode(flags, e["enc"], threads, quiet, {})
    mem_f = step_memory(flags, e_f, out / "memory-flags", quiet, {})
    sets = [(compare_methods(flags, e_f, mem_f, k, w, backend), flags), (compare_methods(ds, e, mem, k, w, backend), ds)]
    timing["compare"] = time.perf_counter() - t
    say(f"\n[6/6] compare  frozen vs RECO ({'weights ' + trained['path'] if trained else 'no trained weights'}) vs "
        f"surrogate vs 1-NN / {k}-NN vote, on a memory of {len(flags['memory'])} flags (fine-grained names the "
        f"frozen encoder cannot give) and on the clip-art above (where RECO must do no harm); "
        f"{timing['compare']:.1f} s")
    for c, d in sets:
        for line in report_lines(c, d["class_names"]):
            say(line)
    fig = out / "comparison.png"
    drawn = comparison_figure(fig, sets)
    return {"sets": {"flags": sets[0][0], "clipart": sets[1][0]}, "figure": str(fig) if drawn else None}


# ----------------------------------------------------------------------------------------------- demo
def run_demo(out_dir: str | Path | None = None, data: str | Path | None = None, k: int = 10,
             backend: str = "numpy", seed: int = 0, quiet: bool = False, *, limit: int | None = 100,
             memory_limit: int | None = None, encoder: Any = "reco-mini", n_show: int = 3,
             threads: int | None = None, fusion: Any = None, compare: bool = True) -> dict:
    """Run encode → memory → search → fuse → evaluate and print each step; return the measured results.

    Parameters
    ----------
    out_dir : folder for ``memory/``, ``results.json``, ``neighbours.png``, ``comparison.png``; None = a new
        temporary folder (kept, its path printed; every path printed and returned is absolute). An existing
        ``out_dir/memory`` is refused, never overwritten.
    data : None (the shipped sample, ``weights/demo``) or a dataset folder with ``manifest.csv``
    k : neighbours per query, capped at the memory's rows (``search.k`` in the result is the k used,
        ``search.k_requested`` the one asked for; a note on stderr says when the cap applies)
    backend : fusion backend, ``"numpy"`` (the reference), ``"numba"`` or ``"cuda"``
    seed : seeds the fusion layers' initialisation and the ``--data`` subsets
    quiet : print nothing
    limit, memory_limit : ``--data`` only: queries from ``test`` / memory rows from ``train`` (None = all)
    encoder : encoder name or folder (``reco_ref.encoders.load``), or an already loaded pair
    n_show : queries whose neighbours are printed (one per category where possible)
    threads : ONNX Runtime / decode threads (None = all cores)
    fusion : trained RECO weights (.npz) to show beside the untrained layers; None = the shipped weights of the
        encoder when present (:func:`reco_ref.reco.weights.default_weights_path`), ``"none"`` = untrained only
    compare : shipped data only: also build the flag memory (``weights/demo-entities``) and compare frozen, surrogate,
        1-NN, k-NN vote and RECO (the trained weights) query by query on the flags and on the clip-art
        (:mod:`reco_ref.eval.demo_compare`); writes ``comparison.png``

    Returns
    -------
    dict — the content of ``results.json``: ``data``, ``encoder``, ``timing_s``, ``search``, ``fusion``,
    ``eval`` (accuracies in [0, 1]), ``examples``, ``out_dir``, ``files`` (``figure`` = neighbours.png and
    ``comparison`` only where drawn), with step 6 ``compare`` (per set: predictions, ``top1``, ``counts``).
    """
    from ..reco.refine import check_backend

    say = printer(quiet)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise RecoError(f"k: expected a positive integer, got {k!r}")
    check_int("seed", seed, 0, 2**32 - 1, error=RecoError)  # numpy's generators refuse a negative seed, mid-demo
    check_backend(backend)  # before any encoding (the check train, ablate, eval and query run too)
    if fusion is not None and str(fusion) != "none":
        from ..reco.weights import load_reco_weights

        load_reco_weights(fusion)  # a missing or malformed file fails here, not after the encoding
    t_start = time.perf_counter()
    timing: dict[str, float] = {}
    ds = shipped_data() if data is None else manifest_data(data, limit=limit, memory_limit=memory_limit, seed=seed)
    out = (Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="reco-ref-demo-"))).absolute()
    mem_dir = out / "memory"
    if mem_dir.exists():
        raise MemoryFormatError(f"{mem_dir} already exists (an earlier demo run?): pass another --out, or delete "
                                "that folder")
    n_mem, n_q, C = len(ds["memory"]), len(ds["queries"]), len(ds["class_names"])
    if compare and data is None:  # six steps: the step headers say "[i/6]"
        say = _steps_of(say, 6)
    say(f"reco-ref demo — {ds['name']}: {n_mem} memory pairs, {n_q} query images, {C} classes; output in {out}")

    e = step_encode(ds, encoder, threads, say, timing)
    mem = step_memory(ds, e, mem_dir, say, timing)
    # a memory of n rows has n neighbours to give (--memory-limit 4 and the default k = 10): every step uses min(k, n)
    k_requested, k = k, cap_k(k, mem, note=None if quiet else lambda m: print(m, file=sys.stderr, flush=True))
    s = step_search(ds, e, mem, k, seed, n_show, say, timing)
    f = step_fuse(e, s, mem, k, backend, seed, say, timing)
    trained = step_trained(e, s, mem, k, backend, fusion, say, timing)
    ev = step_evaluate(ds, e, s, f, k, say, trained)
    comparison = None
    if compare and data is None:
        comparison = step_compare(ds, e, mem, out, k, backend, threads, trained, say, timing)
    timing["total"] = time.perf_counter() - t_start

    enc = e["enc"]
    examples = s["examples"]
    results = {
        "data": {"name": ds["name"], "memory_rows": n_mem, "queries": n_q, "classes": list(ds["class_names"]),
                 "prompt": ds["prompt"]},
        "encoder": {"name": enc.name, "fingerprint": enc.fingerprint, "dim": int(enc.dim),
                    "key_dim": None if enc.key_dim is None else int(enc.key_dim)},
        "timing_s": {key: round(v, 4) for key, v in timing.items()},
        "search": {"k": k, "k_requested": k_requested, "modality": "image->image",
                   "neighbour_precision": s["precision"], "neighbour_precision_chance": s["chance_precision"]},
        "fusion": {**f["summary"], "trained_weights": None if trained is None else trained["path"]},
        "eval": ev,
        "examples": [{**{kk: v for kk, v in ex.items() if kk != "image"},
                      "neighbours": [{kk: v for kk, v in nb.items() if kk != "image"} for nb in ex["neighbours"]]}
                     for ex in examples],
        "out_dir": str(out),
        "files": {"memory": str(mem_dir), "results": str(out / "results.json")},
    }
    if comparison is not None:
        results["compare"] = comparison["sets"]
        if comparison["figure"]:
            results["files"]["comparison"] = comparison["figure"]
        results["files"]["memory_flags"] = str(out / "memory-flags")
    fig_path = out / "neighbours.png"
    if examples and figure(fig_path, examples, min(k, 5)):
        results["files"]["figure"] = str(fig_path)
    atomic_write_json(out / "results.json", results)
    pictures = [results["files"][key] for key in ("figure", "comparison") if key in results["files"]]
    say(f"\nwrote {out / 'results.json'}; total {timing['total']:.1f} s")
    if pictures:
        say("pictures: " + ", ".join(pictures))  # the last line: where to look
    else:
        say(NO_MATPLOTLIB if not have_matplotlib() else "pictures: none (no query to draw)")
    return results
