"""Parameters as data: named NumPy arrays, a small config, and a checked ``.npz`` format.

A fusion module's parameters are a :class:`FusionParams` — a plain ``dict`` of the 18 arrays named in
:data:`PARAM_NAMES` that also carries its config (``heads``, ``mlp_ratio``) as read-only attributes.
Heads are not an array, so they travel with the dict: ``fusion_forward(params, ...)`` needs no
``heads=`` argument when given a :class:`FusionParams`.

File format (``format_version`` 1)
----------------------------------
One ``.npz`` (written atomically through :mod:`reco_ref.io`, never pickled) holding

* ``__header__`` — a ``uint8`` array of UTF-8 JSON::

      {"format": "reco_ref.fusion.params", "format_version": 1, "kind": "module" | "set",
       "modules": {"<prefix>": {"dim": 512, "heads": 8, "mlp_ratio": 4, "dtype": "float32"}, ...},
       "extras": {"<name>": {"shape": [...], "dtype": "float32"}, ...},
       "names": [every array entry, sorted]}

* one entry per array. A single module (``kind: "module"``, written by :func:`save_params`) uses the
  bare names (``w_q``) and the prefix ``""``; a *set* of modules (``kind: "set"``, written by
  :func:`save_param_set`) prefixes each module's names with ``"<prefix>."`` (``image.w_q``,
  ``text.w_q``) and may add free-standing ``extras`` such as ``logit_scale`` (RECO's τ).

Loading (:func:`load_params`, :func:`load_param_set`) uses ``allow_pickle=False`` and checks the header,
that the names are exactly those the header implies, and every array's shape, dtype and finiteness;
any problem raises :class:`~reco_ref.errors.ParamsFormatError` naming the file, the entry, the
expected and the found value.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from ..errors import ParamsFormatError, RecoError
from ..io import ArraySpec, EntryError, atomic_save_npz, load_npz

__all__ = [
    "PARAM_NAMES",
    "RELEVANCE_NAMES",
    "INITS",
    "config_shapes",
    "relevance_of",
    "COPY_ALPHA",
    "adamw_decays",
    "FORMAT",
    "FORMAT_VERSION",
    "FusionConfig",
    "FusionParams",
    "param_shapes",
    "init_params",
    "count_params",
    "save_params",
    "load_params",
    "save_param_set",
    "load_param_set",
]

#: The fusion layer's parameter names, in the spec's order (row-vector convention, W is [in, out]).
PARAM_NAMES = (
    "ln1_gamma", "ln1_beta",
    "w_q", "b_q", "w_k", "b_k", "w_v", "b_v", "w_o", "b_o",
    "ln2_gamma", "ln2_beta",
    "w_1", "b_1", "w_2", "b_2",
    "e_query", "e_neighbor",
)  # fmt: skip

#: The optional relevance-bias parameters (docs/reco.md §2 "Relevance bias" [ours]): per head, ``β [h]`` scales the
#: search score of each neighbour in the attention logits toward it, ``γ [h]`` is the logit toward the query's own
#: token. A module has them exactly when its config says ``relevance=True``; ``β = γ = 0`` is the paper's layer.
RELEVANCE_NAMES = ("rel_beta", "rel_gamma")
#: Default score map ``(s − REL_CENTER) / REL_WIDTH`` of a relevance module (see :class:`FusionConfig`).
REL_CENTER, REL_WIDTH = 1.0, 0.02
#: Where a relevance module's score map comes from: its config (``"fixed"``) or the searched memory (``"memory"``).
REL_SOURCES = ("fixed", "memory")

FORMAT = "reco_ref.fusion.params"
FORMAT_VERSION = 1
HEADER_KEY = "__header__"
_DTYPES = ("float32", "float64")


@dataclass(frozen=True)
class FusionConfig:
    """What a parameter set needs besides its arrays.

    Attributes
    ----------
    dim : int
        Embedding width D.
    heads : int
        Attention heads h; must divide ``dim``.
    mlp_ratio : int
        MLP hidden width is ``mlp_ratio * dim`` (spec default 4).
    dtype : str
        ``"float32"`` or ``"float64"``.
    relevance : bool
        The module has the relevance bias (arrays ``rel_beta, rel_gamma [h]``) and takes search scores.
    rel_center, rel_width : float
        How a raw search score (cosine) ``s`` becomes the bias feature ``(s - rel_center) / rel_width`` that
        ``β`` multiplies. The default centre 1 measures each neighbour's distance from a perfect match, so the
        feature keeps the *absolute* level of the scores (the query logit ``γ`` can win when every neighbour is
        far); the width 0.02 makes one unit a typical gap between close neighbours, so ``β`` is of order 1.
    rel_source : str
        ``"fixed"`` (default): the map's centre and width are ``rel_center, rel_width``. ``"memory"`` [ours]: they
        are measured on the memory being searched, at use time (:func:`reco_ref.memory.score_map.memory_score_map`:
        centre = the median nearest-other-row cosine, width = its robust spread), so ``f = 0`` means
        "as close as a typical neighbour inside *this* memory" whatever memory the weights were trained on;
        ``rel_center, rel_width`` then record the training memory's map (what a caller without a memory, e.g. an
        exported graph's user, would pass).
    """

    dim: int
    heads: int
    mlp_ratio: int = 4
    dtype: str = "float32"
    relevance: bool = False
    rel_center: float = REL_CENTER
    rel_width: float = REL_WIDTH
    rel_source: str = "fixed"

    def __post_init__(self):
        for field in ("dim", "heads", "mlp_ratio"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"FusionConfig.{field}: expected a positive int, got {v!r}")
            object.__setattr__(self, field, int(v))
        if self.dim % self.heads:
            raise ValueError(f"FusionConfig: heads={self.heads} does not divide dim={self.dim}")
        dt = np.dtype(self.dtype).name
        if dt not in _DTYPES:
            raise ValueError(f"FusionConfig.dtype: expected float32 or float64, got {self.dtype!r}")
        object.__setattr__(self, "dtype", dt)
        if not isinstance(self.relevance, (bool, np.bool_)):
            raise ValueError(f"FusionConfig.relevance: expected a bool, got {self.relevance!r}")
        object.__setattr__(self, "relevance", bool(self.relevance))
        for field in ("rel_center", "rel_width"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) or not np.isfinite(v):
                raise ValueError(f"FusionConfig.{field}: expected a finite number, got {v!r}")
            object.__setattr__(self, field, float(v))
        if self.rel_width <= 0:
            raise ValueError(f"FusionConfig.rel_width: expected > 0, got {self.rel_width!r}")
        if self.rel_source not in REL_SOURCES:
            raise ValueError(f"FusionConfig.rel_source: expected one of {list(REL_SOURCES)}, got {self.rel_source!r}")
        if self.rel_source != "fixed" and not self.relevance:
            raise ValueError("FusionConfig.rel_source: 'memory' needs relevance=True")

    @property
    def names(self) -> tuple[str, ...]:
        """The array names of a module with this config: the 18 of :data:`PARAM_NAMES` (+ the relevance pair)."""
        return PARAM_NAMES + RELEVANCE_NAMES if self.relevance else PARAM_NAMES

    def to_json(self) -> dict:
        out = {"dim": self.dim, "heads": self.heads, "mlp_ratio": self.mlp_ratio, "dtype": self.dtype}
        if self.relevance:  # absent = the paper's layer; files without it read as before
            out["relevance"] = {"center": self.rel_center, "width": self.rel_width}
            if self.rel_source != "fixed":  # absent = fixed; files written before the option read as before
                out["relevance"]["source"] = self.rel_source
        return out


class FusionParams(dict):
    """A ``dict`` of the 18 fusion arrays that also knows its config.

    It behaves exactly like a dict (``params["w_q"]``, iteration, ``len``); the config is read-only:
    ``params.heads``, ``params.mlp_ratio``, ``params.dim``, ``params.dtype``, ``params.config``.

    Validation once at the door
    ---------------------------
    A set made by :func:`init_params` or :func:`load_params` (both validated), or one that has
    passed :func:`reco_ref.fusion.check_params` once, carries a *stamp*: references to its 18 array
    objects with their shapes, strides and dtypes. While every entry is still the very same array
    object with the same shape, strides and dtype, the front door trusts the stamp and does not
    re-scan ~3–7 M floats for finiteness on every call (that scan was half of a batch-1 forward).

    * Replacing an entry (``params["w_q"] = ...``, ``update``, ``pop``, ``del`` ...) drops the stamp:
      the next call validates everything again, with the usual named errors.
    * Reshaping an array in place (``a.shape = ...``) changes its shape/strides: re-validated.
    * Writing *values* into a stamped array in place (``params["w_q"][0, 0] = np.nan``, an
      optimiser's ``p -= lr * m / d``) is **not** re-scanned. Such a NaN/inf cannot pass silently:
      it reaches the output, and the front door raises ``ShapeError("fusion output: rows [...] are
      not finite ...")``, which does not name the array. ``check_params(params, rescan=True)``
      re-scans and names it.
    """

    def __init__(self, arrays: Mapping[str, np.ndarray], config: FusionConfig):
        super().__init__(arrays)
        if not isinstance(config, FusionConfig):
            raise TypeError(f"FusionParams: config must be a FusionConfig, got {type(config).__name__}")
        self._config = config
        self._stamp = None  # (D, dtype, arrays, metas) once validated; see the class docstring

    def _set_stamp(self, D: int, dtype: np.dtype) -> None:
        """Record that the current arrays passed full validation (shapes, dtype, finiteness)."""
        arrays = tuple(dict.__getitem__(self, n) for n in self._config.names)
        self._stamp = (int(D), np.dtype(dtype), arrays, tuple((a.shape, a.strides, a.dtype) for a in arrays))

    def _stamped(self):
        """``(D, dtype)`` when the arrays are still exactly the stamped ones, else ``None``.

        18 identity and attribute comparisons (docs/performance.md); holding the stamped objects means an id
        can never be reused by another array while the stamp lives.
        """
        st = self._stamp
        if st is None:
            return None
        D, dtype, arrays, metas = st
        for name, a, meta in zip(self._config.names, arrays, metas):
            b = dict.get(self, name)
            if b is not a or (b.shape, b.strides, b.dtype) != meta:
                return None
        return D, dtype

    # Any change of an entry drops the stamp (and the references it holds).
    def __setitem__(self, key, value):
        self._stamp = None
        super().__setitem__(key, value)

    def __delitem__(self, key):
        self._stamp = None
        super().__delitem__(key)

    def __ior__(self, other):
        self._stamp = None
        return super().__ior__(other)

    def update(self, *args, **kwargs):
        self._stamp = None
        super().update(*args, **kwargs)

    def setdefault(self, key, default=None):
        self._stamp = None
        return super().setdefault(key, default)

    def pop(self, *args):
        self._stamp = None
        return super().pop(*args)

    def popitem(self):
        self._stamp = None
        return super().popitem()

    def clear(self):
        self._stamp = None
        super().clear()

    @property
    def config(self) -> FusionConfig:
        return self._config

    @property
    def heads(self) -> int:
        return self._config.heads

    @property
    def mlp_ratio(self) -> int:
        return self._config.mlp_ratio

    @property
    def dim(self) -> int:
        return self._config.dim

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self._config.dtype)

    def copy(self) -> "FusionParams":
        """Deep copy of the arrays, same config."""
        return FusionParams({k: np.array(v, copy=True) for k, v in self.items()}, self._config)

    def __reduce__(self):  # picklable for multiprocessing (not used for files: those are npz)
        return (FusionParams, (dict(self), self._config))

    def __repr__(self) -> str:
        c = self._config
        return f"FusionParams(dim={c.dim}, heads={c.heads}, mlp_ratio={c.mlp_ratio}, dtype={c.dtype}, {len(self)} arrays)"


def param_shapes(dim: int, mlp_ratio: int = 4, heads: int | None = None) -> dict[str, tuple[int, ...]]:
    """The shape of every parameter for width ``dim`` and MLP ratio ``mlp_ratio``.

    With ``heads`` given, the relevance pair ``rel_beta, rel_gamma [heads]`` is included too."""
    D, R = int(dim), int(dim) * int(mlp_ratio)
    rel = {} if heads is None else {"rel_beta": (int(heads),), "rel_gamma": (int(heads),)}
    return {
        "ln1_gamma": (D,), "ln1_beta": (D,),
        "w_q": (D, D), "b_q": (D,), "w_k": (D, D), "b_k": (D,),
        "w_v": (D, D), "b_v": (D,), "w_o": (D, D), "b_o": (D,),
        "ln2_gamma": (D,), "ln2_beta": (D,),
        "w_1": (D, R), "b_1": (R,), "w_2": (R, D), "b_2": (D,),
        "e_query": (D,), "e_neighbor": (D,),
    } | rel  # fmt: skip


def config_shapes(config: FusionConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of every array of a module with ``config`` (the relevance pair when ``config.relevance``)."""
    return param_shapes(config.dim, config.mlp_ratio, config.heads if config.relevance else None)


#: Initialisation per name (docs/reco.md §2, identity at init): zero makes the layer return its query.
_ZERO_INIT = frozenset({"w_o", "b_o", "w_2", "b_2", "e_query"})
_NORMAL_INIT = frozenset({"w_q", "b_q", "w_k", "b_k", "w_v", "b_v", "w_1", "b_1", "e_neighbor"})
INIT_STD = 0.02


#: Default α of the copy init: the query token starts at ``x + α·mean(r_j)`` (the untrained surrogate's form).
COPY_ALPHA = 1.0
INITS = ("identity", "copy")


def init_params(dim: int, heads: int, mlp_ratio: int = 4, seed: int = 0, dtype=np.float32, *, init: str = "identity",
                alpha: float = COPY_ALPHA, k: int = 10, relevance: bool = False, rel_beta: float = 1.0,
                rel_gamma: float = 0.0, rel_center: float = REL_CENTER, rel_width: float = REL_WIDTH,
                rel_source: str = "fixed") -> FusionParams:
    r"""Fresh parameters (docs/reco.md §2): the identity init (default) or the copy init [ours].

    ``init="identity"`` (docs/reco.md §2, required default): ``w_o, b_o, w_2, b_2, e_query`` are zero, so
    ``Y[:, 0] = x`` and the output is ``normalize(x)``; LayerNorm ``gamma = 1, beta = 0``; every other array
    ~ N(0, 0.02). Draws are made in float64 in :data:`PARAM_NAMES` order and then cast, so float32 and
    float64 sets from one seed agree.

    ``init="copy"`` [ours]: the same draws, then

    .. math::

        W_v = I,\quad b_v = 0,\quad e_r = 0,\quad W_o = \frac{\alpha (k+1)}{k \sqrt{D}} I

    LayerNorm maps a unit vector ``r`` to about ``√D (r − mean r)``, so with near-uniform attention over the
    ``k + 1`` tokens the query token outputs about ``x + α·mean_j(r_j)`` (plus ``α/k·x``): the untrained
    surrogate ``normalize(v + α·mean)``, which the identity init cannot represent at step 0.

    ``relevance=True`` adds ``rel_beta`` and ``rel_gamma`` [h] (docs/reco.md §2 "Relevance bias"), filled with the
    given values. ``rel_beta = rel_gamma = 0`` is the paper's layer exactly; under the identity init the output
    is ``x`` whatever they are, and β gets no gradient until ``W_o`` moves, so β starts at 1 by default.

    Parameters
    ----------
    dim, heads, mlp_ratio : int
        Embedding width D, attention heads (must divide D), MLP hidden width ``mlp_ratio * D``.
    seed : int
        Seed of ``numpy.random.default_rng``.
    dtype : float32 or float64
    init : {"identity", "copy"}
    alpha, k : float, int
        The copy init's gain and the neighbour count it is scaled for (ignored by the identity init).
    relevance : bool
    rel_beta, rel_gamma : float
        Initial β and γ of every head (relevance only).
    rel_center, rel_width : float
        Score → feature map ``(s − center)/width`` recorded in the config (see :class:`FusionConfig`).
    rel_source : {"fixed", "memory"}
        Where the map comes from at use time (see :class:`FusionConfig`).

    Returns
    -------
    FusionParams
    """
    if init not in INITS:
        raise ValueError(f"init: expected one of {list(INITS)}, got {init!r}")
    config = FusionConfig(dim=dim, heads=heads, mlp_ratio=mlp_ratio, dtype=np.dtype(dtype).name,
                          relevance=relevance, rel_center=rel_center, rel_width=rel_width, rel_source=rel_source)
    rng = np.random.default_rng(seed)
    dt = np.dtype(config.dtype)
    arrays = {}
    for name, shape in param_shapes(config.dim, config.mlp_ratio).items():
        if name in _ZERO_INIT:
            a = np.zeros(shape)
        elif name in _NORMAL_INIT:
            a = rng.normal(0.0, INIT_STD, size=shape)
        elif name.endswith("_gamma"):
            a = np.ones(shape)
        else:  # LayerNorm beta
            a = np.zeros(shape)
        arrays[name] = a
    if init == "copy":
        for name, v in (("alpha", alpha), ("k", k)):
            if isinstance(v, bool) or not np.isfinite(v) or v <= 0:
                raise ValueError(f"{name}: expected a positive number for the copy init, got {v!r}")
        D = config.dim
        arrays["w_v"] = np.eye(D)
        arrays["b_v"] = np.zeros(D)
        arrays["e_neighbor"] = np.zeros(D)
        arrays["w_o"] = np.eye(D) * (float(alpha) * (k + 1) / (k * np.sqrt(D)))
    if relevance:
        arrays["rel_beta"] = np.full(config.heads, float(rel_beta))
        arrays["rel_gamma"] = np.full(config.heads, float(rel_gamma))
    params = FusionParams({n: arrays[n].astype(dt) for n in config.names}, config)
    if not all(np.isfinite(a).all() for a in params.values()):
        raise ValueError("init_params: a non-finite initial value (rel_beta / rel_gamma / alpha)")
    params._set_stamp(config.dim, dt)  # made here: shapes, dtype and finiteness hold by construction
    return params


def count_params(params: Mapping[str, np.ndarray]) -> int:
    """Total number of scalars in a parameter dict (D=512, h=8, ratio 4 → 3,153,408)."""
    return int(sum(np.asarray(a).size for a in params.values()))


# ----------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------


def _config_of(params: Mapping[str, np.ndarray], config, where: str) -> FusionConfig:
    if config is None:
        config = getattr(params, "config", None)
        if config is None:
            raise ParamsFormatError(f"{where}: a plain dict has no config; pass config=FusionConfig(...)")
    elif isinstance(config, Mapping):
        config = FusionConfig(**config)
    elif not isinstance(config, FusionConfig):
        raise TypeError(f"{where}: config must be a FusionConfig or a mapping, got {type(config).__name__}")
    return config


def _check_module_arrays(params: Mapping[str, np.ndarray], config: FusionConfig, where: str) -> None:
    """Refuse to write what :func:`load_params` would refuse to read."""
    expected = config_shapes(config)
    missing = [n for n in config.names if n not in params]
    extra = sorted(set(params) - set(config.names))
    if missing or extra:
        raise ParamsFormatError(f"{where}: names do not match the fusion layer (missing {missing}, unexpected {extra})")
    for name, shape in expected.items():
        _check_entry(where, name, np.asarray(params[name]), shape, np.dtype(config.dtype))


def _write(path, header: dict, arrays: Mapping[str, np.ndarray]) -> None:
    header = dict(header, names=sorted(arrays))
    blob = np.frombuffer(json.dumps(header, sort_keys=True).encode("utf-8"), dtype=np.uint8)
    atomic_save_npz(path, {HEADER_KEY: blob, **{k: np.asarray(v, order="C") for k, v in arrays.items()}})  # keeps 0-d arrays 0-d


def save_params(path: str | os.PathLike, params: Mapping[str, np.ndarray], config=None) -> None:
    """Save one fusion module as ``.npz`` with a JSON header, atomically.

    Parameters
    ----------
    path : path-like
    params : FusionParams or mapping of the 18 names to arrays
    config : FusionConfig or mapping, optional
        Required when ``params`` is a plain dict; a :class:`FusionParams` carries its own.

    Raises
    ------
    ParamsFormatError
        If the arrays do not match the config (the file would not load back).
    """
    where = str(path)
    config = _config_of(params, config, where)
    _check_module_arrays(params, config, where)
    header = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": "module",
              "modules": {"": config.to_json()}, "extras": {}}  # fmt: skip
    _write(path, header, {n: np.asarray(params[n]) for n in config.names})


def save_param_set(
    path: str | os.PathLike,
    modules: Mapping[str, Mapping[str, np.ndarray]],
    extras: Mapping[str, np.ndarray] | None = None,
    configs: Mapping[str, FusionConfig] | None = None,
) -> None:
    """Save several fusion modules (e.g. φ_I and φ_T) plus free arrays (e.g. τ) in one ``.npz``.

    Entries are ``"<prefix>.<name>"`` (``image.w_q``, ``text.w_q``) and the bare extra names
    (``logit_scale``). Prefixes must be non-empty identifiers without ``"."``; extras must not
    contain ``"."`` either, so the two kinds of names can never collide.

    Parameters
    ----------
    modules : mapping prefix → FusionParams (or plain dict, then ``configs[prefix]`` is required)
    extras : mapping name → ndarray (float32/float64, finite), optional
    configs : mapping prefix → FusionConfig, optional
    """
    where = str(path)
    arrays: dict[str, np.ndarray] = {}
    header_modules = {}
    for prefix, params in modules.items():
        if not isinstance(prefix, str) or not prefix.isidentifier():
            raise ParamsFormatError(f"{where}: module prefix {prefix!r} must be a non-empty identifier without '.'")
        config = _config_of(params, (configs or {}).get(prefix), f"{where} [{prefix}]")
        _check_module_arrays(params, config, f"{where} [{prefix}]")
        header_modules[prefix] = config.to_json()
        arrays.update({f"{prefix}.{n}": np.asarray(params[n]) for n in config.names})
    header_extras = {}
    for name, a in (extras or {}).items():
        a = np.asarray(a)
        if not isinstance(name, str) or not name.isidentifier() or name == HEADER_KEY:
            raise ParamsFormatError(f"{where}: extra name {name!r} must be an identifier without '.'")
        if a.dtype.name not in _DTYPES:
            raise ParamsFormatError(f"{where}: extra {name!r} has dtype {a.dtype}, expected float32 or float64")
        _check_entry(where, name, a, a.shape, a.dtype)
        header_extras[name] = {"shape": list(a.shape), "dtype": a.dtype.name}
        arrays[name] = a
    header = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": "set",
              "modules": header_modules, "extras": header_extras}  # fmt: skip
    _write(path, header, arrays)


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def _check_entry(where: str, name: str, a: np.ndarray, shape, dtype: np.dtype) -> None:
    if a.dtype != dtype:
        raise ParamsFormatError(f"{where}: entry {name!r} has dtype {a.dtype}, expected {dtype}")
    if tuple(a.shape) != tuple(shape):
        raise ParamsFormatError(f"{where}: entry {name!r} has shape {tuple(a.shape)}, expected {tuple(shape)}")
    if not np.isfinite(a).all():
        bad = int(a.size - np.count_nonzero(np.isfinite(a)))
        raise ParamsFormatError(f"{where}: entry {name!r} holds {bad} NaN/inf value(s), expected all finite")


