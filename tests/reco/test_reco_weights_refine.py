"""reco_ref.reco: the RecoWeights file round trip / validation, and refine(): identity at init, self-exclusion, all four combinations."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from reco_ref.errors import ParamsFormatError, SearchError, ShapeError
from reco_ref.fusion import fusion_forward, save_param_set
from reco_ref.memory import retrieve
from reco_ref.reco.refine import refine
from reco_ref.reco.weights import (RecoWeights, check_weights_match, default_weights_path, init_reco_weights,
                                    load_reco_weights, save_reco_weights)

TRAIN = Path(__file__).resolve().parents[1] / "train"  # the memories of train_testlib, shared with tests/train
if str(TRAIN) not in sys.path:
    sys.path.insert(0, str(TRAIN))
from train_testlib import build, clustered  # noqa: E402


def _trained_like(dim=16, seed=0) -> RecoWeights:
    w = init_reco_weights(dim, heads=4, seed=seed, meta={"encoder_name": "fake", "encoder_fingerprint": "ab" * 32,
                                                         "trained_on": ["x"], "seed": seed})
    rng = np.random.default_rng(seed + 7)
    for phi in (w.image, w.text):
        for name in ("w_o", "w_2", "e_query"):
            phi[name][...] = rng.normal(0, 0.05, phi[name].shape).astype(np.float32)
    w.tau = 3.1
    return w


def test_weights_round_trip(tmp_path):
    w = _trained_like()
    save_reco_weights(tmp_path / "w.npz", w)
    r = load_reco_weights(tmp_path / "w.npz")
    assert r.meta == w.meta and r.tau == 3.1 and r.dim == 16 and r.image.heads == 4
    for name in w.image:
        np.testing.assert_array_equal(r.image[name], w.image[name])
        np.testing.assert_array_equal(r.text[name], w.text[name])
    assert not np.array_equal(r.image["w_o"], r.text["w_o"])


def test_init_is_identity_and_modules_differ():
    w = init_reco_weights(16, heads=4, seed=3)
    assert w.meta["dim"] == 16 and w.meta["heads"] == 4
    assert not np.array_equal(w.image["w_q"], w.text["w_q"])
    q = np.random.default_rng(0).standard_normal((5, 16)).astype(np.float32)
    r = np.random.default_rng(1).standard_normal((5, 3, 16)).astype(np.float32)
    out, _ = fusion_forward(w.image, q, r)
    np.testing.assert_allclose(out, q / np.linalg.norm(q, axis=1, keepdims=True), atol=1e-6)


def test_weights_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="fusion weights not found"):
        load_reco_weights(tmp_path / "nope.npz")
    w = _trained_like()
    save_param_set(tmp_path / "only_image.npz", {"image": w.image})
    with pytest.raises(ParamsFormatError, match=r"only_image.npz: modules \['image'\], expected"):
        load_reco_weights(tmp_path / "only_image.npz")
    save_param_set(tmp_path / "no_meta.npz", {"image": w.image, "text": w.text}, extras={"tau": np.array(1.0)})
    with pytest.raises(ParamsFormatError, match="no_meta.npz: extras"):
        load_reco_weights(tmp_path / "no_meta.npz")
    save_param_set(tmp_path / "bad_meta.npz", {"image": w.image, "text": w.text},
                   extras={"tau": np.array(1.0), "meta_utf8": np.array([300.0, 1.0], np.float32)})
    with pytest.raises(ParamsFormatError, match="meta_utf8"):
        load_reco_weights(tmp_path / "bad_meta.npz")
    w.meta["bad"] = object()
    with pytest.raises(ParamsFormatError, match="not JSON-serialisable"):
        save_reco_weights(tmp_path / "x.npz", w)
    assert not (tmp_path / "x.npz").exists()


def test_check_weights_match():
    w = _trained_like()
    check_weights_match(w, encoder_fingerprint="ab" * 32, dim=16)
    check_weights_match(w)  # nothing known: nothing to refuse
    with pytest.raises(ParamsFormatError, match="--fusion: fusion weights have dim 16, the encoder/memory has dim 8"):
        check_weights_match(w, dim=8, where="--fusion")
    with pytest.raises(ParamsFormatError, match="trained for encoder fingerprint abab"):
        check_weights_match(w, encoder_fingerprint="cd" * 32)


def test_default_weights_path():
    p = default_weights_path()
    assert p.parts[-2:] == ("reco-mini-fusion", "fusion.npz")


@pytest.fixture(scope="module")
def mem(tmp_path_factory):
    image, text, keys, labels, _ = clustered(60, 16, 6, seed=0, key_dim=24)
    m = build(tmp_path_factory.mktemp("mem") / "m", image, text, keys)
    return m, image, text, keys


def test_refine_identity_at_init_and_matches_manual(mem):
    m, image, text, keys = mem
    w = _trained_like()
    ident = init_reco_weights(16, heads=4)
    out, rows, valid = refine(ident.image, m, image[:7], "image", search_queries=keys[:7], k=5, exact=True)
    np.testing.assert_allclose(out, image[:7], atol=1e-6)
    # trained-like weights, batch 3: same as retrieve + one fusion_forward call on all rows
    own = np.arange(7)
    out, rows, valid = refine(w.image, m, image[:7], "image", search_queries=keys[:7], k=5, exclude=own,
                              batch_size=3, exact=True)
    nb, ok, r = retrieve(m, keys[:7], "image", k=5, exclude=own, exact=True)
    ref, _ = fusion_forward(w.image, image[:7], nb, ok)
    np.testing.assert_array_equal(rows, r)
    np.testing.assert_allclose(out, ref, atol=1e-6)
    assert not (rows == own[:, None]).any()  # self-exclusion
    fast, fast_rows, _ = refine(w.image, m, image[:7], "image", search_queries=keys[:7], k=5, exclude=own,
                                batch_size=3, exact=True, validate_params=False)
    np.testing.assert_array_equal(fast, out)
    np.testing.assert_array_equal(fast_rows, rows)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)


@pytest.mark.parametrize("search", ["uni", "cross"])
@pytest.mark.parametrize("fuse", ["cross", "uni"])
@pytest.mark.parametrize("modality", ["image", "text"])
def test_refine_every_combination(mem, search, fuse, modality):
    m, image, text, keys = mem
    w = _trained_like()
    q = image[:4] if modality == "image" else text[:4]
    out, rows, valid = refine(w.phi(modality), m, q, modality, search_queries=keys[:4] if modality == "image" else None,
                              k=3, search=search, fuse=fuse, exact=True)
    searched = modality if search == "uni" else {"image": "text", "text": "image"}[modality]
    fed = {"image": "text", "text": "image"}[modality] if fuse == "cross" else modality
    base = (keys if searched == "image" and search == "uni" else image if searched == "image" else text)
    sims = (keys[:4] if (modality, search) == ("image", "uni") else q) @ base.T
    np.testing.assert_array_equal(rows[:, 0], np.argmax(sims, axis=1))  # nearest row first
    nb = m.embeddings(fed, rows)
    ref, _ = fusion_forward(w.phi(modality), q, nb, valid)
    np.testing.assert_allclose(out, ref, atol=1e-6)


def test_refine_errors(mem):
    m, image, text, keys = mem
    w = _trained_like()
    with pytest.raises(ShapeError, match="does not match the fusion module's dim 16"):
        refine(w.image, m, keys[:2], "image")
    with pytest.raises(SearchError, match="search: expected 'uni' or 'cross'"):
        refine(w.image, m, image[:2], "image", search_queries=keys[:2], search="both")
    with pytest.raises(SearchError, match="encode_image_keys"):
        refine(w.image, m, image[:2], "image")  # keyed memory, no keys given


def test_old_train_paths_still_import_the_same_objects():
    """The weights file and refine moved from train/ to reco/ (issue 22): the old import paths give the very same
    objects, so code written against them keeps working."""
    import importlib

    for m in ("weights", "refine"):  # import_module: the packages also export a function named refine
        old, new = importlib.import_module(f"reco_ref.train.{m}"), importlib.import_module(f"reco_ref.reco.{m}")
        assert old.__all__ == new.__all__
        for name in new.__all__:
            assert getattr(old, name) is getattr(new, name), (m, name)
