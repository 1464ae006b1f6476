"""What float16 rows and search keys cost in recall@10 (docs/memory.md, "float16 rows"; issue 23 item 3).

Two memories built from the same float32 arrays, one ``--dtype float32`` and one ``--dtype float16``, are searched
with the same queries; the reference answer is the float32 memory's exact top 10.  For each memory and each search
(exact, HNSW at the default ef) it prints recall@10 (the share of the reference's 10 rows found) and top-1
agreement, for image queries against the image index (image search keys when the memory has them) and against the
text index (cross-modal).

    python3 scripts/float16_recall.py --f32 MEM32 --f16 MEM16 --queries-image-keys K.npy --queries-image I.npy \
        [--manifest ../shared/data/cub100/manifest.csv --split test] [--json out.json]

``K.npy`` / ``I.npy``: [N, Dk] / [N, D] float32 query rows (e.g. ``/work/cache/emb/cub100/{keys,image}.npy``, one
row per manifest line); with ``--manifest`` only the rows of ``--split`` are used as queries.

    python3 scripts/float16_recall.py --synthetic N --work DIR --queries-image I.npy [--json out.json]

builds the two memories itself in ``DIR`` from ``N`` synthetic rows grown from ``I.npy``
(:func:`reco_ref.memory.synth.expand`: rows in tight groups around real points, the hard case for a lossy row) and
searches them with 1,000 more rows grown the same way (another seed).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def recall_at(found: np.ndarray, ref: np.ndarray) -> float:
    """Mean over queries of |found_i ∩ ref_i| / |ref_i|; found, ref int64 [N, k]."""
    return float(np.mean([len(set(f.tolist()) & set(r.tolist())) / r.size for f, r in zip(found, ref)]))


def measure(mem32, mem16, queries: dict[str, np.ndarray], k: int = 10) -> list[dict]:
    """One row per (index searched, memory dtype, search): recall@k and top-1 agreement against float32 exact."""
    out = []
    for modality, q in queries.items():
        ref, _, _ = mem32.search(q, modality, k=k, exact=True)  # [N, k] the reference rows
        for dtype, mem in (("float32", mem32), ("float16", mem16)):
            for exact in (True, False):
                rows, _, _ = mem.search(q, modality, k=k, exact=exact)
                out.append({"index": modality, "dtype": dtype, "search": "exact" if exact else "HNSW ef=50",
                            "queries": int(q.shape[0]), f"recall@{k}": round(recall_at(rows, ref), 4),
                            "top1_same": round(float(np.mean(rows[:, 0] == ref[:, 0])), 4)})
    return out


def synthetic_pair(base: np.ndarray, n: int, work: Path) -> tuple[str, str]:
    """Memories ``work/syn_float32`` and ``work/syn_float16`` of ``n`` rows grown from ``base [m, D]`` (image rows
    seed 0, text rows seed 1) and ``work/queries.npy`` [1000, D] (seed 2); returns the two memories' paths."""
    from reco_ref.memory import build_memory_from_arrays
    from reco_ref.memory.synth import expand_array

    base = np.ascontiguousarray(base / np.linalg.norm(base, axis=1, keepdims=True), np.float32)
    image, text = expand_array(base, n, seed=0), expand_array(base, n, seed=1)
    work.mkdir(parents=True, exist_ok=True)
    np.save(work / "queries.npy", expand_array(base, 1000, seed=2))
    out = []
    for dtype in ("float32", "float16"):
        mem = work / f"syn_{dtype}"
        build_memory_from_arrays(mem, image, text, name="synthetic", fingerprint="0" * 64, dtype=dtype,
                                 progress=False, log=lambda s: None)
        out.append(str(mem))
    return out[0], out[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--f32", help="memory built with --dtype float32")
    ap.add_argument("--f16", help="the same arrays built with --dtype float16")
    ap.add_argument("--queries-image-keys", help="[N, Dk] image search keys (image index)")
    ap.add_argument("--synthetic", type=int, help="build both memories in --work from this many synthetic rows")
    ap.add_argument("--work", help="with --synthetic: folder for the two memories")
    ap.add_argument("--queries-image", required=True, help="[N, D] image embeddings (text index, cross-modal)")
    ap.add_argument("--manifest", help="dataset manifest: keep only the query rows of --split")
    ap.add_argument("--split", default="test")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--json", help="write the rows here")
    a = ap.parse_args(argv)

    from reco_ref.memory import open_memory

    if a.synthetic:
        a.f32, a.f16 = synthetic_pair(np.load(a.queries_image), a.synthetic, Path(a.work))
        a.queries_image_keys = a.queries_image = str(Path(a.work) / "queries.npy")
    keys, image = np.load(a.queries_image_keys), np.load(a.queries_image)
    if a.manifest:
        with open(a.manifest, newline="") as fh:
            keep = [i for i, r in enumerate(csv.DictReader(fh)) if r["split"] == a.split]
        keys, image = keys[keep], image[keep]
    unit = lambda x: np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True), np.float32)  # noqa: E731
    mem32, mem16 = open_memory(a.f32), open_memory(a.f16)
    if (mem32.dtype, mem16.dtype) != ("float32", "float16"):
        raise SystemExit(f"--f32 is {mem32.dtype}, --f16 is {mem16.dtype}: expected float32 and float16")
    rows = measure(mem32, mem16, {"image": unit(keys if mem32.key_dim else image), "text": unit(image)}, k=a.k)
    for r in rows:
        print(json.dumps(r))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
