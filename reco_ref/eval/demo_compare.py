r"""The demo's side-by-side comparison: frozen vs RECO vs surrogate vs 1-NN / k-NN vote, query by query.

Two shipped sets, each its own memory (its ``memory`` rows) and its own queries (its ``query`` rows):

* **flags** (``weights/demo-entities``, 255 entities, prompt ``"the flag of {}."``): fine-grained names the frozen
  encoder cannot give, but whose look-alikes the memory holds (the case RECO is for);
* **clip-art** (``weights/demo``, 11 coarse classes, prompt ``"a drawing of a {}."``): classes the frozen encoder
  already names (RECO must do no harm here).

Every method predicts one class per query:

.. math::

    \hat y_{\text{frozen}} = \arg\max_c \langle v, t_c \rangle, \quad
    \hat y_{\text{RECO}} = \arg\max_c \langle \phi_I(v, N_I), \phi_T(t_c, N_T) \rangle, \quad
    \hat y_{\text{surrogate}} = \arg\max_c \langle \tfrac{v + m_I}{\lVert v + m_I \rVert},
    \tfrac{t_c + m_T}{\lVert t_c + m_T \rVert} \rangle

(``m`` = mean of the fed neighbours, :func:`reco_ref.eval.zeroshot.surrogate_refine`), the 1-NN label of the nearest
memory image, and the k-NN vote (:func:`reco_ref.eval.metrics.knn_vote`). Nothing here is tuned on these queries:
the RECO weights are the shipped ones (trained on Flowers-102 + CUB-100 photos, never on drawings or flags).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DatasetError
from ..io import atomic_write_bytes
from .metrics import knn_vote, zero_shot

ENTITIES_PROMPT = "the flag of {}."
METHODS = ("frozen", "surrogate", "1-NN", "k-NN vote", "RECO")


def entities_data() -> dict:
    """The shipped flag memory (``weights/demo-entities/pairs.csv``) as a demo dataset dict (see ``shipped_data``)."""
    from ..memory import read_pairs_csv
    from ..paths import weights_file

    pairs = weights_file("demo-entities", "pairs.csv")
    with open(pairs, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    names: dict[int, str] = {}
    for r in rows:
        if names.setdefault(int(r["label"]), r["category"]) != r["category"]:
            raise DatasetError(f"{pairs}: label {r['label']} is both {names[int(r['label'])]!r} and {r['category']!r}")
    queries = read_pairs_csv(pairs, split="query")
    return {"name": "weights/demo-entities (flags)", "memory": read_pairs_csv(pairs, split="memory"),
            "queries": queries, "query_labels": np.array([q["label"] for q in queries], np.int64),
            "class_names": [names[i] for i in range(len(names))], "prompt": ENTITIES_PROMPT}


def compare_methods(ds: dict, e: dict, mem: Any, k: int, weights: Any, backend: str = "numpy") -> dict:
    """Per-query predictions of every method on one set, their top-1, and the queries RECO fixes / misses / breaks.

    Parameters
    ----------
    ds : demo dataset dict (``memory``, ``queries``, ``query_labels`` [Q], ``class_names`` [C], ``prompt``)
    e : step-1 arrays of :mod:`reco_ref.eval.demo` (``q_img`` [Q,D], ``q_keys`` [Q,Dk] or None, ``cls_txt`` [C,D])
    mem : the set's memory (rows in ``ds["memory"]`` order)
    weights : RecoWeights or None (then no RECO column)
    """
    from ..train.refine import refine
    from .zeroshot import surrogate_refine

    y = ds["query_labels"]  # [Q]
    C = len(ds["class_names"])
    q_img, cls = e["q_img"], e["cls_txt"]  # [Q,D], [C,D]
    q_search = e["q_keys"] if e["q_keys"] is not None else q_img
    rows, scores, valid = mem.search(q_search, modality="image", k=k)  # [Q,k] each
    meta = mem.metadata(rows)
    nb = np.array([m["label"] if m and m["label"] is not None else -1 for m in meta], np.int64).reshape(rows.shape)
    nb = np.where(valid, nb, -1)  # [Q,k]
    pred = {"frozen": zero_shot(q_img, cls)}
    sv = surrogate_refine(mem, q_img, "image", search_queries=q_search, k=k)[0]  # [Q,D]
    st = surrogate_refine(mem, cls, "text", k=k)[0]  # [C,D]
    pred["surrogate"] = zero_shot(sv, st)
    pred["1-NN"] = nb[:, 0]
    pred["k-NN vote"] = knn_vote(nb, scores, valid, C)
    if weights is not None:
        v_bar = refine(weights.image, mem, q_img, "image", search_queries=q_search, k=k, backend=backend)[0]
        t_bar = refine(weights.text, mem, cls, "text", k=k, backend=backend)[0]
        pred["RECO"] = zero_shot(v_bar, t_bar)
    top1 = {m: float((p == y).mean()) for m, p in pred.items()}
    out = {"name": ds["name"], "queries": int(y.size), "classes": C, "prompt": ds["prompt"], "k": k, "top1": top1,
           "chance": 1.0 / C, "pred": {m: p.tolist() for m, p in pred.items()}, "labels": y.tolist(),
           "rows": rows.tolist(), "scores": scores.tolist(), "valid": valid.tolist()}
    if "RECO" in pred:
        ok_f, ok_r = pred["frozen"] == y, pred["RECO"] == y
        out["fixed"] = np.flatnonzero(~ok_f & ok_r).tolist()  # frozen wrong, RECO right
        out["missed"] = np.flatnonzero(~ok_f & ~ok_r).tolist()  # both wrong
        out["broken"] = np.flatnonzero(ok_f & ~ok_r).tolist()  # frozen right, RECO wrong
    return out


def report_lines(c: dict, names: list[str], n_list: int = 8) -> list[str]:
    """The printed comparison of one set: a top-1 row per method, then the fixed / missed / broken queries."""
    n = c["queries"]
    lines = [f"      {c['name']}: {n} queries, {c['classes']} classes, prompt \"{c['prompt']}\", k={c['k']}",
             f"      {'method':12s} top-1"]
    for m in METHODS:
        if m in c["top1"]:
            v = c["top1"][m]
            lines.append(f"      {m:12s} {v:.3f}  ({int(round(v * n))}/{n})")
    lines.append(f"      {'chance':12s} {c['chance']:.3f}")
    if "fixed" in c:
        y, pf, pr = c["labels"], c["pred"]["frozen"], c["pred"]["RECO"]

        def show(idx: list[int]) -> str:
            s = "; ".join(f"{names[y[i]]} ({names[pf[i]]} → {names[pr[i]]})" for i in idx[:n_list])
            return s + (f"; … {len(idx) - n_list} more" if len(idx) > n_list else "")

        lines.append(f"      frozen wrong, RECO right: {len(c['fixed'])}" + (f": {show(c['fixed'])}" if c["fixed"] else ""))
        lines.append(f"      both wrong (RECO still misses): {len(c['missed'])}")
        lines.append(f"      frozen right, RECO wrong (RECO breaks): {len(c['broken'])}"
                     + (f": {show(c['broken'])}" if c["broken"] else ""))
    return lines


def pick_examples(c: dict, per_kind: int = 1) -> list[tuple[int, str]]:
    """Queries to draw: up to ``per_kind`` each of fixed, broken and still missed (by query index; seeded order)."""
    picked = []
    for kind in ("fixed", "broken", "missed"):
        picked += [(i, kind) for i in c.get(kind, [])[:per_kind]]
    if not picked:  # no RECO column: the first queries
        picked = [(i, "query") for i in range(min(2, c["queries"]))]
    return picked


def comparison_figure(path: Path, sets: list[tuple[dict, dict]], n_nb: int = 3) -> bool:
    """Queries, their nearest memory images with captions, and every method's prediction -> PNG (atomic).

    ``sets`` : ``(comparison, dataset)`` pairs; each contributes the rows of :func:`pick_examples`.
    False without matplotlib.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    from PIL import Image

    from .report import short

    rows = [(c, ds, i, kind) for c, ds in sets for i, kind in pick_examples(c)]
    if not rows:
        return False
    cols = n_nb + 2
    fig = Figure(figsize=(1.75 * cols + 1.0, 1.8 * len(rows)), dpi=72)
    FigureCanvasAgg(fig)
    for r, (c, ds, i, kind) in enumerate(rows):
        names, y = ds["class_names"], c["labels"][i]
        cells = [(ds["queries"][i]["image"], f"{kind}: {short(names[y], 20)}", "black")]
        for j in range(n_nb):
            if not c["valid"][i][j]:
                continue
            row = c["rows"][i][j]
            item = ds["memory"][row]
            cells.append((item["image"], short(item["caption"], 24), "green" if item["label"] == y else "red"))
        for col, (img, title, colour) in enumerate(cells):
            ax = fig.add_subplot(len(rows), cols, r * cols + col + 1)
            with Image.open(img) as im:
                ax.imshow(np.asarray(im.convert("RGB")))
            ax.set_title(title, fontsize=7, color=colour)
            ax.set_axis_off()
        ax = fig.add_subplot(len(rows), cols, r * cols + cols)
        ax.set_axis_off()
        text = "\n".join(f"{m}: {short(names[c['pred'][m][i]], 18) if c['pred'][m][i] >= 0 else '—'} "
                         f"{'✓' if c['pred'][m][i] == y else '✗'}" for m in METHODS if m in c["pred"])
        ax.text(0.0, 0.5, text, fontsize=7, va="center", ha="left", family="DejaVu Sans")
    fig.suptitle("reco-ref demo: queries (left), nearest memory images with captions (green = same class), "
                 "predictions", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return True
