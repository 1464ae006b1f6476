"""Numba CPU backend of the RECO fusion layer and of the symmetric InfoNCE loss.

Same signatures as :mod:`reco_ref.fusion.reference` (the readable NumPy truth, docs/reco.md §2) and as
:func:`reco_ref.train.losses.infonce_forward` minus ``backend``; the front doors
``reco_ref.fusion.fusion_forward(..., backend="numba")`` and
``reco_ref.train.losses.infonce_forward(..., backend="numba")`` dispatch here.

Where things are
----------------
==================  ============================================================================================
``layer.py``        :func:`fusion_forward` / :func:`fusion_backward`: the step, GEMMs on BLAS between the kernels
``layernorm.py``    type embeddings + LN_1, bias + residual + LN_2, their backwards (LN_1's assembles dA1 itself)
``attention.py``    the query-row attention: the low-rank pair the layer runs, the packed ``[K|V]`` pair (classify)
``gelu.py``         bias + GELU and its backward: exact erf (float64), vectorised Φ (float32)
``l2norm.py``       bias + residual + L2 normalisation and its backward
``gemv.py``         batch-1 GEMVs, the per-head fold/unfold of ``W_k``/``W_v``, ``_mm`` (GEMV or BLAS)
``reduce.py``       column sums (bias gradients)
``infonce.py``      :func:`infonce_forward` / :func:`infonce_backward` and their kernels
``threads.py``      the thread policy: :data:`SMALL_WORK`, :data:`STEP_BLAS_THREADS`
``profile.py``      :func:`profile_steps`, per-stage wall times
``jit.py``          the three numba option sets (``PARALLEL_IEEE``, ``PARALLEL_REASSOC``, ``SERIAL_REASSOC``)
==================  ============================================================================================

Kernels carry a version suffix where an older version exists; the older ones (the LN_1 backward reading a
written dA1, the plain-axpy GEMV) are not part of the runtime: they live in ``tests/fusion/kernels_v1.py``,
where the tests hold them to the reference beside the versions in use.

How the work is split
---------------------
* GEMMs stay on BLAS (``numpy @``, which runs on the BLAS threads): nothing hand-written beats it.
* Everything BLAS does not do well is a fused ``@njit(parallel=True, cache=True)`` kernel: type-embedding add +
  LayerNorm, masked softmax attention over the short ``T = k+1`` sequence, bias + exact GELU, bias + residual +
  LayerNorm, bias + residual + L2 normalisation, and the matching backward kernels with the parameter-gradient
  reductions.  Long reductions (LayerNorm statistics, softmax scores, L2 norms, bias / LayerNorm-parameter /
  type-embedding gradients, InfoNCE log-sum-exp) accumulate in float64 even for float32 data: cheap here and it
  keeps float32 well within 1e-4 of the reference.  GELU and the short per-head sums over the ``T`` tokens run in
  the data's dtype.
* Small problems (``B·T·D < SMALL_WORK``) run on the calling thread (numba kernels, and the GEMMs too when
  ``threadpoolctl`` is installed): waking worker threads costs more than the work.  Large ones keep numba's
  threads but run the GEMMs on ``STEP_BLAS_THREADS`` (default 1) BLAS threads: 2-thread OpenBLAS slows down
  badly on an oversubscribed machine (docs/performance.md, "Threads on a loaded machine").

Dead work that is skipped (legal because only ``Y[:, 0]`` is read out, docs/reco.md §2)
---------------------------------------------------------------------------------------
The reference runs the whole layer on all ``T`` tokens.  The output depends on token 0 only:

* forward: ``K`` and ``V`` are needed for all ``T`` tokens (token 0 attends to every neighbour),
  but ``Q``, the attention rows, ``W_o``, LN2, the MLP and the residuals only for token 0;
* backward: the gradient reaches tokens ``1..k`` only through ``K`` and ``V``, so ``dK``/``dV`` are
  needed for all tokens and ``dQ`` for token 0 only; ``dA1`` (and hence ``dX``, ``de_r``, ``dγ₁``,
  ``dβ₁``) is still needed for every token.

That cuts the layer from ``72·B·T·D²`` GEMM FLOPs (docs/kernels.md, "Dead work is skipped") to
``12·B·T·D² + 60·B·D²`` (ratio 4): at B=256, T=11, D=512 from ≈53 to ≈13 GFLOP.  The low-rank attention
(``attention.py``) then never builds ``K`` and ``V`` at all.  The results are identical to the reference up to
rounding (the tests check every output and gradient).

Relevance bias (docs/reco.md §2, optional: params with ``rel_beta, rel_gamma [h]`` and ``scores [B,k]``)
-------------------------------------------------------------------------------------------------------
Only the query row's logits are computed, so only they get the bias: ``+γ_h`` toward token 0,
``+β_h·scores[b, j−1]`` toward neighbour ``j`` (inside ``_attention_row0_forward_v2``); ``dβ``,
``dγ`` come from that row's ``dS`` (the other rows' ``dS`` is exactly 0).  Without the arrays the
kernel's bias lines are pruned at compile time: the paper's layer runs the same code as before.

Shapes: ``B`` batch, ``k`` neighbours, ``T = k+1``, ``D`` width, ``h`` heads, ``dh = D/h``,
``F = mlp_ratio·D`` hidden width.
"""

