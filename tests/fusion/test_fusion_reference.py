"""Properties of the fusion layer through the front door: identity at init, parameter count,
permutation invariance, masking, k = 0, float32, and clear errors on bad input.

Relevance bias (docs/reco.md §2 [ours]) and the copy init: β = γ = 0 is the paper's layer bit for bit (output and
the 18 shared gradients, any scores); the identity init with the bias (any β, γ) returns normalize(query)
exactly; the copy init's arrays and its untrained output ``normalize(x + α·mean(r) + (α/k)·x)`` within a
derived bound; the score map ``(s − center)/width`` and why the centre is 1; masked-slot scores; errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fusion_testlib import (
    random_inputs,
    random_params,
    random_rel_params,
    random_scores,
    single_blas_thread,
    with_relevance,
)
from reco_ref.errors import BackendUnavailableError, ShapeError
from reco_ref.fusion import (
    PARAM_NAMES,
    FusionConfig,
    FusionParams,
    count_params,
    fusion_backward,
    fusion_forward,
    get_backend,
    init_params,
    reference,
    score_features,
)
from reco_ref.fusion.constants import LN_EPS

@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    with single_blas_thread():
        yield


# ----------------------------------------------------------------------------------------------
# init and size
# ----------------------------------------------------------------------------------------------


def test_param_names_shapes_and_count_at_clip_b32():
    p = init_params(512, 8, mlp_ratio=4)
    assert isinstance(p, FusionParams) and isinstance(p, dict)
    assert list(p) == list(PARAM_NAMES)
    assert p.heads == 8 and p.mlp_ratio == 4 and p.dim == 512 and p.dtype == np.float32
    assert count_params(p) == 3_153_408  # docs/reco.md §2: 12·D² + 9·D + 4·D + 2·D at D = 512
    assert p["w_1"].shape == (512, 2048) and p["w_2"].shape == (2048, 512) and p["w_q"].shape == (512, 512)
    for name in ("w_o", "b_o", "w_2", "b_2", "e_query", "ln1_beta", "ln2_beta"):
        assert not p[name].any(), name
    assert np.all(p["ln1_gamma"] == 1) and np.all(p["ln2_gamma"] == 1)
    for name in ("w_q", "w_k", "w_v", "w_1", "e_neighbor"):
        assert 0.015 < p[name].std() < 0.025, name  # N(0, 0.02)
    with pytest.raises(AttributeError):
        p.heads = 4


@pytest.mark.parametrize("D,h,ratio", [(8, 2, 4), (32, 4, 2), (48, 3, 1)])
def test_count_formula(D, h, ratio):
    assert count_params(init_params(D, h, mlp_ratio=ratio)) == 4 * D * D + 4 * D + 2 * ratio * D * D + ratio * D + D + 4 * D + 2 * D


def test_init_is_seeded_and_dtype_consistent():
    a, b = init_params(16, 2, seed=3), init_params(16, 2, seed=3)
    c = init_params(16, 2, seed=4)
    d = init_params(16, 2, seed=3, dtype=np.float64)
    assert all(np.array_equal(a[n], b[n]) for n in PARAM_NAMES)
    assert not np.array_equal(a["w_q"], c["w_q"])
    assert all(d[n].dtype == np.float64 and np.array_equal(d[n].astype(np.float32), a[n]) for n in PARAM_NAMES)


def test_init_rejects_heads_not_dividing_dim():
    with pytest.raises(ValueError, match="does not divide"):
        init_params(10, 4)


# ----------------------------------------------------------------------------------------------
# identity at init
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("k", [0, 1, 10])
def test_identity_at_init(dtype, k, rng):
    B, D = 5, 32
    p = init_params(D, 4, seed=7, dtype=dtype)
    q = rng.standard_normal((B, D)).astype(dtype) * 3.0  # not normalised
    r = rng.standard_normal((B, k, D)).astype(dtype)
    mask = rng.random((B, k)) < 0.5
    out, _ = fusion_forward(p, q, r, mask)
    expect = q / np.sqrt((q * q).sum(axis=1, keepdims=True))
    assert out.dtype == dtype
    assert np.array_equal(out, expect)  # exactly: Y[:, 0] == x bit for bit
    qn = expect
    out2, _ = fusion_forward(p, qn, r, None)
    np.testing.assert_allclose(out2, qn, rtol=0, atol=4 * np.finfo(dtype).eps)


def test_identity_breaks_once_trained(rng):
    """Sanity of the identity test itself: a non-zero W_o changes the output."""
    p = init_params(16, 2)
    p["w_o"][...] = 0.1
    q = rng.standard_normal((3, 16)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    out, _ = fusion_forward(p, q, rng.standard_normal((3, 4, 16)).astype(np.float32))
    assert np.abs(out - q).max() > 1e-3


# ----------------------------------------------------------------------------------------------
# neighbours: permutation, masking, k = 0
# ----------------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 6),
    k=st.integers(1, 12),
    D_h=st.sampled_from([(8, 1), (8, 2), (16, 4), (24, 3), (32, 8)]),
    seed=st.integers(0, 2**31 - 1),
)
def test_permutation_invariance_and_masked_content(B, k, D_h, seed):
    D, h = D_h
    rng = np.random.default_rng(seed)
    p = random_params(D, h, rng)
    q, r, mask = random_inputs(B, k, D, rng, p_valid=0.6)
    out, cache = fusion_forward(p, q, r, mask)
    dout = rng.standard_normal((B, D))
    g = fusion_backward(p, cache, dout, return_input_grads=True)

    perm = rng.permutation(k)
    out_p, cache_p = fusion_forward(p, q, r[:, perm], mask[:, perm])
    g_p = fusion_backward(p, cache_p, dout, return_input_grads=True)
    np.testing.assert_allclose(out_p, out, rtol=0, atol=1e-13)
    for n in PARAM_NAMES:
        np.testing.assert_allclose(g_p[n], g[n], rtol=1e-10, atol=1e-12, err_msg=n)
    np.testing.assert_allclose(g_p["retrieved"], g["retrieved"][:, perm], rtol=1e-10, atol=1e-12)

    # Whatever sits in a masked slot has no effect (not even NaN) and gets exactly zero gradient.
    r2 = r.copy()
    r2[~mask] = rng.standard_normal(r2[~mask].shape) * 100.0
    out2, cache2 = fusion_forward(p, q, r2, mask)
    assert np.array_equal(out2, out)
    g2 = fusion_backward(p, cache2, dout, return_input_grads=True)
    for n in PARAM_NAMES:
        np.testing.assert_allclose(g2[n], g[n], rtol=1e-12, atol=1e-14, err_msg=n)
    assert np.all(g2["retrieved"][~mask] == 0.0)
    if (~mask).any():
        r3 = r.copy()
        r3[~mask] = np.nan
        out3, _ = fusion_forward(p, q, r3, mask)
        assert np.array_equal(out3, out)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fully_masked_equals_k0(dtype, rng):
    B, k, D, h = 4, 7, 16, 4
    p = random_params(D, h, rng, dtype=dtype)
    q, r, _ = random_inputs(B, k, D, rng, dtype=dtype)
    mask = np.zeros((B, k), dtype=bool)
    out_m, cache_m = fusion_forward(p, q, r, mask)
    out_0, cache_0 = fusion_forward(p, q, r[:, :0], None)
    assert np.isfinite(out_m).all()
    np.testing.assert_allclose(out_m, out_0, rtol=0, atol=10 * np.finfo(dtype).eps)
    dout = rng.standard_normal((B, D)).astype(dtype)
    g_m = fusion_backward(p, cache_m, dout)
    g_0 = fusion_backward(p, cache_0, dout)
    for n in PARAM_NAMES:
        if n == "e_neighbor":  # masked tokens still exist, but their rows carry no gradient
            assert np.all(g_m[n] == 0) and np.all(g_0[n] == 0)
            continue
        np.testing.assert_allclose(g_m[n], g_0[n], rtol=1e-4 if dtype == np.float32 else 1e-10,
                                   atol=1e-5 if dtype == np.float32 else 1e-12, err_msg=n)  # fmt: skip


def test_mask_matters_when_weights_do(rng):
    """The masking tests could pass vacuously if neighbours never mattered: they do."""
    p = random_params(16, 2, rng)
    q, r, _ = random_inputs(3, 5, 16, rng)
    a, _ = fusion_forward(p, q, r, None)
    m = np.ones((3, 5), dtype=bool)
    m[:, 2] = False
    b, _ = fusion_forward(p, q, r, m)
    assert np.abs(a - b).max() > 1e-3


def _assert_float32_matches_float64(p64, p32, q, r, mask, rng, *, atol_out, atol_grad, **kw):
    """The float32 layer's output within ``atol_out`` of the float64 one, and every parameter gradient within
    ``atol_grad`` × max(1, its float64 magnitude); ``kw`` (e.g. ``scores``) goes to both forwards."""
    out64, c64 = fusion_forward(p64, q, r, mask, **kw)
    out32, c32 = fusion_forward(p32, q.astype(np.float32), r.astype(np.float32), mask, **kw)
    assert out32.dtype == np.float32
    np.testing.assert_allclose(out32, out64, rtol=0, atol=atol_out)
    dout = rng.standard_normal(q.shape)
    g64 = fusion_backward(p64, c64, dout)
    g32 = fusion_backward(p32, c32, dout.astype(np.float32))
    assert set(g64) == set(p64)  # every parameter, relevance pair included where present
    for n in g64:
        assert g32[n].dtype == np.float32, n
        scale = max(1.0, np.abs(g64[n]).max())
        np.testing.assert_allclose(g32[n], g64[n], rtol=0, atol=atol_grad * scale, err_msg=n)


def test_float32_path_matches_float64(rng):
    B, k, D, h = 8, 10, 32, 4
    p64 = random_params(D, h, rng)
    q, r, mask = random_inputs(B, k, D, rng)
    p32 = FusionParams({n: a.astype(np.float32) for n, a in p64.items()}, p64.config.__class__(D, h, 4, "float32"))
    _assert_float32_matches_float64(p64, p32, q, r, mask, rng, atol_out=2e-6, atol_grad=5e-5)


def test_every_step_preserves_float32(rng):
    x = rng.standard_normal((3, 5, 8)).astype(np.float32)
    g, b = np.ones(8, np.float32), np.zeros(8, np.float32)
    out, c = reference.layernorm_forward(x, g, b)
    assert out.dtype == np.float32 and all(a.dtype == np.float32 for a in reference.layernorm_backward(c, out))
    u, c = reference.gelu_forward(x)
    assert u.dtype == np.float32 and reference.gelu_backward(c, x).dtype == np.float32
    out, c = reference.linear_forward(x, np.ones((8, 4), np.float32), np.zeros(4, np.float32))
    assert out.dtype == np.float32 and all(a.dtype == np.float32 for a in reference.linear_backward(c, out))
    y, c = reference.l2normalize_forward(x[:, 0])
    assert y.dtype == np.float32 and reference.l2normalize_backward(c, y).dtype == np.float32
    qkv = x.reshape(3, 1, 5, 8)
    o, c = reference.attention_forward(qkv, qkv, qkv, np.ones((3, 5), bool))
    assert o.dtype == np.float32 and all(a.dtype == np.float32 for a in reference.attention_backward(c, o))


def test_attention_masked_probability_is_exactly_zero(rng):
    q = rng.standard_normal((2, 2, 4, 3))
    valid = np.array([[True, False, True, False], [True, True, True, True]])
    _, c = reference.attention_forward(q, q, q, valid)
    assert np.all(c["p"][0][..., ~valid[0]] == 0.0)
    np.testing.assert_allclose(c["p"].sum(-1), 1.0, atol=1e-15)


def test_gelu_matches_definition():
    import math

    u = np.linspace(-6, 6, 101)
    expect = np.array([x * 0.5 * (1 + math.erf(x / math.sqrt(2))) for x in u])
    np.testing.assert_allclose(reference.gelu_forward(u)[0], expect, rtol=1e-15, atol=1e-16)


def test_plain_dict_needs_heads(rng):
    p = random_params(16, 4, rng)
    plain = dict(p)
    q, r, mask = random_inputs(2, 3, 16, rng)
    with pytest.raises(ShapeError, match="heads="):
        fusion_forward(plain, q, r, mask)
    a, _ = fusion_forward(plain, q, r, mask, heads=4)
    b, _ = fusion_forward(p, q, r, mask)
    assert np.array_equal(a, b)
    c, _ = fusion_forward(p, q, r, mask, heads=2)  # explicit heads override params.heads
    assert not np.allclose(a, c)


# ----------------------------------------------------------------------------------------------
# errors at the front door
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def setup32(rng):
    p = init_params(16, 4)
    q, r, mask = random_inputs(3, 4, 16, rng, dtype=np.float32)
    return p, q, r, mask


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda p, q, r, m: (p, q[:, :8], r, m), "query: embedding dim 8 does not match the params' dim 16"),
        (lambda p, q, r, m: (p, q, r[..., :8], m), "retrieved: embedding dim 8 does not match the params' dim 16"),
        (lambda p, q, r, m: (p, q.astype(np.float64), r, m), "query: dtype float64 differs"),
        (lambda p, q, r, m: (p, q, r.astype(np.float64), m), "retrieved"),
        (lambda p, q, r, m: (p, q[:2], r, m), "retrieved: batch size 3 differs"),
        (lambda p, q, r, m: (p, q, r, m.astype(np.int8)), "mask"),
        (lambda p, q, r, m: (p, q, r, m[:, :2]), "mask"),
        (lambda p, q, r, m: (p, q[0], r, m), "query"),
        (lambda p, q, r, m: (p, q[:0], r[:0], m[:0]), "B is 0"),
        (lambda p, q, r, m: (p, np.where(q > 0.5, np.nan, q).astype(np.float32), r, m), "NaN"),
        (lambda p, q, r, m: (p, q, np.full_like(r, np.inf), np.ones_like(m)), "NaN/inf"),
        (lambda p, q, r, m: (p, q, np.full_like(r, np.inf), None), "NaN/inf"),
        (lambda p, q, r, m: ({k: v for k, v in p.items() if k != "w_q"}, q, r, m), "missing"),
        (lambda p, q, r, m: ({**p, "w_q": p["w_q"][:, :8]}, q, r, m), "w_q"),
        (lambda p, q, r, m: ({**p, "b_1": p["b_1"].astype(np.float64)}, q, r, m), "b_1"),
        (lambda p, q, r, m: ({**p, "w_1": np.full_like(p["w_1"], np.nan)}, q, r, m), "w_1"),
        (lambda p, q, r, m: (p, np.zeros_like(q), r, m), "zero"),
    ],
)
def test_front_door_errors(setup32, mutate, match):
    p, q, r, m = mutate(*setup32)
    with pytest.raises(ShapeError, match=match):
        fusion_forward(p, q, r, m, heads=4)


def test_heads_not_dividing_dim(setup32):
    p, q, r, m = setup32
    with pytest.raises(ShapeError, match="3 does not divide"):
        fusion_forward(p, q, r, m, heads=3)


def test_backward_errors(setup32):
    p, q, r, m = setup32
    out, cache = fusion_forward(p, q, r, m)
    with pytest.raises(ShapeError, match="dout"):
        fusion_backward(p, cache, out[:, :8])
    with pytest.raises(ShapeError, match="dout"):
        fusion_backward(p, cache, out.astype(np.float64))
    with pytest.raises(ValueError, match="cache was made by backend 'numpy'"):
        fusion_backward(p, cache, out, backend="numba")
    g = fusion_backward(p, cache, out)
    assert set(g) == set(PARAM_NAMES) and all(g[n].shape == p[n].shape and g[n].dtype == p[n].dtype for n in p)


def test_unknown_backend_and_missing_module(setup32, monkeypatch):
    p, q, r, m = setup32
    with pytest.raises(BackendUnavailableError, match="unknown"):
        fusion_forward(p, q, r, m, backend="tpu")
    from reco_ref import fusion

    monkeypatch.setitem(fusion.BACKENDS, "cuda", fusion.BACKENDS["cuda"]._replace(
        module="reco_ref.fusion._no_such_backend", install="the cuda extra: pip install -e \".[cuda]\""))
    with pytest.raises(ImportError, match=r"cuda.*\[cuda\]") as info:
        get_backend("cuda")
    assert isinstance(info.value, BackendUnavailableError)  # a RecoError too: the CLI prints it in one line


# ----------------------------------------------------------------------------------------------
# Relevance bias (docs/reco.md §2 "Relevance bias" [ours]) and the copy init
# ----------------------------------------------------------------------------------------------


def _normalize(z):
    return z / np.sqrt((z * z).sum(axis=-1, keepdims=True))


def _layernorm(z, eps=LN_EPS):
    """LayerNorm with γ = 1, β = 0, written out here (independent of reference.layernorm_forward)."""
    mu = z.mean(axis=-1, keepdims=True)
    var = ((z - mu) ** 2).mean(axis=-1, keepdims=True)
    return (z - mu) / np.sqrt(var + eps)


def _any_scores(B, k, rng, mask, scale):
    """Raw scores of any size (not only cosines), NaN in masked slots."""
    s = rng.uniform(-1.0, 1.0, size=(B, k)) * scale
    if mask is not None:
        s[~mask] = np.nan
    return s


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("seed", range(8))
def test_relevance_zero_is_the_paper_layer_exactly(seed, dtype):
    """β = γ = 0: output bit-identical to the paper's layer and the 18 shared gradients (and the input
    gradients) identical, whatever the scores are — through the front door and through the reference."""
    rng = np.random.default_rng(4000 + seed)
    D, h = [(8, 2), (16, 4), (24, 3), (32, 8)][seed % 4]
    B, k = int(rng.integers(1, 7)), (0 if seed == 3 else int(rng.integers(1, 13)))
    p = random_params(D, h, rng, dtype=dtype)
    p0 = with_relevance(p, 0.0, 0.0)
    q, r, mask = random_inputs(B, k, D, rng, dtype=dtype, p_valid=None if seed == 5 else 0.6)
    raw = _any_scores(B, k, rng, mask, scale=[1.0, 1e3, 1e6][seed % 3])
    dout = rng.standard_normal((B, D)).astype(dtype)

    out, cache = fusion_forward(p, q, r, mask)
    out0, cache0 = fusion_forward(p0, q, r, mask, scores=raw)
    assert np.array_equal(out0, out)
    g = fusion_backward(p, cache, dout, return_input_grads=True)
    g0 = fusion_backward(p0, cache0, dout, return_input_grads=True)
    assert set(g0) == set(g) | {"rel_beta", "rel_gamma"}
    for n in g:
        assert np.array_equal(g0[n], g[n]), n
    assert g0["rel_beta"].shape == (h,) and g0["rel_beta"].dtype == dtype and g0["rel_gamma"].dtype == dtype

    feat = rng.standard_normal((B, k)).astype(dtype) * 100.0  # the reference itself, any score features
    o_ref, _ = reference.fusion_forward(p, q, np.nan_to_num(r), mask, heads=h)
    o_ref0, _ = reference.fusion_forward(p0, q, np.nan_to_num(r), mask, heads=h, scores=feat)
    assert np.array_equal(o_ref0, o_ref)


def test_relevance_bias_changes_the_output(rng):
    """The tests above could pass vacuously if the bias were never applied: non-zero β or γ moves the output."""
    p = random_params(16, 4, rng)
    q, r, mask = random_inputs(4, 6, 16, rng, fully_masked_row=False)
    raw = rng.uniform(0.85, 0.98, size=(4, 6))
    base, _ = fusion_forward(with_relevance(p, 0.0, 0.0), q, r, mask, scores=raw)
    for beta, gamma in ((1.0, 0.0), (0.0, 1.0)):
        moved, _ = fusion_forward(with_relevance(p, beta, gamma), q, r, mask, scores=raw)
        assert np.abs(moved - base).max() > 1e-3, (beta, gamma)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("k", [0, 1, 10])
@pytest.mark.parametrize("beta, gamma", [(1.0, 0.0), (0.0, 0.0), (-50.0, 30.0), (1e3, -1e3), ("random", "random")])
def test_identity_init_with_relevance_is_exact(dtype, k, beta, gamma, rng):
    """Identity init (W_o = 0) with the relevance bias, any β and γ (per head): the output is normalize(query)
    bit for bit, and β, γ get exactly zero gradient (dS = 0 while W_o = 0; docs/reco.md §2)."""
    B, D, h = 5, 32, 4
    if beta == "random":
        p = init_params(D, h, seed=7, dtype=dtype, relevance=True)
        p["rel_beta"] = (rng.standard_normal(h) * 100).astype(dtype)
        p["rel_gamma"] = (rng.standard_normal(h) * 100).astype(dtype)
    else:
        p = init_params(D, h, seed=7, dtype=dtype, relevance=True, rel_beta=beta, rel_gamma=gamma)
        assert np.all(p["rel_beta"] == dtype(beta)) and np.all(p["rel_gamma"] == dtype(gamma))
    assert list(p) == list(PARAM_NAMES) + ["rel_beta", "rel_gamma"] and p.config.relevance
    q = rng.standard_normal((B, D)).astype(dtype) * 3.0  # not normalised
    r = rng.standard_normal((B, k, D)).astype(dtype)
    mask = rng.random((B, k)) < 0.5
    raw = rng.uniform(0.5, 1.0, size=(B, k))
    out, cache = fusion_forward(p, q, r, mask, scores=raw)
    assert out.dtype == dtype
    assert np.array_equal(out, _normalize(q))
    g = fusion_backward(p, cache, rng.standard_normal((B, D)).astype(dtype))
    assert np.all(g["rel_beta"] == 0) and np.all(g["rel_gamma"] == 0)


def test_init_params_relevance_defaults():
    """β starts at 1 (so it can learn once W_o moves), γ at 0; the score map defaults to centre 1, width 0.02;
    the 18 paper arrays are the same draws as without relevance."""
    p = init_params(16, 4, seed=3, dtype=np.float64, relevance=True)
    plain = init_params(16, 4, seed=3, dtype=np.float64)
    assert np.all(p["rel_beta"] == 1.0) and np.all(p["rel_gamma"] == 0.0) and p["rel_beta"].shape == (4,)
    assert (p.config.rel_center, p.config.rel_width) == (1.0, 0.02)
    assert all(np.array_equal(p[n], plain[n]) for n in PARAM_NAMES)
    assert count_params(p) == count_params(plain) + 2 * 4
    c = init_params(16, 4, relevance=True, rel_center=0.9, rel_width=0.05).config
    assert (c.rel_center, c.rel_width, c.relevance) == (0.9, 0.05, True)
    for bad in ({"rel_width": 0.0}, {"rel_width": -1.0}, {"rel_center": float("nan")}, {"rel_beta": float("inf")}):
        with pytest.raises(ValueError):
            init_params(16, 4, relevance=True, **bad)


# The copy init ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("D, h, alpha, k", [(16, 2, 1.0, 10), (64, 4, 0.5, 3), (48, 3, 2.0, 1)])
def test_copy_init_arrays(D, h, alpha, k, dtype):
    """W_v = I, b_v = 0, e_r = 0, W_o = α(k+1)/(k√D)·I (init_params docstring); every other array is the
    identity init's draw (same seed), so W_2 = b_2 = b_o = e_q = 0 still."""
    c = init_params(D, h, seed=5, dtype=dtype, init="copy", alpha=alpha, k=k)
    ident = init_params(D, h, seed=5, dtype=dtype)
    assert list(c) == list(PARAM_NAMES)
    assert np.array_equal(c["w_v"], np.eye(D, dtype=dtype)) and not c["b_v"].any() and not c["e_neighbor"].any()
    np.testing.assert_allclose(c["w_o"], np.eye(D) * alpha * (k + 1) / (k * np.sqrt(D)), rtol=1e-7 if dtype == np.float32 else 1e-15, atol=0)
    assert np.count_nonzero(c["w_o"]) == D
    for n in PARAM_NAMES:
        if n not in ("w_v", "b_v", "e_neighbor", "w_o"):
            assert np.array_equal(c[n], ident[n]), n
    cr = init_params(D, h, seed=5, dtype=dtype, init="copy", alpha=alpha, k=k, relevance=True, rel_beta=0.0)
    assert all(np.array_equal(cr[n], c[n]) for n in PARAM_NAMES)


