"""Parameters as data: .npz + JSON header roundtrip, and every corruption refused with the entry named.

Also the optional relevance pair ``rel_beta, rel_gamma [h]`` (docs/reco.md §2 "Relevance bias"): round trips through
save_params and save_param_set, the header field ``"relevance": {"center", "width"}``, header and entries
disagreeing either way, and old files (no such field) loading as before."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest

from reco_ref.errors import ParamsFormatError
from reco_ref.fusion import (
    PARAM_NAMES,
    RELEVANCE_NAMES,
    FusionConfig,
    FusionParams,
    fusion_forward,
    init_params,
    load_param_set,
    load_params,
    save_param_set,
    save_params,
)
from reco_ref.fusion.params import HEADER_KEY


def _rewrite(src, dst, *, drop=(), replace=None, header=None):
    """Copy an npz entry by entry (numpy's own writer), dropping/replacing entries or the header."""
    with np.load(src, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files if k not in drop}
    arrays.update(replace or {})
    if header is not None:
        arrays[HEADER_KEY] = np.frombuffer(header.encode("utf-8") if isinstance(header, str) else header, dtype=np.uint8)
    np.savez(dst, **arrays)  # test fixture writing a deliberately corrupt file; not project I/O


def _header(path):
    with np.load(path, allow_pickle=False) as z:
        return json.loads(z[HEADER_KEY].tobytes().decode())


@pytest.fixture
def saved(tmp_path):
    p = init_params(16, 4, mlp_ratio=2, seed=1, dtype=np.float64)
    for n in PARAM_NAMES:  # non-trivial values everywhere
        p[n] += np.random.default_rng(0).standard_normal(p[n].shape)
    path = tmp_path / "phi.npz"
    save_params(path, p)
    return p, path


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_roundtrip(tmp_path, dtype, rng):
    p = init_params(24, 3, mlp_ratio=4, seed=5, dtype=dtype)
    p["w_o"] += dtype(0.5)
    path = tmp_path / "m.npz"
    save_params(path, p)
    q, c = load_params(path)
    assert isinstance(q, FusionParams) and c == p.config and q.heads == 3 and q.mlp_ratio == 4
    assert list(q) == list(PARAM_NAMES)
    for n in PARAM_NAMES:
        assert q[n].dtype == dtype and np.array_equal(q[n], p[n]), n
    x = rng.standard_normal((2, 24)).astype(dtype)
    r = rng.standard_normal((2, 3, 24)).astype(dtype)
    assert np.array_equal(fusion_forward(q, x, r)[0], fusion_forward(p, x, r)[0])
    h = _header(path)
    assert h["format_version"] == 1 and h["modules"][""] == {"dim": 24, "heads": 3, "mlp_ratio": 4, "dtype": np.dtype(dtype).name}
    assert sorted(h["names"]) == sorted(PARAM_NAMES)
    assert not [f for f in path.parent.iterdir() if f.name.startswith(".tmp-")]  # atomic write left no temp file


def test_plain_dict_needs_config(tmp_path):
    p = init_params(8, 2)
    with pytest.raises(ParamsFormatError, match="config"):
        save_params(tmp_path / "x.npz", dict(p))
    save_params(tmp_path / "x.npz", dict(p), {"dim": 8, "heads": 2, "mlp_ratio": 4, "dtype": "float32"})
    assert load_params(tmp_path / "x.npz")[1] == FusionConfig(8, 2, 4, "float32")


def test_save_refuses_inconsistent(tmp_path):
    p = init_params(8, 2)
    bad = FusionParams({**p, "w_q": np.zeros((8, 4), np.float32)}, p.config)
    with pytest.raises(ParamsFormatError, match="'w_q' has shape"):
        save_params(tmp_path / "x.npz", bad)
    assert not (tmp_path / "x.npz").exists()


CORRUPTIONS = {
    "missing name": (dict(drop=("w_k",)), r"entry 'w_k' missing"),
    "unexpected name": (dict(replace={"w_extra": np.zeros(3)}), r"entry 'w_extra' unexpected"),
    "wrong shape": (dict(replace={"w_1": np.zeros((16, 16))}), r"entry 'w_1' has shape \(16, 16\), expected \(16, 32\)"),
    "wrong dtype": (dict(replace={"b_q": np.zeros(16, np.float32)}), r"entry 'b_q' has dtype float32, expected float64"),
    "NaN": (dict(replace={"ln2_gamma": np.full(16, np.nan)}), r"entry 'ln2_gamma' holds 16 NaN/inf"),
    "inf": (dict(replace={"e_query": np.array([np.inf] + [0.0] * 15)}), r"entry 'e_query' holds 1 NaN/inf"),
    "no header": (dict(drop=(HEADER_KEY,)), r"entry '__header__' missing"),
    "header not json": (dict(header="{not json"), r"entry '__header__' is not valid UTF-8 JSON"),
    "header not utf8": (dict(header=b"\xff\xfe"), r"'__header__' is not valid UTF-8"),
    "header is a list": (dict(header="[1, 2]"), r"'__header__' is list"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corruption_names_entry(saved, tmp_path, case):
    _, path = saved
    kwargs, match = CORRUPTIONS[case]
    bad = tmp_path / "bad.npz"
    _rewrite(path, bad, **kwargs)
    with pytest.raises(ParamsFormatError, match=match):
        load_params(bad)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda h: h.update(format_version=2), "'format_version' is 2, expected 1"),
        (lambda h: h.update(format="other"), "'format' is 'other'"),
        (lambda h: h["modules"][""].update(heads=5), "'heads' is 5, expected a divisor of dim=16"),
        (lambda h: h["modules"][""].update(dim=32), r"entry '\w+' has shape"),
        (lambda h: h["modules"][""].update(dtype="float16"), "'dtype' is 'float16'"),
        (lambda h: h["modules"][""].pop("mlp_ratio"), "'mlp_ratio' missing"),
        (lambda h: h["modules"][""].update(heads=True), "'heads' is True"),
        (lambda h: h.update(kind="set"), "'kind' is 'set', expected 'module'"),
        (lambda h: h.update(names=["w_q"]), "'names' lists"),
        (lambda h: h.pop("modules"), "'modules'"),
    ],
)
def test_bad_header_fields(saved, tmp_path, edit, match):
    _, path = saved
    h = _header(path)
    edit(h)
    bad = tmp_path / "bad.npz"
    _rewrite(path, bad, header=json.dumps(h))
    with pytest.raises(ParamsFormatError, match=match):
        load_params(bad)


