"""One backend registry for the fusion layer and the classifier (issue 22 item 2): ``reco_ref/backends.py`` names,
per backend, the module of each family's kernels; ``classify_forward`` dispatches through it as the fusion does."""

from __future__ import annotations

import numpy as np
import pytest

from reco_ref import backends
from reco_ref.errors import BackendUnavailableError


def _inputs(seed=0):
    from reco_ref.classify.model import init_params

    rng = np.random.default_rng(seed)
    P = init_params(8, 3, key_dim=6, value_dim=8, width=8, heads=2, seed=seed)
    q = rng.standard_normal((4, 8)).astype(np.float32)
    K = rng.standard_normal((4, 5, 6)).astype(np.float32)
    V = rng.standard_normal((4, 5, 8)).astype(np.float32)
    return P, q, K, V, np.ones((4, 5), bool)


def test_a_registered_backend_runs_the_classifier(monkeypatch):
    """One line in the registry is all a classifier backend takes (the classifier had its own tuple and if-chain)."""
    from reco_ref.classify.model import classify_backward, classify_forward

    monkeypatch.setitem(backends.BACKENDS, "mine", backends.Backend(
        "reco_ref.fusion.reference", "nothing", classify="reco_ref.classify.reference"))
    P, q, K, V, valid = _inputs()
    ref, _ = classify_forward(P, q, K, V, valid, heads=2)
    out, cache = classify_forward(P, q, K, V, valid, heads=2, backend="mine")
    assert cache["backend"] == "mine" and np.array_equal(out, ref)
    assert set(classify_backward(P, cache, np.ones_like(out))) == set(P)


def test_a_backend_without_classifier_kernels_is_named(monkeypatch):
    from reco_ref.classify.model import classify_forward

    monkeypatch.setattr(backends, "BACKENDS", dict(backends.BACKENDS))
    backends.register_backend("fusion-only", "reco_ref.fusion.reference", "nothing")
    backends.register_backend("ghost", "reco_ref.fusion.reference", "the ghost extra", classify="reco_ref._no_such")
    P, q, K, V, valid = _inputs()
    with pytest.raises(BackendUnavailableError, match=r"classify backend 'fusion-only' unavailable: .*no classify "
                                                      r"kernels; expected one of \['ghost', 'numba', 'numpy'\]"):
        classify_forward(P, q, K, V, valid, heads=2, backend="fusion-only")
    with pytest.raises(BackendUnavailableError, match=r"classify backend 'ghost' unavailable: importing "
                                                      r"reco_ref._no_such failed .* install the ghost extra"):
        classify_forward(P, q, K, V, valid, heads=2, backend="ghost")
    assert backends.backend_names("fusion")[-2:] == ("fusion-only", "ghost")
    assert backends.get_backend("fusion-only").__name__ == "reco_ref.fusion.reference"  # its fusion side works


def test_the_classifier_backends_are_the_registry_s():
    from reco_ref.classify import cli
    from reco_ref.classify.model import BACKENDS

    assert BACKENDS == backends.backend_names("classify") == ("numpy", "numba")
    # the classify verbs offer exactly the registered backends that have classifier kernels
    assert set(cli._BACKEND_EXCLUDE) == set(backends.BACKENDS) - set(BACKENDS)
    for name in BACKENDS:
        mod = backends.get_backend(name, family="classify")
        assert mod.__name__.startswith("reco_ref.classify.") and callable(mod.classify_backward)
