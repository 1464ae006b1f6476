"""The three numba option sets of the kernels, named by what they allow.

All three cache the compiled code (``cache=True``: a second process loads it from ``__pycache__`` instead of
recompiling) and release the GIL (``nogil=True``).

* ``PARALLEL_IEEE``: ``prange`` loops run on numba's threads; fastmath off, IEEE semantics, so the float64 path
  matches the reference to ~1e-13.  The first kernel generation (embed + LN_1, LN_2, exact GELU, L2 norm, the
  packed-``[K|V]`` attention pair) and the InfoNCE kernels.
* ``PARALLEL_REASSOC``: the same plus ``fastmath={"reassoc", "contract"}``: "reassoc" lets LLVM vectorise the dot
  products and sums (changes rounding at the 1e-16 relative level only), "contract" allows FMAs.  No
  ``nnan``/``ninf``: masking relies on IEEE ``-inf`` / 0.  The low-rank attention pair, the fused LN_1 backward and
  the float32 GELU kernels.
* ``SERIAL_REASSOC``: the fastmath of ``PARALLEL_REASSOC`` without ``prange``: the batch-1 GEMVs, one row with
  nothing to split across threads.
"""

from __future__ import annotations

PARALLEL_IEEE = dict(parallel=True, cache=True, fastmath=False, nogil=True)
PARALLEL_REASSOC = dict(parallel=True, cache=True, fastmath={"reassoc", "contract"}, nogil=True)
SERIAL_REASSOC = dict(cache=True, fastmath={"reassoc", "contract"}, nogil=True)