def test_pickled_object_array_is_refused(saved, tmp_path):
    _, path = saved
    bad = tmp_path / "bad.npz"
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["w_v"] = np.array([{"evil": 1}, None], dtype=object)
    np.savez(bad, **arrays)  # numpy pickles object arrays on save
    with pytest.raises(ParamsFormatError, match=r"entry 'w_v' is a pickled object array"):
        load_params(bad)


@pytest.mark.parametrize("keep", [0.3, 0.9])
def test_truncated_file(saved, tmp_path, keep):
    _, path = saved
    data = path.read_bytes()
    bad = tmp_path / "bad.npz"
    bad.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ParamsFormatError, match="entry <archive> unreadable"):
        load_params(bad)


def test_corrupted_member_bytes(saved, tmp_path):
    """A damaged array inside an intact zip: the entry is named."""
    _, path = saved
    bad = tmp_path / "bad.npz"
    with zipfile.ZipFile(path) as zin, zipfile.ZipFile(bad, "w") as zout:
        for info in zin.infolist():
            blob = zin.read(info.filename)
            if info.filename == "w_2.npy":
                blob = blob[:200]  # header intact, data cut short
            zout.writestr(info.filename, blob)
    with pytest.raises(ParamsFormatError, match="'w_2'"):
        load_params(bad)


def test_not_a_zip_and_missing(tmp_path):
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"this is not a zip file at all")
    with pytest.raises(ParamsFormatError, match="unreadable"):
        load_params(junk)
    with pytest.raises(FileNotFoundError):
        load_params(tmp_path / "nope.npz")


# ----------------------------------------------------------------------------------------------
# sets of modules: φ_I, φ_T and τ in one file
# ----------------------------------------------------------------------------------------------


def test_param_set_roundtrip(tmp_path):
    img = init_params(16, 4, seed=1)
    txt = init_params(16, 2, mlp_ratio=2, seed=2)
    tau = np.array(np.log(1 / 0.07), dtype=np.float32)
    path = tmp_path / "reco.npz"
    save_param_set(path, {"image": img, "text": txt}, extras={"logit_scale": tau})
    mods, extras = load_param_set(path)
    assert set(mods) == {"image", "text"} and mods["text"].heads == 2 and mods["text"].mlp_ratio == 2
    for pre, src in (("image", img), ("text", txt)):
        assert all(np.array_equal(mods[pre][n], src[n]) for n in PARAM_NAMES)
    assert extras["logit_scale"].shape == () and extras["logit_scale"] == tau
    h = _header(path)
    assert "image.w_q" in h["names"] and "text.e_neighbor" in h["names"] and "logit_scale" in h["names"]
    with pytest.raises(ParamsFormatError, match="'kind' is 'set', expected 'module'.*load_param_set"):
        load_params(path)
    save_params(tmp_path / "one.npz", img)
    with pytest.raises(ParamsFormatError, match="'kind' is 'module', expected 'set'"):
        load_param_set(tmp_path / "one.npz")