#: largest JSON header accepted (the shipped weights' is about 2 KB: names, shapes, a few numbers and notes)
HEADER_MAX_BYTES = 16 << 20


def _diagnose_unreadable(path, exc: Exception) -> ParamsFormatError:
    """Name the entry that :func:`reco_ref.io.load_npz` could not read, from its error alone.

    ``load_npz`` checks every entry's ``.npy`` header before it reads any data, and its
    :class:`~reco_ref.io.EntryError` names the entry. Nothing is decompressed here (this step used to load
    every entry again, 1.6 GB for a 1.5 MB decompression bomb ``load_npz`` had just refused): only the zip
    directory is opened, to tell a damaged archive from a refused one.
    """
    if isinstance(exc, EntryError):
        if exc.pickled:
            return ParamsFormatError(f"{path}: entry {exc.entry!r} is a pickled object array, expected a plain "
                                     f"numeric array (refused: loading it would need allow_pickle=True)")  # fmt: skip
        return ParamsFormatError(f"{path}: entry {exc.entry!r} {exc.reason}")
    try:
        with zipfile.ZipFile(path):
            pass
    except Exception as exc2:  # truncated / not a zip: no entry can be named
        return ParamsFormatError(f"{path}: entry <archive> unreadable, expected a .npz (zip) file "
                                 f"({type(exc2).__name__}: {exc2})")  # fmt: skip
    text = str(exc)
    return ParamsFormatError(text if text.startswith(str(path)) else f"{path}: unreadable ({text})")


