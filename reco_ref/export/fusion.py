r"""Export the fusion layer φ (docs/reco.md §2) to ONNX: one graph per module (φ_I, φ_T), inference only.

``reco-ref export-fusion --weights WEIGHTS --out DIR`` writes

* ``DIR/phi_<prefix>.onnx`` for every module of the set (``phi_image.onnx``, ``phi_text.onnx``), and
* ``DIR/fusion_onnx.json``, the manifest: format, opset, each module's config, graph file and the
  SHA-256 of its parameter arrays (see :func:`params_digest`), the set's extras (``logit_scale``) as
  numbers, and the source file's SHA-256. A module with the relevance bias also lists its graph's
  ``inputs`` and what ``scores`` holds (its config's ``relevance`` gives the map's centre and width).

Each graph has three inputs and one output, all with a dynamic batch ``B`` and neighbour count ``k``
(``k = 0`` allowed)::

    query     float32 [B, D]
    retrieved float32 [B, k, D]
    mask      bool    [B, k]      True = a valid neighbour (pass all True for "no mask")
    out       float32 [B, D]      = reco_ref.fusion.fusion_forward(params, query, retrieved, mask)

Only the query token's output row is read out (docs/reco.md §2), so the graph computes, with
:math:`a_0 = \mathrm{LN}_1(X)_{:,0}` and every head :math:`j`,

.. math::

    X = [x + e_q;\ r_1 + e_r;\ \dots;\ r_k + e_r], \quad
    K, V = \mathrm{LN}_1(X) W_{k,v} + b_{k,v}, \quad q_0 = a_0 W_q + b_q, \\
    p^{(j)} = \mathrm{softmax}\Big(\frac{q_0^{(j)} K^{(j)\top}}{\sqrt{d_h}} + m\Big), \quad
    h_0 = x + e_q + \mathrm{concat}_j(p^{(j)} V^{(j)}) W_o + b_o, \\
    y_0 = h_0 + \mathrm{GELU}(\mathrm{LN}_2(h_0) W_1 + b_1) W_2 + b_2, \quad
    \bar x = y_0 / \lVert y_0 \rVert

which equals row 0 of the full layer exactly (the other rows of :math:`Q`, the attention output and
the MLP never reach row 0). The query token is always valid, so a row whose neighbours are all masked
attends to itself alone. Masked neighbour slots are replaced by 0 inside the graph before anything
reads them, so NaN/inf there has no effect (the NumPy front door does the same).

**Relevance bias** (docs/reco.md §2 "Relevance bias" [ours]). A module holding ``rel_beta, rel_gamma`` [h]
(``params.config.relevance``) gets a fourth input, after ``mask``::

    scores    float32 [B, k]      the score *features* f = (cos − center)/width, as the front door
                                  reco_ref.fusion.score_features makes them (masked slots: anything)

and every head's logits get :math:`+\gamma_h` toward the query token and :math:`+\beta_h f_{b,j}` toward
neighbour :math:`j`, before the mask and the softmax. The graph takes the features, not raw cosines, because
that is what the backend contract passes (``fusion_forward(..., scores=features)``) and it keeps one source of
the map: ``(center, width)`` stay in the module's config (the weights header and the manifest's
``modules.<prefix>.relevance``) and are also copied into the graph's metadata (``rel_center``, ``rel_width``)
for a caller running the graph without reco_ref. Masked score slots are replaced by 0 inside the graph
(NaN-safe). The metadata of such a graph has ``relevance = "1"`` and ``inputs = "query,retrieved,mask,scores"``;
its ``params_sha256`` covers the 20 arrays (:func:`params_digest`). Modules without the relevance arrays are
exported exactly as before (three inputs, no extra metadata, the 18-array digest).

Float32 only: ONNX Runtime's CPU kernels for ``Erf`` and ``LayerNormalization`` exist for float32, and an
edge deployment runs in float32. A float64 set is refused with a clear error rather than silently cast.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from ..errors import BackendUnavailableError, ParamsFormatError
from ..fusion import onnx_backend
from ..fusion.onnx_backend import FORMAT, MANIFEST, params_digest
from ..fusion.params import PARAM_NAMES, RELEVANCE_NAMES, FusionParams, load_param_set, relevance_of
from ..io import atomic_write_bytes, atomic_write_json, sha256_file
from ..paths import check_output_dir
from ..reco.weights import META_KEY, decode_meta

__all__ = ["MANIFEST", "FORMAT", "OPSET", "params_digest", "fusion_model_bytes", "export_fusion", "attach_in_memory"]

FORMAT_VERSION = 1
#: Opset 17: LayerNormalization is a standard op from 17 on; ONNX Runtime ≥ 1.17 (our floor) runs it.
OPSET = 17
LN_EPS = 1e-5  # the reference's LN_EPS (docs/reco.md §2)
#: What the ``scores`` input of a relevance graph holds (metadata ``scores``, manifest ``scores``).
SCORES_DOC = "feature (cos - rel_center) / rel_width, float32 [B,k]; masked slots ignored"
#: ... and for a module whose map comes from the searched memory (``FusionConfig.rel_source == "memory"``).
SCORES_DOC_MEMORY = ("feature (cos - center) / width, float32 [B,k], with center and width measured on the searched "
                     "memory (reco_ref.memory.score_map.memory_score_map; rel_center/rel_width record the training "
                     "memory's); masked slots ignored")


def _onnx():
    """Import ``onnx`` lazily: only export needs it, never inference."""
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError as exc:
        raise BackendUnavailableError(
            f"exporting the fusion layer to ONNX needs the 'onnx' package ({exc}); install the export extra: "
            f'python3 -m pip install -e ".[export]"'
        ) from exc
    return onnx, TensorProto, helper, numpy_helper


def _check_float32(params: FusionParams, where: str) -> None:
    if not isinstance(params, FusionParams):
        raise ParamsFormatError(f"{where}: expected FusionParams (from init_params / load_params / load_param_set), "
                                f"got {type(params).__name__}")  # fmt: skip
    if params.dtype != np.float32:
        raise ParamsFormatError(f"{where}: dtype {params.dtype}, expected float32 (the ONNX fusion graph runs in float32; "
                                f"cast the set with astype(float32) and save it first)")  # fmt: skip


def fusion_model_bytes(params: FusionParams, name: str = "phi") -> bytes:
    """Serialized ONNX model of one fusion module's forward (see the module docstring for the graph).

    Parameters
    ----------
    params : FusionParams, float32
    name : str
        Graph name (``phi_image`` / ``phi_text``), also written in the model's metadata.

    Returns
    -------
    bytes
        A checked ``ModelProto`` (``onnx.checker``), opset :data:`OPSET`.
    """
    onnx, TP, helper, numpy_helper = _onnx()
    _check_float32(params, name)
    D, h = params.dim, params.heads
    rel = relevance_of(params)  # (center, width) or None; also checks config.relevance against the arrays
    names = PARAM_NAMES + RELEVANCE_NAMES if rel is not None else PARAM_NAMES
    inits = [numpy_helper.from_array(np.ascontiguousarray(params[n]), name=n) for n in names]
    inits += _constants(numpy_helper, D, h, relevance=rel is not None)
    N = helper.make_node
    if rel is not None:  # docs/reco.md §2 "Relevance bias": +gamma_h toward token 0, +beta_h * f_j toward neighbour j
        nodes = _attention_nodes(N, helper, TP, _relevance_nodes(N), "S_rel")
    else:
        nodes = _attention_nodes(N, helper, TP, [], "S_scaled")
    nodes += _mlp_nodes(N)
    inputs = [
        helper.make_tensor_value_info("query", TP.FLOAT, ["B", D]),
        helper.make_tensor_value_info("retrieved", TP.FLOAT, ["B", "k", D]),
        helper.make_tensor_value_info("mask", TP.BOOL, ["B", "k"]),
    ]
    if rel is not None:
        inputs.append(helper.make_tensor_value_info("scores", TP.FLOAT, ["B", "k"]))
    outputs = [helper.make_tensor_value_info("out", TP.FLOAT, ["B", D])]
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="reco_ref")
    model.ir_version = min(model.ir_version, 8)  # readable by ONNX Runtime >= 1.17 (our floor)
    helper.set_model_props(model, _model_props(params, name, rel))
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _constants(numpy_helper, D: int, h: int, *, relevance: bool) -> list:
    """The graph's constant initializers (scalars, index lists, reshape targets), in a fixed order."""
    dh = D // h
    consts = [
        ("c_zero", 0.0, np.float32),
        ("c_neg_inf", -np.inf, np.float32),
        ("c_scale", 1.0 / math.sqrt(dh), np.float32),
        ("c_half", 0.5, np.float32),
        ("c_one", 1.0, np.float32),
        ("c_inv_sqrt2", 1.0 / math.sqrt(2.0), np.float32),
        ("c_idx0", 0, np.int64),  # scalar index: Gather drops the token axis
        ("c_one_1d", [1], np.int64),
        ("c_axis_last", [-1], np.int64),
        ("c_axes_12", [1, 2], np.int64),
        ("c_axis_1", [1], np.int64),
        ("c_shape_q", [0, h, 1, dh], np.int64),  # [B,D] -> [B,h,1,dh]
        ("c_shape_kv", [0, -1, h, dh], np.int64),  # [B,T,D] -> [B,T,h,dh]
        ("c_shape_bd", [0, D], np.int64),  # [B,h,1,dh] -> [B,D] (heads concatenated, head j at j*dh)
        ("c_slice0", [0], np.int64),
    ]
    if relevance:
        consts.append(("c_shape_h4", [1, h, 1, 1], np.int64))
    return [numpy_helper.from_array(np.asarray(value, dtype=dtype), name=nm) for nm, value, dtype in consts]


