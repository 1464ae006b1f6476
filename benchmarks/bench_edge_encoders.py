"""Does ``encode_images`` keep up with its graph? End-to-end JPEG throughput vs the raw ONNX Runtime session.

Same run, same graph, same batch size (64), same intra-op threads (2): three rates over the same 256 JPEGs,
measured in interleaved rounds (best round of each counts, so a burst of load from other processes hurts all
three alike):

* ``raw``      the image graph alone, ``session.run`` on preprocessed pixels [64,224,224,3] (the ceiling)
* ``raw workers``  the graph alone the way the batch workers run it: ``threads`` callers sharing one session
               with one intra-op thread (a second ceiling, for the default path below)
* ``e2e``      ``encode_images(files, batch_size=64)``: decode + resize/crop + normalise + graph + L2, by default
               (>= 2 batches per worker) with one worker per thread decoding a whole batch and running it on a
               single-threaded session (``EncoderPair.iter_encoded_batches``)
* ``overlap``  ``encode_images(..., parallel="overlap")``: decode threads beside the 2-thread session
* ``serial``   the same work without overlap (``preprocess`` then ``run_image_graph`` per batch, the
               behaviour before issue 13), for reference

Target (issue 13): e2e >= 90 % of raw. The table also times decoding alone on one thread and derives the
ceiling no pipeline can pass on ``threads`` cores: graph CPU + decode CPU per image, spread perfectly,
``1 / (1 + raw / (threads * decode_rate))``.

A second table compares the int8 image tower (``weights/reco-mini-int8``) with fp32 (``weights/reco-mini``):
the raw image graphs on the same preprocessed pixels [64,224,224,3], same threads, interleaved rounds; and the
end-to-end ``encode_images`` rate of both. Target: int8 raw >= 1.5x fp32 raw.

    python3 benchmarks/bench_edge_encoders.py [--model reco-mini] [--n 256] [--rounds 5] [--int8]
    python3 -m pytest benchmarks/bench_edge_encoders.py -q -s          # the same table, quick
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_encoders import have_model, image_files  # noqa: E402

THREADS = 2
BATCH = 64


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def best_rates(fns: dict, n: int, rounds: int, per_round: dict | None = None) -> dict:
    """{name: items/s} of the fastest of ``rounds`` interleaved rounds (each fn processes ``n`` items once).

    ``per_round``: if given, filled with {name: [seconds of round 0, 1, ...]} (for paired, per-round ratios).
    """
    for fn in fns.values():  # warm-up: allocations, page cache
        fn()
    times: dict = {k: [] for k in fns}
    for _ in range(rounds):  # interleaved: a burst of load from other processes hurts every path alike
        for k, fn in fns.items():
            times[k].append(_timed(fn))
    if per_round is not None:
        per_round.update(times)
    return {k: n / min(v) for k, v in times.items()}


def paired_ratio(times: dict, path: str, ref: str = "raw") -> tuple[float, float, float]:
    """(min, median, max) over rounds of rate(path) / rate(ref), each round against the same round's reference."""
    r = np.asarray(times[ref]) / np.asarray(times[path])  # [rounds]
    return float(r.min()), float(np.median(r)), float(r.max())


def overlap_rates(model: str = "reco-mini", n: int = 256, rounds: int = 5, threads: int = THREADS) -> dict:
    """{'raw', 'e2e', 'serial'} images/s (best of ``rounds`` interleaved rounds) and the ratios to raw."""
    from reco_ref.encoders import load

    enc = load(model, threads=threads)
    files = [str(f) for f in image_files(n)]
    pixels, _, _ = enc.preprocess(files[:BATCH])  # [64,...] float32, the graph's input
    # the encoder's own session: a second session's spinning thread pool would steal cores from the first
    raw = enc._image
    outputs = [enc.config.image.output] + ([enc.config.image.key_output] if enc.config.image.key_output else [])
    feed = {enc.config.image.input: pixels}

    def run_raw():
        for _ in range(0, n, BATCH):
            raw.run(outputs, feed)

    keys = bool(enc.config.image.key_output)

    single = enc._single_thread_image_session()
    from concurrent.futures import ThreadPoolExecutor

    workers = ThreadPoolExecutor(threads)

    def run_raw_workers():  # the graph alone, the batch workers' way: `threads` callers on the 1-thread session
        list(workers.map(lambda _: single.run(outputs, feed), range(0, n, BATCH)))

    def run_e2e():  # the default: batch workers when there are >= 2 batches per worker
        enc.encode_images(files, batch_size=BATCH, with_keys=keys)

    def run_overlap():
        enc.encode_images(files, batch_size=BATCH, with_keys=keys, parallel="overlap")

    def run_serial():
        for s in range(0, n, BATCH):
            px, _, _ = enc.preprocess(files[s : s + BATCH])
            enc.run_image_graph(px)

    buf = np.empty((1, *pixels.shape[1:]), np.float32)

    def run_decode():  # decoding's CPU cost alone: one thread, every image decoded + cropped + normalised
        for f in files:
            enc._prepare_into(f, buf, 0)

    times: dict = {}
    rates = best_rates({"raw": run_raw, "raw workers": run_raw_workers, "e2e": run_e2e, "overlap": run_overlap, "serial": run_serial,
                        "decode (1 thread)": run_decode}, n, rounds, per_round=times)
    # the most any pipeline can reach on `threads` cores: graph + decoding CPU per image, both spread perfectly
    ceiling = 1.0 / (1.0 + rates["raw"] / (threads * rates["decode (1 thread)"]))
    return {"rates": rates, "e2e_over_raw": rates["e2e"] / rates["raw"], "mode": enc._image_mode(n, BATCH, "auto"),
            "overlap_over_raw": rates["overlap"] / rates["raw"], "ceiling": ceiling,
            "raw_workers_over_raw": rates["raw workers"] / rates["raw"],
            "paired": {k: paired_ratio(times, k) for k in ("raw workers", "e2e", "overlap", "serial")},
            "serial_over_raw": rates["serial"] / rates["raw"], "n": n, "batch": BATCH, "threads": threads, "model": model}


