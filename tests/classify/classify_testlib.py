"""Shared helpers for tests/classify: random non-identity parameters and inputs, and a tiny fake encoder."""

from __future__ import annotations

import numpy as np

from reco_ref.classify.model import init_params


def random_case(rng, *, B=4, k=5, D=6, Dk=5, Dv=7, W=8, C=4, heads=2, attention="softmax", memory=True,
                dtype=np.float64, p_valid=0.7):
    """Parameters perturbed away from the init (W_o = 0 would hide the attention's gradients) and inputs."""
    P = init_params(D, C, key_dim=Dk, value_dim=Dv, width=W, heads=heads, attention=attention, memory=memory,
                    seed=int(rng.integers(1 << 30)), dtype=dtype)
    for n in P:
        P[n] = (P[n] + 0.5 * rng.standard_normal(P[n].shape)).astype(dtype)
    q = rng.standard_normal((B, D)).astype(dtype)
    K = rng.standard_normal((B, k, Dk)).astype(dtype)
    V = rng.standard_normal((B, k, Dv)).astype(dtype)
    valid = rng.random((B, k)) < p_valid
    valid[0] = False  # a row without any retrieved item (empty or fully excluded memory)
    if B > 1:
        valid[1] = True
    y = rng.integers(0, C, B)
    return P, q, K, V, valid, y
