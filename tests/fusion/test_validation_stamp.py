"""Validation once at the door: library-made or once-checked FusionParams are not re-scanned per call,
every way of changing an entry brings the full check (and its named errors) back, and in-place NaN
writes still cannot pass silently."""

from __future__ import annotations

import numpy as np
import pytest
from fusion_testlib import random_inputs

import reco_ref.fusion as fusion
from reco_ref.errors import ShapeError
from reco_ref.fusion import check_params, fusion_backward, fusion_forward, init_params, load_params, save_params


@pytest.fixture
def scans(monkeypatch):
    """Counts check_array calls on parameter arrays made by the front door."""
    seen = []
    real = fusion.check_array

    def spy(name, *a, **kw):
        if name.startswith("params["):
            seen.append(name)
        return real(name, *a, **kw)

    monkeypatch.setattr(fusion, "check_array", spy)
    return seen


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_library_made_params_are_not_rescanned(scans, tmp_path, backend):
    rng = np.random.default_rng(0)
    p = init_params(16, 4)
    save_params(tmp_path / "p.npz", p)
    loaded, _ = load_params(tmp_path / "p.npz")
    q, r, mask = random_inputs(2, 3, 16, rng, dtype=np.float32)
    for params in (p, loaded):
        out, cache = fusion_forward(params, q, r, mask, backend=backend)
        fusion_backward(params, cache, np.ones_like(out))
    assert scans == []
    plain = dict(p)  # a plain dict is checked in full on every call
    fusion_forward(plain, q, r, mask, heads=4, backend=backend)
    fusion_forward(plain, q, r, mask, heads=4, backend=backend)
    assert len(scans) == 2 * 20  # ln1_gamma, w_1, then all 18, per call


def test_a_copy_is_checked_once_then_trusted(scans):
    rng = np.random.default_rng(1)
    p = init_params(16, 4).copy()
    q, r, mask = random_inputs(2, 3, 16, rng, dtype=np.float32)
    fusion_forward(p, q, r, mask)
    n = len(scans)
    assert n == 20
    fusion_forward(p, q, r, mask)
    assert len(scans) == n


@pytest.mark.parametrize(
    "change",
    [
        lambda p: p.__setitem__("w_1", np.full_like(p["w_1"], np.nan)),
        lambda p: p.update(w_1=np.full_like(p["w_1"], np.inf)),
        lambda p: (p.pop("w_1"), dict.__setitem__(p, "w_1", np.full((16, 64), np.nan, np.float32))),  # pop drops it
    ],
)
def test_replacing_an_entry_brings_back_the_named_error(change):
    rng = np.random.default_rng(2)
    p = init_params(16, 4)
    q, r, mask = random_inputs(2, 3, 16, rng, dtype=np.float32)
    fusion_forward(p, q, r, mask)
    change(p)
    with pytest.raises(ShapeError, match=r"params\['w_1'\]: contains \d+ NaN/inf"):
        fusion_forward(p, q, r, mask)


def test_shape_change_in_place_is_caught():
    rng = np.random.default_rng(3)
    p = init_params(16, 4)
    q, r, mask = random_inputs(2, 3, 16, rng, dtype=np.float32)
    p["w_1"].shape = (64, 16)  # same object, same bytes, other shape
    with pytest.raises(ShapeError, match=r"w_1"):
        fusion_forward(p, q, r, mask, backend="numba")
    del p["w_q"]
    with pytest.raises(ShapeError, match="missing"):
        fusion_forward(p, q, r, mask)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_in_place_nan_is_reported_at_the_output_and_named_by_rescan(backend):
    """What the FusionParams docstring promises for in-place value writes."""
    rng = np.random.default_rng(4)
    p = init_params(16, 4)
    q, r, mask = random_inputs(2, 3, 16, rng, dtype=np.float32)
    fusion_forward(p, q, r, mask, backend=backend)
    p["w_1"][0, 0] = np.nan
    with pytest.raises(ShapeError, match="fusion output: rows .* not finite"):
        fusion_forward(p, q, r, mask, backend=backend)
    with pytest.raises(ShapeError, match=r"params\['w_1'\]: contains 1 NaN/inf"):
        check_params(p, rescan=True)
    with pytest.raises(ShapeError, match=r"params\['w_1'\]"):  # the failed rescan left no stamp
        fusion_forward(p, q, r, mask, backend=backend)