def test_param_set_corruptions(tmp_path):
    img = init_params(8, 2, seed=1)
    path = tmp_path / "reco.npz"
    save_param_set(path, {"image": img, "text": img}, extras={"logit_scale": np.array(2.0)})
    bad = tmp_path / "bad.npz"
    _rewrite(path, bad, drop=("text.w_1",))
    with pytest.raises(ParamsFormatError, match="entry 'text.w_1' missing"):
        load_param_set(bad)
    _rewrite(path, bad, replace={"logit_scale": np.array(np.nan)})
    with pytest.raises(ParamsFormatError, match="entry 'logit_scale' holds 1 NaN"):
        load_param_set(bad)
    _rewrite(path, bad, replace={"image.w_o": np.zeros((8, 8), np.float64)})
    with pytest.raises(ParamsFormatError, match="entry 'image.w_o' has dtype float64, expected float32"):
        load_param_set(bad)
    with pytest.raises(ParamsFormatError, match="prefix"):
        save_param_set(tmp_path / "x.npz", {"a.b": img})
    with pytest.raises(ParamsFormatError, match="extra name"):
        save_param_set(tmp_path / "x.npz", {"image": img}, extras={"image.w_q": np.zeros(2)})


def test_header_bytes_are_plain_json(saved):
    """The header is readable without numpy's pickle machinery and without this package."""
    _, path = saved
    with zipfile.ZipFile(path) as z:
        raw = z.read(HEADER_KEY + ".npy")
    arr = np.load(io.BytesIO(raw), allow_pickle=False)
    assert json.loads(arr.tobytes())["format"] == "reco_ref.fusion.params"


# ----------------------------------------------------------------------------------------------
# relevance bias (docs/reco.md §2 [ours]): rel_beta, rel_gamma [h] and the header field "relevance"
# ----------------------------------------------------------------------------------------------


def _rel_module(dtype=np.float64, heads=4, center=0.9, width=0.05, seed=1):
    p = init_params(16, heads, mlp_ratio=2, seed=seed, dtype=dtype, relevance=True, rel_center=center, rel_width=width)
    rng = np.random.default_rng(seed)
    for n in p:  # non-trivial values everywhere, β and γ different per head
        p[n] = p[n] + rng.standard_normal(p[n].shape).astype(dtype)
    return p


@pytest.fixture
def saved_rel(tmp_path):
    p = _rel_module()
    path = tmp_path / "phi_rel.npz"
    save_params(path, p)
    return p, path


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relevance_roundtrip(tmp_path, dtype, rng):
    p = _rel_module(dtype, center=0.95, width=0.03)
    path = tmp_path / "m.npz"
    save_params(path, p)
    q, c = load_params(path)
    assert c == p.config and c.relevance and (c.rel_center, c.rel_width) == (0.95, 0.03)
    assert isinstance(q, FusionParams) and list(q) == list(PARAM_NAMES) + list(RELEVANCE_NAMES)
    for n in p:
        assert q[n].dtype == dtype and np.array_equal(q[n], p[n]), n
    h = _header(path)
    assert h["modules"][""] == {"dim": 16, "heads": 4, "mlp_ratio": 2, "dtype": np.dtype(dtype).name,
                                "relevance": {"center": 0.95, "width": 0.03}}  # fmt: skip
    assert sorted(h["names"]) == sorted(PARAM_NAMES + RELEVANCE_NAMES)
    x = rng.standard_normal((2, 16)).astype(dtype)
    r = rng.standard_normal((2, 3, 16)).astype(dtype)
    s = rng.uniform(0.8, 1.0, size=(2, 3))
    a, _ = fusion_forward(q, x, r, scores=s)
    b, _ = fusion_forward(p, x, r, scores=s)
    assert np.array_equal(a, b)  # the score map's centre and width came back too


def test_paper_module_header_has_no_relevance_field(saved):
    """Files of modules without the bias are written exactly as before: no "relevance" key, the 18 names."""
    _, path = saved
    h = _header(path)
    assert "relevance" not in h["modules"][""] and sorted(h["names"]) == sorted(PARAM_NAMES)


