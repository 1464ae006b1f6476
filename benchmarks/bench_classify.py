"""Training steps/s of the memory-attention classifier, numpy vs numba, in ONE run (ratios are what matter).

Reproduce::

    python3 -m pytest benchmarks/bench_classify.py --benchmark-only -q

One training step = forward + cross-entropy + backward + AdamW update on a batch of retrieved items already
gathered (the memory search is the same code for both backends and is left out). Shape: the reco-mini
experiments' — B = 128 queries, k = 10 items (10 % of slots masked), D = 768, key dim 1024, text values 768,
attention width 64 with 4 heads, logit scale 32, C = 100 classes; float32. Backends are called through the front door
(:func:`reco_ref.classify.model.classify_forward`), the same calls the training loop makes.
"""

from __future__ import annotations

import numpy as np
import pytest

from reco_ref.classify.model import classify_backward, classify_forward, cross_entropy_backward, \
    cross_entropy_forward, init_params
from reco_ref.train.optim import adamw_init, adamw_step

B, K, D, DK, C, WIDTH, HEADS = 128, 10, 768, 1024, 100, 64, 4
RESULTS: dict[str, float] = {}


def _batch():
    rng = np.random.default_rng(0)
    unit = lambda *s: (lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True))(  # noqa: E731
        rng.standard_normal(s)).astype(np.float32)
    return unit(B, D), unit(B, K, DK), unit(B, K, D), rng.random((B, K)) > 0.1, rng.integers(0, C, B)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_train_step(benchmark, backend):
    q, keys, vals, valid, y = _batch()
    params = init_params(D, C, key_dim=DK, value_dim=D, width=WIDTH, heads=HEADS, seed=0)
    params["w_o"] += 0.01  # away from the zero init, so every gradient is non-trivial
    state = adamw_init(params)

    def step():
        logits, cache = classify_forward(params, q, keys, vals, valid, heads=HEADS, logit_scale=32.0, backend=backend)
        _, ce = cross_entropy_forward(logits, y)
        grads = classify_backward(params, cache, cross_entropy_backward(ce))
        adamw_step(params, grads, state, 1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4)

    step()  # numba compiles (cached) on first use; not timed
    benchmark.pedantic(step, rounds=7, iterations=1, warmup_rounds=1)
    RESULTS[backend] = benchmark.stats.stats.median
    if len(RESULTS) == 2:
        print(f"\nclassify train step (B={B}, k={K}): numpy {1 / RESULTS['numpy']:.1f} steps/s, numba "
              f"{1 / RESULTS['numba']:.1f} steps/s, numba/numpy speed-up {RESULTS['numpy'] / RESULTS['numba']:.2f}×")
