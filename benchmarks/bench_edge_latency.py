"""One photo's latency on the edge path, step by step, batch 1 vs batch 64 per image (reco_ref.eval.latency).

Setup (all shipped, offline): the demo memory (weights/demo, 165 image-caption pairs) encoded and built with the
encoder under test, φ_I / φ_T with non-zero weights (timing does not depend on training), the demo's 11 class
prompts refined once by φ_T, k = 10. The photo is the first demo query (a 96 px PNG) unless ``--image`` names
another file. Rows: encoder {reco-mini, reco-mini-int8} x fusion backend {numpy, onnx} where available.

    python3 benchmarks/bench_edge_latency.py [--image PHOTO.jpg] [--repeats 7] [--threads 2]
    python3 -m pytest benchmarks/bench_edge_latency.py -q -s        # quick table
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
K = 10


def _phi(D: int, seed: int):
    from reco_ref.fusion import init_params

    p = init_params(D, 8, seed=seed)
    rng = np.random.default_rng(seed + 100)
    for name in ("w_o", "w_2"):
        p[name][...] = rng.normal(0, 1 / np.sqrt(p[name].shape[0]), p[name].shape)
    return p


def setup(model: str, threads: int, workdir: Path):
    """(encoder, memory, φ_I, refined class embeddings [C,D], demo query paths) for one encoder."""
    from reco_ref.eval.data import SHIPPED_PROMPT, shipped_data
    from reco_ref.encoders import load
    from reco_ref.fusion import fusion_forward
    from reco_ref.memory import Memory, build_memory_from_arrays, retrieve

    ds = shipped_data()
    enc = load(model, threads=threads)
    img, keys = enc.encode_images([it["image"] for it in ds["memory"]], with_keys=True)
    txt = enc.encode_texts([it["caption"] for it in ds["memory"]])
    root = workdir / f"memory-{model}"
    build_memory_from_arrays(root, img, txt, keys=keys, name=enc.name, fingerprint=enc.fingerprint, progress=False)
    mem = Memory.open(root, encoder=enc)
    cls = enc.encode_texts([SHIPPED_PROMPT.format(c) for c in ds["class_names"]])  # [C,D]
    r, mask, _ = retrieve(mem, cls, "text", k=K)
    t_bar, _ = fusion_forward(_phi(enc.dim, 1), cls, r, mask)  # refined once: prompts do not depend on the photo
    return enc, mem, _phi(enc.dim, 0), t_bar, [q["image"] for q in ds["queries"]]


def run(image: str | None = None, repeats: int = 7, threads: int = 2, batch: int = 64) -> list[dict]:
    from reco_ref.eval.latency import profile_query

    models = [m for m in ("reco-mini", "reco-mini-int8") if (ROOT / "weights" / m / "encoder.json").is_file()]
    backends = ["numpy"] + (["onnx"] if importlib.util.find_spec("onnx") else [])
    out = []
    with tempfile.TemporaryDirectory(prefix="bench_edge_latency_") as d:
        for model in models:
            enc, mem, phi, cls, queries = setup(model, threads, Path(d))
            photos = [image] if image else queries
            if "onnx" in backends:
                from reco_ref.export.fusion import attach_in_memory

                attach_in_memory(phi)
            for backend in backends:
                out.append(profile_query(photos, enc, mem, phi, cls, k=K, batch=batch, backend=backend, repeats=repeats))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image", default=None, help="the photo (default: the first demo query, 96 px PNG)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from reco_ref.eval.latency import format_profile

    print(f"load average before: {os.getloadavg()[0]:.1f}")
    for p in run(args.image, args.repeats, args.threads):
        print(format_profile(p) + "\n")
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    return 0


try:
    import pytest
except ImportError:  # pragma: no cover
    pytest = None

if pytest is not None:

    def test_one_photo_latency_table():
        from reco_ref.eval.latency import format_profile

        for p in run(repeats=2, batch=16):
            print("\n" + format_profile(p))
            assert p["batch1_total_ms"] > 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
