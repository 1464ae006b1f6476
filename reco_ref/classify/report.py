"""Report writers for classify results: JSON, a Markdown table, a PNG bar chart (Pillow only).

Numbers are fractions with three decimals and "—" for an empty group, as every other verb's reports
(:func:`reco_ref.eval.report.markdown_table`, the one table writer); the PNG draws percent bars.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from ..io import atomic_path, atomic_write_json, atomic_write_text

__all__ = ["COLUMNS", "write_json", "markdown_table", "write_markdown", "write_png"]

COLUMNS = ("top1", "many", "medium", "few")


def write_json(path: str | os.PathLike, result: dict) -> None:
    """The result dict as indented JSON, atomically."""
    atomic_write_json(path, result)


def markdown_table(rows: Sequence[tuple[str, dict]], columns: Sequence[str] = COLUMNS) -> str:
    """``| run | top1 | many | medium | few | n |``: top-1 as fractions, three decimals, "—" where a group is empty."""
    from ..eval.report import markdown_table as table

    return table(["run", *columns, "n"], [[name, *(r.get(c) for c in columns), r.get("n")] for name, r in rows])


def write_markdown(path: str | os.PathLike, rows: Sequence[tuple[str, dict]], title: str = "") -> None:
    atomic_write_text(path, (f"# {title}\n\n" if title else "") + markdown_table(rows))


def write_png(path: str | os.PathLike, rows: Sequence[tuple[str, dict]], columns: Sequence[str] = COLUMNS,
              title: str = "") -> None:
    """Grouped bars (one group per column, one bar per run), top-1 in percent, drawn with Pillow."""
    from PIL import Image, ImageDraw

    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
               (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
    bw, gap, H, top, left = 14, 24, 300, 30, 40
    n = max(1, len(rows))
    W = left + len(columns) * (n * bw + gap) + 220
    img = Image.new("RGB", (W, H + 60), "white")
    d = ImageDraw.Draw(img)
    d.text((left, 5), title or "top-1 (%)", fill="black")
    for pct in (0, 25, 50, 75, 100):
        y = top + H - H * pct / 100
        d.line([(left - 4, y), (W - 220, y)], fill=(220, 220, 220))
        d.text((4, y - 6), str(pct), fill="black")
    for ci, col in enumerate(columns):
        x0 = left + ci * (n * bw + gap)
        for ri, (_, r) in enumerate(rows):
            v = r.get(col)
            if v is None:
                continue
            x = x0 + ri * bw
            d.rectangle([x, top + H - H * v, x + bw - 2, top + H], fill=colours[ri % len(colours)])
        d.text((x0, top + H + 6), col, fill="black")
    for ri, (name, _) in enumerate(rows):
        y = top + 14 * ri
        d.rectangle([W - 210, y, W - 200, y + 10], fill=colours[ri % len(colours)])
        d.text((W - 195, y - 2), name[:32], fill="black")
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
