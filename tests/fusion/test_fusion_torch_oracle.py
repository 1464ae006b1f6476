"""Independent oracle: the same layer written with PyTorch ops, differentiated by autograd (float64).

Forward and every gradient (18 parameters + both inputs) must agree with the NumPy reference to
≤ 1e-10 absolute. Skipped, with the reason, where torch is not installed (CI installs ``.[oracle]``).
"""

from __future__ import annotations

import numpy as np
import pytest

from fusion_testlib import random_inputs, random_params, single_blas_thread
from reco_ref.fusion import PARAM_NAMES, fusion_backward, fusion_forward

torch = pytest.importorskip("torch", reason="PyTorch oracle not installed (pip install -e '.[oracle]')")
F = torch.nn.functional

pytestmark = pytest.mark.oracle
ATOL = 1e-10
MAX_ABS = {"value": 0.0}


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    with single_blas_thread():
        yield


def torch_fusion(P, x, r, mask, heads):
    """RECO fusion layer with torch ops (pre-LN, masked MHSA, exact GELU, read-out at token 0)."""
    B, D = x.shape
    k = r.shape[1]
    dh = D // heads
    X = torch.cat([(x + P["e_query"])[:, None, :], r + P["e_neighbor"]], dim=1)  # [B, T, D]
    T = k + 1
    A1 = F.layer_norm(X, (D,), P["ln1_gamma"], P["ln1_beta"], eps=1e-5)

    def heads_of(z):
        return z.view(B, T, heads, dh).transpose(1, 2)  # [B, h, T, dh]

    Q = heads_of(A1 @ P["w_q"] + P["b_q"])
    K = heads_of(A1 @ P["w_k"] + P["b_k"])
    V = heads_of(A1 @ P["w_v"] + P["b_v"])
    S = Q @ K.transpose(-1, -2) / dh**0.5
    keep = torch.cat([torch.ones(B, 1, dtype=torch.bool), mask], dim=1)  # [B, T]
    S = S.masked_fill(~keep[:, None, None, :], float("-inf"))
    Pm = torch.softmax(S, dim=-1)
    O = (Pm @ V).transpose(1, 2).reshape(B, T, D) @ P["w_o"] + P["b_o"]
    H = X + O
    A2 = F.layer_norm(H, (D,), P["ln2_gamma"], P["ln2_beta"], eps=1e-5)
    Y = H + F.gelu(A2 @ P["w_1"] + P["b_1"], approximate="none") @ P["w_2"] + P["b_2"]
    return F.normalize(Y[:, 0], dim=-1, eps=0.0)


@pytest.mark.parametrize("seed", range(10))
def test_forward_and_every_gradient_match_torch(seed):
    rng = np.random.default_rng(500 + seed)
    D = [8, 16, 32][seed % 3]
    heads = [1, 2, 4][(seed // 2) % 3]
    B = int(rng.integers(1, 9))
    k = 0 if seed == 3 else int(rng.integers(1, 17))
    params = random_params(D, heads, rng)
    q, r, mask = random_inputs(B, k, D, rng, p_valid=0.6)
    dout = rng.standard_normal((B, D))

    out, cache = fusion_forward(params, q, r, mask)
    grads = fusion_backward(params, cache, dout, return_input_grads=True)

    P = {n: torch.tensor(params[n], requires_grad=True) for n in PARAM_NAMES}
    xt = torch.tensor(q, requires_grad=True)
    rt = torch.tensor(r, requires_grad=True)
    out_t = torch_fusion(P, xt, rt, torch.tensor(mask), heads)
    (out_t * torch.tensor(dout)).sum().backward()

    worst = float(np.abs(out - out_t.detach().numpy()).max())
    assert worst <= ATOL, f"forward differs by {worst:.3g}"
    theirs = {**{n: P[n].grad for n in PARAM_NAMES}, "query": xt.grad, "retrieved": rt.grad}
    for name, g_t in theirs.items():
        g_t = np.zeros_like(grads[name]) if g_t is None else g_t.numpy()
        diff = float(np.abs(grads[name] - g_t).max()) if g_t.size else 0.0
        worst = max(worst, diff)
        assert diff <= ATOL, f"{name}: |numpy − torch| = {diff:.3g}"
    MAX_ABS["value"] = max(MAX_ABS["value"], worst)


def test_oracle_is_sensitive():
    """A deliberately wrong layer (GELU tanh approximation) is told apart by the same tolerance."""
    rng = np.random.default_rng(0)
    params = random_params(16, 2, rng)
    q, r, mask = random_inputs(4, 5, 16, rng)
    out, _ = fusion_forward(params, q, r, mask)
    P = {n: torch.tensor(params[n]) for n in PARAM_NAMES}
    orig = F.gelu
    try:
        F.gelu = lambda u, approximate="none": orig(u, approximate="tanh")
        wrong = torch_fusion(P, torch.tensor(q), torch.tensor(r), torch.tensor(mask), 2).numpy()
    finally:
        F.gelu = orig
    assert np.abs(out - wrong).max() > ATOL


def test_report_max_abs():
    if not MAX_ABS["value"]:
        pytest.skip("run together with test_forward_and_every_gradient_match_torch")
    print(f"\nfusion numpy vs torch autograd: max abs diff {MAX_ABS['value']:.2e}")
