"""Helpers for tests/export: fusion weights that are not the identity (trained weights come from elsewhere)."""

from __future__ import annotations

import numpy as np

from reco_ref.fusion import FusionParams, init_params


def nonidentity_params(D: int, heads: int, seed: int) -> FusionParams:
    """``init_params`` with its zero-initialised arrays (W_o, W_2, b_o, b_2, e_q) drawn too, so φ moves its query."""
    p = init_params(D, heads, seed=seed)
    rng = np.random.default_rng(seed + 100)
    for name in ("w_o", "w_2"):
        p[name][...] = rng.normal(0, 1 / np.sqrt(p[name].shape[0]), p[name].shape)
    for name in ("b_o", "b_2", "e_query"):
        p[name][...] = rng.normal(0, 0.05, p[name].shape)
    return p
