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

import io
from pathlib import Path
from typing import Any

import numpy as np

from ..checks import cap_k
from ..io import atomic_write_bytes
from .metrics import knn_vote, zero_shot

ENTITIES_PROMPT = "the flag of {}."
METHODS = ("frozen", "surrogate", "1-NN", "k-NN vote", "RECO")


def entities_data() -> dict:
    """The shipped flag memory (``weights/demo-entities/pairs.csv``) as a demo dataset dict (see ``shipped_data``)."""
    from ..paths import weights_file
    from .data import pairs_data

    return pairs_data(weights_file("demo-entities", "pairs.csv"), name="weights/demo-entities (flags)",
                      prompt=ENTITIES_PROMPT)


def compare_methods(ds: dict, e: dict, mem: Any, k: int, weights: Any, backend: str = "numpy") -> dict:
    """Per-query predictions of every method on one set, their top-1, and the queries RECO fixes / misses / breaks.

    Parameters
    ----------
    ds : demo dataset dict (``memory``, ``queries``, ``query_labels`` [Q], ``class_names`` [C], ``prompt``)
    e : step-1 arrays of :mod:`reco_ref.eval.demo` (``q_img`` [Q,D], ``q_keys`` [Q,Dk] or None, ``cls_txt`` [C,D])
    mem : the set's memory (rows in ``ds["memory"]`` order)
    weights : RecoWeights or None (then no RECO column)
    """
    from ..fusion import gated_scores
    from ..reco.refine import refine
    from .zeroshot import surrogate_refine

    y = ds["query_labels"]  # [Q]
    C = len(ds["class_names"])
    k = cap_k(k, mem)  # the set's memory may hold fewer rows than k: what its search gives, and what is reported
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
        v_bar, _, _, gate = refine(weights.image, mem, q_img, "image", search_queries=q_search, k=k,
                                   backend=backend, with_gate=True)
        t_bar = refine(weights.text, mem, cls, "text", k=k, backend=backend)[0]
        pred["RECO"] = np.argmax(gated_scores(v_bar, t_bar, cls, gate), axis=1)  # with the relevance gate
    top1 = {m: float((p == y).mean()) for m, p in pred.items()}
    out = {"name": ds["name"], "queries": int(y.size), "classes": C, "prompt": ds["prompt"], "k": k, "top1": top1,
           "chance": 1.0 / C, "pred": {m: p.tolist() for m, p in pred.items()}, "labels": y.tolist(),
           "rows": rows.tolist(), "scores": scores.tolist(), "valid": valid.tolist()}
    out["counts"] = method_counts(out)
    if "RECO" in pred:  # RECO's queries by outcome against frozen (the printed lists and the examples)
        out.update({kind: np.flatnonzero(m).tolist() for kind, m in outcomes(out, "RECO").items()})
    return out


def outcomes(c: dict, method: str) -> dict[str, np.ndarray]:
    """Boolean masks [Q] of ``method`` against frozen zero-shot on the same queries: ``fixed`` (frozen wrong,
    method right), ``broken`` (frozen right, method wrong), ``missed`` (both wrong); a prediction of -1 (no
    neighbour) is wrong."""
    y = np.asarray(c["labels"], np.int64)  # [Q]
    ok_f = np.asarray(c["pred"]["frozen"], np.int64) == y  # [Q]
    ok = np.asarray(c["pred"][method], np.int64) == y  # [Q]
    return {"fixed": ~ok_f & ok, "broken": ok_f & ~ok, "missed": ~ok_f & ~ok}


def method_counts(c: dict) -> dict[str, dict[str, int]]:
    """Per method (in :data:`METHODS` order, those present in ``c["pred"]``): queries it gets ``right``, and against
    frozen zero-shot the queries it ``fixed`` (frozen wrong, method right), ``broken`` (frozen right, method wrong)
    and ``missed`` (both wrong). ``right == fixed + (frozen right) - broken``; a prediction of -1 (no neighbour) is
    wrong. These are the numbers of the counts panel of ``comparison.png`` and of the printed table."""
    y = np.asarray(c["labels"], np.int64)  # [Q]
    out = {}
    for m in METHODS:
        if m in c["pred"]:
            right = int((np.asarray(c["pred"][m], np.int64) == y).sum())
            out[m] = {"right": right, **{kind: int(mask.sum()) for kind, mask in outcomes(c, m).items()}}
    return out