from __future__ import annotations

import os
import sys
import types

# OpenMP workers that spin-wait after a parallel region steal the (few) cores from the BLAS threads that run the
# GEMMs in between, and vice versa: on a busy machine every one of a step's ~13 kernel launches then waits for a
# core (figures: docs/kernels.md, "Performance").  Sleeping workers fix it.  Set here, before the submodules
# import numba.  Only a default: an explicit OMP_WAIT_POLICY wins, and it has no effect once an OpenMP runtime is
# already initialised.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# The public surface and every kernel the tests, the benchmarks and reco_ref.classify.numba_cpu import from here.
from . import threads  # noqa: E402
from .attention import (  # noqa: E402,F401
    _attention_row0_backward,
    _attention_row0_backward_v2,
    _attention_row0_forward,
    _attention_row0_forward_v2,
)
from .gelu import (  # noqa: E402,F401
    _INV_SQRT2,
    _INV_SQRT2PI,
    GELU_MAX_ABS_ERR,
    _bias_gelu_forward,
    _bias_gelu_forward_f32,
    _gelu_backward_colsum_f32,
    _gelu_backward_inplace,
)
from .gemv import _fold_heads_v1, _gemv_v2, _heads_view, _mm, _unfold_heads_v1  # noqa: E402,F401
from .infonce import _infonce_dz, _infonce_lse, infonce_backward, infonce_forward  # noqa: E402,F401
from .l2norm import _bias_residual_l2norm_forward, _l2norm_backward  # noqa: E402,F401
from .layer import _fusion_backward, _fusion_forward, fusion_backward, fusion_forward  # noqa: E402,F401
from .layernorm import (  # noqa: E402,F401
    _bias_residual_layernorm_forward,
    _embed_layernorm_forward,
    _layernorm1_backward_v2,
    _layernorm2_backward,
    _ln1_row_backward,
)
from .profile import profile_steps  # noqa: E402,F401
from .reduce import _colsum, _colsum_rows  # noqa: E402,F401
from .threads import _nblk, _threads_for  # noqa: E402,F401

__all__ = [
    "fusion_forward",
    "fusion_backward",
    "infonce_forward",
    "infonce_backward",
]

#: Knobs that live in :mod:`.threads`, where every step reads them.  Reading or setting them on the package
#: (``numba_cpu.STEP_BLAS_THREADS = None``, as docs/performance.md says) goes there, as it did when the backend
#: was one file.
_THREAD_KNOBS = ("SMALL_WORK", "STEP_BLAS_THREADS")


class _Package(types.ModuleType):
    """This package's module type: forwards the thread knobs to :mod:`.threads` (Python's documented way to
    customise a module's attribute setting)."""

    def __getattr__(self, name):
        if name in _THREAD_KNOBS:
            return getattr(threads, name)
        raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")

    def __setattr__(self, name, value):
        if name in _THREAD_KNOBS:
            setattr(threads, name, value)
        else:
            super().__setattr__(name, value)

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(_THREAD_KNOBS))


sys.modules[__name__].__class__ = _Package
