r"""Fusion backend ``"onnx"``: φ's forward on ONNX Runtime (inference only; needs onnxruntime + numpy).

The graph is the one :mod:`reco_ref.export.fusion` writes (``reco-ref export-fusion``): same inputs,
``out = normalize(Y[:, 0])`` of docs/reco.md §2, float32. This module only *runs* graphs (the fusion room imports
no build tool); a session is attached to a :class:`FusionParams` object in one of two ways:

* **edge (no ``onnx`` package):** export once on a build machine, then at run time
  ``attach(DIR, modules)`` with the same weights (``modules, extras = load_param_set(WEIGHTS)``);
* **where ``onnx`` is installed:** ``reco_ref.export.fusion.attach_in_memory(params, ...)`` builds the graph
  in memory and attaches it.

Either way the graph's own metadata (``params_sha256``, written by the exporter) must equal the SHA-256 of the
given weights (:func:`params_digest`): graphs made from other weights are refused. ``fusion_forward(params, ...,
backend="onnx")`` then runs the cached session; for params with no session attached it raises a one-line
error saying how to attach one.

Before each run the backend compares a cheap checksum of the 18 arrays (XOR of their bit patterns, one
integer pass) with the one taken when the session was attached, so editing the arrays in place afterwards
(an optimiser step) is an error, never a stale answer.

A module with the relevance bias (docs/reco.md §2 "Relevance bias"; arrays ``rel_beta, rel_gamma`` [h]) has them in the
digest and the checksum too (20 arrays), and its graph takes a fourth input ``scores`` float32 [B,k]: the score
*features* ``(cos − center)/width`` that the front door (:func:`reco_ref.fusion.fusion_forward` with raw
``scores=``) makes and passes here. Called without ``scores``, such a module is refused by name.

``fusion_backward`` raises: the graph has no backward (train with ``numpy`` / ``numba`` / ``cuda``).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import weakref
from pathlib import Path

import numpy as np

from ..errors import BackendUnavailableError, ParamsFormatError, RecoError
from .params import PARAM_NAMES, RELEVANCE_NAMES, FusionParams

__all__ = ["FORMAT", "MANIFEST", "params_digest", "fusion_forward", "fusion_backward", "attach", "attach_model",
           "session_for", "clear_cache"]

#: the exporter's manifest (``DIR/fusion_onnx.json``) and its ``format`` value
MANIFEST = "fusion_onnx.json"
FORMAT = "reco_ref.fusion.onnx"

#: id(params) → (weakref to params, checksum, session); an entry is dropped when its params object dies.
_SESSIONS: dict[int, tuple] = {}
_LOCK = threading.Lock()


def _ort():
    try:
        import onnxruntime
    except ImportError as exc:  # a runtime dependency; missing means a broken install
        raise BackendUnavailableError(f"fusion backend 'onnx' needs onnxruntime ({exc}); python3 -m pip install -e .") from exc
    return onnxruntime


def _names(params) -> tuple[str, ...]:
    """The arrays a graph is made from: the 18 of :data:`PARAM_NAMES`, + ``rel_beta, rel_gamma`` when present."""
    return PARAM_NAMES + RELEVANCE_NAMES if RELEVANCE_NAMES[0] in params else PARAM_NAMES


def params_digest(params) -> str:
    """SHA-256 over the 18 arrays in :data:`PARAM_NAMES` order (name, dtype, shape, C-order bytes), followed by
    ``rel_beta, rel_gamma`` when the module has the relevance bias (a module without them hashes as before).

    The exporter writes it into each graph's metadata and the manifest; attaching compares it with the weights.
    """
    h = hashlib.sha256()
    for name in _names(params):
        a = np.ascontiguousarray(params[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _checksum(params) -> tuple:
    """XOR of every array's float32 bit patterns (one integer pass over the weights).

    Any in-place edit changes it unless it flips the same bits twice (a swap of two equal-bit-pattern
    differences); every optimiser step, scaling or re-load changes it.
    """
    return tuple((params[n].shape, int(np.bitwise_xor.reduce(np.ascontiguousarray(params[n]).view(np.uint32), axis=None)))
                 for n in _names(params))  # fmt: skip


def _make_session(model: bytes | str, threads: int | None):
    ort = _ort()
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
    return ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])


def _require_params(params, where: str) -> FusionParams:
    if not isinstance(params, FusionParams):
        raise RecoError(f"{where}: the 'onnx' fusion backend needs FusionParams (init_params / load_params / "
                        f"load_param_set), got {type(params).__name__}")  # fmt: skip
    if params.dtype != np.float32:
        raise RecoError(f"{where}: the 'onnx' fusion backend runs float32 only, params are {params.dtype}")
    return params


def attach(export_dir: str | os.PathLike, modules: dict, *, threads: int | None = None) -> dict:
    """Open the exported graphs in ``export_dir`` for these parameter objects (no ``onnx`` needed).

    Parameters
    ----------
    export_dir : folder written by :func:`reco_ref.export.fusion.export_fusion`
    modules : dict prefix → FusionParams, as returned by :func:`reco_ref.fusion.load_param_set` on the
        weights the graphs were exported from
    threads : ONNX Runtime intra-op threads (default: ONNX Runtime's choice)

    Returns
    -------
    dict
        The manifest (``extras`` holds ``logit_scale`` as a float).

    Raises
    ------
    ParamsFormatError
        Missing / malformed manifest or graph, a module missing on either side, or weights whose
        SHA-256 differs from the one the graph was exported from.
    """
    d = Path(export_dir)
    mpath = d / MANIFEST
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ParamsFormatError(f"{mpath}: missing, expected the manifest written by reco-ref export-fusion") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ParamsFormatError(f"{mpath}: not valid UTF-8 JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("modules"), dict):
        raise ParamsFormatError(f"{mpath}: field 'format' is {manifest.get('format') if isinstance(manifest, dict) else manifest!r}, "
                                f"expected {FORMAT!r} with a 'modules' object")  # fmt: skip
    if sorted(manifest["modules"]) != sorted(modules):
        raise ParamsFormatError(f"{mpath}: field 'modules' lists {sorted(manifest['modules'])}, the weights hold {sorted(modules)}")
    for prefix, entry in manifest["modules"].items():
        params = _require_params(modules[prefix], f"modules[{prefix!r}]")
        want = entry.get("params_sha256") if isinstance(entry, dict) else None
        if want != params_digest(params):
            raise ParamsFormatError(f"{mpath}: module {prefix!r} field 'params_sha256' is {str(want)[:12]}…, the given weights "
                                    f"hash to {params_digest(params)[:12]}…; the graphs were exported from other weights "
                                    f"(re-run export-fusion)")  # fmt: skip
        gpath = d / str(entry.get("file", ""))
        if not gpath.is_file():
            raise ParamsFormatError(f"{mpath}: module {prefix!r} field 'file' names {gpath}, which does not exist")
        attach_model(params, gpath, threads=threads)
    return manifest


def attach_model(params: FusionParams, model: bytes | str | os.PathLike, *, threads: int | None = None) -> None:
    """Open one exported graph (a file or the serialized bytes) as the session of ``params``.

    Raises
    ------
    ParamsFormatError
        ONNX Runtime cannot load it, or its metadata ``params_sha256`` differs from the weights' digest.
    """
    params = _require_params(params, "params")
    where = "in-memory graph" if isinstance(model, (bytes, bytearray)) else str(model)
    try:
        sess = _make_session(model if isinstance(model, (bytes, bytearray)) else str(model), threads)
    except Exception as exc:  # onnxruntime raises its own types for a corrupt graph
        raise ParamsFormatError(f"{where}: ONNX Runtime cannot load it ({type(exc).__name__}: {exc})") from exc
    meta = sess.get_modelmeta().custom_metadata_map
    want, got = meta.get("params_sha256"), params_digest(params)
    if meta.get("reco_ref.format") != FORMAT or want != got:
        raise ParamsFormatError(f"{where}: metadata 'params_sha256' is {str(want)[:12]}… (format {meta.get('reco_ref.format')!r}), "
                                f"the weights hash to {got[:12]}…; expected a graph exported from these weights")  # fmt: skip
    _remember(params, _checksum(params), sess)


def _remember(params: FusionParams, check: tuple, sess) -> None:
    # dicts are unhashable, so the cache is keyed by id() and guarded by a weakref (ids are reused)
    with _LOCK:
        _SESSIONS[id(params)] = (weakref.ref(params), check, sess)
    weakref.finalize(params, _forget, id(params))


def _forget(key: int) -> None:
    with _LOCK:
        entry = _SESSIONS.get(key)
        if entry is not None and entry[0]() is None:
            del _SESSIONS[key]


def _lookup(params: FusionParams):
    with _LOCK:
        entry = _SESSIONS.get(id(params))
    if entry is None or entry[0]() is not params:
        return None
    return entry[1], entry[2]


def session_for(params: FusionParams):
    """The session attached to ``params`` (:func:`attach`, :func:`attach_model`); an error if there is none."""
    params = _require_params(params, "params")
    check = _checksum(params)
    hit = _lookup(params)
    if hit is not None:
        if hit[0] != check:
            raise RecoError("params: the arrays changed in place after the 'onnx' backend compiled them; the session "
                            "would answer with the old weights (call reco_ref.fusion.onnx_backend.clear_cache(), re-attach "
                            "or re-export)")  # fmt: skip
        return hit[1]
    raise BackendUnavailableError(
        "fusion backend 'onnx': no graph is attached for these params; attach the exported graphs with "
        "reco_ref.fusion.onnx_backend.attach(DIR, load_param_set(WEIGHTS)[0]) (DIR from `reco-ref export-fusion "
        "--weights WEIGHTS --out DIR`), or, where the onnx package is installed, "
        "reco_ref.export.fusion.attach_in_memory(params)"
    )


def clear_cache() -> None:
    """Forget every cached session (the next forward re-attaches or re-exports)."""
    with _LOCK:
        _SESSIONS.clear()


def fusion_forward(params, query, retrieved, mask=None, *, heads, scores=None):
    r"""Forward of φ on ONNX Runtime; same contract as :func:`reco_ref.fusion.reference.fusion_forward`.

    .. math:: \bar x = \mathrm{normalize}(Y_{:,0}) \quad \text{(docs/reco.md §2; graph: reco_ref.export.fusion)}

    Parameters
    ----------
    params : FusionParams, float32 (``heads`` must equal ``params.heads``: the graph bakes it in)
    query : float32 [B, D]
    retrieved : float32 [B, k, D]
    mask : bool [B, k] or None (all valid)
    scores : float [B, k] or None
        The score features ``(cos − center)/width`` (the front door maps raw scores); required when ``params``
        has ``rel_beta, rel_gamma``, ignored otherwise.

    Returns
    -------
    out : float32 [B, D]
    cache : dict with ``heads`` and ``B`` only (there is no backward)
    """
    params = _require_params(params, "params")
    if int(heads) != params.heads:
        raise RecoError(f"heads: {heads} differs from params.heads={params.heads}; the exported graph bakes the heads in")
    B, k = retrieved.shape[0], retrieved.shape[1]
    if mask is None:
        mask = np.ones((B, k), dtype=bool)  # [B,k]
    feeds = {"query": query, "retrieved": retrieved, "mask": mask}
    if RELEVANCE_NAMES[0] in params:
        if scores is None:
            raise RecoError("scores: this fusion module has the relevance bias (rel_beta, rel_gamma) and its graph "
                            "needs the neighbours' score features [B,k]; got None (pass raw search scores to "
                            "reco_ref.fusion.fusion_forward(..., scores=...))")  # fmt: skip
        if np.shape(scores) != (B, k):
            raise RecoError(f"scores: shape {np.shape(scores)}, expected ({B}, {k})")
        feeds["scores"] = np.ascontiguousarray(scores, dtype=np.float32)  # [B,k]
    sess = session_for(params)
    (out,) = sess.run(["out"], feeds)  # [B,D]
    return out, {"heads": int(heads), "B": B}


def fusion_backward(params, cache, dout, *, return_input_grads=False):
    """Not available: the ONNX graph is forward only."""
    raise BackendUnavailableError("fusion backend 'onnx' is inference only (the exported graph has no backward); "
                                  "compute gradients with backend 'numpy', 'numba' or 'cuda'")  # fmt: skip
