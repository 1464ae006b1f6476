"""Independent oracle: the memory-attention classifier written with PyTorch ops, differentiated by autograd.

Forward and every gradient (parameters and inputs) must agree with the NumPy reference to 1e-10 (float64).
Skipped, with the reason, where torch is not installed.
"""

from __future__ import annotations

import numpy as np
import pytest

from classify_testlib import random_case
from reco_ref.classify import reference

torch = pytest.importorskip("torch", reason="PyTorch oracle not installed (pip install -e '.[oracle]')")
F = torch.nn.functional
pytestmark = pytest.mark.oracle


def torch_classify(P, q, K, V, valid, y, heads, attention):
    B, k, _ = K.shape
    Vp = F.layer_norm(V, (V.shape[-1],), P["lnv_gamma"], P["lnv_beta"], eps=1e-5) @ P["w_v"] + P["b_v"]
    W = Vp.shape[-1]
    if attention == "uniform":
        w = valid.double() / valid.double().sum(1, keepdim=True).clamp(min=1)
        c = (w[:, :, None] * Vp).sum(1)
    else:
        dh = W // heads
        Q = F.layer_norm(q, (q.shape[-1],), P["lnq_gamma"], P["lnq_beta"], eps=1e-5) @ P["w_q"] + P["b_q"]
        Kp = F.layer_norm(K, (K.shape[-1],), P["lnk_gamma"], P["lnk_beta"], eps=1e-5) @ P["w_k"] + P["b_k"]
        Qh = Q.view(B, 1, heads, dh).transpose(1, 2)  # [B, h, 1, dh]
        Kh = Kp.view(B, k, heads, dh).transpose(1, 2)
        Vh = Vp.view(B, k, heads, dh).transpose(1, 2)
        S = (Qh @ Kh.transpose(-1, -2) / dh**0.5).masked_fill(~valid[:, None, None, :], float("-inf"))
        A = torch.nan_to_num(torch.softmax(S, dim=-1))  # a row without items: all -inf → 0, as the reference
        c = (A @ Vh).transpose(1, 2).reshape(B, W)
    z = q + c @ P["w_o"] + P["b_o"]
    logits = 4.0 * z @ P["w_c"] + P["b_c"]  # logit scale s = 4
    return logits, F.cross_entropy(logits, y)


@pytest.mark.parametrize("attention", ["softmax", "uniform"])
def test_autograd_oracle(attention):
    rng = np.random.default_rng(11)
    P, q, K, V, valid, y = random_case(rng, B=6, k=5, D=8, Dk=6, Dv=10, W=8, C=5, heads=2, attention=attention)
    logits, cache = reference.classify_forward(P, q, K, V, valid, heads=2, attention=attention, logit_scale=4.0)
    loss, ce = reference.cross_entropy_forward(logits, y)
    g = reference.classify_backward(P, cache, reference.cross_entropy_backward(ce), return_input_grads=True)
    T = {n: torch.tensor(a, requires_grad=True) for n, a in dict(P, query=q, keys=K, values=V).items()}
    tl, tloss = torch_classify(T, T["query"], T["keys"], T["values"], torch.tensor(valid), torch.tensor(y), 2,
                               attention)
    tloss.backward()
    np.testing.assert_allclose(logits, tl.detach().numpy(), atol=1e-10, rtol=0)
    assert abs(loss - tloss.item()) < 1e-10
    for name, t in T.items():
        tg = np.zeros_like(t.detach().numpy()) if t.grad is None else t.grad.numpy()
        np.testing.assert_allclose(g[name], tg, atol=1e-10, rtol=0, err_msg=name)
