r"""The paper's control: an MLP with the fusion layer's parameter count, fed the same retrieved data.

RECO's ablation replaces the transformer layer by an MLP of equal size trained on the same retrieved
neighbours with the same loss; it does worse (CUB 44.8 vs 63.0 [paper, reviewer-quoted]). This is that
control, with the fusion layer's readout conventions (residual on the query, identity at init) [ours]:

.. math::

    \bar r = \frac{\sum_j m_j r_j}{\max(1, \sum_j m_j)}, \qquad
    a = \mathrm{LN}([x;\ \bar r]), \qquad
    y = x + \mathrm{GELU}(a W_1 + b_1)\, W_2 + b_2, \qquad
    \bar x = y / \lVert y \rVert

Shapes: ``x`` [B,D], ``r`` [B,k,D], mask ``m`` [B,k]; ``W_1`` [2D,H], ``W_2`` [H,D]. ``W_2, b_2 = 0`` at init,
so ``x̄ = normalize(x)``. :func:`mlp_hidden_for` picks ``H`` so the count ``3DH + H + 5D`` is the largest not
above the fusion layer's ``12D² + 13D + 2D`` (3,153,408 at D=512; the difference is below ``3D + 1``).

Backward (hand-written, checked by finite differences in float64)::

    dy    = l2normalize_backward(dout)                      [B,D]
    dW_2  = Uᵀ dy,  db_2 = Σ dy,  dU = dy W_2ᵀ             U = GELU(pre) [B,H]
    dpre  = dU ⊙ GELU'(pre)
    dW_1  = aᵀ dpre,  db_1 = Σ dpre,  da = dpre W_1ᵀ        [B,2D]
    dγ, dβ, d[x; r̄] = LN backward(da)                       (inputs frozen: their gradient is dropped)
"""

from __future__ import annotations

import numpy as np

from ..checks import check_array
from ..errors import ShapeError
from ..fusion import count_params, init_params
from ..fusion.reference import (gelu_backward, gelu_forward, l2normalize_backward, l2normalize_forward,
                                layernorm_backward, layernorm_forward, linear_backward, linear_forward)

__all__ = ["MLP_NAMES", "mlp_hidden_for", "mlp_init", "mlp_forward", "mlp_backward"]

MLP_NAMES = ("ln_gamma", "ln_beta", "w_1", "b_1", "w_2", "b_2")


def mlp_hidden_for(dim: int, heads: int = 8, mlp_ratio: int = 4) -> int:
    """Hidden width H whose MLP count ``3·D·H + H + 5·D`` is the largest not above the fusion layer's count."""
    target = count_params(init_params(dim, heads, mlp_ratio=mlp_ratio, seed=0))
    return int((target - 5 * dim) // (3 * dim + 1))


def mlp_init(dim: int, hidden: int, *, seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
    """LN γ=1, β=0; ``W_1, b_1`` ~ N(0, 0.02) (as the fusion layer); ``W_2, b_2 = 0`` (identity at init)."""
    rng = np.random.default_rng(seed)
    D, H = int(dim), int(hidden)
    return {
        "ln_gamma": np.ones(2 * D, dtype), "ln_beta": np.zeros(2 * D, dtype),
        "w_1": rng.normal(0, 0.02, (2 * D, H)).astype(dtype), "b_1": rng.normal(0, 0.02, H).astype(dtype),
        "w_2": np.zeros((H, D), dtype), "b_2": np.zeros(D, dtype),
    }  # fmt: skip


def mlp_forward(params: dict, query: np.ndarray, retrieved: np.ndarray, mask: np.ndarray | None = None):
    """Refine ``query`` [B,D] with the masked mean of ``retrieved`` [B,k,D] (see the module docstring).

    Returns ``(out [B,D] unit rows, cache)``.
    """
    q = check_array("query [B,D]", query, ndim=2)
    B, D = q.shape
    r = check_array("retrieved [B,k,D]", retrieved, ndim=3, dtypes=[q.dtype], finite=False)
    if r.shape[0] != B or r.shape[2] != D:
        raise ShapeError(f"retrieved: shape {r.shape}, expected ({B}, k, {D})")
    m = np.ones(r.shape[:2], bool) if mask is None else check_array("mask [B,k]", mask, shape=r.shape[:2],
                                                                      dtypes=[np.bool_], finite=False)
    w = m.astype(q.dtype)  # [B,k]
    r = np.where(m[..., None], r, 0).astype(q.dtype)
    rbar = (w[..., None] * r).sum(1) / np.maximum(1, w.sum(1, keepdims=True))  # [B,D]
    z = np.concatenate([q, rbar], axis=1)  # [B,2D]
    a, ln_cache = layernorm_forward(z, params["ln_gamma"], params["ln_beta"])  # [B,2D]
    pre, lin1_cache = linear_forward(a, params["w_1"], params["b_1"])  # [B,H]
    u, gelu_cache = gelu_forward(pre)  # [B,H]
    v, lin2_cache = linear_forward(u, params["w_2"], params["b_2"])  # [B,D]
    y = q + v  # [B,D]
    out, nc = l2normalize_forward(y)
    if not np.isfinite(out).all():
        raise ShapeError("mlp output: a row is zero or not finite before normalisation; a query row must not be zero")
    return out.astype(q.dtype), {"ln": ln_cache, "lin1": lin1_cache, "gelu": gelu_cache, "lin2": lin2_cache,
                                  "norm": nc}


def mlp_backward(params: dict, cache: dict, dout: np.ndarray) -> dict[str, np.ndarray]:
    """Gradients of ``sum(dout * out)`` for every MLP parameter (same names, shapes, dtype)."""
    dy = l2normalize_backward(cache["norm"], dout)  # [B,D]
    du, dw2, db2 = linear_backward(cache["lin2"], dy)  # [B,H], [H,D], [D]
    dpre = gelu_backward(cache["gelu"], du)  # [B,H]
    da, dw1, db1 = linear_backward(cache["lin1"], dpre)  # [B,2D], [2D,H], [H]
    _, dgamma, dbeta = layernorm_backward(cache["ln"], da)
    dt = params["w_1"].dtype
    return {"ln_gamma": dgamma.astype(dt), "ln_beta": dbeta.astype(dt), "w_1": dw1.astype(dt), "b_1": db1.astype(dt),
            "w_2": dw2.astype(dt), "b_2": db2.astype(dt)}