def report_lines(c: dict, names: list[str], n_list: int = 8) -> list[str]:
    """The printed comparison of one set: per method top-1 and, against frozen, the fixed / broken / missed counts;
    then RECO's fixed / missed / broken queries by name."""
    n = c["queries"]
    counts = method_counts(c)
    lines = [f"      {c['name']}: {n} queries, {c['classes']} classes, prompt \"{c['prompt']}\", k={c['k']}",
             f"      {'method':12s} {'top-1':>5s} {'right':>9s} {'fixed':>6s} {'broken':>6s} {'missed':>6s}"
             "   (fixed / broken / missed: against frozen zero-shot)"]
    for m in METHODS:
        if m in c["top1"]:
            cm = counts[m]
            vs = ("—", "—", "—") if m == "frozen" else (cm["fixed"], cm["broken"], cm["missed"])
            lines.append(f"      {m:12s} {c['top1'][m]:.3f} {str(cm['right']) + '/' + str(n):>9s} "
                         f"{vs[0]:>6} {vs[1]:>6} {vs[2]:>6}")
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


# comparison.png: sizes in inches at FIGURE_DPI, so that every text is FONT_PT / 72 * FIGURE_DPI pixels high at 100 %
FIGURE_DPI = 100
FONT_PT = 11  # predictions and the counts panel: 15 px at 100 dpi
SMALL_PT = 10  # captions above the images, the panel's legend
COUNT_COLUMNS = ("method", "right", "fixed", "broken", "missed")
COUNT_COLOURS = {"fixed": "#1a7f37", "broken": "#c62828"}


def counts_cells(c: dict) -> list[list[str]]:
    """The counts panel of one set as text cells: one row per method (:data:`COUNT_COLUMNS`), frozen's
    fixed / broken / missed as an em dash (frozen is what the others are counted against)."""
    n = c["queries"]
    rows = []
    for m, cm in method_counts(c).items():
        vs = ["—"] * 3 if m == "frozen" else [str(cm["fixed"]), str(cm["broken"]), str(cm["missed"])]
        rows.append([m, f"{cm['right']}/{n}", *vs])
    return rows


def wrap2(text: str, n: int) -> str:
    """``text`` on at most two lines of at most ``n`` characters (the second cut with an ellipsis)."""
    import textwrap

    from .report import short

    lines = textwrap.wrap(" ".join(text.split()), n, break_long_words=True) or [""]
    return lines[0] if len(lines) == 1 else lines[0] + "\n" + short(" ".join(lines[1:]), n)