def _relevance_nodes(N) -> list:
    """The relevance bias on the scaled logits ``S_scaled`` -> ``S_rel`` [B,h,1,T] (before the mask)."""
    return [
        N("Where", ["mask", "scores", "c_zero"], ["f_clean"]),                # [B,k] masked slots -> 0
        N("Unsqueeze", ["f_clean", "c_axes_12"], ["f4"]),                     # [B,1,1,k]
        N("Reshape", ["rel_beta", "c_shape_h4"], ["beta4"]),                  # [1,h,1,1]
        N("Reshape", ["rel_gamma", "c_shape_h4"], ["gamma4"]),                # [1,h,1,1]
        N("Mul", ["f4", "beta4"], ["rel_n"]),                                 # [B,h,1,k]
        N("Unsqueeze", ["bias_q", "c_axes_12"], ["zero4"]),                   # [B,1,1,1] zeros
        N("Add", ["zero4", "gamma4"], ["rel_q"]),                             # [B,h,1,1]
        N("Concat", ["rel_q", "rel_n"], ["rel_bias"], axis=3),                # [B,h,1,T]
        N("Add", ["S_scaled", "rel_bias"], ["S_rel"]),                        # [B,h,1,T] bias before the mask
    ]  # fmt: skip


def _attention_nodes(N, helper, TP, rel_nodes: list, s_biased: str) -> list:
    """Tokens, LN1, keys/values on every token and the query on token 0, masked softmax, the output projection
    and the residual -> ``H0`` [B,D]. ``rel_nodes`` (the relevance bias) run between scaling and masking and
    leave the logits in ``s_biased``."""
    return [
        # Masked slots -> 0 before anything reads them (NaN-safe, as the front door).
        N("Unsqueeze", ["mask", "c_axis_last"], ["mask3"]),                      # [B,k,1] bool
        N("Where", ["mask3", "retrieved", "c_zero"], ["r_clean"]),               # [B,k,D]
        # Tokens with type embeddings.
        N("Add", ["query", "e_query"], ["x0"]),                                   # [B,D]
        N("Add", ["r_clean", "e_neighbor"], ["xr"]),                              # [B,k,D]
        N("Unsqueeze", ["x0", "c_axis_1"], ["x0_3"]),                             # [B,1,D]
        N("Concat", ["x0_3", "xr"], ["X"], axis=1),                               # [B,T,D]
        N("LayerNormalization", ["X", "ln1_gamma", "ln1_beta"], ["A1"], axis=-1, epsilon=LN_EPS),  # [B,T,D]
        # Keys/values on every token, the query projection on token 0 only.
        N("MatMul", ["A1", "w_k"], ["K_mm"]), N("Add", ["K_mm", "b_k"], ["K"]),      # [B,T,D]
        N("MatMul", ["A1", "w_v"], ["V_mm"]), N("Add", ["V_mm", "b_v"], ["V"]),      # [B,T,D]
        N("Gather", ["A1", "c_idx0"], ["a0"], axis=1),                            # [B,D]
        N("MatMul", ["a0", "w_q"], ["q_mm"]), N("Add", ["q_mm", "b_q"], ["q0"]),     # [B,D]
        # Head split.
        N("Reshape", ["q0", "c_shape_q"], ["qh"]),                                # [B,h,1,dh]
        N("Reshape", ["K", "c_shape_kv"], ["K4"]),                                # [B,T,h,dh]
        N("Transpose", ["K4"], ["Kt"], perm=[0, 2, 3, 1]),                        # [B,h,dh,T]
        N("Reshape", ["V", "c_shape_kv"], ["V4"]),                                # [B,T,h,dh]
        N("Transpose", ["V4"], ["Vh"], perm=[0, 2, 1, 3]),                        # [B,h,T,dh]
        # Scores + mask bias (0 on valid tokens, -inf on masked ones; token 0 always valid).
        N("MatMul", ["qh", "Kt"], ["S_raw"]),                                     # [B,h,1,T]
        N("Mul", ["S_raw", "c_scale"], ["S_scaled"]),
        N("Where", ["mask", "c_zero", "c_neg_inf"], ["bias_r"]),                  # [B,k]
        N("Shape", ["query"], ["q_shape"]),                                       # [2] = (B, D)
        N("Slice", ["q_shape", "c_slice0", "c_one_1d"], ["B_1d"]),                # [1] = (B,)
        N("Concat", ["B_1d", "c_one_1d"], ["B1_shape"], axis=0),                  # [2] = (B, 1)
        N("ConstantOfShape", ["B1_shape"], ["bias_q"],
          value=helper.make_tensor("zero", TP.FLOAT, [1], [0.0])),                # [B,1]
        N("Concat", ["bias_q", "bias_r"], ["bias"], axis=1),                      # [B,T]
        *rel_nodes,
        N("Unsqueeze", ["bias", "c_axes_12"], ["bias4"]),                         # [B,1,1,T]
        N("Add", [s_biased, "bias4"], ["S"]),                                     # [B,h,1,T]
        N("Softmax", ["S"], ["P"], axis=-1),                                      # [B,h,1,T]
        N("MatMul", ["P", "Vh"], ["PV"]),                                         # [B,h,1,dh]
        N("Reshape", ["PV", "c_shape_bd"], ["C0"]),                               # [B,D]
        N("MatMul", ["C0", "w_o"], ["o_mm"]), N("Add", ["o_mm", "b_o"], ["O0"]),     # [B,D]
        N("Add", ["x0", "O0"], ["H0"]),                                           # [B,D]
    ]  # fmt: skip


