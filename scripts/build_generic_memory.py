#!/usr/bin/env python3
"""Build a memory of generic, diverse image–caption pairs for training RECO: reco-mini's OpenClipart alignment pairs.

The pairs are those reco-mini's alignment training used (``reco_mini_data.openclipart_pairs``: captions from the SVG
metadata, pairs naming an evaluation class already dropped), restricted to its *training* part (``is_heldout`` False),
and with every image that ``weights/demo`` ships removed — compared by sha256 of the PNG bytes and by file name — so
the do-no-harm check (``weights/demo`` clip-art queries) stays clean: the weights never see a query image.

Inputs: the two sha256-pinned Debian archives of OpenClipart 0.18 in the build cache (``~/.cache/reco_ref_build``,
fetched with ``apt-get download`` by ``reco_mini_data._download`` when missing), unpacked with ``dpkg-deb -x``.

    python3 scripts/build_generic_memory.py --out /work/cache/tune/mem-openclipart   # writes OUT.pairs.csv too
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import reco_mini_data as data  # noqa: E402

from reco_ref.io import atomic_open  # noqa: E402


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def demo_exclusions(demo: Path) -> tuple[set[str], set[str]]:
    """(sha256 of every image under ``demo``, their file names and their ``source`` paths from pairs.csv)."""
    shas = {_sha(p) for p in (demo / "images").rglob("*.png")}
    names = {p.name for p in (demo / "images").rglob("*.png")}
    with open(demo / "pairs.csv", newline="", encoding="utf-8") as fh:
        for r in csv.DictReader(fh):
            names.add(Path(r["source"]).name)
            names.add(Path(r["image"]).name)
    return shas, names


def generic_pairs(png_root: Path, svg_root: Path, demo: Path, heldout_part: bool = False
                  ) -> tuple[list[tuple[Path, str]], dict]:
    """``[(png path, caption)]``: reco-mini's alignment-training pairs minus every ``demo`` image; and a report.

    ``heldout_part``: the *held-out* part (``is_heldout`` True) instead — reco-mini never trained on it; a
    validation set of drawings for the do-no-harm check that is not the demo's clip-art."""
    pairs, report = data.openclipart_pairs({"openclipart_png": png_root, "openclipart_svg": svg_root})
    shas, names = demo_exclusions(demo)
    kept, heldout, demo_hits = [], 0, 0
    for rel, caption in pairs:
        if data.is_heldout(rel) != heldout_part:
            heldout += 1
            continue
        path = png_root / rel
        if Path(rel).name in names or _sha(path) in shas:
            demo_hits += 1
            continue
        kept.append((path, caption))
    report.update({"heldout_dropped": heldout, "demo_images_dropped": demo_hits, "kept": len(kept)})
    return kept, report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="memory folder to create (OUT.pairs.csv is written beside it)")
    ap.add_argument("--demo", default=str(ROOT / "weights" / "demo"), help="folder whose images are excluded")
    ap.add_argument("--pairs-only", action="store_true", help="write the pairs CSV, build no memory")
    ap.add_argument("--heldout", action="store_true", help="the held-out part of the pairs (a validation set)")
    a = ap.parse_args(argv)
    png_root, svg_root = data.openclipart_roots()
    kept, report = generic_pairs(png_root, svg_root, Path(a.demo), heldout_part=a.heldout)
    print(report, flush=True)
    csv_path = Path(a.out + ".pairs.csv")
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(csv_path, "w") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "caption"])
        w.writerows([(str(p), c) for p, c in kept])
    if a.pairs_only:
        return 0
    return subprocess.call([sys.executable, "-m", "reco_ref.cli", "build-memory", "--pairs", str(csv_path),
                            "--allow-outside-paths",  # the images live in the build cache, not beside the CSV
                            "--out", a.out, "--threads", "1", "--no-progress"], cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main())
