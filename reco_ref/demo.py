r"""``reco-ref demo``: the whole pipeline, step by step, on shipped sample data, offline, in seconds.

::

    from reco_ref.demo import run_demo
    results = run_demo()                          # shipped OpenClipart sample (weights/demo), reco-mini
    results = run_demo(data="../shared/data/flowers102", limit=100)   # a dataset manifest folder

Steps (each printed with its timing):

1. **encode** — the frozen encoder pair (default ``reco-mini``) embeds the memory's images and captions and the
   query images; ``v = f_I(image)``, ``t = f_T(caption)``, L2-normalised ``[N,D]`` (+ image search keys
   ``[N,Dk]`` where the encoder has them).
2. **memory** — :func:`reco_ref.memory.build_memory_from_arrays` writes an on-disk memory (npy + SQLite + one
   HNSW index per modality) from those arrays; :meth:`reco_ref.memory.Memory.open` validates it.
3. **uni-modal search** — image→image: each query image's ``k`` nearest memory images, with their captions.
4. **cross-modal fusion** (spec §1–§2) — each query is fed the *text* embeddings of its neighbours through
   :func:`reco_ref.fusion.fusion_forward`; class prompts are fed the *image* embeddings of theirs. The fusion
   layers here are **untrained**: at initialisation they are the identity (``W_o, b_o, W_2, b_2, e_q = 0``),
   so ``refined == frozen``; the demo measures ``max |refined − frozen|`` instead of assuming it, and prints
   the RECO loss (spec §3) that training would start from.
5. **evaluate** (spec §4) — zero-shot classification of the queries with one prompt per class,
   ``argmax_c ⟨v, t_c⟩``; the same with the (untrained, identity) fusion layers; and a retrieval baseline:
   the majority category of the ``k`` image→image neighbours (ties: larger summed cosine). Chance ``1/C``
   and the majority-class rate are printed beside them.

Outputs in ``out_dir`` (a fresh temporary folder by default, kept and printed): ``memory/``, ``results.json``
(atomic) and, where matplotlib is installed, ``neighbours.png`` (a query and its neighbours per row).

Data: ``data=None`` uses ``weights/demo/pairs.csv`` (``image,caption,category,label,split,source``; split
``memory`` / ``query``), prompts ``"a drawing of a {category}."``. ``data=DIR`` takes a dataset folder with
``manifest.csv`` (``file,label,class_name,split``): the ``train`` split is the memory (captions ``"a photo of a
{class_name}."``), up to ``limit`` rows of the ``test`` split are the queries, prompts ``"a photo of a
{class_name}."``.
"""

from __future__ import annotations

import csv
import io
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import MemoryFormatError, RecoError
from .io import atomic_write_bytes, atomic_write_json

SHIPPED_PROMPT = "a drawing of a {}."
DATA_PROMPT = "a photo of a {}."
MANIFEST_COLUMNS = ("file", "label", "class_name", "split")
FUSION_HEADS = 8  # spec §2 default
IDENTITY_TOL = 1e-6  # |refined − frozen| at init: 0 up to float32 re-normalisation of a unit vector
LOSS_BATCH = 256  # rows of the memory used for the "loss at initialisation" line (one training batch)


