"""reco_ref/backends.py: one registry for fusion and training; a backend is one line (issue 8)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from reco_ref import backends, fusion
from reco_ref.errors import BackendUnavailableError
from reco_ref.train import losses


def test_fusion_and_training_share_the_registry():
    assert fusion.BACKENDS is backends.BACKENDS and fusion.get_backend is backends.get_backend
    assert losses.backend_of_cache is backends.backend_of_cache


def test_one_line_registers_a_backend_for_both_front_doors(monkeypatch, rng):
    # a backend module with the fusion layer but no InfoNCE kernels
    monkeypatch.setitem(backends.BACKENDS, "mine", backends.Backend("reco_ref.fusion.reference", "nothing"))
    p = fusion.init_params(8, 2, seed=0, dtype=np.float64)
    q, r = rng.standard_normal((2, 8)), rng.standard_normal((2, 3, 8))
    out, cache = fusion.fusion_forward(p, q, r, backend="mine")
    np.testing.assert_array_equal(out, fusion.fusion_forward(p, q, r)[0])
    assert cache["backend"] == "mine" and set(fusion.fusion_backward(p, cache, out)) == set(p)
    a = rng.standard_normal((3, 4))
    with pytest.raises(BackendUnavailableError, match=r"fusion backend 'mine' unavailable: .* does not define \['infonce_forward'\]"):
        losses.infonce_forward(a, a, 1.0, backend="mine")


def test_register_backend_and_errors(monkeypatch):
    monkeypatch.setattr(backends, "BACKENDS", dict(backends.BACKENDS))
    backends.register_backend("ghost", "reco_ref.fusion._no_such_module", "the ghost extra")
    with pytest.raises(BackendUnavailableError, match=r"fusion backend 'ghost' unavailable: importing .* install the ghost extra"):
        backends.get_backend("ghost")
    with pytest.raises(BackendUnavailableError, match="fusion backend 'tpu' unknown"):
        backends.backend_function("tpu", "infonce_forward")
    with pytest.raises(ValueError, match="cache was made by backend 'numba'"):
        backends.backend_of_cache({"backend": "numba"}, "numpy", "fusion_forward")


def test_importing_the_registry_imports_no_room():
    code = ("import json, sys, reco_ref.backends; "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('reco_ref.'))))")  # fmt: skip
    mods = json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)
    assert mods == ["reco_ref.backends", "reco_ref.errors"], mods
