"""Thread policy of a fusion step: small steps on the calling thread, large ones with BLAS pinned.

The two knobs, :data:`SMALL_WORK` and :data:`STEP_BLAS_THREADS`, are read at every step, so setting them on the
package (``reco_ref.fusion.numba_cpu.STEP_BLAS_THREADS = None``) or here takes effect on the next call.
"""

from __future__ import annotations

from contextlib import contextmanager

from numba import get_num_threads, set_num_threads

from ...backends import blas_threads


#: Below this many activation elements (B·T·D; B ≤ 11 at k=10, D=512) a step runs on the calling
#: thread only — numba kernels and, when threadpoolctl is installed, the BLAS GEMMs too: waking worker
#: threads between ~13 short kernels and GEMMs costs more than the work (figures: docs/performance.md,
#: "Threads on a loaded machine").
SMALL_WORK = 1 << 16

#: BLAS threads for the GEMMs of a large step (``B·T·D ≥ SMALL_WORK``); ``None`` leaves BLAS as
#: configured.  Default 1: on a machine with more runnable threads than cores, 2-thread OpenBLAS
#: calls wait for descheduled workers, and a step slows down several-fold (docs/performance.md,
#: "Threads on a loaded machine").  On a dedicated multi-core machine set it to None (or a count).
#: Needs threadpoolctl (optional); without it BLAS keeps its own threading.
STEP_BLAS_THREADS = 1


_blas_threads = blas_threads  # threadpoolctl-backed, optional (reco_ref.backends)


@contextmanager
def _threads_for(n_elements: int):
    """Run the enclosed step single-threaded (numba kernels and BLAS) when the problem is small;
    a large step keeps numba's threads and runs BLAS on :data:`STEP_BLAS_THREADS`."""
    if n_elements >= SMALL_WORK:
        with _blas_threads(STEP_BLAS_THREADS):
            yield
        return
    old = get_num_threads()
    set_num_threads(1)
    try:
        with _blas_threads(1):
            yield
    finally:
        set_num_threads(old)


def _nblk(n: int) -> int:
    """Number of row blocks for partial reductions: a few per thread, never more than rows."""
    return max(1, min(n, 4 * get_num_threads()))