def test_copy_init_rejects_bad_arguments():
    for kw in ({"init": "zeros"}, {"init": "copy", "alpha": 0.0}, {"init": "copy", "alpha": -1.0},
               {"init": "copy", "k": 0}, {"init": "copy", "alpha": float("nan")}, {"init": "copy", "alpha": True}):  # fmt: skip
        with pytest.raises(ValueError):
            init_params(16, 2, **kw)


def _copy_case(D, h, k, alpha, seed, centred, qk_scale):
    """Copy-init params (float64) with W_q, b_q, W_k, b_k scaled by ``qk_scale`` and random unit inputs
    (``centred``: each vector's coordinate mean removed first, so LayerNorm's centring is a no-op)."""
    rng = np.random.default_rng(seed)
    p = init_params(D, h, seed=seed, dtype=np.float64, init="copy", alpha=alpha, k=k)
    for n in ("w_q", "b_q", "w_k", "b_k"):
        p[n] = p[n] * qk_scale
    B = 6
    x, r = rng.standard_normal((B, D)), rng.standard_normal((B, k, D))
    if centred:
        x -= x.mean(-1, keepdims=True)
        r -= r.mean(-1, keepdims=True)
    x, r = _normalize(x), _normalize(r)
    return rng, p, x, r


@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("D, h, k, alpha", [(16, 2, 4, 1.0), (64, 4, 10, 0.5), (32, 8, 1, 2.0)])
def test_copy_init_with_uniform_attention_is_exact(D, h, k, alpha, with_mask):
    """W_q = W_k = b_q = b_k = 0 makes attention exactly uniform over the valid tokens; then the copy init's
    query token is exactly ``x + α(k+1)/(k√D) · mean_{valid j} LN(X_j)`` (MLP off: W_2 = b_2 = 0). Checked to
    1e-13 with LayerNorm written out here — the algebra of the init, before any approximation of LN."""
    rng, p, x, r = _copy_case(D, h, k, alpha, seed=D + k, centred=False, qk_scale=0.0)
    mask = (rng.random((x.shape[0], k)) < 0.6) if with_mask else None
    out, cache = fusion_forward(p, x, r, mask)
    valid = np.ones((x.shape[0], k + 1), bool)
    if mask is not None:
        valid[:, 1:] = mask
    P = cache["att"]["p"][:, :, 0, :]  # [B, h, T] the query row's attention
    np.testing.assert_allclose(P, np.broadcast_to((valid / valid.sum(1, keepdims=True))[:, None, :], P.shape), rtol=0, atol=1e-15)
    Z = np.concatenate([x[:, None], r], axis=1)  # X with e_q = e_r = 0
    mean_ln = (_layernorm(Z) * valid[..., None]).sum(1) / valid.sum(1)[:, None]
    expect = _normalize(x + alpha * (k + 1) / (k * np.sqrt(D)) * mean_ln)
    np.testing.assert_allclose(out, expect, rtol=0, atol=1e-13)


