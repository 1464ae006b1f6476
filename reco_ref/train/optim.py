r"""AdamW with decoupled weight decay on matrices only, and a linear warm-up + cosine schedule (docs/reco.md §3).

The optimiser state is a flat ``dict`` of NumPy arrays — ``"step"`` (0-d int64), ``"m.<name>"`` and
``"v.<name>"`` (first / second moments, same shape and dtype as the parameter) — so it saves and
loads as-is with :func:`reco_ref.io.atomic_save_npz` / :func:`reco_ref.io.load_npz` for resumable
training. Parameter names may themselves contain dots (``image.w_q``): the moment key is the prefix
``"m."`` / ``"v."`` followed by the full parameter name.

One step (``t`` counts from 1; the same as ``torch.optim.AdamW``)::

    p ← p · (1 − lr·λ)                      only where decay applies (ndim ≥ 2 by default)
    m ← β1 m + (1 − β1) g
    v ← β2 v + (1 − β2) g²
    p ← p − lr · (m / (1 − β1^t)) / (sqrt(v / (1 − β2^t)) + ε)
"""

from __future__ import annotations

import math
from typing import Callable, Collection, Mapping

import numpy as np

from ..errors import CheckpointError, ShapeError

__all__ = ["adamw_init", "adamw_step", "adamw_decays", "lr_at"]

# the decay rule is a property of the parameters (matrices vs vectors): fusion.params owns it, so the CUDA
# AdamW kernel in fusion/cuda can use it without importing the train room
from ..fusion.params import adamw_decays  # noqa: E402  (re-exported)


def adamw_init(params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Zero moments for every parameter and ``step = 0``.

    Returns
    -------
    state : dict of str to ndarray
        ``{"step": int64 0-d, "m.<name>": zeros_like(p), "v.<name>": zeros_like(p)}``.
    """
    state = {"step": np.array(0, dtype=np.int64)}
    for name, p in params.items():
        p = np.asarray(p)
        if p.dtype.kind != "f":
            raise ShapeError(f"params[{name!r}]: dtype {p.dtype}, expected a float array")
        state["m." + name] = np.zeros_like(p)
        state["v." + name] = np.zeros_like(p)
    return state


def adamw_step(
    params: Mapping[str, np.ndarray],
    grads: Mapping[str, np.ndarray],
    state: dict[str, np.ndarray],
    lr: float,
    *,
    betas: tuple[float, float] = (0.9, 0.98),
    eps: float = 1e-6,
    weight_decay: float = 0.2,
    decay: Collection[str] | Callable[[str, np.ndarray], bool] | None = None,
) -> None:
    r"""One AdamW update, in place on ``params`` and ``state``.

    .. math::

        p \leftarrow p(1-\eta\lambda),\quad
        m \leftarrow \beta_1 m + (1-\beta_1) g,\quad
        v \leftarrow \beta_2 v + (1-\beta_2) g^2,\quad
        p \leftarrow p - \eta\,\frac{m/(1-\beta_1^t)}{\sqrt{v/(1-\beta_2^t)}+\epsilon}

    Parameters
    ----------
    params : mapping name → ndarray (writable; updated in place)
    grads : mapping name → ndarray, the same names/shapes (a name may be absent: that parameter is frozen
        for this step, its moments unchanged)
    state : dict from :func:`adamw_init` (updated in place)
    lr : float
        Learning rate η for this step (e.g. from :func:`lr_at`).
    betas, eps, weight_decay :
        docs/reco.md §3 defaults (0.9, 0.98), 1e-6, 0.2.
    decay : see :func:`adamw_decays`.

    Raises
    ------
    ShapeError
        A gradient with the wrong shape or non-finite values (nothing is updated then).
    CheckpointError
        ``state`` does not hold moments for a parameter.
    """
    b1, b2 = float(betas[0]), float(betas[1])
    lr, eps, wd = float(lr), float(eps), float(weight_decay)
    for name, val in (("lr", lr), ("eps", eps), ("weight_decay", wd)):
        if not math.isfinite(val) or val < 0:
            raise ShapeError(f"{name}: expected a non-negative finite float, got {val}")
    if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
        raise ShapeError(f"betas: expected values in [0, 1), got {betas!r}")
    # Validate everything before touching anything, so a bad gradient leaves params and state intact.
    for name, g in grads.items():
        if name not in params:
            raise ShapeError(f"grads[{name!r}]: no parameter of that name")
        p = params[name]
        if not isinstance(p, np.ndarray) or p.dtype.kind != "f":
            raise ShapeError(f"params[{name!r}]: expected a writable float ndarray (updated in place), got {type(p).__name__}")
        if np.shape(g) != p.shape:
            raise ShapeError(f"grads[{name!r}]: shape {np.shape(g)}, expected {p.shape}")
        if not np.isfinite(g).all():
            raise ShapeError(f"grads[{name!r}]: holds NaN/inf")
        for key in ("m." + name, "v." + name):
            if key not in state or state[key].shape != p.shape:
                raise CheckpointError(f"optimiser state: entry {key!r} missing or of the wrong shape, expected {p.shape}")
    t = int(state["step"]) + 1
    c1 = 1.0 - b1**t  # bias corrections
    c2 = 1.0 - b2**t
    for name, g in grads.items():
        p, m, v = params[name], state["m." + name], state["v." + name]
        g = np.asarray(g, dtype=p.dtype)
        if wd and adamw_decays(name, p, decay):
            p *= p.dtype.type(1.0 - lr * wd)  # decoupled decay, before the Adam update (as torch)
        m *= b1
        m += (1.0 - b1) * g
        v *= b2
        v += (1.0 - b2) * (g * g)
        denom = np.sqrt(v) / math.sqrt(c2) + eps
        p -= (lr / c1) * m / denom
    state["step"] = np.array(t, dtype=np.int64)


def lr_at(step: int, *, base_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    r"""Learning rate at ``step`` (0-based): linear warm-up, then cosine decay to ``min_lr``.

    .. math::

        \eta(t) = \begin{cases}
          \eta_0\,\frac{t+1}{W} & t < W \\
          \eta_{\min} + \tfrac12(\eta_0-\eta_{\min})\big(1+\cos(\pi\,\frac{t-W}{\max(1,\,S-W)})\big) & W \le t < S \\
          \eta_{\min} & t \ge S
        \end{cases}

    with ``W = warmup_steps`` and ``S = total_steps``. The warm-up reaches ``base_lr`` at its last
    step, so the first step never runs at lr 0.
    """
    if isinstance(step, bool) or int(step) != step or step < 0:
        raise ValueError(f"step: expected a non-negative int, got {step!r}")
    if warmup_steps < 0 or total_steps < 1 or warmup_steps > total_steps:
        raise ValueError(f"schedule: expected 0 <= warmup_steps <= total_steps and total_steps >= 1, "
                         f"got warmup_steps={warmup_steps}, total_steps={total_steps}")  # fmt: skip
    if not (0.0 <= min_lr <= base_lr) or not math.isfinite(base_lr):
        raise ValueError(f"schedule: expected 0 <= min_lr <= base_lr (finite), got min_lr={min_lr}, base_lr={base_lr}")
    step = int(step)
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return float(min_lr)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return float(min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress)))
