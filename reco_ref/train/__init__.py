"""Training RECO's fusion modules on precomputed (frozen-encoder) embeddings (docs/reco.md §3).

* :mod:`reco_ref.train.losses` — symmetric InfoNCE with a learnable, clamped temperature
  (``infonce_forward / infonce_backward``) and the three-term RECO loss
  (``reco_loss_forward / reco_loss_backward``); backends ``numpy | numba | cuda``.
* :mod:`reco_ref.train.optim` — AdamW (decay on matrices only) and ``lr_at`` (linear warm-up, cosine).
* :mod:`reco_ref.train.pairs` — training pairs from memory rows, neighbours resolved once (self-exclusion,
  near-duplicate filter), unique-caption batches, multi-source interleaving.
* :mod:`reco_ref.train.loop` — ``train(sources, out, TrainConfig(...), val=...)``: the loop, validation,
  best-on-validation selection; :mod:`reco_ref.train.recipe` — what defines a run (``TrainConfig``, ``ValSet``,
  ``TrainResult``); :mod:`reco_ref.train.checkpoint` — atomic checkpoints, bit-identical resume.
* :mod:`reco_ref.train.mlp` — the equal-parameter-count MLP control (forward + hand-written backward).

What training writes, the weights file (:class:`~reco_ref.reco.weights.RecoWeights`), and applying it
(``refine``: retrieve → fuse) are the model, in :mod:`reco_ref.reco`.
"""

from .losses import (  # noqa: F401
    DEFAULT_TAU,
    MAX_SCALE,
    infonce_backward,
    infonce_forward,
    reco_loss_backward,
    reco_loss_forward,
)
from .optim import adamw_init, adamw_step, lr_at  # noqa: F401

__all__ = [
    "DEFAULT_TAU",
    "MAX_SCALE",
    "infonce_forward",
    "infonce_backward",
    "reco_loss_forward",
    "reco_loss_backward",
    "adamw_init",
    "adamw_step",
    "lr_at",
]
