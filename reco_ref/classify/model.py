"""Front door of the memory-attention classifier: parameters, input checks, backend dispatch.

::

    params = init_params(dim=768, classes=102, key_dim=1024, value_dim=768, width=128, heads=4)
    logits, cache = classify_forward(params, q, keys, values, valid, heads=4, backend="numba")
    loss, ce = cross_entropy_forward(logits, labels)
    grads = classify_backward(params, cache, cross_entropy_backward(ce))

The math is in :mod:`reco_ref.classify.reference`; :mod:`reco_ref.classify.numba_cpu` is the fast twin. Both are
registered, beside the fusion layer's modules of the same backend, in the one registry :mod:`reco_ref.backends`
(family ``"classify"``), which this front door dispatches through.
"""

from __future__ import annotations

import numpy as np

from ..backends import backend_names, backend_of_cache, get_backend
from ..errors import ShapeError
from . import reference
from .reference import ATTENTION_MODES, cross_entropy_backward, cross_entropy_forward

__all__ = ["BACKENDS", "VALUE_MODES", "init_params", "param_shapes", "check_inputs", "classify_forward",
           "classify_backward", "cross_entropy_forward", "cross_entropy_backward", "predict_logits"]

#: the registered backends with the classifier's kernels (:func:`reco_ref.backends.backend_names`, read at import)
BACKENDS = backend_names("classify")
#: what a memory item's value is: its paired text embedding (default, the paper's), its image embedding, or both
#: concatenated ([text, image], width 2D)
VALUE_MODES = ("text", "image", "both")


#: the score readout's initial β (a sharp softmax over search cosines: a prototype fitted β ≈ 40–70 on CUB-100 and
#: Flowers-102; started at 0 it stays near a uniform average) and output scale s_v [ours]
READOUT_BETA0, READOUT_SV0 = 40.0, 16.0


def param_shapes(dim: int, classes: int, *, key_dim: int | None = None, value_dim: int | None = None,
                 width: int = 128, memory: bool = True, attention: str = "softmax",
                 readout_dim: int | None = None) -> dict[str, tuple]:
    """Name → shape of every parameter of the configuration (no memory: only the linear classifier).

    ``readout_dim`` (the caption embeddings' width) adds the score readout [ours]: ``ro_beta [1]``, ``ro_log_sv [1]``
    (trained) and ``ro_class_text [C, Dt]`` (the class prompts' text embeddings, fixed: never given a gradient).
    ``attention="none"``: no attention module, the memory only feeds the readout."""
    shapes = {"w_c": (dim, classes), "b_c": (classes,)}
    if memory and readout_dim:
        shapes.update({"ro_beta": (1,), "ro_log_sv": (1,), "ro_class_text": (classes, readout_dim)})
    if not memory or attention == "none":
        return shapes
    key_dim, value_dim = key_dim or dim, value_dim or dim
    shapes.update({"lnv_gamma": (value_dim,), "lnv_beta": (value_dim,), "w_v": (value_dim, width), "b_v": (width,),
                   "w_o": (width, dim), "b_o": (dim,)})
    if attention == "softmax":
        shapes.update({"lnq_gamma": (dim,), "lnq_beta": (dim,), "w_q": (dim, width), "b_q": (width,),
                       "lnk_gamma": (key_dim,), "lnk_beta": (key_dim,), "w_k": (key_dim, width), "b_k": (width,)})
    return shapes


