"""GPU benchmark of the fusion layer, forward + backward, fp32: Numba CUDA vs PyTorch CUDA in one run.

    python3 -m pytest benchmarks/bench_fusion_gpu.py --benchmark-only -q

Skips (whole module) without a real CUDA GPU, and under the CUDA simulator.  Shape as the CPU suite
(k = 10, D = 512, h = 8), B ∈ {256, 4096}.  Rows:

* ``numba_cuda`` — :func:`reco_ref.fusion.cuda.fusion_forward_device` / ``fusion_backward_device`` on
  device-resident arrays (no host copies inside the timed step), default :class:`KernelConfig`;
* ``torch_full`` / ``torch_row0`` — ``benchmarks/torch_fusion.py`` on ``cuda`` tensors (skipped when
  torch has no CUDA); TF32 is disabled so every row is true fp32;
* peak: cuBLAS fp32 GEMM 4096³ through torch (when available).

Each timed step ends with a device synchronisation.  Issue 3's target: numba_cuda ≥ 0.5× torch at B=4096.
"""

from __future__ import annotations

import numpy as np
import pytest

numba_cuda = pytest.importorskip("numba.cuda", reason="numba-cuda not installed")
from numba import config as _nb_config  # noqa: E402

if _nb_config.ENABLE_CUDASIM or not numba_cuda.is_available():
    pytest.skip("no real CUDA GPU (or NUMBA_ENABLE_CUDASIM=1): GPU benchmarks skipped", allow_module_level=True)

from bench_fusion import H, K, _inputs, _params, flops_full, flops_needed  # noqa: E402

from reco_ref.fusion import cuda as fc  # noqa: E402

BATCHES = [256, 4096]
IMPLS = ["numba_cuda", "torch_full", "torch_row0"]
SUITE = "GPU fp32"


@pytest.fixture(scope="module")
def env(fusion_results):
    meta = fusion_results["meta"]
    meta[SUITE + ".desc"] = f"forward+backward, k={K}, D=512, h={H}, device-resident"
    meta[SUITE + ".order"] = IMPLS
    meta[SUITE + ".baseline"] = "torch_full"
    dev = numba_cuda.get_current_device()
    meta[SUITE + ".env.device"] = dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)
    meta[SUITE + ".env.kernel config"] = repr(fc.get_config())
    return meta


def _median(benchmark):
    stats = getattr(benchmark, "stats", None)
    return None if stats is None else float(stats.stats.median)


def _torch_cuda():
    torch = pytest.importorskip("torch", reason="torch not installed")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA: PyTorch GPU rows skipped")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return torch


def test_cublas_peak(benchmark, env):
    torch = _torch_cuda()
    a = torch.randn(4096, 4096, device="cuda")
    b = torch.randn(4096, 4096, device="cuda")

    def step():
        torch.matmul(a, b)
        torch.cuda.synchronize()

    benchmark.pedantic(step, rounds=10, warmup_rounds=2)
    med = _median(benchmark)
    if med:
        env[SUITE + ".peak_gflops"] = 2.0 * 4096**3 / med / 1e9
        env[SUITE + ".peak_name"] = "cuBLAS fp32 GEMM 4096³ (TF32 off)"


@pytest.mark.parametrize("B", BATCHES)
@pytest.mark.parametrize("impl", IMPLS)
def test_fusion_gpu(benchmark, env, fusion_results, impl, B):
    rng = np.random.default_rng(B)
    p = _params(rng)
    q, r, mask, dout = _inputs(B, rng)
    if impl == "numba_cuda":
        dp = fc.params_to_device(p)
        dq, dr, dd = (numba_cuda.to_device(a) for a in (q, r, dout))
        valid = fc.valid_to_device(mask, B, K)

        def step():
            _, cache = fc.fusion_forward_device(dp, dq, dr, valid, heads=H)
            fc.fusion_backward_device(dp, cache, dd)
            numba_cuda.synchronize()

        # correctness of this configuration at this shape, once, before timing
        out, _ = fc.fusion_forward_device(dp, dq, dr, valid, heads=H)
        from reco_ref.fusion import numba_cpu

        want, _ = numba_cpu.fusion_forward(p, q, r, mask, heads=H)
        np.testing.assert_allclose(out.copy_to_host(), want, rtol=0, atol=1e-4)
    else:
        torch = _torch_cuda()
        from torch_fusion import to_torch_params, torch_step

        tp = to_torch_params(p, device="cuda")
        tq, tr, td = (torch.tensor(a, device="cuda") for a in (q, r, dout))
        valid = torch.tensor(np.concatenate([np.ones((B, 1), bool), mask], axis=1), device="cuda")
        row0 = impl == "torch_row0"

        def step():
            torch_step(tp, tq, tr, valid, td, H, row0)
            torch.cuda.synchronize()

    step()  # compile / warm up
    benchmark.group = f"fusion GPU fp32 B={B}"
    benchmark.pedantic(step, rounds=20 if B <= 256 else 10, warmup_rounds=2)
    med = _median(benchmark)
    if med:
        fusion_results["rows"][(SUITE, impl, B)] = dict(median_s=med, flops_needed=flops_needed(B),
                                                        flops_full=flops_full(B))