def _copy_bound(p, x, r, alpha, k, heads):
    r"""Per-row bound on ``‖out − normalize(Y*)‖``, ``Y* = x + α·mean(r) + (α/k)·x`` (the docstring's formula).

    With ``X_j`` the k+1 tokens (``e_q = e_r = 0``), the exact query row is
    ``Y = x + α(k+1)/(k√D) Σ_j P_j LN(X_j)`` and ``Y* = x + (α/k) Σ_j X_j``. Two gaps:

    * LayerNorm is not exactly ``√D·X``: ``LN(z)/√D = a (z − μ1)`` with ``μ`` the coordinate mean and
      ``a = 1/(√D·sqrt(‖z‖²/D − μ² + ε))``. Summed exactly:
      ``ΔLN = (α/k)[Σ_j (a_j − 1) X_j − (Σ_j a_j μ_j)·1]``, so
      ``‖ΔLN‖ ≤ (α/k)[Σ_j |a_j − 1|·‖X_j‖ + √D·|Σ_j a_j μ_j|]``. For centred unit vectors (μ = 0)
      this is ``(α(k+1)/k)(1 − 1/sqrt(1 + Dε))`` ≈ ``α(k+1)/k · Dε/2`` (3.5e-4 at D = 64, α = 1, k = 10);
      for uncentred random unit vectors the ``μ`` term, ~``α√(k+1)/(k√D)``, dominates.
    * Attention is not exactly uniform: with every logit in ``[−s, s]``, ``|P_j − 1/(k+1)| ≤ (e^{2s}−1)/(k+1)``,
      and ``‖LN(X_j)‖ ≤ √D``, so ``‖ΔP‖ ≤ (e^{2s} − 1)·α(k+1)/k``, where
      ``s ≤ (√D‖W_q‖₂ + ‖b_q‖)(√D‖W_k‖₂ + ‖b_k‖)/√d_h`` since ``‖LN(X_j)‖ ≤ √D`` (γ = 1, β = 0).

    Normalising: ``‖Y/‖Y‖ − Y*/‖Y*‖‖ ≤ 2‖Y − Y*‖/‖Y*‖``. Everything here is computed from the inputs and the
    weights, not from the layer's output.
    """
    B, D = x.shape
    Z = np.concatenate([x[:, None], r], axis=1)  # [B, T, D]
    mu = Z.mean(-1)
    a = 1.0 / (np.sqrt(D) * np.sqrt((Z * Z).mean(-1) - mu**2 + LN_EPS))
    d_ln = alpha / k * ((np.abs(a - 1) * np.linalg.norm(Z, axis=-1)).sum(1) + np.sqrt(D) * np.abs((a * mu).sum(1)))
    s = ((np.sqrt(D) * np.linalg.norm(p["w_q"], 2) + np.linalg.norm(p["b_q"]))
         * (np.sqrt(D) * np.linalg.norm(p["w_k"], 2) + np.linalg.norm(p["b_k"])) / np.sqrt(D // heads))  # fmt: skip
    d_att = np.expm1(2 * s) * alpha * (k + 1) / k
    y_star = x + alpha * r.mean(1) + alpha / k * x
    return _normalize(y_star), 2 * (d_ln + d_att) / np.linalg.norm(y_star, axis=-1)


@pytest.mark.parametrize("centred", [True, False])
@pytest.mark.parametrize("D, h, k, alpha", [(32, 2, 3, 2.0), (64, 4, 10, 1.0), (128, 8, 5, 0.5), (256, 8, 10, 1.0)])
def test_copy_init_untrained_matches_its_formula(D, h, k, alpha, centred):
    """Copy init, untrained, near-uniform attention (W_q, W_k, b_q, b_k × 1e-3), all k neighbours valid: the output
    is ``normalize(x + α·mean(r) + (α/k)·x)`` within the bound of :func:`_copy_bound` (LayerNorm's ε and centring,
    plus the attention's distance from uniform).

    Centred inputs: the formula holds to ~Dε (bound ≤ 3e-3, measured ≤ 3.2e-4), tightly enough to tell a wrong
    α or a missing (α/k)·x.
    Uncentred random unit vectors: the docstring's "LN(r) ≈ √D·r" drops LayerNorm's centring, an error of order
    ``α√(k+1)/(k√D)`` (0.01–0.3 here); the layer stays within that derived bound too."""
    rng, p, x, r = _copy_case(D, h, k, alpha, seed=10 * D + k, centred=centred, qk_scale=1e-3)
    out, _ = fusion_forward(p, x, r)
    expect, tol = _copy_bound(p, x, r, alpha, k, h)
    err = np.linalg.norm(out - expect, axis=-1)
    assert np.all(err <= tol), f"err {err.max():.3g} > bound {tol[np.argmax(err - tol)]:.3g}"
    if centred:
        # Only LayerNorm's ε remains: the bound is ≈ 2·α(k+1)/k·Dε/2/‖Y*‖ (5e-4 to 3e-3 here), far below the distance
        # of the formula from normalize(x) (the init doing nothing) and from the same formula with α·1.5 —
        # so the check pins the copy init down, not just "something near x".
        assert tol.max() < 5e-3
        signal = np.linalg.norm(expect - x, axis=-1)
        assert np.all(signal > 20 * tol)
        wrong_alpha = _normalize(x + 1.5 * alpha * r.mean(1) + alpha / k * x)
        assert np.all(np.linalg.norm(out - wrong_alpha, axis=-1) > 5 * tol)
        wrong_self = _normalize(x + alpha * r.mean(1))  # without the (α/k)·x term
        assert np.all(np.linalg.norm(out - wrong_self, axis=-1) > 2 * tol)


# Scores: the map, do-no-harm, masked slots, errors -------------------------------------------------


def test_score_features_map(rng):
    """(s − center)/width from the config, masked slots → exactly 0 (NaN there allowed), cast to the params' dtype;
    None for the paper's layer; a plain dict with the pair uses the defaults (centre 1, width 0.02)."""
    p = init_params(16, 4, dtype=np.float32, relevance=True, rel_center=0.9, rel_width=0.05)
    s = rng.uniform(0.5, 1.0, size=(3, 5))
    mask = rng.random((3, 5)) < 0.5
    s_nan = np.where(mask, s, np.nan)
    f = score_features(p, s_nan, mask)
    assert f.dtype == np.float32 and f.flags.c_contiguous
    np.testing.assert_array_equal(f, np.where(mask, (s - 0.9) / 0.05, 0.0).astype(np.float32))
    f64 = score_features(p, s, dtype=np.float64)
    np.testing.assert_allclose(f64, (s - 0.9) / 0.05, rtol=1e-15)
    assert score_features(init_params(16, 4), s) is None
    plain = dict(init_params(16, 4, dtype=np.float64, relevance=True))
    np.testing.assert_allclose(score_features(plain, s), (s - 1.0) / 0.02, rtol=1e-15)
    # A close neighbour (cos 0.98) is −1 unit from a perfect match, a far one (cos 0.5) −25 units.
    np.testing.assert_allclose(score_features(plain, np.array([[1.0, 0.98, 0.5]])), [[0.0, -1.0, -25.0]], atol=1e-12)


def test_relevance_gamma_wins_when_every_neighbour_is_far(rng):
    """Why the centre is 1 (an absolute distance to a perfect match): when every neighbour is far (cos ≤ 0.6 →
    feature ≤ −20), β = 1 pushes their logits down by ≥ 20 and the query attends to itself — the output is
    that of the layer with every neighbour masked (do no harm). A map relative to the best neighbour,
    ``(s − max_j s_j)/0.02``, gives the best neighbour feature 0 however far it is, and the output moves."""
    B, k, D, h = 6, 8, 16, 4
    p = random_params(D, h, rng)
    pr = with_relevance(p, 1.0, 0.0)
    q, r, _ = random_inputs(B, k, D, rng, p_valid=None)
    far = rng.uniform(0.3, 0.6, size=(B, k))
    alone, _ = fusion_forward(p, q, r, np.zeros((B, k), bool))  # the query token alone
    out, cache = fusion_forward(pr, q, r, None, scores=far)
    att_to_neighbours = cache["att"]["p"][:, :, :, 1:].sum(-1).max()
    assert att_to_neighbours < 1e-4
    assert np.abs(out - alone).max() < 1e-3
    rel_to_best = (far - far.max(1, keepdims=True)) / 0.02
    out_rel, _ = reference.fusion_forward(pr, q, r, None, heads=h, scores=rel_to_best)
    assert np.abs(out_rel - alone).max() > 1e-2
    close = rng.uniform(0.95, 0.99, size=(B, k))  # close neighbours (features −2.5 … −0.5) still count
    out_close, _ = fusion_forward(pr, q, r, None, scores=close)
    assert np.abs(out_close - alone).max() > 1e-2


@settings(max_examples=20, deadline=None)
@given(
    B=st.integers(1, 5),
    k=st.integers(1, 10),
    D_h=st.sampled_from([(8, 1), (8, 2), (16, 4), (24, 3)]),
    seed=st.integers(0, 2**31 - 1),
)
def test_relevance_permutation_and_masked_slots(B, k, D_h, seed):
    """Permuting neighbours together with their scores changes nothing; whatever a masked slot holds (score NaN,
    huge, or neighbour NaN) has no effect on the output or on any parameter gradient, dβ and dγ included."""
    D, h = D_h
    rng = np.random.default_rng(seed)
    p = random_rel_params(D, h, rng)
    q, r, mask = random_inputs(B, k, D, rng, p_valid=0.6)
    raw = random_scores(B, k, rng)
    dout = rng.standard_normal((B, D))
    out, cache = fusion_forward(p, q, r, mask, scores=raw)
    g = fusion_backward(p, cache, dout)

    perm = rng.permutation(k)
    out_p, cache_p = fusion_forward(p, q, r[:, perm], mask[:, perm], scores=raw[:, perm])
    g_p = fusion_backward(p, cache_p, dout)
    np.testing.assert_allclose(out_p, out, rtol=0, atol=1e-13)
    for n in g:
        np.testing.assert_allclose(g_p[n], g[n], rtol=1e-10, atol=1e-12, err_msg=n)

    raw2, r2 = raw.copy(), r.copy()
    raw2[~mask] = np.nan
    r2[~mask] = np.nan
    out2, cache2 = fusion_forward(p, q, r2, mask, scores=raw2)
    assert np.array_equal(out2, out)
    g2 = fusion_backward(p, cache2, dout)
    for n in g:
        assert np.isfinite(g2[n]).all(), n
        np.testing.assert_allclose(g2[n], g[n], rtol=1e-12, atol=1e-14, err_msg=n)
    raw3 = raw.copy()
    raw3[~mask] = 1e6
    out3, _ = fusion_forward(p, q, r, mask, scores=raw3)
    assert np.array_equal(out3, out)


def test_relevance_float32_matches_float64(rng):
    B, k, D, h = 8, 10, 32, 4
    p64 = random_rel_params(D, h, rng)
    p32 = FusionParams({n: a.astype(np.float32) for n, a in p64.items()}, FusionConfig(D, h, 4, "float32", relevance=True))
    q, r, mask = random_inputs(B, k, D, rng)
    raw = random_scores(B, k, rng)
    _assert_float32_matches_float64(p64, p32, q, r, mask, rng, atol_out=2e-5, atol_grad=2e-4, scores=raw)


@pytest.fixture
def rel_setup(rng):
    p = init_params(16, 4, relevance=True)
    q, r, mask = random_inputs(3, 4, 16, rng, dtype=np.float32, fully_masked_row=False)
    mask[:, 0] = True
    mask[:, 1] = False
    raw = rng.uniform(0.8, 0.98, size=(3, 4))
    return p, q, r, mask, raw


def _nan_at(raw, where):
    s = raw.copy()
    s[where] = np.nan
    return s


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda p, q, r, m, s: (p, q, r, m, None), r"scores: this fusion module has the relevance bias .* got None"),
        (lambda p, q, r, m, s: (p, q, r, m, s[:, :3]), r"scores \[B,k\]: axis 1 has size 3, expected 4"),
        (lambda p, q, r, m, s: (p, q, r, m, np.concatenate([s, s[:, :1]], 1)), r"scores \[B,k\]: axis 1 has size 5"),
        (lambda p, q, r, m, s: (p, q, r, m, s[:2]), r"scores \[B,k\]: axis 0 has size 2, expected 3"),
        (lambda p, q, r, m, s: (p, q, r, m, s[:, 0]), r"scores \[B,k\]: expected 2 dimensions"),
        (lambda p, q, r, m, s: (p, q, r, m, s.tolist()), r"scores \[B,k\]: expected a numpy array"),
        (lambda p, q, r, m, s: (p, q, r, m, (s * 100).astype(np.int64)), r"scores"),
        (lambda p, q, r, m, s: (p, q, r, m, _nan_at(s, (1, 0))), r"scores: 1 NaN/inf value\(s\) in valid neighbour slots"),
        (lambda p, q, r, m, s: (p, q, r, m, _nan_at(s, (slice(None), 0))), r"scores: 3 NaN/inf"),
        (lambda p, q, r, m, s: (p, q, r, m, np.where(m, np.inf, s)), r"scores: \d+ NaN/inf value\(s\) in valid"),
        (lambda p, q, r, m, s: (p, q, r, None, _nan_at(s, (0, 1))), r"scores: 1 NaN/inf value\(s\) in valid"),
        (lambda p, q, r, m, s: ({n: a for n, a in p.items() if n != "rel_gamma"}, q, r, m, s), r"rel_beta.*rel_gamma.*not both"),
        (lambda p, q, r, m, s: (FusionParams({n: p[n] for n in PARAM_NAMES}, p.config), q, r, m, s), r"config.relevance is True"),
        (lambda p, q, r, m, s: ({**p, "rel_beta": p["rel_beta"].astype(np.float64)}, q, r, m, s), r"rel_beta"),
        (lambda p, q, r, m, s: ({**p, "rel_gamma": np.full(4, np.nan, np.float32)}, q, r, m, s), r"rel_gamma"),
        (lambda p, q, r, m, s: ({**p, "rel_gamma": np.zeros(2, np.float32)}, q, r, m, s), r"rel_gamma"),
    ],
)
def test_relevance_front_door_errors(rel_setup, mutate, match):
    p, q, r, m, s = mutate(*rel_setup)
    with pytest.raises(ShapeError, match=match):
        fusion_forward(p, q, r, m, heads=4, scores=s)


