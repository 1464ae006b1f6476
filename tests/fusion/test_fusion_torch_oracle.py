"""Independent oracle: the same layer written with PyTorch ops, differentiated by autograd (float64).

Forward and every gradient (18 parameters + both inputs) must agree with the NumPy reference to
≤ 1e-10 absolute. Skipped, with the reason, where torch is not installed (CI installs ``.[oracle]``).

The relevance bias (docs/reco.md §2 "Relevance bias" [ours]) has its own torch version: the per-head logit bias
``γ_h`` toward token 0 and ``β_h·(s_j − center)/width`` toward neighbour j, added to ``QKᵀ/√d_h`` before the
mask, written from the spec (the score map included, so the front door's ``score_features`` is checked
too). Forward and all 20 parameter gradients plus both inputs agree to ≤ 1e-10 on 10 random configurations.
"""

from __future__ import annotations

import numpy as np
import pytest

from fusion_testlib import random_inputs, random_params, random_rel_params, random_scores, single_blas_thread
from reco_ref.fusion import PARAM_NAMES, RELEVANCE_NAMES, fusion_backward, fusion_forward

torch = pytest.importorskip("torch", reason="PyTorch oracle not installed (pip install -e '.[oracle]')")
F = torch.nn.functional

pytestmark = pytest.mark.oracle
ATOL = 1e-10
MAX_ABS = {"value": 0.0}


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    with single_blas_thread():
        yield


def torch_fusion(P, x, r, mask, heads, raw_scores=None, center=1.0, width=0.02, logit_bias=None):
    """RECO fusion layer with torch ops (pre-LN, masked MHSA, exact GELU, read-out at token 0).

    With ``P["rel_beta"], P["rel_gamma"]`` [h] and the raw search scores ``raw_scores`` [B, k] (cosines; masked
    slots may be NaN), the relevance bias of docs/reco.md §2 is added to the logits before the mask:
    ``S[b,h,:,0] += γ_h``, ``S[b,h,:,j] += β_h·(s[b,j] − center)/width``. ``logit_bias`` (any tensor
    broadcastable to [B, h, T, T]) is added there too, in place of it — only the sensitivity test uses it.
    """
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
    if "rel_beta" in P:
        feat = torch.where(mask, (raw_scores - center) / width, torch.zeros_like(raw_scores))  # [B, k]; NaN-safe
        to_query = P["rel_gamma"].view(1, heads, 1, 1).expand(B, heads, 1, 1)  # [B, h, 1, 1]
        to_neighbours = P["rel_beta"].view(1, heads, 1, 1) * feat.view(B, 1, 1, k)  # [B, h, 1, k]
        S = S + torch.cat([to_query, to_neighbours], dim=-1)  # broadcast over the T query rows
    if logit_bias is not None:
        S = S + logit_bias
    S = S.masked_fill(~keep[:, None, None, :], float("-inf"))
    Pm = torch.softmax(S, dim=-1)
    O = (Pm @ V).transpose(1, 2).reshape(B, T, D) @ P["w_o"] + P["b_o"]
    H = X + O
    A2 = F.layer_norm(H, (D,), P["ln2_gamma"], P["ln2_beta"], eps=1e-5)
    Y = H + F.gelu(A2 @ P["w_1"] + P["b_1"], approximate="none") @ P["w_2"] + P["b_2"]
    return F.normalize(Y[:, 0], dim=-1, eps=0.0)


def _assert_matches_torch(params, names, q, r, dout, out, grads, run) -> float:
    """Run the torch layer ``run(P, xt, rt)`` on leaf tensors of ``params[names]``, ``q``, ``r``, back-propagate
    ``dout``, and assert the forward ``out`` and every gradient in ``grads`` (``names`` + the two inputs) match
    within ATOL. Returns the worst absolute difference."""
    P = {n: torch.tensor(params[n], requires_grad=True) for n in names}
    xt = torch.tensor(q, requires_grad=True)
    rt = torch.tensor(r, requires_grad=True)
    out_t = run(P, xt, rt)
    (out_t * torch.tensor(dout)).sum().backward()

    worst = float(np.abs(out - out_t.detach().numpy()).max())
    assert worst <= ATOL, f"forward differs by {worst:.3g}"
    theirs = {**{n: P[n].grad for n in names}, "query": xt.grad, "retrieved": rt.grad}
    for name, g_t in theirs.items():
        g_t = np.zeros_like(grads[name]) if g_t is None else g_t.numpy()
        diff = float(np.abs(grads[name] - g_t).max()) if g_t.size else 0.0
        worst = max(worst, diff)
        assert diff <= ATOL, f"{name}: |numpy − torch| = {diff:.3g}"
    return worst


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

    worst = _assert_matches_torch(params, PARAM_NAMES, q, r, dout, out, grads,
                                  lambda P, xt, rt: torch_fusion(P, xt, rt, torch.tensor(mask), heads))
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


# ----------------------------------------------------------------------------------------------
# Relevance bias
# ----------------------------------------------------------------------------------------------


