"""Where the (image, caption) pairs of a memory come from: CSV, JSONL, dataset manifests, caption folders.

Every reader returns a list of *items*, one dict per input pair, in a stable order::

    {"image": absolute path (str), "caption": str | None, "source": path as written in the input,
     "label": int | None, "split": str | None, "tags": str | None}

``caption=None`` marks a pair whose caption is missing (e.g. an image without its sidecar ``.txt``);
the build reports it in ``failures.jsonl`` instead of dropping it.  The order is the row order of the
memory (minus failures), and :func:`items_digest` hashes it so a resumed build can prove it is
continuing the same input.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Iterable

from ..errors import MemoryFormatError

MANIFEST_COLUMNS = ("file", "label", "class_name", "split")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")


def _item(image: Path, caption: str | None, source: str, label=None, split=None, tags=None) -> dict:
    return {"image": str(image), "caption": caption, "source": source,
            "label": None if label in (None, "") else int(label), "split": split or None, "tags": tags or None}


def read_pairs_csv(path: str | Path, *, split: str | None = None,
                   caption_template: str | None = None) -> list[dict]:
    """Read a pairs CSV (``image,caption`` [+ label, split, tags]) or a dataset manifest.

    A dataset manifest (columns ``file,label,class_name,split``, as ``../shared/data/*/manifest.csv``)
    gets its captions from ``caption_template`` (e.g. ``"a photo of a {class_name}."``; default that
    one), and ``split`` keeps only rows of that split.  Image paths are relative to the CSV's folder.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pairs file not found: {path}")
    base = path.parent.resolve()
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        cols = tuple(reader.fieldnames or ())
        rows = list(reader)
    if "image" in cols and "caption" in cols:
        items = []
        for r in rows:
            if split is not None and r.get("split") != split:
                continue
            items.append(_item(base / r["image"], r["caption"], r["image"], r.get("label"), r.get("split"),
                               r.get("tags")))
        return items
    if all(c in cols for c in MANIFEST_COLUMNS):
        template = caption_template or "a photo of a {class_name}."
        items = []
        for r in rows:
            if split is not None and r["split"] != split:
                continue
            try:
                caption = template.format(**r)
            except (KeyError, IndexError) as exc:
                raise MemoryFormatError(
                    f"caption template {template!r} names field {exc} that {path} does not have "
                    f"(columns: {', '.join(cols)})"
                ) from None
            items.append(_item(base / r["file"], caption, r["file"], r["label"], r["split"]))
        if split is not None and not items:
            splits = sorted({r["split"] for r in rows})
            raise MemoryFormatError(f"{path}: no rows with split {split!r} (splits present: {splits})")
        return items
    raise MemoryFormatError(
        f"{path}: columns {list(cols)} are neither a pairs CSV (image,caption) "
        f"nor a dataset manifest ({','.join(MANIFEST_COLUMNS)})"
    )


def read_pairs_jsonl(path: str | Path, *, split: str | None = None) -> list[dict]:
    """Read JSON lines ``{"image": ..., "caption": ..., ["label", "split", "tags"]}`` (paths relative to the file)."""
    path = Path(path)
    base = path.parent.resolve()
    items = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                image = r["image"]
            except (ValueError, KeyError, TypeError) as exc:
                raise MemoryFormatError(f"{path}:{lineno}: expected a JSON object with 'image' ({exc})") from None
            if split is not None and r.get("split") != split:
                continue
            tags = r.get("tags")
            if isinstance(tags, list):
                tags = ",".join(map(str, tags))
            items.append(_item(base / image, r.get("caption"), image, r.get("label"), r.get("split"), tags))
    return items


def read_caption_folder(folder: str | Path, suffixes: Iterable[str] = IMAGE_SUFFIXES) -> list[dict]:
    """Every image under ``folder`` (sorted) with the caption from its sidecar ``<stem>.txt``.

    Images without a sidecar get ``caption=None`` (reported as failures by the build, never dropped).
    """
    root = Path(folder).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a directory")
    want = {s.lower() for s in suffixes}
    items = []
    for p in sorted(q for q in root.rglob("*") if q.is_file() and q.suffix.lower() in want):
        side = p.with_suffix(".txt")
        caption = side.read_text(encoding="utf-8").strip() if side.is_file() else None
        items.append(_item(p, caption, str(p.relative_to(root))))
    return items


def read_pairs(path: str | Path, *, split: str | None = None, caption_template: str | None = None) -> list[dict]:
    """Dispatch on what ``path`` is: folder (sidecar captions), ``.jsonl``, else CSV/manifest."""
    path = Path(path)
    if path.is_dir():
        return read_caption_folder(path)
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        return read_pairs_jsonl(path, split=split)
    return read_pairs_csv(path, split=split, caption_template=caption_template)


def items_digest(items: list[dict]) -> str:
    """sha256 over the canonical JSON of the items (what a resumed build must match)."""
    h = hashlib.sha256()
    for it in items:
        h.update(json.dumps(it, sort_keys=True).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()