def test_relevance_front_door_accepts(rel_setup):
    """NaN/inf scores in masked slots are fine (and change nothing); float32 raw scores are fine; the paper's
    layer ignores ``scores``; heads must match the length of rel_beta."""
    p, q, r, m, s = rel_setup
    out, _ = fusion_forward(p, q, r, m, scores=s)
    for masked in (np.nan, np.inf, -np.inf, 123.0):
        o, _ = fusion_forward(p, q, r, m, scores=np.where(m, s, masked))
        assert np.array_equal(o, out), masked
    o32, _ = fusion_forward(p, q, r, m, scores=s.astype(np.float32))
    np.testing.assert_allclose(o32, out, rtol=0, atol=1e-6)
    paper = FusionParams({n: p[n] for n in PARAM_NAMES}, FusionConfig(16, 4, 4, "float32"))
    a, _ = fusion_forward(paper, q, r, m)
    b, _ = fusion_forward(paper, q, r, m, scores=s)
    assert np.array_equal(a, b)
    with pytest.raises(ShapeError, match=r"rel_beta.*one per head \(2\)"):
        fusion_forward(dict(p), q, r, m, heads=2, scores=s)
    g = fusion_backward(p, fusion_forward(p, q, r, m, scores=s)[1], out)
    assert set(g) == set(p) and all(g[n].shape == p[n].shape and g[n].dtype == np.float32 for n in p)