def test_old_file_without_relevance_still_loads(tmp_path, rng):
    """A file as format_version 1 wrote it before the relevance bias existed (header and entries built by hand
    here, not by save_params) loads as the paper's layer: no relevance arrays, forward needs no scores."""
    p = init_params(8, 2, seed=3, dtype=np.float32)
    header = {"format": "reco_ref.fusion.params", "format_version": 1, "kind": "module",
              "modules": {"": {"dim": 8, "heads": 2, "mlp_ratio": 4, "dtype": "float32"}}, "extras": {},
              "names": sorted(PARAM_NAMES)}  # fmt: skip
    path = tmp_path / "old.npz"
    np.savez(path, **{HEADER_KEY: np.frombuffer(json.dumps(header).encode(), np.uint8)}, **dict(p))
    q, c = load_params(path)
    assert not c.relevance and list(q) == list(PARAM_NAMES) and c == FusionConfig(8, 2, 4, "float32")
    x = rng.standard_normal((2, 8)).astype(np.float32)
    out, _ = fusion_forward(q, x, rng.standard_normal((2, 3, 8)).astype(np.float32))
    np.testing.assert_array_equal(out, x / np.linalg.norm(x, axis=1, keepdims=True))
    set_path = tmp_path / "old_set.npz"
    set_header = dict(header, kind="set", modules={"image": header["modules"][""]},
                      names=sorted("image." + n for n in PARAM_NAMES))  # fmt: skip
    np.savez(set_path, **{HEADER_KEY: np.frombuffer(json.dumps(set_header).encode(), np.uint8)},
             **{"image." + n: a for n, a in p.items()})  # fmt: skip
    mods, extras = load_param_set(set_path)
    assert not mods["image"].config.relevance and list(mods["image"]) == list(PARAM_NAMES) and extras == {}


def test_relevance_param_set_roundtrip(tmp_path):
    """φ_I with the bias, φ_T without, and τ in one file: each module's header says what it has."""
    img = _rel_module(np.float32, heads=4, center=1.0, width=0.02)
    txt = init_params(16, 2, mlp_ratio=2, seed=2)
    tau = np.array(np.log(1 / 0.07), dtype=np.float32)
    path = tmp_path / "reco.npz"
    save_param_set(path, {"image": img, "text": txt}, extras={"logit_scale": tau})
    h = _header(path)
    assert h["modules"]["image"]["relevance"] == {"center": 1.0, "width": 0.02}
    assert "relevance" not in h["modules"]["text"]
    assert "image.rel_beta" in h["names"] and "image.rel_gamma" in h["names"] and "text.rel_beta" not in h["names"]
    mods, extras = load_param_set(path)
    assert mods["image"].config == img.config and mods["text"].config == txt.config
    assert list(mods["image"]) == list(PARAM_NAMES) + list(RELEVANCE_NAMES) and list(mods["text"]) == list(PARAM_NAMES)
    for n in img:
        assert np.array_equal(mods["image"][n], img[n]), n
    assert extras["logit_scale"] == tau
    bad = tmp_path / "bad.npz"
    _rewrite(path, bad, drop=("image.rel_gamma",))
    with pytest.raises(ParamsFormatError, match=r"entry 'image.rel_gamma' missing, expected shape \(4,\)"):
        load_param_set(bad)


REL_CORRUPTIONS = {
    "header says relevance, rel_beta entry missing": (dict(drop=("rel_beta",)), r"entry 'rel_beta' missing, expected shape \(4,\)"),
    "header says relevance, rel_gamma entry missing": (dict(drop=("rel_gamma",)), r"entry 'rel_gamma' missing"),
    "rel_beta one per head": (dict(replace={"rel_beta": np.zeros(2)}), r"entry 'rel_beta' has shape \(2,\), expected \(4,\)"),
    "rel_gamma dtype": (dict(replace={"rel_gamma": np.zeros(4, np.float32)}), r"entry 'rel_gamma' has dtype float32"),
    "rel_beta NaN": (dict(replace={"rel_beta": np.array([0.0, np.nan, 1.0, 2.0])}), r"entry 'rel_beta' holds 1 NaN/inf"),
}


@pytest.mark.parametrize("case", list(REL_CORRUPTIONS))
def test_relevance_corruption_names_entry(saved_rel, tmp_path, case):
    _, path = saved_rel
    kwargs, match = REL_CORRUPTIONS[case]
    bad = tmp_path / "bad.npz"
    _rewrite(path, bad, **kwargs)
    with pytest.raises(ParamsFormatError, match=match):
        load_params(bad)


