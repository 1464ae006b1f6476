"""What a fusion module is made of: the array names, :class:`FusionConfig`, the shape of every array.

D = ``dim`` (embedding width), h = ``heads``, R = ``mlp_ratio * D`` (MLP hidden width).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from ...errors import RecoError

#: The fusion layer's parameter names, in the spec's order (row-vector convention, W is [in, out]).
PARAM_NAMES = (
    "ln1_gamma", "ln1_beta",
    "w_q", "b_q", "w_k", "b_k", "w_v", "b_v", "w_o", "b_o",
    "ln2_gamma", "ln2_beta",
    "w_1", "b_1", "w_2", "b_2",
    "e_query", "e_neighbor",
)  # fmt: skip

#: The optional relevance-bias parameters (docs/reco.md §2 "Relevance bias" [ours]): per head, ``β [h]`` scales the
#: search score of each neighbour in the attention logits toward it, ``γ [h]`` is the logit toward the query's own
#: token. A module has them exactly when its config says ``relevance=True``; ``β = γ = 0`` is the paper's layer.
RELEVANCE_NAMES = ("rel_beta", "rel_gamma")
#: Default score map ``(s − REL_CENTER) / REL_WIDTH`` of a relevance module (see :class:`FusionConfig`).
REL_CENTER, REL_WIDTH = 1.0, 0.02
#: Where a relevance module's score map comes from: its config (``"fixed"``) or the searched memory (``"memory"``).
REL_SOURCES = ("fixed", "memory")

#: the float dtypes a module's arrays may have
DTYPES = ("float32", "float64")


@dataclass(frozen=True)
class FusionConfig:
    """What a parameter set needs besides its arrays.

    Attributes
    ----------
    dim : int
        Embedding width D.
    heads : int
        Attention heads h; must divide ``dim``.
    mlp_ratio : int
        MLP hidden width is ``mlp_ratio * dim`` (spec default 4).
    dtype : str
        ``"float32"`` or ``"float64"``.
    relevance : bool
        The module has the relevance bias (arrays ``rel_beta, rel_gamma [h]``) and takes search scores.
    rel_center, rel_width : float
        How a raw search score (cosine) ``s`` becomes the bias feature ``(s - rel_center) / rel_width`` that
        ``β`` multiplies. The default centre 1 measures each neighbour's distance from a perfect match, so the
        feature keeps the *absolute* level of the scores (the query logit ``γ`` can win when every neighbour is
        far); the width 0.02 makes one unit a typical gap between close neighbours, so ``β`` is of order 1.
    rel_source : str
        ``"fixed"`` (default): the map's centre and width are ``rel_center, rel_width``. ``"memory"`` [ours]: they
        are measured on the memory being searched, at use time (:func:`reco_ref.memory.score_map.memory_score_map`:
        centre = the median nearest-other-row cosine, width = its robust spread), so ``f = 0`` means
        "as close as a typical neighbour inside *this* memory" whatever memory the weights were trained on;
        ``rel_center, rel_width`` then record the training memory's map (what a caller without a memory, e.g. an
        exported graph's user, would pass).
    """

    dim: int
    heads: int
    mlp_ratio: int = 4
    dtype: str = "float32"
    relevance: bool = False
    rel_center: float = REL_CENTER
    rel_width: float = REL_WIDTH
    rel_source: str = "fixed"

    def __post_init__(self):
        for field in ("dim", "heads", "mlp_ratio"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"FusionConfig.{field}: expected a positive int, got {v!r}")
            object.__setattr__(self, field, int(v))
        if self.dim % self.heads:
            raise ValueError(f"FusionConfig: heads={self.heads} does not divide dim={self.dim}")
        dt = np.dtype(self.dtype).name
        if dt not in DTYPES:
            raise ValueError(f"FusionConfig.dtype: expected float32 or float64, got {self.dtype!r}")
        object.__setattr__(self, "dtype", dt)
        if not isinstance(self.relevance, (bool, np.bool_)):
            raise ValueError(f"FusionConfig.relevance: expected a bool, got {self.relevance!r}")
        object.__setattr__(self, "relevance", bool(self.relevance))
        for field in ("rel_center", "rel_width"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) or not np.isfinite(v):
                raise ValueError(f"FusionConfig.{field}: expected a finite number, got {v!r}")
            object.__setattr__(self, field, float(v))
        if self.rel_width <= 0:
            raise ValueError(f"FusionConfig.rel_width: expected > 0, got {self.rel_width!r}")
        if self.rel_source not in REL_SOURCES:
            raise ValueError(f"FusionConfig.rel_source: expected one of {list(REL_SOURCES)}, got {self.rel_source!r}")
        if self.rel_source != "fixed" and not self.relevance:
            raise ValueError("FusionConfig.rel_source: 'memory' needs relevance=True")

    @property
    def names(self) -> tuple[str, ...]:
        """The array names of a module with this config: the 18 of :data:`PARAM_NAMES` (+ the relevance pair)."""
        return PARAM_NAMES + RELEVANCE_NAMES if self.relevance else PARAM_NAMES

    def to_json(self) -> dict:
        out = {"dim": self.dim, "heads": self.heads, "mlp_ratio": self.mlp_ratio, "dtype": self.dtype}
        if self.relevance:  # absent = the paper's layer; files without it read as before
            out["relevance"] = {"center": self.rel_center, "width": self.rel_width}
            if self.rel_source != "fixed":  # absent = fixed; files written before the option read as before
                out["relevance"]["source"] = self.rel_source
        return out


def param_shapes(dim: int, mlp_ratio: int = 4, heads: int | None = None) -> dict[str, tuple[int, ...]]:
    """The shape of every parameter for width ``dim`` and MLP ratio ``mlp_ratio``.

    With ``heads`` given, the relevance pair ``rel_beta, rel_gamma [heads]`` is included too."""
    D, R = int(dim), int(dim) * int(mlp_ratio)
    rel = {} if heads is None else {"rel_beta": (int(heads),), "rel_gamma": (int(heads),)}
    return {
        "ln1_gamma": (D,), "ln1_beta": (D,),
        "w_q": (D, D), "b_q": (D,), "w_k": (D, D), "b_k": (D,),
        "w_v": (D, D), "b_v": (D,), "w_o": (D, D), "b_o": (D,),
        "ln2_gamma": (D,), "ln2_beta": (D,),
        "w_1": (D, R), "b_1": (R,), "w_2": (R, D), "b_2": (D,),
        "e_query": (D,), "e_neighbor": (D,),
    } | rel  # fmt: skip


def config_shapes(config: FusionConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of every array of a module with ``config`` (the relevance pair when ``config.relevance``)."""
    return param_shapes(config.dim, config.mlp_ratio, config.heads if config.relevance else None)


def relevance_of(params: Mapping[str, np.ndarray]) -> tuple[float, float] | None:
    """``(center, width)`` of the score map ``(s − center)/width`` when ``params`` has the relevance pair, else ``None``.

    A :class:`FusionParams` answers from its config (and must hold the pair exactly when its config says so);
    a plain dict holding ``rel_beta`` gets the defaults of :class:`FusionConfig` (centre 1, width 0.02)."""
    config = getattr(params, "config", None)
    has = RELEVANCE_NAMES[0] in params or RELEVANCE_NAMES[1] in params
    if config is not None:
        if config.relevance != has:
            raise RecoError(f"params: config.relevance is {config.relevance} but the relevance arrays "
                            f"{list(RELEVANCE_NAMES)} are {'present' if has else 'absent'}")
        return (config.rel_center, config.rel_width) if has else None
    if not has:
        return None
    return REL_CENTER, REL_WIDTH
