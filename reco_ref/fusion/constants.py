"""Numerical constants of the fusion layer and the InfoNCE loss, defined once (docs/reco.md §2, §3).

Every backend (:mod:`reco_ref.fusion.reference`, ``numba_cpu``, ``cuda/``), the training loss and the weights
file (:mod:`reco_ref.reco.weights`) import them from here, so the backends cannot drift apart on, say, the
LayerNorm epsilon.
"""

from __future__ import annotations

import math

__all__ = ["LN_EPS", "GELU_INV_SQRT2", "GELU_INV_SQRT_2PI", "MAX_SCALE", "DEFAULT_TAU"]

#: LayerNorm epsilon added to the biased variance (docs/reco.md §2; torch's default).
LN_EPS = 1e-5
#: 1/√2, the argument scale of the exact GELU: GELU(u) = ½ u (1 + erf(u/√2)).
GELU_INV_SQRT2 = 1.0 / math.sqrt(2.0)
#: 1/√(2π), the normal density's constant in GELU'(u) = Φ(u) + u φ(u).
GELU_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
#: Clamp of the InfoNCE scale s = min(exp τ, MAX_SCALE) (docs/reco.md §3, as CLIP).
MAX_SCALE = 100.0
#: τ at initialisation: log(1/0.07), as CLIP (docs/reco.md §3); the loss and the weights file both start from it.
DEFAULT_TAU = math.log(1.0 / 0.07)
