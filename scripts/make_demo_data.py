#!/usr/bin/env python3
"""Regenerate ``weights/demo/`` (the sample data of ``reco-ref demo``) from pinned Debian OpenClipart packages.

    python3 scripts/make_demo_data.py                       # writes weights/demo/ (images/, pairs.csv, notes)
    python3 scripts/make_demo_data.py --out /tmp/demo --check weights/demo   # rebuild elsewhere, compare

Inputs: ``openclipart-png`` + ``openclipart-svg`` 1:0.18+dfsg-19 (public domain), downloaded, sha256-checked and
unpacked by ``scripts/reco_mini_data.py`` into ``~/.cache/reco_ref_build`` (the same cache the reco-mini build
uses). Captions are that script's cleaned titles + keywords (:func:`reco_mini_data.openclipart_pairs`).

Selection (deterministic, no randomness beyond sha256 of the file paths):

* a pair belongs to a category when its path lies under one of the category's folders AND its caption
  names the category (whole word), AND no exclusion word appears; pairs claimed by two categories are dropped.
  Folder + word together keep the categories clean (the folders alone hold road signs, knots, composers...).
* **queries** are pairs in reco-mini's held-out 10 % (:func:`reco_mini_data.is_heldout`), so the demo's
  zero-shot numbers are measured on images the encoder's alignment training never saw; at most
  ``MAX_QUERIES`` per category. A query whose exact bytes also occur among the training pairs under the same
  file name (OpenClipart ships some drawings in two folders) is dropped.
* the **memory** is ``MEMORY_PER_CATEGORY`` training-split pairs per category (a memory is any image-text
  collection; RECO's is web data the encoder may well have seen).
* order within a category: by sha256 of the path (stable across machines and file-system order).

Images: alpha composited on white, shrunk to fit 96x96 (LANCZOS), centred on a white 96x96 square (so the
encoder's centre crop sees the whole drawing), quantised to an adaptive 64-colour palette, PNG-optimised.
Sources above 40 Mpx (a few posters) are passed over.
Byte-identical output needs the same Pillow version (recorded in SOURCE.md); ``--check`` reports differences.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import re
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import reco_mini_data as data  # noqa: E402

from reco_ref.io import atomic_write_bytes, atomic_write_text  # noqa: E402

SIZE = 96  # px, square
PALETTE = 64  # colours
MEMORY_PER_CATEGORY = 15
MAX_QUERIES = 6
MAX_SOURCE_PIXELS = 40_000_000  # larger source PNGs (a few posters) are skipped rather than decoded
MAX_TOTAL_BYTES = 1_500_000
PROMPT = "a drawing of a {}."

# (category, folders, caption words (regex alternation, whole words), exclusion regex or None)
CATEGORIES = (
    ("bird", ("animals/",),
     r"birds?|parrots?|owls?|eagles?|ducks?|penguins?|rooster|hen|chickens?|swans?|doves?|pigeons?|toucan|"
     r"flamingo|seagull|gull|crow|raven|stork|peacock", None),
    ("insect", ("animals/",),
     r"insects?|butterfly|butterflies|bees?|ants?|bugs?|beetles?|ladybugs?|ladybird|dragonfly|caterpillar|wasp",
     None),
    ("dog", ("animals/",), r"dogs?|puppy|puppies", None),
    ("fish", ("animals/",), r"fish|fishes|shark|goldfish", None),
    ("fruit", ("food/fruit/",),
     r"fruits?|apples?|bananas?|pears?|oranges?|cherry|cherries|grapes?|strawberry|strawberries|lemons?|limes?|"
     r"pineapple|watermelon|melon|peach", None),
    ("boat", ("transportation/",), r"boats?|ships?|sailboat|yacht|canoe|ferry|sailing", r"knot|rules"),
    ("car", ("transportation/vehicles/",), r"cars?|automobiles?|trucks?|taxi|jeep|van|bus|hummer|sedan|wagon|ambulance",
     r"sign|plane|aircraft|bicycle|cycle"),
    ("house", ("buildings/",), r"house|houses|home|cottage|hut|cabin", r"furniture|table"),
    ("tree", ("plants/", "recreation/holiday/"), r"trees?|evergreen", None),
    ("musical instrument", ("recreation/music/",),
     r"guitars?|drums?|violin|cello|piano|trumpet|saxophone|flute|harp|horn|accordion|banjo|tuba", None),
    ("tool", ("tools/",),
     r"hammer|wrench|screwdriver|saw|drill|pliers|axe|shovel|spanner|roller|shears?|rake|trowel|lopper|cultivator",
     r"weapon"),
)


def _path_hash(rel: str) -> str:
    return hashlib.sha256(rel.encode()).hexdigest()


def categorise(pairs: list[tuple[str, str]]) -> dict[str, list[tuple[str, str]]]:
    """``{category: [(png path, caption)]}`` for the pairs that belong to exactly one category."""
    rules = [(name, folders, re.compile(r"(?<![a-z])(?:" + words + r")(?![a-z])"),
              re.compile(excl) if excl else None) for name, folders, words, excl in CATEGORIES]
    out: dict[str, list[tuple[str, str]]] = {name: [] for name, *_ in CATEGORIES}
    for rel, caption in pairs:
        text = caption.lower()
        hits = [name for name, folders, words, excl in rules
                if rel.startswith(folders) and words.search(text) and not (excl and excl.search(text))]
        if len(hits) == 1:
            out[hits[0]].append((rel, caption))
    return out


def _seen_in_training(rel: str, train_by_name: dict[str, list[str]], png_root: Path) -> bool:
    """True when a training pair holds the same bytes as ``rel`` under the same file name (a copy)."""
    mine = data.sha256_path(png_root / rel)
    return any(data.sha256_path(png_root / other) == mine for other in train_by_name.get(Path(rel).name, ()))


def _too_large(path: Path) -> bool:
    """Source drawings above MAX_SOURCE_PIXELS (a few posters) are passed over; the header tells, no decoding."""
    import warnings

    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            return im.width * im.height > MAX_SOURCE_PIXELS


def select(pairs: list[tuple[str, str]], png_root: Path) -> list[dict]:
    """Rows ``{rel, caption, category, label, split}``: memory first (by category), then queries."""
    by_cat = categorise(pairs)
    train_by_name: dict[str, list[str]] = {}
    for rel, _ in pairs:
        if not data.is_heldout(rel):
            train_by_name.setdefault(Path(rel).name, []).append(rel)
    memory, queries = [], []
    for label, (name, *_rest) in enumerate(CATEGORIES):
        items = sorted(by_cat[name], key=lambda p: _path_hash(p[0]))
        seen: set[str] = set()
        mem, qry = [], []
        for rel, caption in items:
            stem = Path(rel).name
            if stem in seen or _too_large(png_root / rel):  # the same drawing filed in two folders; a poster
                continue
            seen.add(stem)
            if data.is_heldout(rel):
                if len(qry) < MAX_QUERIES and not _seen_in_training(rel, train_by_name, png_root):
                    qry.append((rel, caption))
            elif len(mem) < MEMORY_PER_CATEGORY:
                mem.append((rel, caption))
        if not qry or len(mem) < MEMORY_PER_CATEGORY:
            raise SystemExit(f"category {name!r}: {len(mem)} memory / {len(qry)} query pairs; adjust CATEGORIES")
        memory += [dict(rel=r, caption=c, category=name, label=label, split="memory") for r, c in mem]
        queries += [dict(rel=r, caption=c, category=name, label=label, split="query") for r, c in qry]
    return memory + queries


def thumbnail_png(path: Path) -> bytes:
    """The source PNG as a 96x96 palette PNG on white (see the module docstring)."""
    import warnings

    from PIL import Image

    with warnings.catch_warnings():
        # the size is checked here, from the header, before any pixel is decoded
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            if im.width * im.height > MAX_SOURCE_PIXELS:
                raise ValueError(f"{im.width}x{im.height} exceeds {MAX_SOURCE_PIXELS} pixels")
            rgba = im.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    rgb = Image.alpha_composite(white, rgba).convert("RGB")
    rgb.thumbnail((SIZE, SIZE), Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    canvas.paste(rgb, ((SIZE - rgb.width) // 2, (SIZE - rgb.height) // 2))
    pal = canvas.quantize(colors=PALETTE, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    buf = io.BytesIO()
    pal.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def write(out: Path, rows: list[dict], png_root: Path) -> dict:
    """Write images/, pairs.csv, SOURCE.md, LICENSE; return a small report."""
    import PIL
    from PIL import Image

    images = out / "images"
    if images.is_dir():
        shutil.rmtree(images)  # this script owns the folder; stale thumbnails must not survive
    kept, skipped, total = [], [], 0
    used: set[str] = set()
    for row in rows:
        try:
            png = thumbnail_png(png_root / row["rel"])
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            skipped.append(f"{row['rel']}: {exc}")
            continue
        name = f"images/{_slug(row['category'])}/{_slug(Path(row['rel']).stem)}.png"
        n = 2
        while name in used:
            name = f"images/{_slug(row['category'])}/{_slug(Path(row['rel']).stem)}_{n}.png"
            n += 1
        used.add(name)
        atomic_write_bytes(out / name, png)
        total += len(png)
        kept.append({**row, "image": name})
    if total > MAX_TOTAL_BYTES:
        raise SystemExit(f"{total} bytes of images exceed the {MAX_TOTAL_BYTES}-byte budget")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["image", "caption", "category", "label", "split", "source"])
    for r in kept:
        w.writerow([r["image"], r["caption"], r["category"], r["label"], r["split"], r["rel"]])
    atomic_write_text(out / "pairs.csv", buf.getvalue())
    counts = {name: (sum(r["category"] == name and r["split"] == "memory" for r in kept),
                     sum(r["category"] == name and r["split"] == "query" for r in kept)) for name, *_ in CATEGORIES}
    atomic_write_text(out / "SOURCE.md", _source_md(kept, counts, total, PIL.__version__, skipped))
    atomic_write_text(out / "LICENSE", _LICENSE)
    return {"images": len(kept), "bytes": total, "skipped": skipped, "counts": counts}


_LICENSE = """\
The images in this folder are downscaled copies of drawings from the Open Clip Art Library 0.18, as packaged
by Debian (openclipart-png / openclipart-svg 1:0.18+dfsg-19). Every drawing in the Open Clip Art Library is
released into the public domain by its author (Creative Commons Public Domain Dedication; see
/usr/share/doc/openclipart-png/copyright in the Debian package). The captions are derived from the titles and
keywords in the drawings' own SVG metadata. No rights are reserved; attribution is given per file in
pairs.csv (column `source`, the path inside the Debian package, whose file name carries the author).
"""


def _source_md(rows: list[dict], counts: dict, total: int, pil_version: str, skipped: list[str]) -> str:
    debs = [data.ARCHIVES[k] for k in ("openclipart_png", "openclipart_svg")]
    lines = [
        "# weights/demo — sample data of `reco-ref demo` (provenance)",
        "",
        "Regenerate with `python3 scripts/make_demo_data.py` (see its docstring for the selection rules).",
        "",
        "Sources (public domain, see LICENSE):",
        "",
    ]
    lines += [f"- `{req}` — `{fname}`, sha256 `{sha}`" for _kind, req, fname, sha in debs]
    lines += [
        "",
        f"Built with Pillow {pil_version}: {len(rows)} PNG files, {SIZE}x{SIZE}, {PALETTE}-colour palette, "
        f"{total:,} bytes in all.",
        "",
        "`pairs.csv`: `image` (relative to this folder), `caption` (cleaned title + keywords), `category`, `label`"
        " (index of the category), `split` (`memory` or `query`), `source` (path in the Debian package).",
        f"Queries are in reco-mini's held-out 10 % (never seen by its alignment training); zero-shot prompts: "
        f"`{PROMPT.format('{category}')}`.",
        "",
        "| category | memory | queries |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {m} | {q} |" for name, (m, q) in counts.items()]
    if skipped:
        lines += ["", "Skipped source files:", ""] + [f"- {s}" for s in skipped]
    return "\n".join(lines) + "\n"


def check(out: Path, ref: Path) -> int:
    """Compare two generated folders file by file; print differences; return the number of differences."""
    names = sorted({p.relative_to(d).as_posix() for d in (out, ref) for p in d.rglob("*") if p.is_file()})
    bad = 0
    for name in names:
        a, b = out / name, ref / name
        if not (a.is_file() and b.is_file()) or a.read_bytes() != b.read_bytes():
            print(f"differs: {name}")
            bad += 1
    print(f"{len(names) - bad}/{len(names)} files identical")
    return bad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "weights" / "demo")
    ap.add_argument("--check", type=Path, default=None, help="compare the result with this folder")
    args = ap.parse_args(argv)
    paths = data.fetch_inputs()
    pairs, report = data.openclipart_pairs(paths)
    rows = select(pairs, paths["openclipart_png"])
    args.out.mkdir(parents=True, exist_ok=True)
    rep = write(args.out, rows, paths["openclipart_png"])
    print(f"{rep['images']} images, {rep['bytes']:,} bytes -> {args.out}")
    for name, (m, q) in rep["counts"].items():
        print(f"  {name:20s} memory {m:3d}  queries {q:2d}")
    for s in rep["skipped"]:
        print(f"  skipped {s}")
    return check(args.out, args.check) if args.check else 0


if __name__ == "__main__":
    sys.exit(main())
