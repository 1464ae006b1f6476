"""The parameter type, :class:`FusionParams` (the arrays and their config), and fresh parameters: the inits.

D = ``dim``, h = ``heads``, R = ``mlp_ratio * D``.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from .config import REL_CENTER, REL_WIDTH, FusionConfig, param_shapes
from .stamp import StampedDict


class FusionParams(StampedDict):
    """A ``dict`` of the 18 fusion arrays that also knows its config.

    It behaves exactly like a dict (``params["w_q"]``, iteration, ``len``); the config is read-only:
    ``params.heads``, ``params.mlp_ratio``, ``params.dim``, ``params.dtype``, ``params.config``.

    Validation once at the door
    ---------------------------
    A set made by :func:`init_params` or :func:`load_params` (both validated), or one that has
    passed :func:`reco_ref.fusion.check_params` once, carries a *stamp*: references to its 18 array
    objects with their shapes, strides and dtypes. While every entry is still the very same array
    object with the same shape, strides and dtype, the front door trusts the stamp and does not
    re-scan ~3–7 M floats for finiteness on every call (that scan was half of a batch-1 forward).

    * Replacing an entry (``params["w_q"] = ...``, ``update``, ``pop``, ``del`` ...) drops the stamp:
      the next call validates everything again, with the usual named errors.
    * Reshaping an array in place (``a.shape = ...``) changes its shape/strides: re-validated.
    * Writing *values* into a stamped array in place (``params["w_q"][0, 0] = np.nan``, an
      optimiser's ``p -= lr * m / d``) is **not** re-scanned. Such a NaN/inf cannot pass silently:
      it reaches the output, and the front door raises ``ShapeError("fusion output: rows [...] are
      not finite ...")``, which does not name the array. ``check_params(params, rescan=True)``
      re-scans and names it.
    """

    def __init__(self, arrays: Mapping[str, np.ndarray], config: FusionConfig):
        super().__init__(arrays)
        if not isinstance(config, FusionConfig):
            raise TypeError(f"FusionParams: config must be a FusionConfig, got {type(config).__name__}")
        self._config = config
        self._stamp = None  # set once validated; see the class docstring and reco_ref.fusion.params.stamp

    def _stamp_names(self) -> tuple[str, ...]:
        return self._config.names

    @property
    def config(self) -> FusionConfig:
        return self._config

    @property
    def heads(self) -> int:
        return self._config.heads

    @property
    def mlp_ratio(self) -> int:
        return self._config.mlp_ratio

    @property
    def dim(self) -> int:
        return self._config.dim

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self._config.dtype)

    def copy(self) -> "FusionParams":
        """Deep copy of the arrays, same config."""
        return FusionParams({k: np.array(v, copy=True) for k, v in self.items()}, self._config)

    def __reduce__(self):  # picklable for multiprocessing (not used for files: those are npz)
        return (FusionParams, (dict(self), self._config))

    def __repr__(self) -> str:
        c = self._config
        return f"FusionParams(dim={c.dim}, heads={c.heads}, mlp_ratio={c.mlp_ratio}, dtype={c.dtype}, {len(self)} arrays)"


#: Initialisation per name (docs/reco.md §2, identity at init): zero makes the layer return its query.
_ZERO_INIT = frozenset({"w_o", "b_o", "w_2", "b_2", "e_query"})
_NORMAL_INIT = frozenset({"w_q", "b_q", "w_k", "b_k", "w_v", "b_v", "w_1", "b_1", "e_neighbor"})
INIT_STD = 0.02


#: Default α of the copy init: the query token starts at ``x + α·mean(r_j)`` (the untrained surrogate's form).
COPY_ALPHA = 1.0
INITS = ("identity", "copy")


def init_params(dim: int, heads: int, mlp_ratio: int = 4, seed: int = 0, dtype=np.float32, *, init: str = "identity",
                alpha: float = COPY_ALPHA, k: int = 10, relevance: bool = False, rel_beta: float = 1.0,
                rel_gamma: float = 0.0, rel_center: float = REL_CENTER, rel_width: float = REL_WIDTH,
                rel_source: str = "fixed") -> FusionParams:
    r"""Fresh parameters (docs/reco.md §2): the identity init (default) or the copy init [ours].

    ``init="identity"`` (docs/reco.md §2, required default): ``w_o, b_o, w_2, b_2, e_query`` are zero, so
    ``Y[:, 0] = x`` and the output is ``normalize(x)``; LayerNorm ``gamma = 1, beta = 0``; every other array
    ~ N(0, 0.02). Draws are made in float64 in :data:`PARAM_NAMES` order and then cast, so float32 and
    float64 sets from one seed agree.

    ``init="copy"`` [ours]: the same draws, then

    .. math::

        W_v = I,\quad b_v = 0,\quad e_r = 0,\quad W_o = \frac{\alpha (k+1)}{k \sqrt{D}} I

    LayerNorm maps a unit vector ``r`` to about ``√D (r − mean r)``, so with near-uniform attention over the
    ``k + 1`` tokens the query token outputs about ``x + α·mean_j(r_j)`` (plus ``α/k·x``): the untrained
    surrogate ``normalize(v + α·mean)``, which the identity init cannot represent at step 0.

    ``relevance=True`` adds ``rel_beta`` and ``rel_gamma`` [h] (docs/reco.md §2 "Relevance bias"), filled with the
    given values. ``rel_beta = rel_gamma = 0`` is the paper's layer exactly; under the identity init the output
    is ``x`` whatever they are, and β gets no gradient until ``W_o`` moves, so β starts at 1 by default.

    Parameters
    ----------
    dim, heads, mlp_ratio : int
        Embedding width D, attention heads (must divide D), MLP hidden width ``mlp_ratio * D``.
    seed : int
        Seed of ``numpy.random.default_rng``.
    dtype : float32 or float64
    init : {"identity", "copy"}
    alpha, k : float, int
        The copy init's gain and the neighbour count it is scaled for (ignored by the identity init).
    relevance : bool
    rel_beta, rel_gamma : float
        Initial β and γ of every head (relevance only).
    rel_center, rel_width : float
        Score → feature map ``(s − center)/width`` recorded in the config (see :class:`FusionConfig`).
    rel_source : {"fixed", "memory"}
        Where the map comes from at use time (see :class:`FusionConfig`).

    Returns
    -------
    FusionParams
    """
    if init not in INITS:
        raise ValueError(f"init: expected one of {list(INITS)}, got {init!r}")
    config = FusionConfig(dim=dim, heads=heads, mlp_ratio=mlp_ratio, dtype=np.dtype(dtype).name,
                          relevance=relevance, rel_center=rel_center, rel_width=rel_width, rel_source=rel_source)
    rng = np.random.default_rng(seed)
    dt = np.dtype(config.dtype)
    arrays = {}
    for name, shape in param_shapes(config.dim, config.mlp_ratio).items():
        if name in _ZERO_INIT:
            a = np.zeros(shape)
        elif name in _NORMAL_INIT:
            a = rng.normal(0.0, INIT_STD, size=shape)
        elif name.endswith("_gamma"):
            a = np.ones(shape)
        else:  # LayerNorm beta
            a = np.zeros(shape)
        arrays[name] = a
    if init == "copy":
        for name, v in (("alpha", alpha), ("k", k)):
            if isinstance(v, bool) or not np.isfinite(v) or v <= 0:
                raise ValueError(f"{name}: expected a positive number for the copy init, got {v!r}")
        D = config.dim
        arrays["w_v"] = np.eye(D)
        arrays["b_v"] = np.zeros(D)
        arrays["e_neighbor"] = np.zeros(D)
        arrays["w_o"] = np.eye(D) * (float(alpha) * (k + 1) / (k * np.sqrt(D)))
    if relevance:
        arrays["rel_beta"] = np.full(config.heads, float(rel_beta))
        arrays["rel_gamma"] = np.full(config.heads, float(rel_gamma))
    params = FusionParams({n: arrays[n].astype(dt) for n in config.names}, config)
    if not all(np.isfinite(a).all() for a in params.values()):
        raise ValueError("init_params: a non-finite initial value (rel_beta / rel_gamma / alpha)")
    params._set_stamp(config.dim, dt)  # made here: shapes, dtype and finiteness hold by construction
    return params


def count_params(params: Mapping[str, np.ndarray]) -> int:
    """Total number of scalars in a parameter dict (D=512, h=8, ratio 4 → 3,153,408)."""
    return int(sum(np.asarray(a).size for a in params.values()))
