"""A training loop entirely on the GPU: forward → InfoNCE → backward → AdamW on device arrays, no
copy to the host inside the loop, and the same parameters as the NumPy pipeline after the same steps
(float64, ≤ 1e-10).  Tiny shapes: under the CUDA simulator every GPU thread is a Python thread.

Also with the relevance bias (docs/reco.md §2 "Relevance bias"): ``rel_beta, rel_gamma`` get their gradients from
the backward and are updated by the device AdamW like every other parameter."""

from __future__ import annotations

import numpy as np
import pytest
from fusion_testlib import random_inputs, random_params
from numba import cuda

from reco_ref.fusion import FusionParams, init_params, score_features
from reco_ref.fusion import cuda as fc
from reco_ref.fusion import reference as ref
from reco_ref.train.losses import infonce_backward, infonce_forward
from reco_ref.train.optim import adamw_init, adamw_step

pytestmark = pytest.mark.cuda

B, K, D, H, STEPS, LR = 3, 2, 8, 2, 2, 0.05


def _numpy_loop(params, q, r, mask, t, tau, scores=None):
    params = {n: a.copy() for n, a in params.items()}
    params["tau"] = np.array([tau])
    state = adamw_init(params)
    losses = []
    for _ in range(STEPS):
        out, cache = ref.fusion_forward(params, q, r, mask, heads=H, scores=scores)
        loss, lc = infonce_forward(out, t, float(params["tau"][0]))
        dout, _, dtau = infonce_backward(lc)
        grads = ref.fusion_backward(params, cache, dout)
        grads["tau"] = np.array([dtau])
        adamw_step(params, grads, state, LR)
        losses.append(loss)
    return params, losses


def _relevance_params(rng):
    """Copy-init module with the relevance pair, every array perturbed (float64)."""
    base = init_params(D, H, relevance=True, init="copy", dtype=np.float64, seed=7)
    return FusionParams({n: a + 0.3 * rng.standard_normal(a.shape) for n, a in base.items()}, base.config)


@pytest.mark.parametrize("relevance", [False, True], ids=["plain", "relevance"])
def test_device_resident_loop_matches_numpy_and_stays_on_device(monkeypatch, relevance):
    rng = np.random.default_rng(5)
    params = _relevance_params(rng) if relevance else random_params(D, H, rng)
    q, r, mask = random_inputs(B, K, D, rng, p_valid=0.6)
    t = rng.standard_normal((B, D))
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    scores = None
    if relevance:  # raw cosines → features (s − 1)/0.02, as the front door does
        scores = score_features(params, 0.95 + 0.02 * rng.standard_normal((B, K)), mask)
    want, want_losses = _numpy_loop(params, q, r, mask, t, 2.0, scores)

    dparams = fc.params_to_device(params)
    dparams["tau"] = cuda.to_device(np.array([2.0]))
    dstate = fc.adamw_init_device(dparams)
    dq, dr, dt = cuda.to_device(q), cuda.to_device(r), cuda.to_device(t)
    valid = fc.valid_to_device(mask, B, K)
    dscores = None if scores is None else cuda.to_device(scores)
    one = cuda.to_device(np.array([1.0]))

    # count device → host copies inside the loop (there must be none)
    arr_type = type(dq)
    copies = []
    orig = arr_type.copy_to_host
    monkeypatch.setattr(arr_type, "copy_to_host", lambda self, *a, **kw: copies.append(1) or orig(self, *a, **kw))
    losses = []
    for _ in range(STEPS):
        out, cache = fc.fusion_forward_device(dparams, dq, dr, valid, heads=H, scores=dscores)
        loss, lc = fc.infonce_forward_device(out, dt, dparams["tau"])
        dout, _, dtau = fc.infonce_backward_device(lc, one)
        grads = fc.fusion_backward_device(dparams, cache, dout)
        grads["tau"] = dtau
        fc.adamw_step_device(dparams, grads, dstate, LR)
        losses.append(loss)
    assert copies == [], f"{len(copies)} device→host copies inside the loop"
    monkeypatch.undo()

    got = fc.params_to_host(dparams)
    assert set(got) == set(want)
    if relevance:  # the pair trained: it moved away from its start
        for n in ("rel_beta", "rel_gamma"):
            assert np.abs(got[n] - params[n]).min() > 1e-3, n
    for n, w in want.items():
        err = float(np.abs(got[n] - w).max())
        assert err <= 1e-10, f"{n}: {err:.3g}"
    np.testing.assert_allclose([float(x.copy_to_host()[0]) for x in losses], want_losses, rtol=0, atol=1e-10)
    assert fc.state_to_host(dstate)["step"] == STEPS
