#!/usr/bin/env python3
"""Regenerate ``weights/demo-entities/``: a memory of flags, fine-grained entities the frozen encoder cannot name.

    python3 scripts/make_demo_entities.py                      # writes weights/demo-entities/
    python3 scripts/make_demo_entities.py --out /tmp/ent --check weights/demo-entities   # rebuild elsewhere, compare
    python3 scripts/make_demo_entities.py --measure-only       # reco-mini: zero-shot vs image->image 1-NN

Why: ``reco-mini`` (and a real CLIP, to a lesser degree) knows coarse categories, but cannot tell the flag of
Chad from the flag of Romania by name. A memory that holds one captioned picture per flag gives a retrieval-
enhanced model that knowledge at run time; the demo can then show frozen vs RECO on queries the frozen encoder
gets wrong. ``--measure-only`` prints the two numbers that make the point (zero-shot top-1 with the prompt
``"the flag of {}."`` and image->image 1-NN top-1 against the memory).

Inputs (pinned, sha256-checked, fetched through the package registries' own clients at build time only, into
``~/.cache/reco_ref_build`` — the cache ``scripts/reco_mini_data.py`` manages):

* ``flag-icons@7.5.0`` from npm (MIT): ``country.json`` (code, name, ``iso``) and two SVG drawings per entity,
  ``flags/4x3/<code>.svg`` and ``flags/1x1/<code>.svg`` (a square re-composition, not a crop of the 4x3 one).
* Debian ``librsvg2-bin=2.54.7+dfsg-1~deb12u1`` (``rsvg-convert``, the rasteriser; not shipped). It links the
  system's ``librsvg2-2``, which must be the same version (checked through ``rsvg-convert --version``).

Rows (deterministic; no randomness):

* **memory**: the 4x3 drawing rendered at 96x72 on white, centred on a white 96x96 square (the encoder's centre
  crop then sees the whole flag), caption ``"the flag of {name}."``;
* **query**: the 1x1 drawing rendered at 96x96, so a query is another drawing of the entity, never a copy of
  its memory image.
* Entities whose 4x3 renderings are the same picture (mean absolute pixel difference < ``DUPLICATE_MAD``: the
  French overseas territories fly the French flag, Heard Island the Australian one, ...) cannot be told apart
  by any image model; each such group keeps one member, named in ``KEEP_ON_DUPLICATE`` (the build fails when a
  group has no such member, so an input change cannot slip through). ``xx`` ("Unknown") is left out.
* PNGs: adaptive 64-colour palette (median cut, no dither), optimised. Byte-identical output needs the same
  Pillow and librsvg versions (recorded in SOURCE.md); ``--check`` reports differences.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import reco_mini_data as data  # noqa: E402
from make_demo_data import check  # noqa: E402

from reco_ref.io import atomic_write_bytes, atomic_write_text  # noqa: E402

ARCHIVES = {
    "flag_icons": ("npm", "flag-icons@7.5.0", "flag-icons-7.5.0.tgz",
                   "c0b80bf0e08006a60f56621d6bc49f8c7131f4d1fef6737a165a673431f4b518"),
    "rsvg": ("deb", "librsvg2-bin=2.54.7+dfsg-1~deb12u1", "librsvg2-bin_2.54.7+dfsg-1~deb12u1_amd64.deb",
             "2199db95318c03dd139e12477f410bffa910ef0c999aebf6acae18c7cd16487b"),
}
COUNTRY_JSON_SHA256 = "f5e99aee5051868b391b9f42e110cb104b7fcd6269807b2dc5e2c80b1e6c9436"
RSVG_VERSION = "rsvg-convert version 2.54.7"
SIZE = 96  # px, square canvas
PALETTE = 64
DUPLICATE_MAD = 3.0  # mean |Δpixel| (0..255, over the 96x96 canvas) below which two renderings are one picture
KEEP_ON_DUPLICATE = ("au", "fr", "gb", "io", "nl", "no", "us")
EXCLUDE = ("xx",)  # "Unknown"
PROMPT = "the flag of {}."
MAX_TOTAL_BYTES = 3_000_000


def fetch() -> tuple[Path, Path]:
    """Download + unpack the two pinned archives; return (flag-icons package root, rsvg-convert path)."""
    out = []
    for key in ("flag_icons", "rsvg"):
        archive = data._download(key, ARCHIVES)
        dest = data.CACHE / "x" / ARCHIVES[key][2]
        stamp = dest / ".unpacked"
        if not stamp.is_file():
            dest.mkdir(parents=True, exist_ok=True)
            if archive.name.endswith(".tgz"):
                with tarfile.open(archive) as tf:
                    tf.extractall(dest, filter="data")
            else:
                subprocess.run(["dpkg-deb", "-x", str(archive), str(dest)], check=True)
            atomic_write_text(stamp, "ok\n")
        out.append(dest)
    pkg, rsvg = out[0] / "package", out[1] / "usr" / "bin" / "rsvg-convert"
    data._check(pkg / "country.json", COUNTRY_JSON_SHA256, "flag-icons@7.5.0:package/country.json")
    got = subprocess.run([str(rsvg), "--version"], capture_output=True, text=True, check=True).stdout.strip()
    if got != RSVG_VERSION:
        raise SystemExit(f"{rsvg}: {got!r}, expected {RSVG_VERSION!r} (install librsvg2-2 of the same version)")
    return pkg, rsvg


def render(rsvg: Path, svg: Path, width: int, height: int) -> "Image.Image":  # noqa: F821
    """``svg`` rasterised by rsvg-convert at ``width x height`` on white, centred on a SIZE x SIZE canvas (RGB)."""
    from PIL import Image

    png = subprocess.run([str(rsvg), "-b", "white", "-w", str(width), "-h", str(height), str(svg)],
                         capture_output=True, check=True).stdout
    with Image.open(io.BytesIO(png)) as im:
        rgb = im.convert("RGB")
    canvas = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    canvas.paste(rgb, ((SIZE - width) // 2, (SIZE - height) // 2))
    return canvas


def palette_png(img) -> bytes:
    from PIL import Image

    pal = img.quantize(colors=PALETTE, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    buf = io.BytesIO()
    pal.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def select(pkg: Path, rsvg: Path) -> tuple[list[dict], list[list[str]]]:
    """Entities kept (sorted by name, with their rendered images) and the duplicate groups that were merged."""
    import numpy as np

    entries = [e for e in json.loads((pkg / "country.json").read_text(encoding="utf-8")) if e["code"] not in EXCLUDE]
    for e in entries:
        e["memory_img"] = render(rsvg, pkg / e["flag_4x3"], SIZE, SIZE * 3 // 4)
        e["query_img"] = render(rsvg, pkg / e["flag_1x1"], SIZE, SIZE)
    pix = np.stack([np.asarray(e["memory_img"], np.float32).ravel() for e in entries])  # [n, 96*96*3]
    n = len(entries)
    parent = list(range(n))  # union-find over "same picture" pairs

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for i in range(n):
        mad = np.abs(pix[i + 1:] - pix[i]).mean(axis=1)  # [n-i-1]
        for j in np.flatnonzero(mad < DUPLICATE_MAD) + i + 1:
            parent[root(int(j))] = root(i)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(root(i), []).append(i)
    kept, merged = [], []
    for members in groups.values():
        if len(members) == 1:
            kept.append(entries[members[0]])
            continue
        codes = sorted(entries[i]["code"] for i in members)
        keep = [c for c in codes if c in KEEP_ON_DUPLICATE]
        if len(keep) != 1:
            raise SystemExit(f"identical flags {codes}: expected exactly one of them in KEEP_ON_DUPLICATE, found {keep}")
        kept.append(next(entries[i] for i in members if entries[i]["code"] == keep[0]))
        merged.append([keep[0]] + [c for c in codes if c != keep[0]])
    kept.sort(key=lambda e: e["name"])
    return kept, sorted(merged)


def write(out: Path, kept: list[dict], merged: list[list[str]], pkg: Path) -> dict:
    import PIL

    images = out / "images"
    if images.is_dir():
        shutil.rmtree(images)  # this script owns the folder; stale renderings must not survive
    rows, total = [], 0
    for label, e in enumerate(kept):
        for split, key, variant in (("memory", "memory_img", "flag_4x3"), ("query", "query_img", "flag_1x1")):
            png = palette_png(e[key])
            name = f"images/{split}/{e['code']}.png"
            atomic_write_bytes(out / name, png)
            total += len(png)
            rows.append([name, PROMPT.format(e["name"]), e["name"], label, split, f"flag-icons/{e[variant]}"])
    if total > MAX_TOTAL_BYTES:
        raise SystemExit(f"{total} bytes of images exceed the {MAX_TOTAL_BYTES}-byte budget")
    rows.sort(key=lambda r: (r[4] != "memory", r[3]))  # memory rows first, then queries, each by label
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["image", "caption", "category", "label", "split", "source"])
    w.writerows(rows)
    atomic_write_text(out / "pairs.csv", buf.getvalue())
    atomic_write_text(out / "LICENSE", (pkg / "LICENSE").read_text(encoding="utf-8") + _LICENSE_NOTE)
    atomic_write_text(out / "SOURCE.md", _source_md(kept, merged, total, PIL.__version__,
                                                    COUNTRY_JSON_SHA256))
    return {"entities": len(kept), "images": len(rows), "bytes": total, "merged": merged}


_LICENSE_NOTE = """
----
The PNG files in this folder are rasterisations (by librsvg's rsvg-convert, which is not shipped) of the SVG
drawings of the npm package flag-icons 7.5.0, under the MIT licence above. Names come from the package's
country.json. Captions are generated ("the flag of {name}.").
"""


def _source_md(kept: list[dict], merged: list[list[str]], total: int, pil_version: str, country_sha: str) -> str:
    lines = [
        "# weights/demo-entities — a memory of flags (provenance)",
        "",
        "Regenerate with `python3 scripts/make_demo_entities.py` (its docstring gives the rules); measure with",
        "`python3 scripts/make_demo_entities.py --measure-only`.",
        "",
        "Sources:",
        "",
    ]
    lines += [f"- {kind} `{req}` — `{fname}`, sha256 `{sha}`" for kind, req, fname, sha in ARCHIVES.values()]
    lines += [
        f"- `package/country.json` inside the npm archive, sha256 `{country_sha}`",
        "",
        f"Built with Pillow {pil_version} and {RSVG_VERSION}: {len(kept)} entities, {2 * len(kept)} PNG files, "
        f"{SIZE}x{SIZE}, {PALETTE}-colour palette, {total:,} bytes in all.",
        "",
        "`pairs.csv`: `image` (relative to this folder), `caption` (`the flag of {name}.`), `category` (the name),",
        "`label` (index, entities sorted by name), `split` (`memory`: the 4x3 drawing letterboxed; `query`: the 1x1",
        "drawing), `source` (the SVG inside the npm package). Zero-shot prompt: `the flag of {category}.`.",
        "",
        "Identical flags merged (kept first, then the entities left out):",
        "",
    ]
    lines += [f"- {g[0]}: {', '.join(g[1:])}" for g in merged]
    return "\n".join(lines) + "\n"


def measure(folder: Path, encoder: str = "reco-mini") -> dict:
    """reco-mini on the folder: zero-shot top-1 of the queries and image->image 1-NN top-1 against the memory.

    Zero-shot: ``argmax_c <f_I(query), f_T("the flag of {c}.")>`` over all entities. 1-NN: the label of the memory
    row whose image search key is nearest the query's (exact cosine search; ties cannot change a 1-NN label
    here since each entity has one memory row).
    """
    import numpy as np

    from reco_ref.encoders import load

    with open(folder / "pairs.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    mem = [r for r in rows if r["split"] == "memory"]
    qry = [r for r in rows if r["split"] == "query"]
    names = {int(r["label"]): r["category"] for r in mem}
    classes = [names[i] for i in range(len(names))]
    enc = load(encoder)
    m_img, m_key = enc.encode_images([str(folder / r["image"]) for r in mem], with_keys=True)  # [M,D], [M,Dk]
    q_img, q_key = enc.encode_images([str(folder / r["image"]) for r in qry], with_keys=True)  # [Q,D], [Q,Dk]
    t_cls = enc.encode_texts([PROMPT.format(c) for c in classes])                             # [C,D]
    y = np.array([int(r["label"]) for r in qry])
    m_lab = np.array([int(r["label"]) for r in mem])
    zero_shot = float((np.argmax(q_img @ t_cls.T, axis=1) == y).mean())
    nn_key = float((m_lab[np.argmax(q_key @ m_key.T, axis=1)] == y).mean())
    nn_emb = float((m_lab[np.argmax(q_img @ m_img.T, axis=1)] == y).mean())
    return {"encoder": enc.name, "entities": len(classes), "queries": len(qry), "zero_shot_top1": zero_shot,
            "nn1_image_keys_top1": nn_key, "nn1_image_embeds_top1": nn_emb, "chance": 1 / len(classes)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "weights" / "demo-entities")
    ap.add_argument("--check", type=Path, default=None, help="compare the result with this folder")
    ap.add_argument("--measure-only", action="store_true", help="measure --out with reco-mini; build nothing")
    args = ap.parse_args(argv)
    if not args.measure_only:
        pkg, rsvg = fetch()
        kept, merged = select(pkg, rsvg)
        args.out.mkdir(parents=True, exist_ok=True)
        rep = write(args.out, kept, merged, pkg)
        print(f"{rep['entities']} entities, {rep['images']} images, {rep['bytes']:,} bytes -> {args.out}; "
              f"merged {rep['merged']}")
        if args.check is not None:
            return 1 if check(args.out, args.check) else 0
    print(json.dumps(measure(args.out), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
