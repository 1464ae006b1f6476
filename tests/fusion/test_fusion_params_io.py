"""Parameters as data: .npz + JSON header roundtrip, and every corruption refused with the entry named."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest

from reco_ref.errors import ParamsFormatError
from reco_ref.fusion import (
    PARAM_NAMES,
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