def int8_rates(n: int = 256, rounds: int = 5, threads: int = THREADS) -> dict:
    """Images/s of the fp32 and int8 image towers: raw graph at batch 64 and ``encode_images`` end to end."""
    from reco_ref.encoders import load

    encs = {"fp32": load("reco-mini", threads=threads), "int8": load("reco-mini-int8", threads=threads)}
    files = [str(f) for f in image_files(n)]
    pixels, _, _ = encs["fp32"].preprocess(files[:BATCH])  # same preprocessing config for both
    fns = {}
    for prec, enc in encs.items():
        outs = [enc.config.image.output, enc.config.image.key_output]
        fns[f"{prec} raw"] = (lambda s=enc._image, o=outs: [s.run(o, {"pixels": pixels}) for _ in range(0, n, BATCH)])
        fns[f"{prec} e2e"] = (lambda e=enc: e.encode_images(files, batch_size=BATCH, with_keys=True))
    rates = best_rates(fns, n, rounds)
    return {"rates": rates, "raw_int8_over_fp32": rates["int8 raw"] / rates["fp32 raw"],
            "e2e_int8_over_fp32": rates["int8 e2e"] / rates["fp32 e2e"], "n": n, "batch": BATCH, "threads": threads}


def _int8_table(res: dict) -> str:
    r = res["rates"]
    return "\n".join([
        f"int8 vs fp32 image tower: {res['n']} JPEGs, batch {res['batch']}, {res['threads']} intra-op threads",
        "| path | fp32 images/s | int8 images/s | int8 / fp32 |", "|---|---:|---:|---:|",
        f"| raw image graph | {r['fp32 raw']:.1f} | {r['int8 raw']:.1f} | {res['raw_int8_over_fp32']:.2f} |",
        f"| encode_images end to end | {r['fp32 e2e']:.1f} | {r['int8 e2e']:.1f} | {res['e2e_int8_over_fp32']:.2f} |",
    ])  # fmt: skip


def _table(res: dict) -> str:
    r = res["rates"]
    return "\n".join([
        f"{res['model']}: {res['n']} JPEGs, batch {res['batch']}, {res['threads']} intra-op threads, best of interleaved rounds",
        "| path | images/s | vs raw session |", "|---|---:|---:|",
        f"| raw ONNX Runtime session (graph only) | {r['raw']:.1f} | 1.00 |",
        f"| raw, {res['threads']} workers sharing a 1-thread session (graph only) | {r['raw workers']:.1f} | {res['raw_workers_over_raw']:.2f} |",
        f"| encode_images (default: parallel={res['mode']!r}) | {r['e2e']:.1f} | {res['e2e_over_raw']:.2f} |",
        f"| encode_images(parallel='overlap') | {r['overlap']:.1f} | {res['overlap_over_raw']:.2f} |",
        f"| serial decode then graph (before) | {r['serial']:.1f} | {res['serial_over_raw']:.2f} |",
        f"| decoding alone, 1 thread (CPU cost {1e3 / r['decode (1 thread)']:.2f} ms/image) | {r['decode (1 thread)']:.1f} | |",
        f"| ceiling on {res['threads']} cores: 1 / (1 + raw / ({res['threads']} x decode rate)) | | {res['ceiling']:.2f} |",
        "",
        "per-round ratios to the same round's raw session (min / median / max):",
        *(f"  {k}: {lo:.2f} / {mid:.2f} / {hi:.2f}" for k, (lo, mid, hi) in res["paired"].items()),
    ])  # fmt: skip


try:
    import pytest
except ImportError:  # pragma: no cover
    pytest = None

if pytest is not None:

    def test_encode_images_vs_raw_session():
        reason = have_model()
        if reason:
            pytest.skip(reason)
        res = overlap_rates(n=128, rounds=2)
        print("\n" + _table(res))
        assert all(v > 0 for v in res["rates"].values())

    def test_int8_vs_fp32():
        if not (ROOT / "weights" / "reco-mini-int8" / "encoder.json").is_file():
            pytest.skip("weights/reco-mini-int8 not built (python3 scripts/quantize_reco_mini.py)")
        res = int8_rates(n=128, rounds=2)
        print("\n" + _int8_table(res))
        assert all(v > 0 for v in res["rates"].values())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="reco-mini")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--int8", action="store_true", help="also the int8 vs fp32 table (needs weights/reco-mini-int8)")
    args = ap.parse_args()
    reason = have_model()
    if reason:
        print(f"skipped: {reason}")
        return 0
    print(f"load average before: {os.getloadavg()[0]:.1f}")
    print(_table(overlap_rates(args.model, args.n, args.rounds)))
    if args.int8:
        print()
        print(_int8_table(int8_rates(args.n, args.rounds)))
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
