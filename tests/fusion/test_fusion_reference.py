"""Properties of the fusion layer through the front door: identity at init, parameter count,
permutation invariance, masking, k = 0, float32, and clear errors on bad input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fusion_testlib import random_inputs, random_params, single_blas_thread
from reco_ref.errors import BackendUnavailableError, ShapeError
from reco_ref.fusion import (
    PARAM_NAMES,
    FusionParams,
    count_params,
    fusion_backward,
    fusion_forward,
    get_backend,
    init_params,
    reference,
)

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
    assert count_params(p) == 3_153_408  # spec §2: 12·D² + 9·D + 4·D + 2·D at D = 512
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


def test_float32_path_matches_float64(rng):
    B, k, D, h = 8, 10, 32, 4
    p64 = random_params(D, h, rng)
    q, r, mask = random_inputs(B, k, D, rng)
    p32 = FusionParams({n: a.astype(np.float32) for n, a in p64.items()}, p64.config.__class__(D, h, 4, "float32"))
    out64, c64 = fusion_forward(p64, q, r, mask)
    out32, c32 = fusion_forward(p32, q.astype(np.float32), r.astype(np.float32), mask)
    assert out32.dtype == np.float32
    np.testing.assert_allclose(out32, out64, rtol=0, atol=2e-6)
    dout = rng.standard_normal((B, D))
    g64 = fusion_backward(p64, c64, dout)
    g32 = fusion_backward(p32, c32, dout.astype(np.float32))
    for n in PARAM_NAMES:
        assert g32[n].dtype == np.float32, n
        scale = max(1.0, np.abs(g64[n]).max())
        np.testing.assert_allclose(g32[n], g64[n], rtol=0, atol=5e-5 * scale, err_msg=n)


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

    monkeypatch.setitem(fusion.BACKENDS, "cuda", ("reco_ref.fusion._no_such_backend", "the cuda extra: pip install -e \".[cuda]\""))
    with pytest.raises(ImportError, match=r"cuda.*\[cuda\]") as info:
        get_backend("cuda")
    assert isinstance(info.value, BackendUnavailableError)  # a RecoError too: the CLI prints it in one line
