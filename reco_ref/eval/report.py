"""Report writers: JSON, a Markdown table and a PNG bar chart of methods × metrics (reused by the ablations).

::

    from reco_ref.eval.report import write_report, markdown_table, bar_chart_png
    write_report(result, json_path="eval.json", markdown_path="eval.md", png_path="eval.png")
    text = markdown_table(["method", "top1"], [["frozen", 0.05], ["reco", 0.61]])
    bar_chart_png("k.png", {"k=1": {"top1": 0.5}, "k=10": {"top1": 0.6}}, title="RECO vs k")

The chart is drawn with Pillow (a runtime dependency), so every install can write it. Everything is written
atomically (:mod:`reco_ref.io`). A missing value (``None``: e.g. a k-NN vote without labels) is printed as ``—``
in the table and left out of the chart, never drawn as 0.
"""

from __future__ import annotations

import io
import os
from typing import Any, Mapping, Sequence

from ..io import atomic_write_bytes, atomic_write_json, atomic_write_text

#: methods of a zero-shot report, in table order, with their row labels
METHODS = (
    ("frozen", "frozen encoder"),
    ("surrogate", "untrained surrogate normalize(v + alpha*mean)"),
    ("reco", "RECO (trained fusion)"),
    ("knn_vote", "k-NN label vote (memory ceiling)"),
)
METRICS = ("top1", "top5", "mean_per_class_recall")
#: bar colours per series (RGB), cycled
PALETTE = ((76, 114, 176), (221, 132, 82), (85, 168, 104), (196, 78, 82), (129, 114, 179), (147, 120, 96))


def short(text: str | None, n: int = 60) -> str:
    """``text`` on one line, cut to ``n`` characters with an ellipsis."""
    text = " ".join((text or "").split())
    return text if len(text) <= n else text[: n - 1] + "…"


