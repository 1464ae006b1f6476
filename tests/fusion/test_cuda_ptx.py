"""Compile every CUDA kernel for a real GPU target (PTX, sm_90) — no GPU needed, no simulator.

The simulator runs kernels as Python, so it cannot catch what only the real compiler rejects
(untyped shared-array sizes, dtype unification, unsupported calls).  This test runs the layer's
device entry points, every kernel version and the InfoNCE/AdamW kernels in a subprocess with
``NUMBA_ENABLE_CUDASIM=0`` where each kernel launch is replaced by ``cuda.compile_ptx`` for the
launch's argument types (NumPy arrays stand in for device arrays: same dtypes and layouts).

Needs NVVM and NVRTC (a CUDA toolkit or the nvidia-* wheels); skips where they are missing.
Marked slow (NVVM takes ~1 s per kernel).  Example where the libraries live outside the default
search path::

    LD_LIBRARY_PATH=/path/to/nvidia/cu13/lib python3 -m pytest -m slow tests/fusion/test_cuda_ptx.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = [pytest.mark.cuda, pytest.mark.slow]

SCRIPT = textwrap.dedent(r'''
    import json, sys
    import numpy as np
    import numba
    from numba import cuda

    import types
    import numba.cuda.dispatcher as _disp

    # device functions called from a kernel are compiled for "the current device": pretend sm_90
    _disp.get_current_device = lambda: types.SimpleNamespace(compute_capability=(9, 0))
    real_jit = cuda.jit
    done = {}

    class Launcher:
        def __init__(self, fn):
            self.fn = fn
        def __getitem__(self, launch_cfg):
            def launch(*args):
                sig = tuple(numba.typeof(a) for a in args)
                key = (self.fn.__qualname__, id(self.fn), sig)
                if key not in done:
                    cuda.compile_ptx(self.fn, sig, cc=(9, 0))
                    done[key] = f"{self.fn.__module__}.{self.fn.__qualname__}{sig}"
            return launch

    def fake_jit(fn=None, **kw):
        if kw.get("device"):
            return real_jit(fn, **kw) if fn is not None else real_jit(**kw)
        if fn is None:
            return Launcher
        return Launcher(fn)

    cuda.jit = fake_jit
    cuda.device_array = lambda shape, dtype=np.float64, **kw: np.zeros(shape, dtype)
    cuda.to_device = lambda a, **kw: np.array(a)

    from reco_ref.fusion.cuda import (KernelConfig, attention, gelu, gemm, l2norm, layernorm, reduce,
                                      fusion_forward_device, fusion_backward_device, infonce_forward_device,
                                      infonce_backward_device, adamw_init_device, adamw_step_device)
    from reco_ref.fusion.params import init_params

    cfg = KernelConfig()
    B, k, D, H = 4, 3, 32, 4
    T = k + 1
    for dt in (np.float32, np.float64):
        p = dict(init_params(D, H, dtype=dt))
        q, r = np.ones((B, D), dt), np.ones((B, k, D), dt)
        valid = np.ones((B, T), np.bool_)
        out, cache = fusion_forward_device(p, q, r, valid, heads=H, cfg=cfg)
        g = fusion_backward_device(p, cache, np.ones((B, D), dt), return_input_grads=True, cfg=cfg)
        # the relevance-bias specialisations (docs/reco.md §2 "Relevance bias", issue 18) beside the paper layer's
        pr = dict(init_params(D, H, dtype=dt, relevance=True))
        _, cache_r = fusion_forward_device(pr, q, r, valid, heads=H, scores=np.zeros((B, k), dt), cfg=cfg)
        fusion_backward_device(pr, cache_r, np.ones((B, D), dt), cfg=cfg)
        loss, c = infonce_forward_device(q, q, np.array([2.0]), cfg=cfg)
        infonce_backward_device(c, np.array([1.0]), cfg=cfg)
        st = adamw_init_device(p)
        adamw_step_device(p, {n: g[n] for n in p}, st, 1e-3, cfg=cfg)
        # every kept version, every transpose / accumulate variant, strided outputs
        for v in (1, 2, 3):
            for ta in (False, True):
                for tb in (False, True):
                    for acc in (False, True):
                        gemm.gemm(np.ones((5, 5), dt), np.ones((5, 5), dt), np.ones((5, 10), dt)[:, :5],
                                  ta=ta, tb=tb, accumulate=acc, version=v, cfg=cfg)
        x, xh, a1 = (np.zeros((B, T, D), dt) for _ in range(3))
        layernorm.embed_layernorm_forward(q, r, q[0], q[0], q[0], q[0], 1e-5, x, xh, np.zeros((B, T), dt), a1,
                                          version=1, cfg=cfg)
        qh = np.ones((B, H, T, D // H), dt)
        pp = np.zeros((B, H, T, T), dt)
        attention.attention_full_forward(qh, qh, qh, valid, qh.copy(), pp, cfg=cfg)
        attention.attention_full_backward(qh, qh, qh, qh, pp, qh.copy(), qh.copy(), qh.copy(), cfg=cfg)
        gelu.gelu_forward(q, q.copy(), cfg=cfg)
        l2norm.l2norm_forward(q, q.copy(), np.zeros(B, dt), cfg=cfg)
        reduce.colsum_v1(x, q[0].copy(), cfg=cfg)
        reduce.fill(q, 0.0, cfg=cfg)
        reduce.copy(q, q.copy(), cfg=cfg)
    print(json.dumps(sorted(done.values())))
''')


def test_every_kernel_compiles_to_ptx():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    res = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=1800)
    if res.returncode != 0:
        err = res.stderr[-3000:]
        missing = ("DynamicLibNotFoundError", "libnvrtc", "NVVM", "libnvvm", "CudaSupportError", "cuda toolkit")
        if any(m.lower() in err.lower() for m in missing):
            pytest.skip(f"CUDA compiler libraries (NVVM / NVRTC) not found: {err.strip().splitlines()[-1]}")
        pytest.fail(f"PTX compilation failed:\n{err}")
    compiled = json.loads(res.stdout.strip().splitlines()[-1])
    names = {c.split("(")[0] for c in compiled}
    # every kernel module contributed
    for mod in ("gemm", "layernorm", "attention", "gelu", "l2norm", "reduce", "infonce", "adamw"):
        assert any(f".cuda.{mod}." in n for n in names), f"no kernel of {mod} compiled: {sorted(names)}"
    assert len(compiled) >= 60, len(compiled)
    # the relevance bias: its dβ/dγ reduction, and per dtype the row-0 forward and backward with and without it
    ends = [c.split("(")[0] for c in compiled]
    assert any(n.endswith("_rel_bwd.<locals>.kernel") for n in ends), ends
    for fn in ("_row0_fwd", "_row0_bwd"):
        assert sum(n.endswith(f"{fn}.<locals>.kernel") for n in ends) == 4, ends
