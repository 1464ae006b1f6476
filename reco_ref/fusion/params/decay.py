"""An optimiser rule that belongs to the parameters: which of them AdamW decays (matrices, not vectors).

It lives with the parameters so the NumPy AdamW (:mod:`reco_ref.train.optim`) and the device AdamW
(:mod:`reco_ref.fusion.cuda.adamw`) apply one rule without the fusion room importing the training room.
"""

from __future__ import annotations

import numpy as np


def adamw_decays(name: str, p: np.ndarray, decay=None) -> bool:
    """Whether weight decay applies to parameter ``name``.

    ``decay`` is ``None`` (default: matrices only, ``ndim >= 2`` — LayerNorm, biases, type embeddings
    and scalars like τ are not decayed), a collection of names, or a callable ``(name, array) -> bool``.
    """
    if decay is None:
        return p.ndim >= 2
    if callable(decay):
        return bool(decay(name, p))
    return name in decay
