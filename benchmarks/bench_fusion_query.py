"""One query and the profile: what a user feels, in the same run as ``bench_fusion.py``'s table.

Reproduce (prints the fusion table, the one-query table and the profile tables)::

    python3 -m pytest benchmarks/bench_fusion.py benchmarks/bench_fusion_query.py --benchmark-only -q

* **One query**: ``fusion_forward`` through the front door (validation included, params from
  ``load_params`` as an application would hold them), B = 1, k = 10, D = 768 (reco-mini's width),
  h = 8, fp32, against the **weight-read bound**: the time to read every parameter once (27 MiB; a
  batch-1 forward cannot do less), measured in the same rounds as the best of a NumPy ``sum`` and a
  vectorised Numba sum over every array, single-threaded like the batch-1 forward.  A 2-thread read is
  reported beside it.
* **Profile**: the numba step split into stages with :func:`reco_ref.fusion.numba_cpu.profile_steps`
  (median over rounds of each stage's wall time and its share of the step).

Each round runs every row once, in a rotating order, so all rows see the same machine load; rows
report the median and the 10th/90th percentiles over the rounds (a shared machine is noisy: only
same-run ratios mean anything).
"""

from __future__ import annotations

import os
import time
from collections import defaultdict

import numpy as np
import pytest
from bench_fusion import _params, rotating_rounds
from numba import njit, prange

from reco_ref.fusion import fusion_backward, fusion_forward, load_params, numba_cpu, save_params
from reco_ref.fusion.params import FusionConfig, FusionParams

KQ, DQ, HQ = 10, 768, 8  # one query: reco-mini's width
ROUNDS_QUERY = 200
ROUNDS_PROFILE = 9


@njit(fastmath=True, nogil=True)
def _read_1t(a):
    """Σ a (1-D): a vectorised stream over every element, the cheapest way to read them."""
    s = np.float32(0.0)
    for i in range(a.size):
        s += a[i]
    return s


@njit(fastmath=True, nogil=True, parallel=True)
def _read_2t(a):
    s = np.float32(0.0)
    for i in prange(a.size):
        s += a[i]
    return s


def _random_params(D: int, heads: int, rng) -> FusionParams:
    return FusionParams(_params(rng, D), FusionConfig(D, heads, 4, "float32"))


def _pcts(ts):
    ts = np.asarray(ts) * 1e3
    return float(np.median(ts)), float(np.percentile(ts, 10)), float(np.percentile(ts, 90))


