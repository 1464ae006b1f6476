"""Shared helpers for the fusion tests: random non-identity parameters, random inputs, finite differences.

Importable from any test in tests/fusion (pytest puts this folder on sys.path): ``from fusion_testlib import ...``.
"""

from __future__ import annotations

import contextlib

import numpy as np

from reco_ref.fusion import RELEVANCE_NAMES, FusionConfig, FusionParams, param_shapes


def random_params(D: int, heads: int, rng: np.random.Generator, mlp_ratio: int = 4, dtype=np.float64) -> FusionParams:
    """Random, clearly non-identity parameters.

    At identity init most gradients vanish (W_o = W_2 = 0 cut every path but the residual), so the
    checks use weights large enough that attention is far from uniform, GELU is in its curved range
    and every parameter influences the output.
    """
    arrays = {}
    for name, shape in param_shapes(D, mlp_ratio).items():
        if name.endswith("_gamma"):
            a = 1.0 + 0.3 * rng.standard_normal(shape)
        elif name.startswith("w_"):
            a = rng.standard_normal(shape) * (1.0 / np.sqrt(shape[0]))
        else:  # biases, LN betas, type embeddings
            a = 0.3 * rng.standard_normal(shape)
        arrays[name] = a.astype(dtype)
    return FusionParams(arrays, FusionConfig(D, heads, mlp_ratio, np.dtype(dtype).name))


def random_rel_params(D: int, heads: int, rng: np.random.Generator, mlp_ratio: int = 4, dtype=np.float64,
                      rel_center: float = 1.0, rel_width: float = 0.02) -> FusionParams:  # fmt: skip
    """:func:`random_params` plus the relevance pair (docs/reco.md §2 "Relevance bias"), config ``relevance=True``.

    ``rel_beta, rel_gamma [h]`` are drawn N(0, 1) per head (both signs, order 1, different per head), so
    the bias moves attention by O(1) logits, like the score-product term it is added to.
    """
    base = random_params(D, heads, rng, mlp_ratio, dtype)
    arrays = dict(base)
    for name in RELEVANCE_NAMES:
        arrays[name] = rng.standard_normal(heads).astype(dtype)
    config = FusionConfig(D, heads, mlp_ratio, np.dtype(dtype).name, relevance=True, rel_center=rel_center,
                          rel_width=rel_width)  # fmt: skip
    return FusionParams(arrays, config)


def with_relevance(params: FusionParams, beta, gamma, rel_center: float = 1.0, rel_width: float = 0.02) -> FusionParams:
    """The same 18 arrays (the very objects, not copies) plus ``rel_beta = beta``, ``rel_gamma = gamma`` [h]."""
    c = params.config
    h = c.heads
    dt = np.dtype(c.dtype)
    arrays = dict(params)
    arrays["rel_beta"] = np.broadcast_to(np.asarray(beta, dtype=dt), (h,)).copy()
    arrays["rel_gamma"] = np.broadcast_to(np.asarray(gamma, dtype=dt), (h,)).copy()
    config = FusionConfig(c.dim, h, c.mlp_ratio, c.dtype, relevance=True, rel_center=rel_center, rel_width=rel_width)
    return FusionParams(arrays, config)


def random_scores(B: int, k: int, rng: np.random.Generator, mask=None, lo: float = 0.80, hi: float = 0.98,
                  masked_value: float | None = None) -> np.ndarray:  # fmt: skip
    """Raw search scores (cosines) [B, k] in ``[lo, hi]``; masked slots get ``masked_value`` when given."""
    s = rng.uniform(lo, hi, size=(B, k))
    if mask is not None and masked_value is not None:
        s[~mask] = masked_value
    return s


def random_inputs(B: int, k: int, D: int, rng: np.random.Generator, dtype=np.float64, p_valid: float | None = 0.6,
                  fully_masked_row: bool = True):  # fmt: skip
    """Normalised query [B,D], neighbours [B,k,D] and a bool mask [B,k] (None when p_valid is None).

    With ``fully_masked_row`` and B ≥ 2, row 0 has no valid neighbour at all.
    """
    q = rng.standard_normal((B, D))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    r = rng.standard_normal((B, k, D))
    r /= np.maximum(np.linalg.norm(r, axis=2, keepdims=True), 1e-12)
    if p_valid is None:
        mask = None
    else:
        mask = rng.random((B, k)) < p_valid
        if fully_masked_row and B >= 2:
            mask[0] = False
    return q.astype(dtype), r.astype(dtype), mask


def rel_err(analytic: np.ndarray, numeric: np.ndarray, scale: float = 1.0, floor: float = 1e-5) -> float:
    r"""Relative error of one gradient array, as used in every finite-difference check.

    .. math::

        \mathrm{rel} = \frac{\lVert a - n \rVert_2}{\max(\lVert a \rVert_2 + \lVert n \rVert_2,\ \text{floor}\cdot\sqrt{m}\cdot\text{scale})}

    over the ``m`` checked entries. The floor term exists because a central difference cannot resolve
    gradients below its own round-off noise (≈ ε_mach·|f|/h ≈ 2e-11·|f| for h = 1e-5): an array whose
    true gradient is ~0 (e.g. ``b_k``: softmax is shift-invariant) is thereby held to an absolute RMS
    error of ``rel_tol·floor·scale`` per entry instead of a meaningless ratio of two round-off values.
    ``scale`` is ``max(1, |f|)``.
    """
    a = np.asarray(analytic, dtype=np.float64).ravel()
    n = np.asarray(numeric, dtype=np.float64).ravel()
    if a.size == 0:
        return 0.0
    denom = max(np.linalg.norm(a) + np.linalg.norm(n), floor * np.sqrt(a.size) * scale)
    return float(np.linalg.norm(a - n) / denom)


def central_diff(f, arr: np.ndarray, idx, h: float = 1e-5) -> float:
    """(f(arr[idx] + h) − f(arr[idx] − h)) / 2h, restoring ``arr`` afterwards."""
    old = arr[idx]
    arr[idx] = old + h
    fp = f()
    arr[idx] = old - h
    fm = f()
    arr[idx] = old
    return (fp - fm) / (2.0 * h)


def directional_diff(f, arr: np.ndarray, direction: np.ndarray, h: float = 1e-5) -> float:
    """(f(arr + h·u) − f(arr − h·u)) / 2h for a whole-array direction ``u``, restoring ``arr``."""
    old = arr.copy()
    arr += h * direction
    fp = f()
    arr[...] = old - h * direction
    fm = f()
    arr[...] = old
    return (fp - fm) / (2.0 * h)


@contextlib.contextmanager
def single_blas_thread():
    """Run BLAS on one thread inside the block.

    The checks multiply tiny matrices thousands of times; a threaded BLAS gains nothing there and,
    on a loaded 2-core machine, its spinning threads made one configuration 25× slower (measured:
    26 ms vs 1.1 ms per forward). Uses threadpoolctl (test extra) when installed, else does nothing.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - the test extra installs it
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def assert_matches_reference(got, want, dtype, what: str = "") -> None:
    """The fast backends' tolerance against the NumPy reference (issue 3).

    float64: max absolute error ≤ 1e-10; float32: max absolute error ≤ 1e-4 × max |reference|.
    """
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    err = float(np.abs(got - want).max(initial=0.0))
    if dtype == np.float64:
        assert err <= 1e-10, f"{what}: max abs err {err:.3g}"
    else:
        scale = max(float(np.abs(want).max(initial=0.0)), 1e-30)
        assert err / scale <= 1e-4, f"{what}: max rel err {err / scale:.3g}"