def init_params(dim: int, classes: int, *, key_dim: int | None = None, value_dim: int | None = None,
                width: int = 128, heads: int = 4, memory: bool = True, attention: str = "softmax", seed: int = 0,
                dtype=np.float32, class_text: np.ndarray | None = None) -> dict[str, np.ndarray]:
    r"""Initial parameters: LayerNorms identity, projections :math:`\mathcal N(0, 1/d_\mathrm{in})`, biases 0,
    :math:`W_o = 0, b_o = 0` (so :math:`z = q`: training starts at the no-memory classifier) and
    :math:`W_c \sim \mathcal N(0, 0.01^2)`, :math:`b_c = 0`.

    ``class_text`` [C, Dt] (the class prompts' text embeddings) adds the score readout [ours]:
    ``ro_beta = READOUT_BETA0``, ``ro_log_sv = log READOUT_SV0``, ``ro_class_text = class_text``.
    """
    if attention not in ATTENTION_MODES + ("none",):
        raise ShapeError(f"attention: expected one of {ATTENTION_MODES + ('none',)}, got {attention!r}")
    if attention == "none" and class_text is None:
        raise ShapeError("attention 'none' (no attention module) is only the score readout's variant: give class_text")
    if memory and (width < 1 or heads < 1 or width % heads):
        raise ShapeError(f"width {width} must be a positive multiple of heads {heads}")
    rng = np.random.default_rng(seed)
    params = {}
    readout_dim = None if class_text is None else int(np.shape(class_text)[1])
    if class_text is not None and np.shape(class_text)[0] != classes:
        raise ShapeError(f"class_text: {np.shape(class_text)[0]} rows, expected one per class ({classes})")
    for name, shape in param_shapes(dim, classes, key_dim=key_dim, value_dim=value_dim, width=width, memory=memory,
                                    attention=attention, readout_dim=readout_dim).items():
        if name == "ro_beta":
            a = np.full(shape, READOUT_BETA0)
        elif name == "ro_log_sv":
            a = np.full(shape, np.log(READOUT_SV0))
        elif name == "ro_class_text":
            a = np.asarray(class_text, np.float64)
        elif name.endswith("_gamma"):
            a = np.ones(shape)
        elif name in ("w_q", "w_k", "w_v"):
            a = rng.standard_normal(shape) / np.sqrt(shape[0])
        elif name == "w_c":
            a = rng.standard_normal(shape) * 0.01
        else:  # biases, betas, w_o: zero
            a = np.zeros(shape)
        params[name] = a.astype(dtype)
    return params


def check_inputs(params, query, keys, values, valid, heads) -> None:
    """Shapes and dtypes agree with ``params`` (ShapeError naming the array otherwise)."""
    if query.ndim != 2 or query.shape[1] != params["w_c"].shape[0]:
        raise ShapeError(f"query [B,D]: got {query.shape}, expected D={params['w_c'].shape[0]}")
    dt = params["w_c"].dtype
    if query.dtype != dt:
        raise ShapeError(f"query: dtype {query.dtype}, expected the parameters' {dt}")
    if "w_v" not in params or keys is None:
        return
    B = query.shape[0]
    Dv, W = params["w_v"].shape
    Dk = params["w_k"].shape[0] if "w_k" in params else keys.shape[-1]
    if keys.ndim != 3 or keys.shape[0] != B or keys.shape[2] != Dk:
        raise ShapeError(f"keys [B,k,Dk]: got {keys.shape}, expected B={B}, Dk={Dk}")
    if values is None or values.shape != keys.shape[:2] + (Dv,):
        raise ShapeError(f"values [B,k,Dv]: got {None if values is None else values.shape}, "
                         f"expected {keys.shape[:2] + (Dv,)}")
    if keys.dtype != dt or values.dtype != dt:
        raise ShapeError(f"keys/values: dtypes {keys.dtype}/{values.dtype}, expected {dt}")
    if valid is not None and (valid.shape != keys.shape[:2] or valid.dtype != bool):
        raise ShapeError(f"valid [B,k] bool: got {valid.shape} {valid.dtype}, expected {keys.shape[:2]} bool")
    if W % heads:
        raise ShapeError(f"heads {heads} must divide the attention width {W}")


def _impl(backend: str):
    """The classifier's kernels on ``backend``; BackendUnavailableError (a one-line RecoError) naming it otherwise."""
    return get_backend(backend, family="classify")


