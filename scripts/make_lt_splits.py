#!/usr/bin/env python3
r"""Long-tailed train splits (Flowers-102-LT, CUB-100-LT) from the balanced shared sets, byte-for-byte reproducible.

Usage::

    python3 scripts/make_lt_splits.py --data ../shared/data --out /tmp/lt            # both sets, ratios 10 and 50
    python3 scripts/make_lt_splits.py --manifest some/manifest.csv --name mine --out /tmp/lt --ratios 10

writes ``OUT/<name>-lt-r<ratio>/manifest.csv`` (the ``../shared/data`` format, ``file,label,class_name,split``)
and ``OUT/<name>-lt-r<ratio>/lt_summary.json`` (per-class counts and the profile actually reached). ``OUT`` must
lie outside the repository and outside the data folder; nothing is copied — every ``file`` entry is the path
of the *original* image relative to the new manifest's folder (``os.path.relpath``), so the manifest works as
long as the output folder and the data folder keep their relative position (``--absolute`` writes absolute
paths instead, for a manifest that is moved around; the bytes then depend on where the data lives).

The profile (exponential, as ImageNet-LT / CIFAR-LT): classes are ranked by how many train images they have
(most first; ties broken by a permutation drawn from ``--seed``), and the class of rank ``i`` (0-based, C
classes) keeps

.. math::

    n_i = \max\!\left(1,\ \mathrm{round}\!\left(n_{\max}\, r^{-i/(C-1)}\right)\right), \qquad
    n_{\max} = \min_i\ a_{(i)}\, r^{\,i/(C-1)}

images, where :math:`a_{(i)}` is the number available to the class of rank ``i`` and :math:`r` the imbalance
ratio: :math:`n_{\max}` is the largest head size for which every class can fill its target, so the profile is
exactly exponential except where the ``max(1, ·)`` floor lifts the tail (CUB-100 has at most 30 train images
a class: at r = 50 the tail target 0.6 becomes 1 and the reached ratio is 30 — ``lt_summary.json`` records it).
Which images a class keeps is a seeded draw (``numpy.random.default_rng([seed, label])``) without replacement.
Every non-train row (test, valid) is kept unchanged: the test split stays the original balanced one. Rows keep
the source manifest's order; the CSV is written with ``\n`` line endings and no timestamps, so the same inputs,
seed and output location give the same bytes.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from pathlib import Path

import numpy as np

DEFAULT_RATIOS = (10, 50)
DATASETS = ("flowers102", "cub100")
COLUMNS = ("file", "label", "class_name", "split")


def lt_counts(available: np.ndarray, ratio: float, seed: int) -> tuple[np.ndarray, float]:
    """Per-class kept counts ``[C]`` (indexed by label) and ``n_max`` for an exponential profile of ``ratio``.

    available : int [C] — train images per class.
    """
    C = len(available)
    if C < 2:
        raise ValueError(f"a long-tailed split needs at least 2 classes, found {C}")
    if ratio < 1:
        raise ValueError(f"imbalance ratio must be >= 1, got {ratio}")
    tie = np.random.default_rng([seed, 0x17]).permutation(C)  # seeded tie-break among equal counts
    order = np.lexsort((tie, -available))  # rank 0 = most images
    expo = np.arange(C) / (C - 1)  # i/(C-1)
    n_max = float(np.min(available[order] * ratio ** expo))
    target = np.maximum(1, np.round(n_max * ratio ** (-expo))).astype(np.int64)
    counts = np.empty(C, np.int64)
    counts[order] = np.minimum(target, available[order])  # equal to target by the choice of n_max, up to rounding
    return counts, n_max


def make_lt_manifest(manifest: str | os.PathLike, out_dir: str | os.PathLike, ratio: float, *, seed: int = 0,
                     absolute: bool = False) -> Path:
    """Write the long-tailed version of ``manifest`` (ratio ``ratio``) into ``out_dir``; return the manifest path."""
    manifest = Path(manifest).resolve()
    out_dir = Path(out_dir).resolve()
    with open(manifest, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise SystemExit(f"make_lt_splits: error: {manifest}: missing columns {missing} "
                             f"(expected {','.join(COLUMNS)})")
        rows = list(reader)
    labels = np.array([int(r["label"]) for r in rows], np.int64)
    is_train = np.array([r["split"] == "train" for r in rows])
    if not is_train.any():
        raise SystemExit(f"make_lt_splits: error: {manifest}: no rows with split 'train'")
    C = int(labels.max()) + 1
    available = np.bincount(labels[is_train], minlength=C)
    if (available == 0).any():
        raise SystemExit(f"make_lt_splits: error: {manifest}: classes {np.flatnonzero(available == 0)[:10].tolist()} "
                         "have no train rows")
    counts, n_max = lt_counts(available, ratio, seed)
    keep = ~is_train
    for c in range(C):
        idx = np.flatnonzero(is_train & (labels == c))
        chosen = np.random.default_rng([seed, c]).permutation(len(idx))[: counts[c]]
        keep[idx[chosen]] = True
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for r, k in zip(rows, keep):
        if not k:
            continue
        src = (manifest.parent / r["file"]).resolve()
        f = str(src) if absolute else os.path.relpath(src, out_dir)
        w.writerow([Path(f).as_posix(), r["label"], r["class_name"], r["split"]])
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "manifest.csv"
    _atomic_write(path, buf.getvalue().encode("utf-8"))
    groups = {"many": int((counts > 20).sum()), "medium": int(((counts >= 5) & (counts <= 20)).sum()),
              "few": int((counts < 5).sum())}
    summary = {"source": str(manifest) if absolute else os.path.relpath(manifest, out_dir), "ratio": ratio,
               "seed": seed, "n_max": round(n_max, 6), "reached_ratio": round(float(counts.max() / counts.min()), 6),
               "train_images": int(counts.sum()), "classes": C, "shot_groups": groups,
               "train_counts": counts.tolist()}
    _atomic_write(out_dir / "lt_summary.json", (json.dumps(summary, indent=1) + "\n").encode())
    return path


def _atomic_write(path: Path, data: bytes) -> None:
    # stdlib only on purpose (the script runs without the package installed); temp file + fsync + rename
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _inside(child: Path, parent: Path) -> bool:
    try:
        child.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output folder (outside the repository and the data folder)")
    ap.add_argument("--data", default=None, help="folder holding flowers102/ and cub100/ (default ../shared/data)")
    ap.add_argument("--manifest", help="one manifest instead of the shared sets (with --name)")
    ap.add_argument("--name", help="name of --manifest's set (output folder <name>-lt-r<ratio>)")
    ap.add_argument("--ratios", type=float, nargs="+", default=list(DEFAULT_RATIOS), help="imbalance ratios (10 50)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the tie-break and image draws (default 0)")
    ap.add_argument("--absolute", action="store_true", help="absolute image paths instead of relative ones")
    a = ap.parse_args(argv)
    repo = Path(__file__).resolve().parents[1]
    out = Path(a.out)
    if a.manifest:
        if not a.name:
            ap.error("--manifest needs --name")
        sources = [(a.name, Path(a.manifest))]
    else:
        data = Path(a.data) if a.data else repo.parent / "shared" / "data"
        sources = [(d, data / d / "manifest.csv") for d in DATASETS]
    if _inside(out, repo):
        ap.error(f"--out {out} lies inside the repository; write the splits elsewhere")
    for _, m in sources:
        if _inside(out, m.parent):
            ap.error(f"--out {out} lies inside the data folder {m.parent}; write the splits elsewhere")
        if not m.is_file():
            ap.error(f"manifest not found: {m}")
    for name, m in sources:
        for r in a.ratios:
            tag = f"{name}-lt-r{r:g}"
            path = make_lt_manifest(m, out / tag, r, seed=a.seed, absolute=a.absolute)
            s = json.loads((path.parent / "lt_summary.json").read_text())
            print(f"{path}: {s['train_images']} train images, n_max {s['n_max']:.1f}, reached ratio "
                  f"{s['reached_ratio']:g}, many/medium/few classes {s['shot_groups']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
