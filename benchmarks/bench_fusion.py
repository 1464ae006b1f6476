"""CPU benchmark of the fusion layer, forward + backward, fp32 — all implementations in ONE run.

Reproduce the table (also printed at the end of the run)::

    python3 -m pytest benchmarks/bench_fusion.py --benchmark-only -q

Shape: k = 10 neighbours (T = 11 tokens, 10 % of neighbour slots masked), D = 512, h = 8, MLP ratio 4,
B ∈ {1, 32, 256, 1024}.  Implementations:

* ``numpy``      — :mod:`reco_ref.fusion.reference` (the readable truth; all tokens)
* ``numba``      — :mod:`reco_ref.fusion.numba_cpu` (fused parallel kernels + BLAS; token-0 fast path,
  with K and V folded into one D-vector per (head, row), so it does fewer FLOPs than the *needed*
  count below: ≈ ``72·B·D²`` + small terms, 4.8 GFLOP at B=256 — its "GFLOP/s (needed)" is a
  work-equivalent rate and may exceed the sgemm peak)
* ``torch_full`` — the same math with torch ops + autograd, every token (``benchmarks/torch_fusion.py``)
* ``torch_row0`` — torch with the token-0 dead-work elimination (Q, attention row, W_o, LN_2, MLP on
  token 0; K, V, LN_1 on every token): the "same work" comparison of issue 14
* ``sgemm``      — ``numpy`` float32 matmul 2048³: this machine's GEMM peak, timed in every round

Backends are called directly (``module.fusion_forward`` / ``fusion_backward``): the front door's
input validation is excluded from every row alike.  FLOP counts (multiply-add = 2 FLOPs):

* *needed* — what the output actually depends on: ``12·B·T·D² + (12 + 12·r)·B·D² + 12·B·T·D``
  (K, V, LN_1 and their gradients for all tokens; Q, W_o, MLP for token 0), ≈ 12.9 GFLOP at B=256;
* *spec §7* — the whole layer on every token: ``72·B·T·D² + 12·B·T²·D``, ≈ 53 GFLOP at B=256.

Torch rows are skipped when torch is not installed.  ``RECO_REF_BENCH_THREADS=1`` pins every thread
pool to one thread (a per-core comparison, robust to other load on the machine; see conftest.py).  Timings on a shared machine are noisy; the
ratios in one run are what matter.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from reco_ref.fusion import numba_cpu, reference

K, D, H, R = 10, 512, 8, 4
T = K + 1
BATCHES = [1, 32, 256, 1024]
IMPLS = ["numpy", "numba", "torch_full", "torch_row0"]
ROUNDS = {1: 30, 32: 15, 256: 7, 1024: 5}
SUITE = "CPU fp32"


def flops_needed(B: int, T: int = T, D: int = D, r: int = R) -> float:
    """GEMM (+ attention) FLOPs of forward+backward that the output depends on."""
    return 12.0 * B * T * D * D + (12.0 + 12.0 * r) * B * D * D + 12.0 * B * T * D


def flops_full(B: int, T: int = T, D: int = D) -> float:
    """Spec §7's count: the whole layer on every token, forward + backward."""
    return 72.0 * B * T * D * D + 12.0 * B * T * T * D


def _params(rng, dim: int = D):
    """Random fp32 parameters (plain dict), clearly non-identity, for width ``dim``."""
    from reco_ref.fusion.params import param_shapes

    p = {}
    for name, shape in param_shapes(dim, R).items():
        if name.endswith("_gamma"):
            a = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name.startswith("w_"):
            a = rng.standard_normal(shape) / np.sqrt(shape[0])
        else:
            a = 0.1 * rng.standard_normal(shape)
        p[name] = a.astype(np.float32)
    return p


def _inputs(B, rng):
    q = rng.standard_normal((B, D)).astype(np.float32)
    r = rng.standard_normal((B, K, D)).astype(np.float32)
    mask = rng.random((B, K)) < 0.9
    dout = rng.standard_normal((B, D)).astype(np.float32)
    return q, r, mask, dout