def test_relevance_header_and_entries_must_agree(saved, saved_rel, tmp_path):
    """The header's "relevance" field and the rel_beta/rel_gamma entries must go together, both ways; the error
    names the entries."""
    bad = tmp_path / "bad.npz"
    # Header without "relevance" (names updated to match), but the file still holds rel_beta / rel_gamma.
    _, rel_path = saved_rel
    h = _header(rel_path)
    h["modules"][""].pop("relevance")
    h["names"] = sorted(PARAM_NAMES)
    _rewrite(rel_path, bad, header=json.dumps(h))
    with pytest.raises(ParamsFormatError, match=r"entry 'rel_(beta|gamma)' unexpected"):
        load_params(bad)
    # Same, header names still listing the pair: the names check reports the two entries.
    h = _header(rel_path)
    h["modules"][""].pop("relevance")
    _rewrite(rel_path, bad, header=json.dumps(h))
    with pytest.raises(ParamsFormatError, match=r"'names' lists .*unexpected \['rel_beta', 'rel_gamma'\]"):
        load_params(bad)
    # A paper file whose header was given "relevance" (names updated): the entries are missing.
    _, path = saved
    h = _header(path)
    h["modules"][""]["relevance"] = {"center": 1.0, "width": 0.02}
    h["names"] = sorted(PARAM_NAMES + RELEVANCE_NAMES)
    _rewrite(path, bad, header=json.dumps(h))
    with pytest.raises(ParamsFormatError, match=r"entry 'rel_beta' missing"):
        load_params(bad)
    # Same, names not updated.
    h = _header(path)
    h["modules"][""]["relevance"] = {"center": 1.0, "width": 0.02}
    _rewrite(path, bad, header=json.dumps(h))
    with pytest.raises(ParamsFormatError, match=r"'names' lists .*missing \['rel_beta', 'rel_gamma'\]"):
        load_params(bad)
    # Header says relevance, file holds rel_beta but not rel_gamma (names listing both).
    _rewrite(rel_path, bad, drop=("rel_gamma",))
    with pytest.raises(ParamsFormatError, match=r"entry 'rel_gamma' missing"):
        load_params(bad)


@pytest.mark.parametrize(
    "rel, match",
    [
        (True, "'relevance' is True"),
        ({"center": 1.0}, "'relevance' is"),
        ({"center": 1.0, "width": 0.0}, "'relevance' is"),
        ({"center": 1.0, "width": -0.02}, "'relevance' is"),
        ({"center": "1", "width": 0.02}, "'relevance' is"),
        ({"center": 1.0, "width": 0.02, "scale": 3}, "'relevance' is"),
        ({"center": float("nan"), "width": 0.02}, "'relevance' is"),
        ({"center": 1.0, "width": True}, "'relevance' is"),
    ],
)
def test_bad_relevance_header_field(saved_rel, tmp_path, rel, match):
    _, path = saved_rel
    h = _header(path)
    h["modules"][""]["relevance"] = rel
    bad = tmp_path / "bad.npz"
    _rewrite(path, bad, header=json.dumps(h))
    with pytest.raises(ParamsFormatError, match=match):
        load_params(bad)


def test_save_refuses_relevance_mismatch(tmp_path):
    """What load would refuse is not written: a relevance config without the pair, the pair without the config."""
    p = _rel_module()
    missing = FusionParams({n: p[n] for n in PARAM_NAMES}, p.config)
    with pytest.raises(ParamsFormatError, match=r"missing \['rel_beta', 'rel_gamma'\]"):
        save_params(tmp_path / "x.npz", missing)
    with pytest.raises(ParamsFormatError, match=r"unexpected \['rel_beta', 'rel_gamma'\]"):
        save_params(tmp_path / "x.npz", dict(p), {"dim": 16, "heads": 4, "mlp_ratio": 2, "dtype": "float64"})
    with pytest.raises(ParamsFormatError, match=r"'rel_beta' has shape \(2,\), expected \(4,\)"):
        save_params(tmp_path / "x.npz", FusionParams({**p, "rel_beta": np.zeros(2)}, p.config))
    with pytest.raises(ParamsFormatError, match=r"'rel_gamma' holds 1 NaN"):
        save_params(tmp_path / "x.npz", FusionParams({**p, "rel_gamma": np.array([0, 0, np.inf, 0.0])}, p.config))
    assert not (tmp_path / "x.npz").exists()
    save_params(tmp_path / "ok.npz", dict(p), p.config)  # a plain dict with the right config is fine
    assert load_params(tmp_path / "ok.npz")[1] == p.config