# ------------------------------------------------------------------------------------------------- data
def shipped_data() -> dict:
    """The shipped sample (``weights/demo``) as a dataset dict (see :func:`manifest_data` for the keys)."""
    from .memory import read_pairs_csv
    from .paths import weights_file

    pairs = weights_file("demo", "pairs.csv")
    with open(pairs, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
        cols = tuple(reader.fieldnames or ())
    need = ("image", "caption", "category", "label", "split")
    if any(c not in cols for c in need):
        raise MemoryFormatError(f"{pairs}: columns {list(cols)}, expected {', '.join(need)}")
    names: dict[int, str] = {}
    for r in rows:
        if names.setdefault(int(r["label"]), r["category"]) != r["category"]:
            raise MemoryFormatError(f"{pairs}: label {r['label']} is both {names[int(r['label'])]!r} and "
                                    f"{r['category']!r}")
    class_names = [names[i] for i in range(len(names))]
    memory = read_pairs_csv(pairs, split="memory")
    queries = read_pairs_csv(pairs, split="query")
    return {"name": "weights/demo (OpenClipart sample)", "memory": memory, "queries": queries,
            "query_labels": np.array([q["label"] for q in queries], np.int64), "class_names": class_names,
            "prompt": SHIPPED_PROMPT}


def _balanced(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``n`` rows spread evenly over the classes (seeded), in their original order."""
    if n >= labels.size:
        return np.arange(labels.size)
    perm = rng.permutation(labels.size)
    rank = np.empty(labels.size, np.int64)  # rank of each row inside its class, in permuted order
    for c in np.unique(labels):
        members = perm[labels[perm] == c]
        rank[members] = np.arange(members.size)
    order = np.lexsort((np.argsort(perm), rank))  # by rank, then by permuted position
    return np.sort(order[:n])


def manifest_data(folder: str | Path, *, limit: int | None = 100, memory_limit: int | None = None,
                  seed: int = 0) -> dict:
    """A dataset folder holding ``manifest.csv`` (``file,label,class_name,split``) as a demo dataset.

    Parameters
    ----------
    folder : e.g. ``../shared/data/flowers102``
    limit : queries taken from the ``test`` split (class-balanced, seeded); None = all
    memory_limit : memory rows taken from the ``train`` split (class-balanced, seeded); None = all

    Returns
    -------
    dict with ``name``, ``memory`` (items as :func:`reco_ref.memory.read_pairs`, captions
    ``"a photo of a {class_name}."``), ``queries`` (items), ``query_labels`` int64 ``[Q]``, ``class_names``
    (indexed by label), ``prompt``.

    Raises
    ------
    FileNotFoundError  the folder or its manifest.csv is missing
    MemoryFormatError  wrong columns, no train/test rows, labels not 0..C-1 or naming two classes
    """
    from .memory import read_pairs_csv

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"data folder {folder}: not a directory (expected a dataset folder holding "
                                f"manifest.csv with columns {','.join(MANIFEST_COLUMNS)})")
    manifest = folder / "manifest.csv"
    if not manifest.is_file():
        raise FileNotFoundError(f"data folder {folder}: no manifest.csv in it (expected columns "
                                f"{','.join(MANIFEST_COLUMNS)})")
    for name, value in (("limit", limit), ("memory_limit", memory_limit)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise RecoError(f"{name}: expected a positive integer or None, got {value!r}")
    with open(manifest, newline="", encoding="utf-8") as fh:
        cols = tuple(csv.DictReader(fh).fieldnames or ())
    if any(c not in cols for c in MANIFEST_COLUMNS):
        raise MemoryFormatError(f"{manifest}: columns {list(cols)}, expected a dataset manifest with "
                                f"{','.join(MANIFEST_COLUMNS)}")
    # the memory reader resolves paths and checks the split; "{class_name}" as caption gives the names
    memory = read_pairs_csv(manifest, split="train", caption_template=DATA_PROMPT.format("{class_name}"))
    test = read_pairs_csv(manifest, split="test", caption_template="{class_name}")
    names: dict[int, str] = {}
    for it in test + read_pairs_csv(manifest, split="train", caption_template="{class_name}"):
        if names.setdefault(it["label"], it["caption"]) != it["caption"]:
            raise MemoryFormatError(f"{manifest}: label {it['label']} names both {names[it['label']]!r} and "
                                    f"{it['caption']!r}")
    if sorted(names) != list(range(len(names))):
        raise MemoryFormatError(f"{manifest}: labels must be 0..C-1, found {sorted(names)[:5]}... "
                                f"({len(names)} classes)")
    rng = np.random.default_rng(seed)
    mem_labels = np.array([it["label"] for it in memory], np.int64)
    memory = [memory[i] for i in _balanced(mem_labels, memory_limit or mem_labels.size, rng)]
    test_labels = np.array([it["label"] for it in test], np.int64)
    keep = _balanced(test_labels, limit or test_labels.size, rng)
    queries = [{**test[i], "caption": DATA_PROMPT.format(test[i]["caption"])} for i in keep]
    return {"name": str(folder), "memory": memory, "queries": queries, "query_labels": test_labels[keep],
            "class_names": [names[i] for i in range(len(names))], "prompt": DATA_PROMPT}


# --------------------------------------------------------------------------------------------- metrics
def knn_vote(labels: np.ndarray, scores: np.ndarray, valid: np.ndarray, n_classes: int) -> np.ndarray:
    """Majority label of the valid neighbours; ties go to the class with the larger summed cosine.

    Parameters
    ----------
    labels : int [N,k] — neighbours' labels (any value where invalid)
    scores : float [N,k] — cosines
    valid : bool [N,k]
    n_classes : C

    Returns
    -------
    int64 [N] — predicted label, −1 for a query without any valid neighbour
    """
    N = labels.shape[0]
    votes = np.zeros((N, n_classes), np.float64)  # [N,C]
    sums = np.zeros((N, n_classes), np.float64)  # [N,C]
    qi, kj = np.nonzero(valid)
    np.add.at(votes, (qi, labels[qi, kj]), 1.0)
    np.add.at(sums, (qi, labels[qi, kj]), scores[qi, kj].astype(np.float64))
    # a vote count is an integer and a summed cosine lies in [-k, k]: scaling it below 1/(2k+1) can only
    # break ties between equal counts, never overturn a count
    k = max(labels.shape[1], 1)
    pred = np.argmax(votes + sums / (2.0 * (2 * k + 1)), axis=1)
    pred[~valid.any(axis=1)] = -1
    return pred.astype(np.int64)


def zero_shot(image_emb: np.ndarray, class_emb: np.ndarray) -> np.ndarray:
    """``argmax_c ⟨v, t_c⟩`` (spec §4): image_emb [N,D], class_emb [C,D] -> int64 [N]."""
    return np.argmax(image_emb @ class_emb.T, axis=1).astype(np.int64)


# ------------------------------------------------------------------------------------------- reporting
def _printer(quiet: bool) -> Callable[..., None]:
    return (lambda *a, **k: None) if quiet else (lambda *a, **k: print(*a, **k, flush=True))


def _short(text: str | None, n: int = 60) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _figure(path: Path, examples: list[dict], n_cols: int) -> bool:
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
            ax.set_title(_short(title, 24), fontsize=8, color=colour)
            ax.set_axis_off()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return True


# ------------------------------------------------------------------------------------------------ demo
def run_demo(out_dir: str | Path | None = None, data: str | Path | None = None, k: int = 10,
             backend: str = "numpy", seed: int = 0, quiet: bool = False, *, limit: int | None = 100,
             memory_limit: int | None = None, encoder: Any = "reco-mini", n_show: int = 3,
             threads: int | None = None) -> dict:
    """Run encode → memory → search → fuse → evaluate and print each step; return the measured results.

    Parameters
    ----------
    out_dir : folder for ``memory/``, ``results.json``, ``neighbours.png``; None = a new temporary folder
        (kept, its path printed). An existing ``out_dir/memory`` is refused, never overwritten.
    data : None (the shipped sample, ``weights/demo``) or a dataset folder with ``manifest.csv``
    k : neighbours per query
    backend : fusion backend, ``"numpy"`` (the reference), ``"numba"`` or ``"cuda"``
    seed : seeds the fusion layers' initialisation and the ``--data`` subsets
    quiet : print nothing
    limit, memory_limit : ``--data`` only: queries from ``test`` / memory rows from ``train`` (None = all)
    encoder : encoder name or folder (``reco_ref.encoders.load``), or an already loaded pair
    n_show : queries whose neighbours are printed (one per category where possible)
    threads : ONNX Runtime / decode threads (None = all cores)

    Returns
    -------
    dict — the content of ``results.json``: ``data``, ``encoder``, ``timing_s``, ``search``, ``fusion``,
    ``eval`` (accuracies in [0, 1]), ``examples``, ``out_dir``, ``files``.
    """
    from .encoders import load
    from .fusion import fusion_forward, get_backend, init_params
    from .fusion.reference import l2normalize_forward
    from .memory import Memory, build_memory_from_arrays, retrieve
    from .train.losses import DEFAULT_TAU, infonce_forward, reco_loss_forward

    say = _printer(quiet)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise RecoError(f"k: expected a positive integer, got {k!r}")
    get_backend(backend)  # before any encoding; BackendUnavailableError is a RecoError (one-line CLI error)
    if backend == "cuda":
        from numba import cuda

        if not cuda.is_available():  # True under NUMBA_ENABLE_CUDASIM=1 (the simulator) as well
            raise RecoError("fusion backend 'cuda': no usable CUDA device/driver (numba.cuda.is_available() is "
                            "False); use --backend numpy or numba")
    t_start = time.perf_counter()
    timing: dict[str, float] = {}
    ds = shipped_data() if data is None else manifest_data(data, limit=limit, memory_limit=memory_limit, seed=seed)
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="reco-ref-demo-"))
    mem_dir = out / "memory"
    if mem_dir.exists():
        raise MemoryFormatError(f"{mem_dir} already exists (an earlier demo run?): pass another --out, or delete "
                                "that folder")
    n_mem, n_q, C = len(ds["memory"]), len(ds["queries"]), len(ds["class_names"])
    say(f"reco-ref demo — {ds['name']}: {n_mem} memory pairs, {n_q} query images, {C} classes; output in {out}")

    # ---- 1. encode ---------------------------------------------------------------------------------
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
    captions = [it["caption"] for it in ds["memory"]]
    mem_txt = enc.encode_texts(captions)  # [M,D]
    prompts = [ds["prompt"].format(c) for c in ds["class_names"]]
    cls_txt = enc.encode_texts(prompts)  # [C,D]
    timing["encode_texts"] = time.perf_counter() - t
    mem_img, q_img = img[:n_mem], img[n_mem:]  # [M,D], [Q,D]
    mem_keys, q_keys = (keys[:n_mem], keys[n_mem:]) if with_keys else (None, None)
    say(f"      {n_mem + n_q} images in {timing['encode_images']:.2f} s "
        f"({(n_mem + n_q) / max(timing['encode_images'], 1e-9):.0f}/s); {n_mem + C} texts in "
        f"{timing['encode_texts']:.2f} s ({(n_mem + C) / max(timing['encode_texts'], 1e-9):.0f}/s)")
    say(f"      v = f_I(image) {list(q_img.shape)} float32, t = f_T(caption) {list(mem_txt.shape)}, "
        f"‖v‖ = 1 (max |‖v‖−1| = {np.abs(np.linalg.norm(img, axis=1) - 1).max():.1e})")

    # ---- 2. memory ---------------------------------------------------------------------------------
    t = time.perf_counter()
    build_memory_from_arrays(mem_dir, mem_img, mem_txt, keys=mem_keys, name=enc.name, fingerprint=enc.fingerprint,
                             items=ds["memory"], progress=False)
    mem = Memory.open(mem_dir, encoder=enc)
    timing["build_memory"] = time.perf_counter() - t
    info = mem.info()
    say(f"\n[2/5] memory  {mem_dir}: {len(mem)} rows, {info['bytes_on_disk'] / 1e6:.2f} MB "
        f"({', '.join(sorted(info['files']))}); built + opened + sha256-verified in {timing['build_memory']:.2f} s")
    say(f"      image index on {'keys' if with_keys else 'embeddings'} (dim {mem.search_dim('image')}), text index "
        f"on embeddings (dim {mem.search_dim('text')}), HNSW M={info['hnsw']['image']['M']}")

    # ---- 3. uni-modal search -----------------------------------------------------------------------
    q_search = q_keys if with_keys else q_img  # what the image index holds
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
    show = []
    for i in np.random.default_rng(seed).permutation(n_q):  # one query per class, seeded
        if len(show) < n_show and y[i] not in {y[j] for j in show}:
            show.append(int(i))
    examples = []
    for i in show:
        name = ds["class_names"][y[i]]
        say(f"      query {Path(q_paths[i]).name} [{name}]")
        nbs = []
        for j in range(k):
            if not valid[i, j]:
                continue
            m = meta[i * k + j]
            cat = ds["class_names"][m["label"]] if m["label"] is not None else "?"
            nbs.append({"row": int(rows[i, j]), "score": float(scores[i, j]), "caption": m["caption"],
                        "category": cat, "same": bool(same[i, j]), "image": mem_paths[int(rows[i, j])]})
            if j < 5:
                mark = "✓" if same[i, j] else "✗"
                say(f"        {scores[i, j]:.3f}  {mark} {cat:18.18s} \"{_short(m['caption'])}\"")
        examples.append({"query": ds["queries"][i]["source"], "image": q_paths[i], "category": name,
                         "neighbours": nbs})

    # ---- 4. cross-modal fusion (untrained: identity at init) ---------------------------------------
    t = time.perf_counter()
    phi_i = init_params(enc.dim, heads=FUSION_HEADS, seed=seed)  # φ_I
    phi_t = init_params(enc.dim, heads=FUSION_HEADS, seed=seed + 1)  # φ_T
    # image query: image→image search, fed the neighbours' TEXT embeddings (spec §1, the paper's setting)
    r_txt, m_txt, _ = retrieve(mem, q_search, "image", search="uni", fuse="cross", k=k)  # [Q,k,D], [Q,k]
    v_bar, _ = fusion_forward(phi_i, q_img, r_txt, mask=m_txt, backend=backend)  # [Q,D]
    # class prompt: text→text search, fed the neighbours' IMAGE embeddings
    r_img, m_img, _ = retrieve(mem, cls_txt, "text", search="uni", fuse="cross", k=k)  # [C,k,D], [C,k]
    t_bar, _ = fusion_forward(phi_t, cls_txt, r_img, mask=m_img, backend=backend)  # [C,D]
    timing["fusion"] = time.perf_counter() - t
    d_img = float(np.abs(v_bar - q_img).max())
    d_txt = float(np.abs(t_bar - cls_txt).max())
    # the layer's own output normalisation applied to the bare query: at init the output IS this, bit for bit
    n_img, n_txt = l2normalize_forward(q_img)[0], l2normalize_forward(cls_txt)[0]
    bits = bool(np.array_equal(v_bar, n_img) and np.array_equal(t_bar, n_txt))
    dn = float(max(np.abs(v_bar - n_img).max(), np.abs(t_bar - n_txt).max()))
    if not (d_img <= IDENTITY_TOL and d_txt <= IDENTITY_TOL):  # would be a bug in the fusion layer's init
        raise RecoError(f"identity at init violated: max |refined − frozen| = {max(d_img, d_txt):.2e} "
                        f"(expected <= {IDENTITY_TOL:.0e}: the untrained layer must return its query)")
    # the loss training would start from, on one batch of memory pairs (self-excluded: a row must not
    # retrieve itself, spec §1)
    sel = np.sort(np.random.default_rng(seed).permutation(n_mem)[:LOSS_BATCH])
    v_m, t_m = mem_img[sel], mem_txt[sel]  # [B,D]
    ks = mem_keys[sel] if with_keys else v_m
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

    # ---- 5. evaluate -------------------------------------------------------------------------------
    pred_frozen = zero_shot(q_img, cls_txt)
    pred_reco = zero_shot(v_bar, t_bar)
    pred_knn = knn_vote(nb_labels, scores, valid, C)
    acc = {name: float((p == y).mean()) if n_q else 0.0
           for name, p in (("zero_shot_frozen", pred_frozen), ("zero_shot_reco_untrained", pred_reco),
                           ("knn_vote", pred_knn))}
    chance = 1.0 / C
    majority = float(np.bincount(y, minlength=C).max() / n_q) if n_q else 0.0
    same_preds = bool(np.array_equal(pred_frozen, pred_reco))
    say(f"\n[5/5] evaluate  {n_q} held-out query images, {C} classes, prompts \"{ds['prompt']}\"")
    table = [
        ("zero-shot, frozen encoder", acc["zero_shot_frozen"]),
        ("zero-shot, RECO with untrained φ (identity)", acc["zero_shot_reco_untrained"]),
        (f"retrieval baseline: {k}-NN vote (image→image)", acc["knn_vote"]),
        ("chance (1/C)", chance),
        ("majority class", majority),
    ]
    say(f"      {'method':48s} top-1")
    for name, value in table:
        say(f"      {name:48s} {value:.3f}" + (f"  ({int(round(value * n_q))}/{n_q})" if "chance" not in name else ""))
    say(f"      untrained RECO predictions identical to frozen: {same_preds}")
    timing["total"] = time.perf_counter() - t_start

    results = {
        "data": {"name": ds["name"], "memory_rows": n_mem, "queries": n_q, "classes": list(ds["class_names"]),
                 "prompt": ds["prompt"]},
        "encoder": {"name": enc.name, "fingerprint": enc.fingerprint, "dim": int(enc.dim),
                    "key_dim": None if enc.key_dim is None else int(enc.key_dim)},
        "timing_s": {key: round(v, 4) for key, v in timing.items()},
        "search": {"k": k, "modality": "image->image", "neighbour_precision": precision,
                   "neighbour_precision_chance": chance_precision},
        "fusion": {"backend": backend, "heads": FUSION_HEADS, "trained": False,
                   "max_abs_refined_minus_frozen_image": d_img, "max_abs_refined_minus_frozen_text": d_txt,
                   "max_abs_refined_minus_normalized_query": dn, "bit_identical_to_normalized_query": bits,
                   "reco_loss_init": float(loss), "reco_loss_terms": [float(x) for x in lcache["terms"]],
                   "infonce_frozen": float(frozen_loss), "loss_batch": int(len(sel))},
        "eval": {**acc, "chance": chance, "majority": majority, "n_queries": n_q,
                 "reco_untrained_equals_frozen": same_preds},
        "examples": [{**{kk: v for kk, v in ex.items() if kk != "image"},
                      "neighbours": [{kk: v for kk, v in nb.items() if kk != "image"} for nb in ex["neighbours"]]}
                     for ex in examples],
        "out_dir": str(out),
        "files": {"memory": str(mem_dir), "results": str(out / "results.json")},
    }
    fig_path = out / "neighbours.png"
    if examples and _figure(fig_path, examples, min(k, 5)):
        results["files"]["figure"] = str(fig_path)
    atomic_write_json(out / "results.json", results)
    say(f"\nwrote {out / 'results.json'}" + (f" and {fig_path}" if "figure" in results["files"] else "")
        + f"; total {timing['total']:.1f} s")
    return results
