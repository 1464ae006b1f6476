"""Tiny ONNX encoder pairs built with ``onnx.helper`` for the encoder tests, plus their NumPy references.

Image graph: flatten the pixels, one random projection ``W [3*S*S, D]`` (+ optional key projection).
Text graph: embedding table ``E [V, D]`` gathered at the ids (-> [N,L,D] token states), optionally pooled
inside the graph (mask-weighted mean, the Hugging Face layout's ``text_embeds``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

onnx = __import__("pytest").importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

OPSET = 17


def _save(graph, path: Path) -> None:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="reco_ref-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def image_graph(path: Path, W: np.ndarray, *, size: int, layout: str = "NCHW", input_name: str = "pixels",
                output: str = "image_embeds", key_W: np.ndarray | None = None, key_output: str = "image_keys",
                batch: int | str = "N", extra_output: bool = False, nan: bool = False) -> None:
    """pixels [N,3,S,S] or [N,S,S,3] -> flatten (in NCHW order) @ W [3SS,D] -> output [N,D]."""
    shape = [batch, 3, size, size] if layout == "NCHW" else [batch, size, size, 3]
    nodes, inits = [], [numpy_helper.from_array(W.astype(np.float32), "W")]
    src = input_name
    if layout == "NHWC":
        nodes.append(helper.make_node("Transpose", [input_name], ["nchw"], perm=[0, 3, 1, 2]))
        src = "nchw"
    nodes.append(helper.make_node("Flatten", [src], ["flat"], axis=1))
    nodes.append(helper.make_node("MatMul", ["flat", "W"], ["proj"]))
    if nan:
        inits.append(numpy_helper.from_array(np.array([0.0], np.float32), "zero"))
        nodes.append(helper.make_node("Div", ["proj", "zero"], ["inf"]))
        nodes.append(helper.make_node("Mul", ["inf", "zero"], [output]))  # inf*0 = NaN
    else:
        nodes.append(helper.make_node("Identity", ["proj"], [output]))
    outs = [helper.make_tensor_value_info(output, TensorProto.FLOAT, [batch, W.shape[1]])]
    if key_W is not None:
        inits.append(numpy_helper.from_array(key_W.astype(np.float32), "K"))
        nodes.append(helper.make_node("MatMul", ["flat", "K"], [key_output]))
        outs.append(helper.make_tensor_value_info(key_output, TensorProto.FLOAT, [batch, key_W.shape[1]]))
    if extra_output:  # like HF's last_hidden_state: present, unused
        nodes.append(helper.make_node("Identity", ["flat"], ["last_hidden_state"]))
        outs.append(helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, [batch, 3 * size * size]))
    g = helper.make_graph(nodes, "image", [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, shape)], outs, inits)
    _save(g, path)


def image_ref(pixels: np.ndarray, W: np.ndarray, layout: str = "NCHW") -> np.ndarray:
    if layout == "NHWC":
        pixels = pixels.transpose(0, 3, 1, 2)
    return pixels.reshape(pixels.shape[0], -1).astype(np.float64) @ W.astype(np.float64)


def text_graph(path: Path, E: np.ndarray, *, ids: str = "input_ids", mask: str | None = None,
               types: str | None = None, output: str = "hidden", pooled: bool = False, seq: int | str = "L",
               id_type=TensorProto.INT64) -> None:
    """ids [N,L] -> E[ids] [N,L,D] (times the mask where given; + a zero token-type embedding where given);
    ``pooled``: mask-weighted mean -> [N,D] (the Hugging Face layout's ``text_embeds``; needs ``mask``)."""
    D = E.shape[1]
    inits = [numpy_helper.from_array(E.astype(np.float32), "E"),
             numpy_helper.from_array(np.array([2], np.int64), "ax2"),
             numpy_helper.from_array(np.array([1], np.int64), "ax1")]
    nodes = [helper.make_node("Gather", ["E", ids], ["tok0"], axis=0)]
    src = "tok0"
    if types is not None:
        inits.append(numpy_helper.from_array(np.zeros((2, D), np.float32), "T"))
        nodes += [helper.make_node("Gather", ["T", types], ["typ"], axis=0), helper.make_node("Add", [src, "typ"], ["tok1"])]
        src = "tok1"
    if mask is not None:
        nodes += [
            helper.make_node("Cast", [mask], ["maskf"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["maskf", "ax2"], ["mask3"]),
            helper.make_node("Mul", [src, "mask3"], ["tok2"]),
        ]
        src = "tok2"
    if pooled:
        nodes += [
            helper.make_node("ReduceSum", [src, "ax1"], ["summed"], keepdims=0),
            helper.make_node("ReduceSum", ["maskf", "ax1"], ["count"], keepdims=1),
            helper.make_node("Div", ["summed", "count"], [output]),
        ]
        out_shape = ["N", D]
    else:
        nodes.append(helper.make_node("Identity", [src], [output]))
        out_shape = ["N", seq, D]
    names = [n for n in (ids, mask, types) if n is not None]
    ins = [helper.make_tensor_value_info(n, id_type, ["N", seq]) for n in names]
    outs = [helper.make_tensor_value_info(output, TensorProto.FLOAT, out_shape)]
    _save(helper.make_graph(nodes, "text", ins, outs, inits), path)


class FakeTokenizer:
    """Stands in for the tokenizers room: word -> id by a stable hash; [start] words [end]; pad 0 to L."""

    pad_id, start_id, end_id, vocab_size = 0, 1, 99, 100

    def encode(self, text: str) -> list[int]:
        words = text.lower().split()
        return [self.start_id] + [2 + sum(map(ord, w)) % 90 for w in words] + [self.end_id]

    def encode_batch(self, texts, context_length):
        ids = np.zeros((len(texts), context_length), np.int64)
        mask = np.zeros((len(texts), context_length), np.int64)
        for i, t in enumerate(texts):
            e = self.encode(t)
            if len(e) > context_length:
                e = e[: context_length - 1] + [self.end_id]
            ids[i, : len(e)] = e
            mask[i, : len(e)] = 1
        return ids, mask


def write_pair(folder: Path, rng: np.random.Generator, *, D: int = 8, size: int = 16, layout: str = "NCHW",
               pooling: str = "mean", key_dim: int | None = None, context_length: int = 12, with_sha: bool = True,
               **overrides) -> dict:
    """A complete tiny pair in ``folder``: image.onnx, text.onnx, encoder.json; returns the weights + config."""
    folder.mkdir(parents=True, exist_ok=True)
    W = rng.standard_normal((3 * size * size, D)).astype(np.float32)
    K = rng.standard_normal((3 * size * size, key_dim)).astype(np.float32) if key_dim else None
    E = rng.standard_normal((FakeTokenizer.vocab_size, D)).astype(np.float32)
    image_graph(folder / "image.onnx", W, size=size, layout=layout, key_W=K)
    text_graph(folder / "text.onnx", E, output="hidden")
    cfg = {
        "format_version": 1,
        "name": "tiny",
        "embed_dim": D,
        "image": {
            "onnx": "image.onnx", "input": "pixels", "layout": layout, "size": size, "resize_shortest": size + 4,
            "interpolation": "bicubic", "mean": [0.48, 0.45, 0.4], "std": [0.26, 0.26, 0.27],
            "output": "image_embeds", "key_output": "image_keys" if key_dim else None, "normalize": True,
        },
        "text": {
            "onnx": "text.onnx", "tokenizer": {"kind": "clip_bpe", "file": None}, "context_length": context_length,
            "inputs": {"input_ids": "input_ids", "attention_mask": None, "token_type_ids": None},
            "output": "hidden", "pooling": pooling, "normalize": True,
        },
    }
    for dotted, value in overrides.items():
        *head, last = dotted.split("__")
        d = cfg
        for h in head:
            d = d[h]
        d[last] = value
    if with_sha:
        from reco_ref.io import sha256_file

        cfg["sha256"] = {f: sha256_file(folder / f) for f in ("image.onnx", "text.onnx")}
    (folder / "encoder.json").write_text(json.dumps(cfg, indent=1))
    return {"W": W, "K": K, "E": E, "cfg": cfg}