def _rel_case(seed):
    rng = np.random.default_rng(800 + seed)
    D = [8, 16, 32, 24][seed % 4]
    heads = {8: [1, 2, 4], 16: [2, 4, 8], 32: [4, 8, 2], 24: [3, 6, 1]}[D][(seed // 4) % 3]
    B = int(rng.integers(1, 9))
    k = 0 if seed == 6 else int(rng.integers(1, 17))
    center, width = [(1.0, 0.02), (0.9, 0.05), (1.0, 0.1)][seed % 3]
    params = random_rel_params(D, heads, rng, rel_center=center, rel_width=width)
    all_valid = seed == 4
    q, r, mask = random_inputs(B, k, D, rng, p_valid=None if all_valid else 0.6)
    # Raw cosines of close neighbours; NaN in masked slots (the front door must keep them out).
    raw = random_scores(B, k, rng, mask, lo=0.80, hi=0.98, masked_value=np.nan)
    return rng, params, q, r, mask, raw, heads, center, width


@pytest.mark.parametrize("seed", range(10))
def test_relevance_forward_and_every_gradient_match_torch(seed):
    rng, params, q, r, mask, raw, heads, center, width = _rel_case(seed)
    B, D = q.shape
    dout = rng.standard_normal((B, D))
    out, cache = fusion_forward(params, q, r, mask, scores=raw)
    grads = fusion_backward(params, cache, dout, return_input_grads=True)
    assert set(grads) == set(PARAM_NAMES) | set(RELEVANCE_NAMES) | {"query", "retrieved"}

    keep = torch.ones(r.shape[:2], dtype=torch.bool) if mask is None else torch.tensor(mask)
    worst = _assert_matches_torch(params, PARAM_NAMES + RELEVANCE_NAMES, q, r, dout, out, grads,
                                  lambda P, xt, rt: torch_fusion(P, xt, rt, keep, heads, torch.tensor(raw), center,
                                                                 width))
    if r.shape[1]:  # the bias is doing something in these configurations
        assert max(np.abs(grads["rel_beta"]).max(), np.abs(grads["rel_gamma"]).max()) > 1e-3
    MAX_ABS["relevance"] = max(MAX_ABS.get("relevance", 0.0), worst)


def test_relevance_oracle_is_sensitive():
    """Plausible mistakes in the bias are told apart by the same tolerance: the score map without its centre,
    the bias shifted by one token (γ on the last token, β·s on tokens 0..k−1), and the bias laid along the
    query rows instead of the keys."""
    rng, params, q, r, mask, raw, heads, center, width = _rel_case(1)
    out, _ = fusion_forward(params, q, r, mask, scores=raw)
    P = {n: torch.tensor(params[n]) for n in PARAM_NAMES + RELEVANCE_NAMES}
    paper = {n: P[n] for n in PARAM_NAMES}
    x_t, r_t, keep, raw_t = torch.tensor(q), torch.tensor(r), torch.tensor(mask), torch.tensor(raw)

    right = torch_fusion(P, x_t, r_t, keep, heads, raw_t, center, width).numpy()
    assert np.abs(out - right).max() <= ATOL
    no_center = torch_fusion(P, x_t, r_t, keep, heads, raw_t, 0.0, width).numpy()
    assert np.abs(out - no_center).max() > 1e-6

    bias = _bias_of(params, raw, mask, center, width, heads)  # [B, h, 1, T], the spec's bias
    assert np.abs(torch_fusion(paper, x_t, r_t, keep, heads, logit_bias=torch.tensor(bias)).numpy() - out).max() <= ATOL
    shifted = np.roll(bias, -1, axis=-1)
    assert np.abs(torch_fusion(paper, x_t, r_t, keep, heads, logit_bias=torch.tensor(shifted)).numpy() - out).max() > 1e-6
    rows = np.ascontiguousarray(np.swapaxes(np.broadcast_to(bias, bias.shape[:2] + (bias.shape[-1],) * 2), -1, -2))
    assert np.abs(torch_fusion(paper, x_t, r_t, keep, heads, logit_bias=torch.tensor(rows)).numpy() - out).max() > 1e-6


def _bias_of(params, raw, mask, center, width, heads):
    """The spec's bias [B, h, 1, k+1] in NumPy: γ_h at token 0, β_h·(s_j − center)/width at token j (0 if masked)."""
    B, k = raw.shape
    feat = np.where(mask, (raw - center) / width, 0.0)
    bias = np.zeros((B, heads, 1, k + 1))
    bias[:, :, 0, 0] = params["rel_gamma"]
    bias[:, :, 0, 1:] = params["rel_beta"][None, :, None] * feat[:, None, :]
    return bias


def test_relevance_zero_is_paper_layer_in_torch_too():
    """β = γ = 0 in the torch version equals the paper's torch layer (the oracle's own consistency)."""
    rng, params, q, r, mask, raw, heads, center, width = _rel_case(2)
    P = {n: torch.tensor(params[n]) for n in PARAM_NAMES}
    paper = torch_fusion(P, torch.tensor(q), torch.tensor(r), torch.tensor(mask), heads).numpy()
    P0 = {**P, "rel_beta": torch.zeros(heads, dtype=torch.float64), "rel_gamma": torch.zeros(heads, dtype=torch.float64)}
    zero = torch_fusion(P0, torch.tensor(q), torch.tensor(r), torch.tensor(mask), heads, torch.tensor(raw), center, width)
    assert np.array_equal(zero.numpy(), paper)


@pytest.fixture(autouse=True, scope="module")
def _report_max_abs():
    """After the module's tests, print the largest differences they saw (``-s`` to see it; docs/fusion.md quotes
    them). A fixture, not a test: every case asserts its own bound, a report has nothing left to check."""
    yield
    if MAX_ABS["value"]:
        print(f"\nfusion numpy vs torch autograd: max abs diff {MAX_ABS['value']:.2e}")
    if "relevance" in MAX_ABS:
        print(f"fusion with relevance bias, numpy vs torch autograd: max abs diff {MAX_ABS['relevance']:.2e}")