@pytest.fixture(scope="module")
def env(fusion_results):
    import numba

    meta = fusion_results["meta"]
    meta[SUITE + ".desc"] = f"forward+backward, k={K} (T={T}), D={D}, h={H}, MLP ratio {R}, 10% slots masked"
    meta[SUITE + ".order"] = IMPLS
    meta[SUITE + ".baseline"] = "numpy"
    meta[SUITE + ".env.load average at start"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    meta[SUITE + ".env.numba threads"] = f"{numba.get_num_threads()} ({numba.config.THREADING_LAYER} layer)"
    meta[SUITE + ".env.OMP_WAIT_POLICY"] = os.environ.get("OMP_WAIT_POLICY", "unset")
    meta[SUITE + ".env.RECO_REF_BENCH_THREADS"] = os.environ.get("RECO_REF_BENCH_THREADS", "unset (library defaults)")
    try:
        import torch

        meta[SUITE + ".env.torch"] = f"{torch.__version__}, {torch.get_num_threads()} threads"
    except ImportError:
        meta[SUITE + ".env.torch"] = "not installed (torch rows skipped)"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    except OSError:
        model = "?"
    meta[SUITE + ".env.cpu"] = f"{model}, {os.cpu_count()} logical cores"
    yield meta
    meta[SUITE + ".env.load average at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())


def rotating_rounds(steps: dict):
    """``(one_round, times)``: each call of ``one_round`` times every step once, starting one step
    later than the previous round, and appends to ``times[name]`` (seconds)."""
    names = list(steps)
    times = {n: [] for n in names}
    counter = [0]

    def one_round():
        k = counter[0] % len(names)
        counter[0] += 1
        for n in names[k:] + names[:k]:
            t0 = time.perf_counter()
            steps[n]()
            times[n].append(time.perf_counter() - t0)

    return one_round, times


def _torch_or_skip():
    return pytest.importorskip("torch", reason="torch not installed: PyTorch CPU rows skipped")


@pytest.fixture(scope="module")
def torch_checked():
    """The torch variants compute the reference's output (else their timings mean nothing).
    A fixture, so it also runs under ``--benchmark-only``; None when torch is missing."""
    try:
        import torch
    except ImportError:
        return None
    from torch_fusion import to_torch_params, torch_forward

    rng = np.random.default_rng(1)
    p = _params(rng)
    q, r, mask, _ = _inputs(4, rng)
    want, _ = reference.fusion_forward(p, q, r, mask, heads=H)
    valid = torch.tensor(np.concatenate([np.ones((4, 1), bool), mask], axis=1))
    tp = to_torch_params(p)
    for row0 in (False, True):
        got = torch_forward(tp, torch.tensor(q), torch.tensor(r), valid, H, row0).detach().numpy()
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    return torch


def _steps(B: int, torch):
    """impl name -> zero-argument forward+backward step at batch B (plus the sgemm probe)."""
    rng = np.random.default_rng(B)
    p = _params(rng)
    q, r, mask, dout = _inputs(B, rng)
    steps = {}
    for impl, mod in (("numpy", reference), ("numba", numba_cpu)):
        def step(mod=mod):
            _, cache = mod.fusion_forward(p, q, r, mask, heads=H)
            return mod.fusion_backward(p, cache, dout)
        steps[impl] = step
    if torch is not None:
        from torch_fusion import to_torch_params, torch_step

        tp = to_torch_params(p)
        tq, tr, td = torch.tensor(q), torch.tensor(r), torch.tensor(dout)
        valid = torch.tensor(np.concatenate([np.ones((B, 1), bool), mask], axis=1))
        for impl, row0 in (("torch_full", False), ("torch_row0", True)):
            steps[impl] = lambda row0=row0: torch_step(tp, tq, tr, valid, td, H, row0)
    a = rng.standard_normal((2048, 2048)).astype(np.float32)
    b = rng.standard_normal((2048, 2048)).astype(np.float32)
    steps["sgemm"] = lambda: np.matmul(a, b)
    return steps


@pytest.mark.parametrize("B", BATCHES)
def test_fusion_cpu(benchmark, env, fusion_results, torch_checked, B):
    """One benchmark round = one forward+backward of EVERY implementation plus one sgemm 2048³, in
    a rotating order: all rows of the table see the same machine load (other jobs on a shared
    machine drift over minutes; consecutive per-implementation runs would bias the ratios).
    pytest-benchmark's own figure for this test is the time of a whole round; the table reports
    each implementation's median over the rounds."""
    steps = _steps(B, torch_checked)
    names = list(steps)
    for f in steps.values():
        f()  # compile (numba) and warm caches
    one_round, times = rotating_rounds(steps)
    benchmark.group = "fusion CPU fp32 (one round = every implementation once)"
    benchmark.extra_info.update(B=B)
    benchmark.pedantic(one_round, rounds=ROUNDS[B], warmup_rounds=0)
    for n in names:
        med = float(np.median(times[n]))
        benchmark.extra_info[f"median_s.{n}"] = med
        if n == "sgemm":
            env.setdefault(SUITE + ".sgemm_times", []).extend(times[n])
            # peak = the BEST sgemm round (a median would sink with the load and flatter the rows)
            env[SUITE + ".peak_gflops"] = 2.0 * 2048**3 / float(np.min(env[SUITE + ".sgemm_times"])) / 1e9
            env[SUITE + ".peak_name"] = (f"numpy sgemm 2048³ float32, best of "
                                         f"{len(env[SUITE + '.sgemm_times'])} rounds interleaved with the rows "
                                         f"(median {2.0 * 2048**3 / float(np.median(env[SUITE + '.sgemm_times'])) / 1e9:.1f})")
        else:
            fusion_results["rows"][(SUITE, n, B)] = dict(median_s=med, flops_needed=flops_needed(B),
                                                        flops_full=flops_full(B))