def _load_npz(path, **kw) -> dict[str, np.ndarray]:
    """:func:`reco_ref.io.load_npz` with its errors as :class:`ParamsFormatError` naming the entry."""
    try:
        return load_npz(path, **kw)
    except FileNotFoundError:
        raise
    except (RecoError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise _diagnose_unreadable(path, exc) from exc


def _read(path) -> dict:
    """The checked JSON header, read alone: it says which arrays of which shapes the file must hold, so they
    are read only after their headers matched it (:func:`_load_checked`)."""
    raw = _load_npz(path, only=[HEADER_KEY], expect={HEADER_KEY: ArraySpec(max_bytes=HEADER_MAX_BYTES)})
    if HEADER_KEY not in raw:
        raise ParamsFormatError(f"{path}: entry {HEADER_KEY!r} missing, expected a JSON header (format {FORMAT})")
    blob = raw.pop(HEADER_KEY)
    if blob.dtype != np.uint8 or blob.ndim != 1:
        raise ParamsFormatError(f"{path}: entry {HEADER_KEY!r} has dtype {blob.dtype} shape {blob.shape}, "
                                f"expected 1-D uint8 JSON bytes")  # fmt: skip
    try:
        header = json.loads(blob.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ParamsFormatError(f"{path}: entry {HEADER_KEY!r} is not valid UTF-8 JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise ParamsFormatError(f"{path}: entry {HEADER_KEY!r} is {type(header).__name__}, expected a JSON object")
    if header.get("format") != FORMAT:
        raise ParamsFormatError(f"{path}: header field 'format' is {header.get('format')!r}, expected {FORMAT!r}")
    if header.get("format_version") != FORMAT_VERSION:
        raise ParamsFormatError(f"{path}: header field 'format_version' is {header.get('format_version')!r}, "
                                f"expected {FORMAT_VERSION}")  # fmt: skip
    for field, typ in (("modules", dict), ("extras", dict), ("names", list)):
        if not isinstance(header.get(field), typ):
            raise ParamsFormatError(f"{path}: header field {field!r} is {header.get(field)!r}, expected a JSON {typ.__name__}")
    return header


def _header_config(path, prefix: str, entry) -> FusionConfig:
    label = f"header module {prefix!r}" if prefix else "header"
    if not isinstance(entry, dict):
        raise ParamsFormatError(f"{path}: {label} is {entry!r}, expected an object with dim/heads/mlp_ratio/dtype")
    for field in ("dim", "heads", "mlp_ratio", "dtype"):
        if field not in entry:
            raise ParamsFormatError(f"{path}: {label} field {field!r} missing")
    for field in ("dim", "heads", "mlp_ratio"):
        v = entry[field]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ParamsFormatError(f"{path}: {label} field {field!r} is {v!r}, expected a positive int")
    if entry["dtype"] not in _DTYPES:
        raise ParamsFormatError(f"{path}: {label} field 'dtype' is {entry['dtype']!r}, expected float32 or float64")
    if entry["dim"] % entry["heads"]:
        raise ParamsFormatError(f"{path}: {label} field 'heads' is {entry['heads']}, expected a divisor of dim={entry['dim']}")
    extra = sorted(set(entry) - {"dim", "heads", "mlp_ratio", "dtype", "relevance"})
    if extra:
        raise ParamsFormatError(f"{path}: {label} has unexpected field(s) {extra}")
    rel = entry.get("relevance")
    if rel is None:
        return FusionConfig(entry["dim"], entry["heads"], entry["mlp_ratio"], entry["dtype"])
    if not isinstance(rel, dict) or sorted(set(rel) - {"source"}) != ["center", "width"] or not all(
            isinstance(rel[f], (int, float)) and not isinstance(rel[f], bool) and np.isfinite(rel[f])
            for f in ("center", "width")) or rel["width"] <= 0 or rel.get("source", "fixed") not in REL_SOURCES:
        raise ParamsFormatError(f"{path}: {label} field 'relevance' is {rel!r}, expected "
                                "{'center': finite number, 'width': positive number[, 'source': "
                                f"one of {list(REL_SOURCES)}]}}")
    return FusionConfig(entry["dim"], entry["heads"], entry["mlp_ratio"], entry["dtype"], relevance=True,
                        rel_center=rel["center"], rel_width=rel["width"], rel_source=rel.get("source", "fixed"))


def _expected_entries(path, header) -> dict[str, tuple[str, tuple[int, ...], np.dtype]]:
    """Every array name the header implies → (module prefix or '', shape, dtype)."""
    out = {}
    for prefix, entry in header["modules"].items():
        config = _header_config(path, prefix, entry)
        for name, shape in config_shapes(config).items():
            out[f"{prefix}.{name}" if prefix else name] = (prefix, shape, np.dtype(config.dtype))
    for name, entry in header["extras"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("shape"), list) or entry.get("dtype") not in _DTYPES:
            raise ParamsFormatError(f"{path}: header extra {name!r} is {entry!r}, expected {{'shape': [...], 'dtype': 'float32'|'float64'}}")
        out[name] = ("", tuple(entry["shape"]), np.dtype(entry["dtype"]))
    return out


def _load_checked(path, kind: str):
    header = _read(path)
    if header.get("kind") != kind:
        raise ParamsFormatError(f"{path}: header field 'kind' is {header.get('kind')!r}, expected {kind!r}"
                                + (" (use load_param_set)" if header.get("kind") == "set" else "")
                                + (" (use load_params)" if header.get("kind") == "module" else ""))  # fmt: skip
    if kind == "set":
        for prefix in header["modules"]:
            if not isinstance(prefix, str) or not prefix.isidentifier():
                raise ParamsFormatError(f"{path}: header module prefix {prefix!r}, expected a non-empty identifier without '.'")
    expected = _expected_entries(path, header)
    if sorted(header["names"]) != sorted(expected):
        missing = [n for n in sorted(expected) if n not in header["names"]]
        unexpected = [n for n in header["names"] if not (isinstance(n, str) and n in expected)]
        raise ParamsFormatError(f"{path}: header field 'names' lists {sorted(header['names'])}, expected {sorted(expected)} "
                                f"(missing {missing}, unexpected {unexpected})")  # fmt: skip
    # every entry's header must match the shape and dtype the header implies before any data is read, so an
    # entry declaring a 1.2 GB array is refused from its header (it used to be read, then refused by shape)
    spec = {name: ArraySpec(shape, dtype) for name, (_, shape, dtype) in expected.items()}
    raw = _load_npz(path, expect={HEADER_KEY: ArraySpec(max_bytes=HEADER_MAX_BYTES), **spec})
    raw.pop(HEADER_KEY, None)
    for name in expected:
        if name not in raw:
            raise ParamsFormatError(f"{path}: entry {name!r} missing, expected shape {expected[name][1]} {expected[name][2]}")
    for name in raw:
        if name not in expected:
            raise ParamsFormatError(f"{path}: entry {name!r} unexpected, expected only {sorted(expected)}")
    for name, (_, shape, dtype) in expected.items():
        _check_entry(str(path), name, raw[name], shape, dtype)
    return header, raw


def load_params(path: str | os.PathLike) -> tuple[FusionParams, FusionConfig]:
    """Load and fully validate one fusion module saved by :func:`save_params`.

    Returns
    -------
    params : FusionParams
    config : FusionConfig (also ``params.config``)

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ParamsFormatError
        Naming the entry, the expected and the found value, for any missing / unexpected name,
        wrong shape or dtype, NaN/inf, bad header, pickled object array or unreadable file.
    """
    header, raw = _load_checked(path, "module")
    if list(header["modules"]) != [""]:
        raise ParamsFormatError(f"{path}: header field 'modules' has prefixes {list(header['modules'])}, expected [''] for kind 'module'")
    config = _header_config(path, "", header["modules"][""])
    params = FusionParams({n: raw[n] for n in config.names}, config)
    params._set_stamp(config.dim, config.dtype)  # _load_checked validated every entry
    return params, config


def load_param_set(path: str | os.PathLike) -> tuple[dict[str, FusionParams], dict[str, np.ndarray]]:
    """Load and validate a set saved by :func:`save_param_set`.

    Returns
    -------
    modules : dict prefix → FusionParams
    extras : dict name → ndarray
    """
    header, raw = _load_checked(path, "set")
    modules = {}
    for prefix, entry in header["modules"].items():
        config = _header_config(path, prefix, entry)
        modules[prefix] = FusionParams({n: raw[f"{prefix}.{n}"] for n in config.names}, config)
        modules[prefix]._set_stamp(config.dim, config.dtype)  # validated by _load_checked
    extras = {name: raw[name] for name in header["extras"]}
    return modules, extras


def adamw_decays(name: str, p: np.ndarray, decay=None) -> bool:
    """Whether weight decay applies to parameter ``name``.

    ``decay`` is ``None`` (default: matrices only, ``ndim >= 2`` — LayerNorm, biases, type embeddings
    and scalars like τ are not decayed), a collection of names, or a callable ``(name, array) -> bool``.
    """
    if decay is None:
        return p.ndim >= 2
    if callable(decay):
        return bool(decay(name, p))
    return name in decay


def relevance_of(params: Mapping[str, np.ndarray]) -> tuple[float, float] | None:
    """``(center, width)`` of the score map ``(s − center)/width`` when ``params`` has the relevance pair, else ``None``.

    A :class:`FusionParams` answers from its config (and must hold the pair exactly when its config says so);
    a plain dict holding ``rel_beta`` gets the defaults of :class:`FusionConfig` (centre 1, width 0.02)."""
    config = getattr(params, "config", None)
    has = RELEVANCE_NAMES[0] in params or RELEVANCE_NAMES[1] in params
    if config is not None:
        if config.relevance != has:
            raise RecoError(f"params: config.relevance is {config.relevance} but the relevance arrays "
                            f"{list(RELEVANCE_NAMES)} are {'present' if has else 'absent'}")
        return (config.rel_center, config.rel_width) if has else None
    if not has:
        return None
    return REL_CENTER, REL_WIDTH