def draw_comparison(sets: list[tuple[dict, dict]], n_nb: int = 3) -> Any:
    """The comparison figure (a matplotlib ``Figure`` on its own Agg canvas; no pyplot), or None when there is
    nothing to draw. Raises ImportError without matplotlib.

    Top: the counts panel, one table per set (``axes.get_label() == "counts: " + set name``): per method the
    queries right and, against frozen zero-shot, fixed / broken / missed (:func:`method_counts`). Below: example
    queries (:func:`pick_examples`), their ``n_nb`` nearest memory images with captions (green = same class) and
    every method's prediction (green ✓ right, red ✗ wrong).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from PIL import Image

    from .report import short

    if not sets:
        return None
    examples = [(c, ds, i, kind) for c, ds in sets for i, kind in pick_examples(c)]
    # layout, in inches from the top
    img_w, text_w, margin = 1.45, 3.3, 0.2
    width = 2 * margin + (n_nb + 1) * img_w + text_w
    title_h, set_title_h, row_h, legend_h, head_h, ex_h = 0.5, 0.3, 0.27, 0.6, 0.4, 1.95
    n_table_rows = 1 + max(len(method_counts(c)) for c, _ in sets)
    table_h = n_table_rows * row_h
    panel_h = set_title_h + table_h + legend_h
    height = title_h + panel_h + (head_h + ex_h * len(examples) if examples else 0) + margin
    fig = Figure(figsize=(width, height), dpi=FIGURE_DPI)
    FigureCanvasAgg(fig)

    def axes(left: float, top: float, w: float, h: float) -> Any:  # inches from the top-left corner
        return fig.add_axes((left / width, 1 - (top + h) / height, w / width, h / height))

    present = [m for m in METHODS if any(m in c["pred"] for c, _ in sets)]
    fig.text(0.5, 1 - 0.3 / height, "reco-ref demo, step 6: " + " vs ".join(
        "frozen zero-shot" if m == "frozen" else m for m in present), ha="center", va="center",
        fontsize=FONT_PT + 2, weight="bold")
    # ---- counts panel: one table per set, side by side
    per_set_w = (width - 2 * margin - 0.2 * (len(sets) - 1)) / len(sets)
    for s_i, (c, ds) in enumerate(sets):
        left = margin + s_i * (per_set_w + 0.2)
        label = "flags" if "flag" in c["name"] else "clip-art" if "demo" in c["name"] else c["name"]
        fig.text(left / width, 1 - (title_h + set_title_h / 2) / height,
                 f"{label}: {c['queries']} queries, {c['classes']} classes", ha="left", va="center",
                 fontsize=FONT_PT, weight="bold")
        cells = counts_cells(c)
        ax = axes(left, title_h + set_title_h, per_set_w, (len(cells) + 1) * row_h)
        ax.set_label(f"counts: {c['name']}")
        ax.set_axis_off()
        tab = ax.table(cellText=cells, colLabels=list(COUNT_COLUMNS), cellLoc="center", colLoc="center",
                       colWidths=[0.28, 0.21, 0.17, 0.17, 0.17], bbox=(0.0, 0.0, 1.0, 1.0))
        tab.auto_set_font_size(False)
        tab.set_fontsize(FONT_PT)
        for (r, col), cell in tab.get_celld().items():
            cell.set_edgecolor("#bbbbbb")
            name = COUNT_COLUMNS[col]
            if r == 0:
                cell.set_facecolor("#eeeeee")
                cell.get_text().set_weight("bold")
            if name in COUNT_COLOURS and cell.get_text().get_text() not in ("—", "0"):
                cell.get_text().set_color(COUNT_COLOURS[name])
            if r > 0 and cells[r - 1][0] == "RECO":
                cell.get_text().set_weight("bold")
            if col == 0 and r > 0:
                cell.get_text().set_horizontalalignment("left")
                cell.PAD = 0.05
    fig.text(margin / width, 1 - (title_h + set_title_h + table_h + 0.12) / height,
             "right: queries the method names correctly.  Against frozen zero-shot (same queries):\n"
             "fixed = frozen wrong, method right;  broken = frozen right, method wrong;  missed = both wrong.",
             ha="left", va="top", fontsize=SMALL_PT, linespacing=1.4)
    # ---- example queries
    if examples:
        top = title_h + panel_h
        fig.text(margin / width, 1 - (top + head_h / 2) / height,
                 "Examples (" + ("one RECO fixed / broken / missed query per set" if "RECO" in present else
                                 "the first queries of each set") + "; the counts above cover all queries)",
                 ha="left", va="center", fontsize=FONT_PT, weight="bold")
        top += head_h
    for r, (c, ds, i, kind) in enumerate(examples):
        names, y = ds["class_names"], c["labels"][i]
        row_top = top + r * ex_h
        cells = [(ds["queries"][i]["image"], f"{'RECO ' if kind != 'query' else ''}{kind}:\n{short(names[y], 15)}",
                  "black")]
        for j in range(n_nb):
            if not c["valid"][i][j]:
                continue
            item = ds["memory"][c["rows"][i][j]]
            cells.append((item["image"], wrap2(item["caption"], 15), "#1a7f37" if item["label"] == y else "#c62828"))
        for col, (img, title, colour) in enumerate(cells):
            ax = axes(margin + col * img_w + 0.05, row_top + 0.45, img_w - 0.1, ex_h - 0.5)
            with Image.open(img) as im:
                ax.imshow(np.asarray(im.convert("RGB")))
            ax.set_title(title, fontsize=SMALL_PT, color=colour, pad=3,
                         weight="bold" if col == 0 else "normal")
            ax.set_axis_off()
        methods = [m for m in METHODS if m in c["pred"]]
        x = (margin + (n_nb + 1) * img_w + 0.15) / width
        line_h = FONT_PT * 1.45 / 72  # inches
        y0 = row_top + ex_h / 2 - line_h * (len(methods) - 1) / 2
        for li, m in enumerate(methods):
            p = c["pred"][m][i]
            ok = p == y
            fig.text(x, 1 - (y0 + li * line_h) / height,
                     f"{m}: {short(names[p], 18) if p >= 0 else '—'} {'✓' if ok else '✗'}",
                     ha="left", va="center", fontsize=FONT_PT, color="#1a7f37" if ok else "#c62828",
                     weight="bold" if m == "RECO" else "normal")
    return fig


def comparison_figure(path: Path, sets: list[tuple[dict, dict]], n_nb: int = 3) -> bool:
    """:func:`draw_comparison` -> PNG at ``path`` (atomic, :data:`FIGURE_DPI`). False without matplotlib or with
    nothing to draw."""
    try:
        fig = draw_comparison(sets, n_nb)
    except ImportError:
        return False
    if fig is None:
        return False
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=FIGURE_DPI)
    from PIL import Image

    # a 256-colour palette: flags, clip-art and text lose nothing visible, the file shrinks about threefold
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        small = io.BytesIO()
        im.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(small, format="png", optimize=True)
    atomic_write_bytes(path, small.getvalue())
    return True
