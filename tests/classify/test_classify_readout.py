"""The score readout [ours] (``reco_ref.classify.reference.score_readout_*`` through the model front door).

Float64 central differences of every trained array and input (β, log s_v, the module's parameters, query, keys,
values, scores) with the readout on top of softmax / uniform attention and with no attention module
(``attention="none"``); the class prompts get no gradient; numba = numpy; a PyTorch autograd oracle where torch is
installed; at β → ∞ and a strong s_v the readout is the nearest item's vote.
"""

from __future__ import annotations

import numpy as np
import pytest

from classify_testlib import central_differences, random_case
from reco_ref.classify.model import classify_backward, classify_forward, cross_entropy_backward, \
    cross_entropy_forward, init_params
from reco_ref.errors import ShapeError

EPS, TOL, SCALE = 1e-6, 1e-7, 2.5


def _case(rng, attention, Dt=5, C=4, dtype=np.float64):
    P, q, K, V, valid, y = random_case(rng, attention="softmax" if attention == "none" else attention, C=C,
                                       dtype=dtype)
    T = rng.standard_normal((C, Dt)).astype(dtype)
    R = init_params(q.shape[1], C, key_dim=K.shape[2], value_dim=V.shape[2], width=8, heads=2,
                    attention=attention, class_text=T, dtype=dtype)
    P = {n: P.get(n, R[n]) for n in R}  # the module's perturbed arrays where it has them, the readout's own
    P["ro_beta"] = np.array([1.7], dtype)  # moderate: the softmax over scores is not saturated
    P["ro_log_sv"] = np.array([0.3], dtype)
    scores = rng.uniform(-1, 1, valid.shape).astype(dtype)
    return P, q, K, V, valid, y, scores


def _loss(P, q, K, V, valid, y, scores, attention, backend="numpy"):
    logits, _ = classify_forward(P, q, K, V, valid, heads=2, attention=attention, logit_scale=SCALE,
                                 backend=backend, scores=scores)
    return cross_entropy_forward(logits, y)[0]


@pytest.mark.parametrize("attention", ["softmax", "uniform", "none"])
def test_fd_every_gradient_with_the_readout(attention):
    rng = np.random.default_rng([11, len(attention)])
    P, q, K, V, valid, y, sc = _case(rng, attention)
    logits, cache = classify_forward(P, q, K, V, valid, heads=2, attention=attention, logit_scale=SCALE, scores=sc)
    _, ce = cross_entropy_forward(logits, y)
    g = classify_backward(P, cache, cross_entropy_backward(ce), return_input_grads=True)
    assert "ro_class_text" not in g  # the class prompts are fixed
    arrays = {n: a for n, a in P.items() if n != "ro_class_text"} | {"query": q, "values": V, "scores": sc}
    if attention == "softmax":
        arrays["keys"] = K
    vname = "values" if attention != "none" else "values_text"
    for name, arr in arrays.items():
        num = central_differences(lambda: _loss(P, q, K, V, valid, y, sc, attention), arr, EPS)
        if name in ("b_k", "lnk_beta"):
            continue  # exactly gradient-free (one query token): checked in test_classify_gradcheck
        got = g[vname] if name == "values" else g[name]
        if name == "values" and attention == "none":
            num = num[..., :got.shape[-1]]  # the readout reads the first Dt columns only
        err = np.linalg.norm(got - num) / max(np.linalg.norm(num), 1e-8)
        assert err <= TOL, (name, err)
    assert not g["scores"][~valid].any()  # masked items get no gradient


def test_numba_equals_numpy_with_the_readout():
    pytest.importorskip("numba")
    rng = np.random.default_rng(5)
    P, q, K, V, valid, y, sc = _case(rng, "softmax")
    a, ca = classify_forward(P, q, K, V, valid, heads=2, logit_scale=SCALE, scores=sc)
    b, cb = classify_forward(P, q, K, V, valid, heads=2, logit_scale=SCALE, scores=sc, backend="numba")
    assert np.abs(a - b).max() <= 1e-12
    d = cross_entropy_backward(cross_entropy_forward(a, y)[1])
    ga, gb = classify_backward(P, ca, d), classify_backward(P, cb, d)
    for n in ga:
        assert np.abs(ga[n] - gb[n]).max() <= 1e-10 * max(1.0, np.abs(ga[n]).max()), n


def test_torch_oracle_of_the_readout():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(9)
    P, q, K, V, valid, y, sc = _case(rng, "none")
    logits, cache = classify_forward(P, q, K, V, valid, heads=2, attention="none", logit_scale=SCALE, scores=sc)
    g = classify_backward(P, cache, cross_entropy_backward(cross_entropy_forward(logits, y)[1]))
    t = {n: torch.tensor(a, requires_grad=n in ("w_c", "b_c", "ro_beta", "ro_log_sv")) for n, a in P.items()}
    qt, vt, st = torch.tensor(q), torch.tensor(V[..., :P["ro_class_text"].shape[1]]), torch.tensor(sc)
    z = (t["ro_beta"] * st).masked_fill(~torch.tensor(valid), float("-inf"))
    a = torch.nan_to_num(torch.softmax(z, dim=1), nan=0.0)  # a row without items: all zero
    out = SCALE * qt @ t["w_c"] + t["b_c"] + torch.exp(t["ro_log_sv"]) * (torch.einsum("bk,bkd->bd", a, vt)
                                                                          @ t["ro_class_text"].T)
    assert np.abs(out.detach().numpy() - logits).max() <= 1e-12
    torch.nn.functional.cross_entropy(out, torch.tensor(y)).backward()
    for n in ("w_c", "b_c", "ro_beta", "ro_log_sv"):
        assert np.abs(t[n].grad.numpy() - g[n]).max() <= 1e-10, n


def test_a_sharp_readout_is_the_nearest_items_vote_and_bad_inputs_are_named():
    rng = np.random.default_rng(3)
    C, Dt = 3, 4
    T = np.eye(C, Dt)
    P = init_params(6, C, key_dim=5, value_dim=Dt, width=8, heads=2, attention="none", class_text=T)
    P["w_c"][...] = 0
    P["ro_beta"][...] = 1e4
    labels = rng.integers(0, C, (2, 5))
    V = T[labels].astype(np.float32)  # each item's caption = its class prompt
    sc = rng.uniform(0, 1, (2, 5)).astype(np.float32)
    q = rng.standard_normal((2, 6)).astype(np.float32)
    K = rng.standard_normal((2, 5, 5)).astype(np.float32)
    logits, _ = classify_forward(P, q, K, V, None, heads=2, attention="none", scores=sc)
    assert (logits.argmax(1) == labels[np.arange(2), sc.argmax(1)]).all()
    with pytest.raises(ShapeError, match="search scores"):
        classify_forward(P, q, K, V, None, heads=2, attention="none")
    with pytest.raises(ShapeError, match="NaN"):
        classify_forward(P, q, K, V, None, heads=2, attention="none", scores=np.full((2, 5), np.nan, np.float32))
    with pytest.raises(ShapeError, match="class_text"):
        init_params(6, C, attention="none")