def test_one_query(benchmark, fusion_results, tmp_path):
    rng = np.random.default_rng(0)
    save_params(tmp_path / "phi.npz", _random_params(DQ, HQ, rng))
    params, _ = load_params(tmp_path / "phi.npz")  # validated once here, as in an application
    q = rng.standard_normal((1, DQ)).astype(np.float32)
    r = rng.standard_normal((1, KQ, DQ)).astype(np.float32)
    flat = [a.reshape(-1) for a in params.values()]
    nbytes = sum(a.nbytes for a in flat)
    rows = {
        "numba forward (front door)": lambda: fusion_forward(params, q, r, backend="numba"),
        "read bound: numpy sum": lambda: [a.sum() for a in flat],
        "read bound: numba sum, 1 thread": lambda: [_read_1t(a) for a in flat],
        "read: numba sum, 2 threads": lambda: [_read_2t(a) for a in flat],
    }
    for f in rows.values():
        f()
        f()
    one_round, times = rotating_rounds(rows)
    benchmark.group = "one query (B=1 forward, D=768)"
    benchmark.pedantic(one_round, rounds=ROUNDS_QUERY, warmup_rounds=0)
    # The NumPy reference runs after the rotation, not inside it: it calls 2-thread BLAS at B=1, whose
    # spinning workers would slow whichever row follows it (measured: the next row 2-10x slower).
    ref_fwd = lambda: fusion_forward(params, q, r, backend="numpy")  # noqa: E731
    ref_fwd()
    ref_times = []
    for _ in range(ROUNDS_QUERY // 4):
        t0 = time.perf_counter()
        ref_fwd()
        ref_times.append(time.perf_counter() - t0)
    # the bound of each round: the faster single-thread read of that round
    bound = [min(a, b) for a, b in zip(times["read bound: numpy sum"], times["read bound: numba sum, 1 thread"])]
    times["weight-read bound (best 1-thread read)"] = bound
    bmed = float(np.median(bound)) * 1e3
    lines = [f"**One query** — B=1 forward, k={KQ}, D={DQ}, h={HQ}, fp32, params from load_params "
             f"({nbytes / 2**20:.1f} MiB); {ROUNDS_QUERY} rounds, every row once per round (rotating order)",
             "", "| row | median ms | p10–p90 ms | × weight-read bound (median) | per-round ratio p10–p90 |",
             "|---|---|---|---|---|"]
    for n, ts in times.items():
        med, p10, p90 = _pcts(ts)
        ratios = np.asarray(ts) / np.asarray(bound)
        lines.append(f"| {n} | {med:.3f} | {p10:.3f}–{p90:.3f} | {med / bmed:.2f}× "
                     f"| {np.percentile(ratios, 10):.2f}–{np.percentile(ratios, 90):.2f} |")
        benchmark.extra_info[f"median_ms.{n}"] = med
    med, p10, p90 = _pcts(ref_times)
    lines.append(f"| numpy forward (front door; {len(ref_times)} calls after the rotation) | {med:.3f} "
                 f"| {p10:.3f}–{p90:.3f} | {med / bmed:.2f}× | – |")
    lines += ["", f"- load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
                  f"RECO_REF_BENCH_THREADS: {os.environ.get('RECO_REF_BENCH_THREADS', 'unset')}", ""]
    fusion_results.setdefault("extra", []).append("\n".join(lines))


def _profile(fn, rounds):
    stages, totals = defaultdict(list), []
    for _ in range(rounds):
        with numba_cpu.profile_steps() as prof:
            t0 = time.perf_counter()
            fn()
            totals.append(time.perf_counter() - t0)
        per = defaultdict(float)
        for name, s in prof:
            per[name] += s
        for name, s in per.items():
            stages[name].append(s)
    return stages, totals


@pytest.mark.parametrize("case", ["query B=1 D=768 forward", "train B=256 D=512 fwd+bwd"])
def test_profile(benchmark, fusion_results, case):
    rng = np.random.default_rng(1)
    if case.startswith("query"):
        B, K, D, H = 1, KQ, DQ, HQ
    else:
        B, K, D, H = 256, 10, 512, 8
    params = _random_params(D, H, rng)
    q = rng.standard_normal((B, D)).astype(np.float32)
    r = rng.standard_normal((B, K, D)).astype(np.float32)
    mask = rng.random((B, K)) < 0.9
    dout = rng.standard_normal((B, D)).astype(np.float32)

    def step():
        out, cache = fusion_forward(params, q, r, mask, backend="numba")
        if case.startswith("train"):
            fusion_backward(params, cache, dout)

    step()
    step()
    result = {}
    benchmark.group = "numba step profile"
    benchmark.pedantic(lambda: result.update(zip(("stages", "totals"), _profile(step, ROUNDS_PROFILE))),
                       rounds=1, warmup_rounds=0)
    stages, totals = result["stages"], result["totals"]
    total = float(np.median(totals)) * 1e3
    staged = sum(float(np.median(v)) * 1e3 for v in stages.values())
    lines = [f"**Profile, numba {case}** (k={K}, h={H}, fp32, 10% slots masked; median of {ROUNDS_PROFILE} steps, "
             f"front door included)", "", "| stage | median ms | share of step |", "|---|---|---|"]
    for name, v in sorted(stages.items(), key=lambda kv: -np.median(kv[1])):
        med = float(np.median(v)) * 1e3
        lines.append(f"| {name} | {med:.3f} | {100 * med / total:.1f}% |")
    lines.append(f"| front door (validation, dispatch) and Python between stages | {max(total - staged, 0):.3f} "
                 f"| {100 * max(total - staged, 0) / total:.1f}% |")
    lines.append(f"| **step** | **{total:.3f}** | 100% |")
    lines += ["", f"- load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", ""]
    fusion_results.setdefault("extra", []).append("\n".join(lines))
