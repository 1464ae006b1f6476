"""The fusion parameters' file: one checked ``.npz`` (:func:`save_params`, :func:`load_params`, and the sets).

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
from typing import Mapping

import numpy as np

from ...errors import ParamsFormatError, RecoError
from ...io import ArraySpec, EntryError, atomic_save_npz, load_npz
from .config import DTYPES, REL_SOURCES, FusionConfig, config_shapes
from .fusion_params import FusionParams

FORMAT = "reco_ref.fusion.params"
FORMAT_VERSION = 1
HEADER_KEY = "__header__"


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
        if a.dtype.name not in DTYPES:
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
    if entry["dtype"] not in DTYPES:
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
        if not isinstance(entry, dict) or not isinstance(entry.get("shape"), list) or entry.get("dtype") not in DTYPES:
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
