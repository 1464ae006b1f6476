"""Float64 central finite differences for every gradient of the memory-attention classifier (+ numba parity).

Loss = mean cross-entropy of the logits. Every parameter entry and every input entry (query, keys, values)
is perturbed by ±1e-6; the analytic gradient must agree to 1e-7 relative (per array, L2 norms). ``b_k`` and
``lnk_beta`` are the exceptions the math predicts: both add the same vector to every key, the one query
token turns that into the same shift of every score, and softmax is invariant to it — so their analytic
gradients are checked to be 0 (round-off) and the finite differences to be round-off too.
"""

from __future__ import annotations

import numpy as np
import pytest

from classify_testlib import central_differences, random_case
from reco_ref.classify import reference
from reco_ref.classify.model import classify_backward, classify_forward, cross_entropy_backward, \
    cross_entropy_forward, init_params
from reco_ref.errors import BackendUnavailableError, ShapeError

TOL = 1e-7
EPS = 1e-6


SCALE = 2.5  # a logit scale != 1, so its place in the backward is checked too


def _loss(P, q, K, V, valid, y, heads, attention):
    logits, _ = reference.classify_forward(P, q, K, V, valid, heads=heads, attention=attention, logit_scale=SCALE)
    return reference.cross_entropy_forward(logits, y)[0]


@pytest.mark.parametrize("attention, memory, heads", [("softmax", True, 1), ("softmax", True, 2),
                                                      ("uniform", True, 2), ("softmax", False, 2)])
def test_fd_every_gradient(attention, memory, heads):
    rng = np.random.default_rng([7, heads, memory, len(attention)])
    P, q, K, V, valid, y = random_case(rng, attention=attention, memory=memory, heads=heads)
    logits, cache = reference.classify_forward(P, q, K, V, valid, heads=heads, attention=attention,
                                               logit_scale=SCALE)
    _, ce = reference.cross_entropy_forward(logits, y)
    g = reference.classify_backward(P, cache, reference.cross_entropy_backward(ce), return_input_grads=True)
    arrays = dict(P, query=q) if not memory else dict(P, query=q, keys=K, values=V)
    assert set(g) == set(arrays)
    for name, arr in arrays.items():
        num = central_differences(lambda: _loss(P, q, K, V, valid, y, heads, attention), arr, EPS)
        if name in ("b_k", "lnk_beta"):
            assert np.abs(g[name]).max() <= 1e-12, name and np.abs(num).max() <= 1e-8
            continue
        err = np.linalg.norm(g[name] - num) / max(np.linalg.norm(num), 1e-8)
        assert err <= TOL, (name, err)
    if memory:  # the row without items and the masked slots get no gradient through the memory
        assert not g["values"][~valid].any() and not g["keys"][~valid].any()


def test_zero_init_output_is_the_no_memory_classifier():
    rng = np.random.default_rng(0)
    _, q, K, V, valid, _ = random_case(rng)
    P = init_params(6, 4, key_dim=5, value_dim=7, width=8, heads=2, dtype=np.float64)
    with_mem, _ = classify_forward(P, q, K, V, valid, heads=2)
    without, _ = classify_forward({"w_c": P["w_c"], "b_c": P["b_c"]}, q)
    assert np.array_equal(with_mem, without)


@pytest.mark.parametrize("dtype, atol", [(np.float64, 1e-12), (np.float32, 1e-4)])
@pytest.mark.parametrize("attention", ["softmax", "uniform"])
def test_numba_matches_reference(dtype, atol, attention):
    rng = np.random.default_rng(3)
    P, q, K, V, valid, y = random_case(rng, B=9, k=7, D=16, Dk=12, Dv=10, W=16, heads=4, attention=attention,
                                       dtype=dtype)
    out = {}
    for backend in ("numpy", "numba"):
        logits, cache = classify_forward(P, q, K, V, valid, heads=4, attention=attention, logit_scale=3.0,
                                         backend=backend)
        _, ce = cross_entropy_forward(logits, y)
        out[backend] = logits, classify_backward(P, cache, cross_entropy_backward(ce), return_input_grads=True)
    np.testing.assert_allclose(out["numba"][0], out["numpy"][0], atol=atol, rtol=1e-5 if dtype == np.float32 else 0)
    assert set(out["numba"][1]) == set(out["numpy"][1])
    for name, ref in out["numpy"][1].items():
        assert out["numba"][1][name].dtype == dtype
        np.testing.assert_allclose(out["numba"][1][name], ref, atol=atol, rtol=1e-5 if dtype == np.float32 else 0,
                                   err_msg=name)


def test_bad_inputs_raise_one_line_errors():
    rng = np.random.default_rng(1)
    P, q, K, V, valid, _ = random_case(rng)
    with pytest.raises(ShapeError, match="keys"):
        classify_forward(P, q, K[:, :, :3], V, valid, heads=2)
    with pytest.raises(ShapeError, match="dtype"):
        classify_forward(P, q.astype(np.float32), K, V, valid, heads=2)
    with pytest.raises(BackendUnavailableError, match="classify backend"):
        classify_forward(P, q, K, V, valid, heads=2, backend="tpu")
