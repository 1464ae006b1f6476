"""The compute-backend registry: one name → its modules, shared by fusion, training and the classifier.

A *backend* is a module implementing the kernels behind the front doors
:func:`reco_ref.fusion.fusion_forward` / ``fusion_backward`` and
:func:`reco_ref.train.losses.infonce_forward` / ``infonce_backward``, with the signatures of the
NumPy reference (:mod:`reco_ref.fusion.reference`), and, where the backend has them, a second module with the
memory-attention classifier's kernels behind :func:`reco_ref.classify.classify_forward` / ``classify_backward``
(signatures of :mod:`reco_ref.classify.reference`). Every front door finds backends here, so a name means the same
backend everywhere and a missing install gives the same one-line error. The *families* (:data:`FAMILIES`) say
which field of a :class:`Backend` names a family's module and what that module must define.

Registering a backend is one line in :data:`BACKENDS` (or one :func:`register_backend` call for a
backend that lives outside this package). Modules are named, never imported here: this is a shared
helper and imports no room until a backend is asked for (:func:`get_backend`).

Example
-------
>>> from reco_ref.backends import get_backend
>>> get_backend("numpy").__name__
'reco_ref.fusion.reference'
>>> get_backend("numba", family="classify").__name__
'reco_ref.classify.numba_cpu'
"""

from __future__ import annotations

import contextlib
import importlib
from types import ModuleType
from typing import Callable, NamedTuple

from .errors import BackendUnavailableError, RecoError

__all__ = ["Backend", "BACKENDS", "FAMILIES", "register_backend", "backend_names", "get_backend", "backend_function",
           "backend_of_cache", "blas_threads"]


class Backend(NamedTuple):
    """Where a backend lives and what to install when importing it fails."""

    module: str  # dotted module path of the fusion layer's (and InfoNCE's) kernels, imported on first use
    install: str  # the install hint printed in the error
    classify: str | None = None  # dotted module path of the classifier's kernels; None: this backend has none


#: backend name → :class:`Backend`; one line per backend.
BACKENDS: dict[str, Backend] = {
    "numpy": Backend("reco_ref.fusion.reference", "nothing (NumPy and SciPy are runtime dependencies)",
                     classify="reco_ref.classify.reference"),
    "numba": Backend("reco_ref.fusion.numba_cpu", "numba (a runtime dependency: python3 -m pip install -e .)",
                     classify="reco_ref.classify.numba_cpu"),
    "cuda": Backend("reco_ref.fusion.cuda", 'the cuda extra: python3 -m pip install -e ".[cuda]" (numba-cuda) and a CUDA GPU/driver'),
    "onnx": Backend("reco_ref.fusion.onnx_backend", "onnxruntime (a runtime dependency); forward only; graphs from reco-ref export-fusion or, with the export extra, built in memory"),
}

#: what every backend module must define (the fusion layer); other functions are asked for by name
REQUIRED = ("fusion_forward", "fusion_backward")

#: family → (the :class:`Backend` field naming its module, the functions that module must define)
FAMILIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "fusion": ("module", REQUIRED),
    "classify": ("classify", ("classify_forward", "classify_backward")),
}


def register_backend(name: str, module: str, install: str, *, classify: str | None = None) -> None:
    """Add (or replace) the backend ``name`` implemented by the module path ``module`` (and, given ``classify``,
    the classifier's kernels in that module path)."""
    if not name or not isinstance(name, str):
        raise RecoError(f"backend name: expected a non-empty str, got {name!r}")
    BACKENDS[name] = Backend(module, install, classify)


def backend_names(family: str = "fusion") -> tuple[str, ...]:
    """The registered backends that implement ``family`` (a key of :data:`FAMILIES`), in registry order."""
    field = FAMILIES[family][0]
    return tuple(name for name, b in BACKENDS.items() if getattr(b, field) is not None)


def get_backend(name: str, needs: tuple[str, ...] | None = None, *, family: str = "fusion") -> ModuleType:
    """Import and return the module of backend ``name`` (see :data:`BACKENDS`) for ``family``.

    Parameters
    ----------
    name : str
        A key of :data:`BACKENDS`.
    needs : tuple of str, optional
        Functions the module must define (default: the family's, :data:`FAMILIES`).
    family : str
        ``"fusion"`` (the fusion layer and InfoNCE) or ``"classify"`` (the memory-attention classifier).

    Raises
    ------
    BackendUnavailableError
        Unknown name, a backend without this family's kernels, the module (or a package it needs) not
        installed, or a function in ``needs`` missing; the message names the backend and what to install.
    """
    field, required = FAMILIES[family]
    needs = required if needs is None else needs
    if name not in BACKENDS:
        raise BackendUnavailableError(f"{family} backend {name!r} unknown; expected one of "
                                      f"{sorted(backend_names(family))}")
    module, install = getattr(BACKENDS[name], field), BACKENDS[name].install
    if module is None:
        raise BackendUnavailableError(f"{family} backend {name!r} unavailable: the {name} backend has no {family} "
                                      f"kernels; expected one of {sorted(backend_names(family))}")
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise BackendUnavailableError(f"{family} backend {name!r} unavailable: importing {module} failed ({exc}); "
                                      f"install {install}") from exc
    missing = [f for f in needs if not callable(getattr(mod, f, None))]
    if missing:
        raise BackendUnavailableError(f"{family} backend {name!r} unavailable: {module} does not define {missing} "
                                      f"(incomplete install?); install {install}")
    return mod


def backend_function(name: str, function: str) -> Callable:
    """The function ``function`` of backend ``name`` (e.g. ``"infonce_forward"``); errors as :func:`get_backend`."""
    return getattr(get_backend(name, needs=REQUIRED + (function,)), function)


def backend_of_cache(cache: dict, backend: str | None, made_by_fn: str) -> str:
    """The backend a backward must run on: the one that made ``cache`` (asking for another is an error).

    Caches hold backend-specific buffers (host arrays, device arrays), so a backward on another backend
    would read the wrong layout; ``made_by_fn`` names the forward in the message. A cache without a
    ``"backend"`` key was made by the NumPy reference.
    """
    if not isinstance(cache, dict):
        raise RecoError(f"cache: expected the dict returned by {made_by_fn}, got {type(cache).__name__}")
    made_by = cache.get("backend", "numpy")
    if backend is not None and backend != made_by:
        raise RecoError(f"backend: cache was made by backend {made_by!r}, backward asked for {backend!r}")
    return made_by


_BLAS_POOLS: object = False  # not looked up yet; None = threadpoolctl absent or unusable


@contextlib.contextmanager
def blas_threads(n: int | None):
    """Run the enclosed code with BLAS limited to ``n`` threads (``None``: as configured).

    Needs ``threadpoolctl`` (optional, not a runtime dependency): without it BLAS keeps its own threading. Small
    GEMMs on a machine with more runnable threads than cores are the reason: a 2-thread OpenBLAS call waits for a
    descheduled worker, which made a classifier epoch an order of magnitude slower while another process held a
    core (figures: docs/classify.md); the fusion layer's numba steps behave the same (docs/performance.md)."""
    global _BLAS_POOLS
    if _BLAS_POOLS is False:
        try:
            from threadpoolctl import ThreadpoolController

            _BLAS_POOLS = ThreadpoolController()
        except Exception:  # noqa: BLE001  (absent, or fails to inspect the loaded libraries)
            _BLAS_POOLS = None
    if n is None or _BLAS_POOLS is None:
        yield
    else:
        with _BLAS_POOLS.limit(limits=n, user_api="blas"):
            yield