def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: floats to ``digits`` places, None as an em dash."""
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value).replace("|", "\\|")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 3) -> str:
    """A GitHub Markdown table (first column left-aligned, the others right-aligned)."""
    head = "| " + " | ".join(fmt(h) for h in header) + " |"
    rule = "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"
    body = ["| " + " | ".join(fmt(c, digits) for c in r) + " |" for r in rows]
    return "\n".join([head, rule, *body]) + "\n"


#: How the RECO row is marked by what its weights saw (``reco_weights_saw_dataset`` of a result).
SAW_MARKS = {"in-domain": " — IN-DOMAIN: the weights saw this dataset's train split",
             "never saw": " — weights never saw this dataset", "unknown": " — unknown whether the weights saw it"}


def method_label(result: Mapping[str, Any], key: str, label: str) -> str:
    """The row label of method ``key``; the RECO row carries what its weights saw (in-domain / never saw)."""
    if key == "reco" and result.get("reco_weights_saw_dataset") in SAW_MARKS:
        return label + SAW_MARKS[result["reco_weights_saw_dataset"]]
    return label


def method_rows(result: Mapping[str, Any], metrics: Sequence[str] = METRICS) -> list[list[Any]]:
    """Rows ``[label, metric...]`` of the side-by-side methods present in a zero-shot result."""
    rows = []
    for key, label in METHODS:
        if key in result:
            m = result[key]
            rows.append([method_label(result, key, label)] + [None if m is None else m.get(x) for x in metrics])
    return rows


def zero_shot_markdown(result: Mapping[str, Any], title: str | None = None) -> str:
    """The zero-shot report as Markdown: settings line, the side-by-side table, per-mode table, notes."""
    r = result
    lines = [f"## {title or 'Zero-shot classification, side by side'}\n"]
    where = ", ".join(f"{k}: `{r[k]}`" for k in ("dataset", "split", "memory", "fusion", "templates") if r.get(k))
    if where:
        lines.append(where + "\n")
    lines.append(f"n = {r['n']} images, {r['classes']} classes (chance {1 / r['classes']:.3f}), k = {r['k']}, "
                 f"mode = `{r['mode']}`, search = {r.get('search')}, fuse = {r.get('fuse')}, α = {r.get('alpha')}, "
                 f"own memory rows excluded: {r.get('excluded_own_rows', 0)}\n")
    lines.append(markdown_table(["method"] + list(METRICS), method_rows(r)))
    by_mode = r.get("by_mode") or {}
    if by_mode:
        lines.append("\ntop-1 by enhancement mode:\n")
        lines.append(markdown_table(["method", "none", "image", "text", "both"],
                                    [[m] + [by_mode[m][x]["top1"] for x in ("none", "image", "text", "both")]
                                     for m in by_mode]))
    lines.append(f"\nk-NN vote labels: {r.get('knn_vote_labels')}\n")
    if r.get("command"):
        lines.append(f"\nreproduce: `{r['command']}`\n")
    return "\n".join(lines)


def bar_chart_png(path: str | os.PathLike, groups: Mapping[str, Mapping[str, float | None]], *, title: str = "",
                  ylabel: str = "", ymax: float = 1.0, width: int = 900, height: int = 480) -> None:
    """Grouped bar chart: one group per key of ``groups``, one bar per series (inner key) -> PNG (atomic).

    Values are drawn on ``[0, ymax]`` with their number above each bar; ``None`` values are skipped.
    """
    from PIL import Image, ImageDraw, ImageFont

    series: list[str] = []
    for g in groups.values():
        series += [s for s in g if s not in series]
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    left, right, top, bottom = 60, width - 20, 40, height - 90
    d.text((left, 10), title, fill="black", font=font)
    d.line([(left, top), (left, bottom), (right, bottom)], fill="black")
    for i in range(6):  # y grid + ticks
        v = ymax * i / 5
        y = bottom - (bottom - top) * i / 5
        d.line([(left - 4, y), (left, y)], fill="black")
        if i:
            d.line([(left + 1, y), (right, y)], fill=(225, 225, 225))
        d.text((8, y - 6), f"{v:.2f}", fill="black", font=font)
    if ylabel:
        d.text((8, top - 28), ylabel, fill="black", font=font)
    n_g, n_s = max(len(groups), 1), max(len(series), 1)
    gw = (right - left) / n_g
    bw = gw * 0.8 / n_s
    for gi, (gname, vals) in enumerate(groups.items()):
        x0 = left + gi * gw + gw * 0.1
        for si, s in enumerate(series):
            v = vals.get(s)
            if v is None:
                continue
            h = (bottom - top) * max(0.0, min(float(v), ymax)) / ymax
            xa = x0 + si * bw
            d.rectangle([xa, bottom - h, xa + bw - 2, bottom], fill=PALETTE[si % len(PALETTE)])
            d.text((xa, bottom - h - 12), f"{float(v):.2f}", fill="black", font=font)
        d.text((x0, bottom + 6), str(gname)[: max(int(gw / 6), 4)], fill="black", font=font)
    for si, s in enumerate(series):  # legend
        y = bottom + 26 + 14 * (si % 4)
        x = left + (si // 4) * 300
        d.rectangle([x, y, x + 10, y + 10], fill=PALETTE[si % len(PALETTE)])
        d.text((x + 16, y - 1), s, fill="black", font=font)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def zero_shot_chart_groups(result: Mapping[str, Any]) -> dict[str, dict[str, float | None]]:
    """``{metric: {method: value}}`` for :func:`bar_chart_png` from a zero-shot result."""
    short_marks = {"in-domain": " (in-domain)", "never saw": " (held-out)", "unknown": ""}
    mark = short_marks.get(result.get("reco_weights_saw_dataset"), "")
    return {metric: {label + (mark if key == "reco" else ""): (None if result.get(key) is None else result[key].get(metric))
                     for key, label in METHODS if key in result} for metric in METRICS}


def write_report(result: Mapping[str, Any], *, json_path: str | os.PathLike | None = None,
                 markdown_path: str | os.PathLike | None = None, png_path: str | os.PathLike | None = None,
                 title: str | None = None) -> None:
    """Write a zero-shot result as JSON, Markdown and/or a PNG bar chart (each path optional, atomic)."""
    if json_path is not None:
        atomic_write_json(json_path, result)
    if markdown_path is not None:
        atomic_write_text(markdown_path, zero_shot_markdown(result, title))
    if png_path is not None:
        bar_chart_png(png_path, zero_shot_chart_groups(result), ylabel="accuracy",
                      title=title or f"zero-shot, n={result['n']}, k={result['k']}, mode={result['mode']}")


def retrieval_rows(result: Mapping[str, Any]) -> list[list[Any]]:
    """Rows ``[method (mode), i→t R@1, R@5, R@10, t→i R@1, R@5, R@10]`` of a retrieval result."""
    def cells(r):
        return [r["image_to_text"][f"R@{k}"] for k in (1, 5, 10)] + [r["text_to_image"][f"R@{k}"] for k in (1, 5, 10)]

    rows = [["frozen encoder"] + cells(result["frozen"])]
    for method in ("surrogate", "reco"):
        for mode, r in (result.get(method) or {}).items():
            rows.append([f"{method} ({mode})"] + cells(r))
    return rows


RETRIEVAL_HEADER = ["method (enhanced side)", "i→t R@1", "i→t R@5", "i→t R@10", "t→i R@1", "t→i R@5", "t→i R@10"]


def write_retrieval_report(result: Mapping[str, Any], *, json_path: str | os.PathLike | None = None,
                           markdown_path: str | os.PathLike | None = None,
                           png_path: str | os.PathLike | None = None) -> None:
    """Write a retrieval result as JSON, a Markdown table and/or a PNG bar chart (R@1 / R@5 / R@10 groups)."""
    if json_path is not None:
        atomic_write_json(json_path, result)
    if markdown_path is not None:
        text = (f"## Image↔text retrieval, n = {result['n']} pairs, k = {result['k']}\n\n"
                + markdown_table(RETRIEVAL_HEADER, retrieval_rows(result)))
        atomic_write_text(markdown_path, text)
    if png_path is not None:
        rows = retrieval_rows(result)
        groups = {h: {r[0]: r[i + 1] for r in rows} for i, h in enumerate(RETRIEVAL_HEADER[1:])}
        bar_chart_png(png_path, groups, ylabel="recall", title=f"image-text retrieval, n={result['n']}, k={result['k']}")
