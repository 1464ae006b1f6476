"""Does ``build-memory`` keep up with the image encoder? Pairs/s of a whole build vs ``encode_images`` img/s.

Same run, same JPEGs, same encoder (reco-mini), same batch size (64): interleaved rounds of

* ``encode``  ``encode_images(files, batch_size=64, with_keys=True)`` — decode overlapped with the graph (issue 13)
* ``build``   ``build_memory(out, items, encoder)``: the same images plus their captions encoded, the chunks written
              atomically, both HNSW indexes built, the manifest committed — everything a user waits for

Best round of each counts (a burst of load from other processes hurts both alike). Target (issue 13): build
pairs/s >= 80 % of encode img/s. Reported, never asserted.

    python3 benchmarks/bench_build_memory.py [--n 512] [--rounds 3]
    python3 -m pytest benchmarks/bench_build_memory.py -q -s          # the same table, quick (--n 128, 2 rounds)
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_encoders import have_model, image_files  # noqa: E402

BATCH = 64


def measure(n: int, rounds: int) -> dict:
    """Best-of-``rounds`` rates of encode (img/s) and build (pairs/s) over the same ``n`` images."""
    from reco_ref.encoders import load
    from reco_ref.memory import build_memory

    enc = load("reco-mini")
    files = [str(f) for f in image_files(n)]
    items = [{"image": f, "caption": f"a photo number {i} of a flower.", "source": Path(f).name, "label": None,
              "split": None, "tags": None} for i, f in enumerate(files)]
    enc.encode_images(files[:BATCH], batch_size=BATCH, with_keys=True)  # warm-up: sessions, thread pools
    best = {"encode": 0.0, "build": 0.0}
    work = Path(tempfile.mkdtemp(prefix="bench_build_"))
    try:
        for r in range(rounds):
            t = time.perf_counter()
            enc.encode_images(files, batch_size=BATCH, with_keys=True)
            best["encode"] = max(best["encode"], n / (time.perf_counter() - t))
            out = work / f"mem{r}"
            t = time.perf_counter()
            build_memory(out, items, enc, batch_size=BATCH, progress=False)
            best["build"] = max(best["build"], n / (time.perf_counter() - t))
            shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    best["ratio"] = best["build"] / best["encode"]
    best["n"] = n
    return best


def table(res: dict) -> str:
    return "\n".join([
        "| measure | value |", "|:---|---:|",
        f"| encode_images (keys too), img/s, batch {BATCH} | {res['encode']:.1f} |",
        f"| build_memory (encode + captions + chunks + 2 HNSW + commit), pairs/s | {res['build']:.1f} |",
        f"| build / encode (same run; target >= 0.80) | {res['ratio']:.2f} |",
        f"| images | {res['n']} |"])


@pytest.mark.skipif(have_model() is not None, reason=str(have_model()))
def test_build_memory_keeps_up(benchmark):
    res = benchmark.pedantic(measure, args=(128, 2), rounds=1, iterations=1)
    benchmark.extra_info.update(res)
    print("\n" + table(res))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    print(table(measure(a.n, a.rounds)))
