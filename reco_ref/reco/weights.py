r"""RECO's trained state as one value: φ_I, φ_T, τ and a JSON-able description (docs/reco.md §2–§3).

:class:`RecoWeights` is the model's file: what training produces and what evaluation, the demo and ``query``
consume (through :func:`reco_ref.reco.refine.refine`)::

    w = init_reco_weights(768, heads=8, seed=0, meta={"encoder_name": "reco-mini"})   # identity: x̄ = x
    save_reco_weights("fusion.npz", w)
    w = load_reco_weights("fusion.npz")          # validated; ParamsFormatError naming the file otherwise
    check_weights_match(w, encoder_fingerprint=enc.fingerprint, dim=enc.dim, where="--weights")

File format
-----------
One ``.npz`` written by :func:`reco_ref.fusion.save_param_set` (atomic, never pickled) holding the modules
``image`` (φ_I) and ``text`` (φ_T) and two extras:

* ``tau`` — float64 0-d: τ, the log of the logit scale ``s = min(exp τ, 100)`` (docs/reco.md §3);
* ``meta_utf8`` — float32 ``[n]``: the UTF-8 bytes of the ``meta`` JSON object, one byte per element
  (values 0..255). The param-set format admits only finite float arrays as extras; storing the bytes
  this way keeps the file a plain numeric archive (no object arrays, no pickle) that every existing
  validator already checks.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ParamsFormatError
from ..fusion import FusionParams, init_params, load_param_set, save_param_set
from ..fusion.constants import DEFAULT_TAU

__all__ = [
    "RecoWeights",
    "init_reco_weights",
    "save_reco_weights",
    "load_reco_weights",
    "default_weights_path",
    "check_weights_match",
    "decode_meta",
    "META_KEY",
    "TAU_KEY",
]

MODULES = ("image", "text")
TAU_KEY = "tau"
META_KEY = "meta_utf8"


@dataclass
class RecoWeights:
    """φ_I, φ_T, τ and a description.

    Attributes
    ----------
    image : FusionParams — φ_I, refines image queries (fed text neighbours by default)
    text : FusionParams — φ_T, refines text queries (fed image neighbours by default)
    tau : float — log of the logit scale (docs/reco.md §3); ``exp(tau)`` is clamped at 100 in the loss
    meta : dict — JSON-able: encoder_name, encoder_fingerprint, dim, heads, k, search, fuse, dup_threshold,
        trained_on, recipe, seed, ... (free-form; :func:`check_weights_match` reads ``encoder_fingerprint``)
    """

    image: FusionParams
    text: FusionParams
    tau: float = DEFAULT_TAU
    meta: dict = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.image.dim)

    def phi(self, modality: str) -> FusionParams:
        """φ for queries of ``modality`` ("image" → φ_I, "text" → φ_T)."""
        if modality == "image":
            return self.image
        if modality == "text":
            return self.text
        raise ParamsFormatError(f"modality: expected 'image' or 'text', got {modality!r}")

    def copy(self) -> "RecoWeights":
        """Deep copy (arrays and meta)."""
        return RecoWeights(self.image.copy(), self.text.copy(), float(self.tau), json.loads(json.dumps(self.meta)))


def init_reco_weights(dim: int, *, heads: int = 8, mlp_ratio: int = 4, seed: int = 0, meta: dict | None = None,
                      dtype=np.float32, maps: dict | None = None, **init_kw) -> RecoWeights:
    """Untrained RECO weights: both modules the identity on their query (docs/reco.md §2), τ = log(1/0.07).

    φ_I is drawn from ``seed`` and φ_T from ``seed + 1`` so the two modules start different (their zeroed
    arrays make both the identity regardless). ``init_kw`` goes to :func:`~reco_ref.fusion.init_params`
    (``init="copy"``, ``alpha``, ``k``, ``relevance``, ``rel_beta``, ``rel_gamma``); ``maps`` gives each
    module's score map ``{"image": (center, width), "text": (center, width)}`` when ``relevance``.
    """
    meta = dict(meta or {})
    meta.setdefault("dim", int(dim))
    meta.setdefault("heads", int(heads))
    _check_meta_json(meta, "init_reco_weights(meta=...)")
    def one(modality: str, s: int):
        kw = dict(init_kw)
        if kw.get("relevance") and maps is not None:
            kw["rel_center"], kw["rel_width"] = (float(x) for x in maps[modality])
        return init_params(dim, heads, mlp_ratio=mlp_ratio, seed=s, dtype=dtype, **kw)

    return RecoWeights(
        image=one("image", seed),
        text=one("text", seed + 1),
        tau=float(DEFAULT_TAU),
        meta=meta,
    )


def _check_meta_json(meta: Any, where: str) -> str:
    if not isinstance(meta, dict):
        raise ParamsFormatError(f"{where}: meta is {type(meta).__name__}, expected a JSON object (dict)")
    try:
        return json.dumps(meta, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ParamsFormatError(f"{where}: meta is not JSON-serialisable ({exc})") from exc


def save_reco_weights(path: str | os.PathLike, w: RecoWeights) -> None:
    """Write ``w`` atomically as one param-set ``.npz`` (see the module docstring for the layout)."""
    where = str(path)
    if not isinstance(w, RecoWeights):
        raise ParamsFormatError(f"{where}: expected RecoWeights, got {type(w).__name__}")
    if not math.isfinite(float(w.tau)):
        raise ParamsFormatError(f"{where}: tau is {w.tau}, expected a finite float")
    if w.image.dim != w.text.dim:
        raise ParamsFormatError(f"{where}: image module dim {w.image.dim} differs from text module dim {w.text.dim}")
    text = _check_meta_json(w.meta, where)
    meta_bytes = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.float32)  # [n] values 0..255
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_param_set(path, {"image": w.image, "text": w.text},
                   extras={TAU_KEY: np.array(float(w.tau), np.float64), META_KEY: meta_bytes})


def load_reco_weights(path: str | os.PathLike) -> RecoWeights:
    """Load and validate RECO weights written by :func:`save_reco_weights`.

    Raises
    ------
    FileNotFoundError  no file at ``path``
    ParamsFormatError  naming the file and the entry: not a param set, modules other than image/text, dims that
                       differ, a missing/non-scalar ``tau``, a ``meta_utf8`` that is not UTF-8 JSON bytes
    """
    from ..paths import file_problem

    path = Path(path)
    problem = file_problem(path)  # a device never ends a read, a pipe blocks it: named before anything opens it
    if problem == "no such file":
        raise FileNotFoundError(f"fusion weights not found: {path}")
    if problem:
        raise ParamsFormatError(f"{path}: {problem}; expected fusion weights (.npz)")
    modules, extras = load_param_set(path)
    if sorted(modules) != sorted(MODULES):
        raise ParamsFormatError(f"{path}: modules {sorted(modules)}, expected {list(MODULES)} (φ_I and φ_T)")
    if modules["image"].dim != modules["text"].dim:
        raise ParamsFormatError(f"{path}: module 'image' has dim {modules['image'].dim}, 'text' has "
                                f"{modules['text'].dim}; expected equal")
    if sorted(extras) != sorted((TAU_KEY, META_KEY)):
        raise ParamsFormatError(f"{path}: extras {sorted(extras)}, expected {sorted((TAU_KEY, META_KEY))}")
    tau = extras[TAU_KEY]
    if tau.shape != ():
        raise ParamsFormatError(f"{path}: entry {TAU_KEY!r} has shape {tau.shape}, expected a scalar ()")
    return RecoWeights(image=modules["image"], text=modules["text"], tau=float(tau),
                       meta=decode_meta(path, extras[META_KEY]))


def decode_meta(path: str | os.PathLike, raw: np.ndarray) -> dict:
    """The JSON object stored in a weights file's ``meta_utf8`` extra (its UTF-8 bytes, one per float element).

    Raises
    ------
    ParamsFormatError
        Not a 1-D array of byte values, not UTF-8 JSON, or not a JSON object.
    """
    if raw.ndim != 1 or ((raw < 0) | (raw > 255) | (raw != np.round(raw))).any():
        raise ParamsFormatError(f"{path}: entry {META_KEY!r} is not a 1-D array of byte values 0..255")
    try:
        meta = json.loads(raw.astype(np.uint8).tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ParamsFormatError(f"{path}: entry {META_KEY!r} is not UTF-8 JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise ParamsFormatError(f"{path}: entry {META_KEY!r} holds {type(meta).__name__}, expected a JSON object")
    return meta


def default_weights_path(encoder_name: str = "reco-mini") -> Path:
    """Where the shipped fusion weights for ``encoder_name`` live: ``weights/<name>-fusion/fusion.npz``."""
    from ..paths import weights_dir

    return weights_dir() / f"{encoder_name}-fusion" / "fusion.npz"


def check_weights_match(w: RecoWeights, encoder_fingerprint: str | None = None, dim: int | None = None,
                        where: str = "") -> None:
    """Refuse weights trained for another encoder or embedding width (one-line :class:`ParamsFormatError`).

    ``encoder_fingerprint`` is compared with ``w.meta["encoder_fingerprint"]`` when both are known; ``dim`` with
    the modules' width.
    """
    label = f"{where}: " if where else ""
    if dim is not None and int(dim) != w.dim:
        raise ParamsFormatError(f"{label}fusion weights have dim {w.dim}, the encoder/memory has dim {int(dim)}")
    fp = w.meta.get("encoder_fingerprint")
    if encoder_fingerprint is not None and fp is not None and fp != encoder_fingerprint:
        raise ParamsFormatError(f"{label}fusion weights were trained for encoder fingerprint {str(fp)[:12]}… "
                                f"({w.meta.get('encoder_name', '?')}), the encoder in use has "
                                f"{str(encoder_fingerprint)[:12]}…")