def classify_forward(params, query, keys=None, values=None, valid=None, *, heads=4, attention="softmax",
                     logit_scale=1.0, backend="numpy", scores=None, readout_values=None):
    """Checked forward (see :func:`reco_ref.classify.reference.classify_forward`); ``cache["backend"]`` set.

    With the score readout (``ro_beta`` in ``params``) the front door adds
    :func:`~reco_ref.classify.reference.score_readout_forward` of the items' ``scores`` [B, k] and caption
    embeddings (the first ``Dt`` columns of ``values``) to the backend's logits — one NumPy implementation for both
    backends (small GEMMs). ``readout_values`` [B, k, Dt], when given, is what the readout reads instead of the
    captions (the items' one-hot labels of the label readout [ours], read against ``ro_class_text = I``).
    ``attention="none"``: the backend runs the no-memory classifier, the memory feeds the readout only."""
    readout = "ro_beta" in params and keys is not None
    if readout:
        _check_readout(params, keys, values if readout_values is None else readout_values, valid, scores)
    module = attention != "none"
    check_inputs(params, query, keys if module else None, values, valid, heads)
    logits, cache = _impl(backend).classify_forward(params, query, keys if module else None,
                                                    values if module else None, valid, heads=heads,
                                                    attention=attention if module else "softmax",
                                                    logit_scale=logit_scale)
    if readout:
        Dt = params["ro_class_text"].shape[1]
        ro_v = values[..., :Dt] if readout_values is None else readout_values
        ro, cache["readout"] = reference.score_readout_forward(
            scores, valid, ro_v, params["ro_class_text"], params["ro_beta"][0], params["ro_log_sv"][0])
        cache["readout_own_values"] = readout_values is not None
        logits = logits + ro
    cache["backend"] = backend
    return logits, cache


def _check_readout(params, keys, values, valid, scores) -> None:
    Dt = params["ro_class_text"].shape[1]
    if scores is None or np.shape(scores) != keys.shape[:2]:
        raise ShapeError(f"scores [B,k]: the score readout needs the items' search scores, got "
                         f"{None if scores is None else np.shape(scores)}, expected {keys.shape[:2]}")
    if values is None or values.shape[-1] < Dt or values.shape[:2] != keys.shape[:2]:
        raise ShapeError(f"values: the score readout reads the items' caption embeddings (width {Dt}) as their first "
                         f"columns (values 'text' or 'both'), or readout_values [B, k, {Dt}], got "
                         f"{None if values is None else values.shape}")
    if values.dtype != params["ro_class_text"].dtype:
        raise ShapeError(f"readout values: dtype {values.dtype}, expected the parameters' "
                         f"{params['ro_class_text'].dtype}")
    ok = np.ones(keys.shape[:2], bool) if valid is None else valid
    if not np.isfinite(np.asarray(scores)[ok]).all():
        raise ShapeError("scores: NaN/inf in a valid item's search score")


def classify_backward(params, cache, dlogits, *, return_input_grads=False):
    """Backward on the backend that made ``cache`` (+ the score readout's, when the forward had one)."""
    made_by = backend_of_cache(cache, None, "classify_forward")
    grads = _impl(made_by).classify_backward(params, cache, dlogits, return_input_grads=return_input_grads)
    if "readout" in cache:
        dscores, dvalues_text, dbeta, dlog_sv = reference.score_readout_backward(cache["readout"], dlogits)
        grads["ro_beta"] = np.reshape(dbeta, (1,)).astype(params["ro_beta"].dtype)
        grads["ro_log_sv"] = np.reshape(dlog_sv, (1,)).astype(params["ro_log_sv"].dtype)
        if return_input_grads:
            Dt = dvalues_text.shape[-1]
            if cache.get("readout_own_values"):
                grads["readout_values"] = dvalues_text
            elif "values" in grads:
                grads["values"] = grads["values"].copy()
                grads["values"][..., :Dt] += dvalues_text
            else:
                grads["values_text"] = dvalues_text
            grads["scores"] = dscores
    return grads


def predict_logits(params, query, keys=None, values=None, valid=None, *, heads=4, attention="softmax",
                   logit_scale=1.0, backend="numpy", batch_size=1024, scores=None,
                   readout_values=None) -> np.ndarray:
    """Logits ``[N, C]`` in batches (bounded memory)."""
    out = []
    for lo in range(0, len(query), batch_size):
        s = slice(lo, lo + batch_size)
        logits, _ = classify_forward(params, query[s], None if keys is None else keys[s],
                                     None if values is None else values[s], None if valid is None else valid[s],
                                     heads=heads, attention=attention, logit_scale=logit_scale, backend=backend,
                                     scores=None if scores is None else scores[s],
                                     readout_values=None if readout_values is None else readout_values[s])
        out.append(logits)
    return np.concatenate(out) if out else np.zeros((0, params["b_c"].shape[0]), params["b_c"].dtype)