def _mlp_nodes(N) -> list:
    """The MLP on the query token with its residual and the L2 normalisation: ``H0`` [B,D] -> ``out`` [B,D]."""
    return [
        # MLP on the query token: exact GELU u * Φ(u) = 0.5 u (1 + erf(u / sqrt 2)).
        N("LayerNormalization", ["H0", "ln2_gamma", "ln2_beta"], ["A2"], axis=-1, epsilon=LN_EPS),  # [B,D]
        N("MatMul", ["A2", "w_1"], ["pre_mm"]), N("Add", ["pre_mm", "b_1"], ["pre"]),  # [B,R]
        N("Mul", ["pre", "c_inv_sqrt2"], ["pre_s"]),
        N("Erf", ["pre_s"], ["erf"]),
        N("Add", ["erf", "c_one"], ["erf1"]),
        N("Mul", ["pre", "erf1"], ["u_half"]),
        N("Mul", ["u_half", "c_half"], ["U"]),                                    # [B,R]
        N("MatMul", ["U", "w_2"], ["m_mm"]), N("Add", ["m_mm", "b_2"], ["M0"]),     # [B,D]
        N("Add", ["H0", "M0"], ["Y0"]),                                           # [B,D]
        # L2 normalisation.
        N("ReduceSumSquare", ["Y0"], ["sq"], axes=[-1], keepdims=1),              # [B,1]
        N("Sqrt", ["sq"], ["norm"]),
        N("Div", ["Y0", "norm"], ["out"]),                                        # [B,D]
    ]  # fmt: skip


