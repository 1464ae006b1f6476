"""Can a build's stages hide behind image encoding on this machine? Each stage alone vs two at once.

Same run, same 512 JPEGs and captions, reco-mini, batch 64; interleaved rounds of

* ``images``            ``encode_images(files, with_keys=True)`` alone
* ``captions``          ``encode_texts(captions)`` alone
* ``index``             ``hnsw_build`` of ``--index-rows`` clustered unit vectors [*,1024] (M 16, ef_construction 200)
* ``images || captions``  the captions on a background thread while the images encode (what the build does
                        for ``concurrent_towers`` encoders, see ``EncoderProducer.produce``)
* ``images || index``   the index built on a background thread while the images encode (what overlapping
                        indexing with encoding would do; not built)

Overlap pays only where ``a || b`` is faster than ``a`` then ``b``: on a machine whose cores image encoding
already keeps busy it cannot.  ``--no-spin`` adds the same rows for an encoder whose ONNX Runtime sessions do
not spin-wait (``session.intra_op.allow_spinning = 0``, set here by wrapping ``SessionOptions``: an
experiment, the shipped loader does not do this).  Best and median of ``--rounds``; reported, never asserted.

    python3 benchmarks/bench_build_overlap.py [--n 512] [--rounds 3] [--index-rows 4000] [--no-spin]
    python3 -m pytest benchmarks/bench_build_overlap.py -q -s     # the same table, quick (--n 128, 2 rounds)
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_encoders import have_model, image_files  # noqa: E402

BATCH = 64


def load_encoder(spin: bool):
    """reco-mini; with ``spin=False`` its sessions are created with intra-op spin-waiting off."""
    import onnxruntime as ort

    from reco_ref.encoders import load

    if spin:
        return load("reco-mini")
    plain = ort.SessionOptions

    class NoSpin(plain):
        def __init__(self) -> None:
            super().__init__()
            self.add_session_config_entry("session.intra_op.allow_spinning", "0")

    ort.SessionOptions = NoSpin
    try:
        return load("reco-mini")
    finally:
        ort.SessionOptions = plain


def clustered(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """[n, dim] float32 unit vectors around 50 centres (closer to real embeddings than iid noise)."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((50, dim)).astype(np.float32)
    x = c[rng.integers(0, 50, n)] + 0.7 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def measure(n: int, rounds: int, index_rows: int, no_spin: bool) -> dict:
    """{(variant, row): [seconds per round]} for the five rows above, per encoder variant."""
    from reco_ref.memory.index import hnsw_build

    files = [str(f) for f in image_files(n)]
    captions = [f"a photo number {i} of a flower." for i in range(n)]
    vectors = clustered(index_rows, 1024)
    encoders = {"spinning": load_encoder(True)}
    if no_spin:
        encoders["no spinning"] = load_encoder(False)
    background = ThreadPoolExecutor(max_workers=1)

    def both(bg: Callable, fg: Callable) -> Callable:
        def run() -> None:
            fut = background.submit(bg)
            fg()
            fut.result()
        return run

    times: dict[tuple[str, str], list[float]] = {}
    for enc in encoders.values():  # warm-up: sessions, thread pools
        enc.encode_images(files[:BATCH], batch_size=BATCH, with_keys=True)
        enc.encode_texts(captions[:BATCH])
    for _ in range(rounds):
        for variant, enc in encoders.items():
            def images(enc=enc):
                return enc.encode_images(files, batch_size=BATCH, with_keys=True)

            def texts(enc=enc):
                return enc.encode_texts(captions)

            def index():
                return hnsw_build(vectors)

            for row, fn in (("images", images), ("captions", texts), ("index", index),
                            ("images || captions", both(texts, images)), ("images || index", both(index, images))):
                t = time.perf_counter()
                fn()
                times.setdefault((variant, row), []).append(time.perf_counter() - t)
    background.shutdown()
    return times


def table(times: dict) -> str:
    lines = ["| encoder sessions | step | best s | median s |", "|:---|:---|---:|---:|"]
    variants = list(dict.fromkeys(v for v, _ in times))
    for v in variants:
        t = {row: np.asarray(s) for (vv, row), s in times.items() if vv == v}
        for row in ("images", "captions", "index"):
            lines.append(f"| {v} | {row} | {t[row].min():.3f} | {np.median(t[row]):.3f} |")
        for other in ("captions", "index"):
            serial = t["images"] + t[other]  # per round: one after the other
            lines.append(f"| {v} | images then {other} | {serial.min():.3f} | {np.median(serial):.3f} |")
            both = t[f"images || {other}"]
            lines.append(f"| {v} | images \\|\\| {other} | {both.min():.3f} | {np.median(both):.3f} |")
    return "\n".join(lines)


@pytest.mark.skipif(have_model() is not None, reason=str(have_model()))
def test_stage_overlap_table(benchmark):
    times = benchmark.pedantic(measure, args=(128, 2, 1000, False), rounds=1, iterations=1)
    print("\n" + table(times))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--index-rows", type=int, default=4000)
    ap.add_argument("--no-spin", action="store_true")
    a = ap.parse_args()
    print(table(measure(a.n, a.rounds, a.index_rows, a.no_spin)))