def _model_props(params: FusionParams, name: str, rel: tuple[float, float] | None) -> dict[str, str]:
    """The graph's metadata: format, module name, shape, the parameters' digest, and what a relevance graph takes."""
    props = {"reco_ref.format": FORMAT, "reco_ref.module": name, "dim": str(params.dim), "heads": str(params.heads),
             "mlp_hidden": str(params["w_1"].shape[1]), "params_sha256": params_digest(params)}  # fmt: skip
    if rel is not None:
        source = params.config.rel_source if isinstance(params, FusionParams) else "fixed"
        props.update({"relevance": "1", "inputs": "query,retrieved,mask,scores", "rel_source": source,
                      "scores": SCORES_DOC_MEMORY if source == "memory" else SCORES_DOC,
                      "rel_center": repr(rel[0]), "rel_width": repr(rel[1])})  # fmt: skip
    return props


def export_fusion(weights: str | os.PathLike, out_dir: str | os.PathLike, *, overwrite: bool = False,
                  modules: tuple[str, ...] | list[str] | None = None) -> dict:
    """Write every module of a fusion parameter set as an ONNX graph, plus the manifest.

    Parameters
    ----------
    weights : path of a set saved by :func:`reco_ref.fusion.save_param_set` (``image.*``, ``text.*``,
        optional scalar extras such as ``logit_scale``), including RECO weights written by
        :func:`reco_ref.reco.weights.save_reco_weights` (``reco-ref train``'s ``best.npz`` / ``last.npz``, the shipped
        ``fusion.npz``): their ``tau`` goes into ``extras``, their ``meta_utf8`` description into ``meta``
    out_dir : output folder (created; files written atomically, only after every check has passed); never
        inside a memory
    overwrite : replace existing ``phi_*.onnx`` / ``fusion_onnx.json`` there (default: refuse, naming them)
    modules : the modules to export, e.g. ``("image",)`` for φ_I alone (an edge device that ranks classes with
        precomputed class text needs no φ_T); default every module of the set. The manifest lists only these,
        so :func:`~reco_ref.fusion.onnx_backend.attach` pairs it with weights holding the same modules (φ_I alone:
        :func:`reco_ref.eval.edge.save_image_weights`).

    Returns
    -------
    dict
        The manifest written to ``out_dir/fusion_onnx.json`` (with ``meta``, the weights' JSON description, when
        they carry one).

    Raises
    ------
    ParamsFormatError
        A bad weights file (named entry), a float64 set, extras that are not scalars (other than a valid
        ``meta_utf8``); raised before anything is written.
    BackendUnavailableError
        ``onnx`` is not installed.
    RecoError
        ``out_dir`` lies inside a memory, or holds one of the outputs and ``overwrite`` is False.
    """
    _onnx()  # fail before reading anything when the tool itself is missing
    wanted = None if modules is None else list(dict.fromkeys(modules))
    if wanted is not None and not wanted:
        raise ParamsFormatError("modules: expected at least one module name (e.g. image)")
    loaded, extras = load_param_set(weights)
    missing = [m for m in wanted or () if m not in loaded]
    if missing:
        raise ParamsFormatError(f"{weights}: no module {missing[0]!r} to export; it holds {sorted(loaded)}")
    modules = loaded if wanted is None else {m: loaded[m] for m in wanted}
    out = Path(out_dir)
    # every output checked and every graph built before the first write: a refusal or a bad weights file leaves
    # DIR as it was (a user's own phi_image.onnx is replaced only with overwrite=True / --overwrite)
    check_output_dir(out, [f"phi_{prefix}.onnx" for prefix in modules] + [MANIFEST], overwrite=overwrite)
    blobs: dict[str, bytes] = {}
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "opset": OPSET,
                "source": os.path.basename(os.fspath(weights)), "source_sha256": sha256_file(weights),
                "modules": {}, "extras": {}}  # fmt: skip
    for prefix, params in modules.items():
        fname = f"phi_{prefix}.onnx"
        blobs[fname] = fusion_model_bytes(params, name=f"phi_{prefix}")
        entry = dict(params.config.to_json(), file=fname, params_sha256=params_digest(params))
        if params.config.relevance:  # the config's "relevance" holds {center, width}; say what the graph takes
            entry.update(inputs=["query", "retrieved", "mask", "scores"],
                         scores=SCORES_DOC_MEMORY if params.config.rel_source == "memory" else SCORES_DOC)
        manifest["modules"][prefix] = entry
    for name, a in extras.items():
        if name == META_KEY:  # RECO weights (train's best.npz, the shipped set): the run's description, as JSON
            manifest["meta"] = decode_meta(weights, a)  # checked as load_reco_weights checks it
            continue
        if a.size != 1:
            raise ParamsFormatError(f"{weights}: extra {name!r} has shape {a.shape}, expected a scalar for the manifest")
        manifest["extras"][name] = float(a.reshape(()))
    out.mkdir(parents=True, exist_ok=True)
    for fname, blob in blobs.items():
        atomic_write_bytes(out / fname, blob)
    atomic_write_json(out / MANIFEST, manifest)  # last: its presence says the export is complete
    return manifest


def attach_in_memory(*params: FusionParams, threads: int | None = None) -> None:
    """Build each module's graph in memory and attach it to the fusion backend ``"onnx"`` (needs ``onnx``).

    After this, ``fusion_forward(p, ..., backend="onnx")`` runs on ONNX Runtime for every ``p`` given. The edge
    path without ``onnx`` uses :func:`export_fusion` once and :func:`reco_ref.fusion.onnx_backend.attach`.
    """
    for i, p in enumerate(params):
        onnx_backend.attach_model(p, fusion_model_bytes(p, name=f"phi_{i}"), threads=threads)
