"""Convert a frozen TensorFlow GraphDef (e.g. a TF-slim MobileNetV1) to ONNX, without TensorFlow.

The GraphDef is read by a small protobuf wire-format reader here (:func:`parse_graphdef`; field numbers from
TensorFlow's ``graph.proto`` family) - no TensorFlow, no protobuf runtime. The converters also accept a
``GraphDef`` parsed by any other means (e.g. tensorboard's compiled protos), as they only use ``.node`` with
``name/op/input/attr``. The ONNX graph is written with ``onnx.helper`` (the ``export`` extra), never a runtime
dependency of ``reco_ref``.

A build-only tool: it lives with the rebuild scripts (``scripts/tools/``), not in the ``reco_ref`` package an
edge device installs. ``scripts/reco_mini_graphs.py`` and the tests import it as the top-level module
``graphdef_to_onnx`` after putting ``scripts/tools`` on ``sys.path``.

What is converted (the op set of TF-slim image classifiers):

=========================  =====================================================================
TensorFlow op              ONNX
=========================  =====================================================================
Placeholder (NHWC)         graph input, then ``Transpose`` to NCHW; everything inside is NCHW
Conv2D                     ``Conv`` (``auto_pad=SAME_UPPER`` reproduces TF's SAME padding)
DepthwiseConv2dNative      ``Conv`` with ``group = C_in``
Mul / Add / Sub / BiasAdd  folded into the preceding conv's weights/bias when the other operand is
  by a per-channel const   a per-channel constant (that is how frozen batch-norm looks), else elementwise
Relu6 / Relu               ``Clip(0, 6)`` / ``Relu``
AvgPool / Mean(1,2)        ``AveragePool`` / ``GlobalAveragePool``
Squeeze, Reshape, MatMul,  the obvious ONNX ops
Softmax, Identity
=========================  =====================================================================

Every node whose inputs are all constants (``Const``, ``Identity`` of a const, the ``Rsqrt``/``Mul``/``Sub``
arithmetic of a frozen batch-norm) is evaluated here in float64 then stored as float32, so the ONNX graph
only holds the convolutions and activations.

Independent check: ``graphdef_forward_numpy`` in ``tests/encoders/graphdef_oracle.py`` re-executes the
*unconverted* GraphDef op by op in NumPy with TensorFlow's own semantics (NHWC, TF SAME padding, unfolded
batch-norm arithmetic). The tests compare the ONNX Runtime output of the converted graph against it; with
TensorFlow unavailable that interpreter is the converter's oracle.

Example
-------
>>> graph = load_graphdef("retrained_graph.pb")                                  # doctest: +SKIP
>>> model = graphdef_to_onnx(graph, input_name="input",
...                          outputs={"MobilenetV1/Logits/AvgPool_1a/AvgPool": "features",
...                                   "MobilenetV1/Predictions/Reshape": "imagenet_logits"},
...                          flatten_outputs=("features",), onnx_input_name="pixels")  # doctest: +SKIP
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run from a checkout: the package sits two folders up
    sys.path.insert(0, str(ROOT))

from reco_ref.errors import EncoderConfigError  # noqa: E402

__all__ = [
    "parse_graphdef",
    "GraphDefMessage",
    "load_graphdef",
    "tensor_to_numpy",
    "node_map",
    "constant_values",
    "graphdef_to_onnx",
    "SUPPORTED_OPS",
]

SUPPORTED_OPS = frozenset(
    {
        "Const", "Identity", "Placeholder", "PlaceholderWithDefault", "Conv2D", "DepthwiseConv2dNative",
        "BiasAdd", "Add", "AddV2", "Sub", "Mul", "Rsqrt", "Relu", "Relu6", "AvgPool", "Mean", "Squeeze",
        "Reshape", "MatMul", "Softmax",
    }
)

# TF DataType enum -> numpy dtype (only the ones a frozen image classifier holds).
_TF_DTYPES = {1: np.float32, 2: np.float64, 3: np.int32, 9: np.int64, 10: np.bool_}


# ----------------------------------------------------------------------------------------------------------
# Parsing
# ----------------------------------------------------------------------------------------------------------
# The GraphDef wire format, read directly (protobuf encoding, field numbers from TensorFlow's graph.proto,
# node_def.proto, attr_value.proto, tensor.proto, tensor_shape.proto). Only what a frozen inference graph
# holds is kept; unknown fields are skipped, as any protobuf reader does. No TensorFlow, no protobuf runtime.
class _Shape:
    """TensorShapeProto: ``dim`` (each with ``.size``; -1 = unknown), ``unknown_rank``."""

    def __init__(self):
        self.dim: list = []
        self.unknown_rank = False


class _Dim:
    def __init__(self, size: int = 0):
        self.size = size


class _Tensor:
    """TensorProto: ``dtype``, ``tensor_shape``, ``tensor_content`` or the typed ``*_val`` lists."""

    def __init__(self):
        self.dtype = 0
        self.tensor_shape = _Shape()
        self.tensor_content = b""
        self.float_val: list = []
        self.double_val: list = []
        self.int_val: list = []
        self.int64_val: list = []
        self.bool_val: list = []


class _List:
    """AttrValue.ListValue: ``s``, ``i``, ``f``, ``b``, ``type``, ``shape``, ``tensor``."""

    def __init__(self):
        self.s: list = []
        self.i: list = []
        self.f: list = []
        self.b: list = []
        self.type: list = []
        self.shape: list = []
        self.tensor: list = []


class _Attr:
    """AttrValue: one of ``s``, ``i``, ``f``, ``b``, ``type``, ``shape``, ``tensor``, ``list`` (defaults otherwise)."""

    def __init__(self):
        self.s = b""
        self.i = 0
        self.f = 0.0
        self.b = False
        self.type = 0
        self.shape = _Shape()
        self.tensor = _Tensor()
        self.list = _List()


class _AttrMap(dict):
    """``attr[key]`` of a missing key gives a default AttrValue (as protobuf maps do) without inserting it."""

    def __missing__(self, key):
        return _Attr()


class _Node:
    def __init__(self):
        self.name = ""
        self.op = ""
        self.input: list = []
        self.device = ""
        self.attr = _AttrMap()


class GraphDefMessage:
    """A parsed ``GraphDef``: ``.node`` is the list of NodeDefs (``name``, ``op``, ``input``, ``attr``)."""

    def __init__(self, nodes: list):
        self.node = nodes


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise EncoderConfigError("GraphDef: truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 70:
            raise EncoderConfigError("GraphDef: malformed varint")


def _signed64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _fields(buf: memoryview):
    """Yield ``(field number, wire type, value)``; value is an int (varint), bytes-like, or raw fixed bytes."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wt = key >> 3, key & 7
        if wt == 0:
            val, pos = _varint(buf, pos)
        elif wt == 1:
            val, pos = buf[pos : pos + 8], pos + 8
        elif wt == 2:
            n, pos = _varint(buf, pos)
            val, pos = buf[pos : pos + n], pos + n
        elif wt == 5:
            val, pos = buf[pos : pos + 4], pos + 4
        else:
            raise EncoderConfigError(f"GraphDef: unsupported wire type {wt} (field {field})")
        if pos > end:
            raise EncoderConfigError("GraphDef: truncated field")
        yield field, wt, val


def _repeated(wt: int, val, kind: str) -> list:
    """A repeated scalar, packed (one length-delimited run) or not (one element)."""
    if kind == "f32":
        return list(np.frombuffer(bytes(val), "<f4").astype(float)) if wt in (2, 5) else []
    if kind == "f64":
        return list(np.frombuffer(bytes(val), "<f8").astype(float)) if wt in (1, 2) else []
    if wt == 0:
        return [_signed64(val)]
    out, pos, run = [], 0, memoryview(val)
    while pos < len(run):
        v, pos = _varint(run, pos)
        out.append(_signed64(v))
    return out


def _parse_shape(buf) -> _Shape:
    sh = _Shape()
    for f, _wt, v in _fields(memoryview(buf)):
        if f == 2:
            size = 0
            for f2, _w2, v2 in _fields(memoryview(v)):
                if f2 == 1:
                    size = _signed64(v2)
            sh.dim.append(_Dim(size))
        elif f == 3:
            sh.unknown_rank = bool(v)
    return sh


def _parse_tensor(buf) -> _Tensor:
    t = _Tensor()
    for f, wt, v in _fields(memoryview(buf)):
        if f == 1:
            t.dtype = v
        elif f == 2:
            t.tensor_shape = _parse_shape(v)
        elif f == 4:
            t.tensor_content = bytes(v)
        elif f == 5:
            t.float_val += _repeated(wt, v, "f32")
        elif f == 6:
            t.double_val += _repeated(wt, v, "f64")
        elif f == 7:
            t.int_val += _repeated(wt, v, "int")
        elif f == 10:
            t.int64_val += _repeated(wt, v, "int")
        elif f == 11:
            t.bool_val += [bool(x) for x in _repeated(wt, v, "int")]
    return t


def _parse_list(buf) -> _List:
    lv = _List()
    for f, wt, v in _fields(memoryview(buf)):
        if f == 2:
            lv.s.append(bytes(v))
        elif f == 3:
            lv.i += _repeated(wt, v, "int")
        elif f == 4:
            lv.f += _repeated(wt, v, "f32")
        elif f == 5:
            lv.b += [bool(x) for x in _repeated(wt, v, "int")]
        elif f == 6:
            lv.type += _repeated(wt, v, "int")
        elif f == 7:
            lv.shape.append(_parse_shape(v))
        elif f == 8:
            lv.tensor.append(_parse_tensor(v))
    return lv


def _parse_attr(buf) -> _Attr:
    a = _Attr()
    for f, _wt, v in _fields(memoryview(buf)):
        if f == 1:
            a.list = _parse_list(v)
        elif f == 2:
            a.s = bytes(v)
        elif f == 3:
            a.i = _signed64(v)
        elif f == 4:
            a.f = float(np.frombuffer(bytes(v), "<f4")[0])
        elif f == 5:
            a.b = bool(v)
        elif f == 6:
            a.type = v
        elif f == 7:
            a.shape = _parse_shape(v)
        elif f == 8:
            a.tensor = _parse_tensor(v)
    return a


def _parse_node(buf) -> _Node:
    n = _Node()
    for f, _wt, v in _fields(memoryview(buf)):
        if f == 1:
            n.name = bytes(v).decode("utf-8")
        elif f == 2:
            n.op = bytes(v).decode("utf-8")
        elif f == 3:
            n.input.append(bytes(v).decode("utf-8"))
        elif f == 4:
            n.device = bytes(v).decode("utf-8")
        elif f == 5:  # map<string, AttrValue> entry: key = 1, value = 2
            key, val = "", _Attr()
            for f2, _w2, v2 in _fields(memoryview(v)):
                if f2 == 1:
                    key = bytes(v2).decode("utf-8")
                elif f2 == 2:
                    val = _parse_attr(v2)
            n.attr[key] = val
    return n


def parse_graphdef(data: bytes, source: str = "GraphDef") -> GraphDefMessage:
    """Parse serialized ``GraphDef`` bytes (the node list; versions/library are skipped).

    Raises
    ------
    EncoderConfigError
        Malformed protobuf, or no nodes (message names ``source``).
    """
    try:
        nodes = [_parse_node(v) for f, wt, v in _fields(memoryview(data)) if f == 1 and wt == 2]
    except EncoderConfigError as exc:
        raise EncoderConfigError(f"{source}: not a TensorFlow GraphDef ({exc})") from None
    except (UnicodeDecodeError, ValueError, IndexError) as exc:
        raise EncoderConfigError(f"{source}: not a TensorFlow GraphDef ({type(exc).__name__}: {exc})") from None
    if not nodes or any(not n.name or not n.op for n in nodes):
        raise EncoderConfigError(f"{source}: not a TensorFlow GraphDef (no nodes, or nodes without name/op)")
    return GraphDefMessage(nodes)


def load_graphdef(path: str | os.PathLike) -> GraphDefMessage:
    """Read a frozen ``GraphDef`` (``.pb``) with the built-in wire-format reader (:func:`parse_graphdef`).

    Raises
    ------
    EncoderConfigError
        If the file is not a GraphDef.
    """
    with open(path, "rb") as fh:
        data = fh.read()
    return parse_graphdef(data, source=os.fspath(path))


def tensor_to_numpy(tensor: Any) -> np.ndarray:
    """A TF ``TensorProto`` as a NumPy array (``tensor_content`` bytes or the typed ``*_val`` fields)."""
    if tensor.dtype not in _TF_DTYPES:
        raise EncoderConfigError(f"TensorProto dtype enum {tensor.dtype} is not supported")
    dtype = np.dtype(_TF_DTYPES[tensor.dtype])
    shape = tuple(int(d.size) for d in tensor.tensor_shape.dim)
    if tensor.tensor_content:
        arr = np.frombuffer(tensor.tensor_content, dtype=dtype.newbyteorder("<")).astype(dtype)
        return arr.reshape(shape)
    vals = {np.float32: tensor.float_val, np.float64: tensor.double_val, np.int32: tensor.int_val,
            np.int64: tensor.int64_val, np.bool_: tensor.bool_val}[dtype.type]
    arr = np.asarray(list(vals), dtype=dtype)
    size = int(np.prod(shape)) if shape else 1
    if arr.size == size:
        return arr.reshape(shape)
    if arr.size == 1:  # TF stores a splat constant as one value
        return np.full(shape, arr[0], dtype=dtype)
    raise EncoderConfigError(f"TensorProto holds {arr.size} values for shape {shape}")


def _clean(name: str) -> str:
    # "^ctrl" control inputs and ":0" output indices
    name = name.lstrip("^")
    return name.split(":")[0]


def node_map(graph: Any) -> dict[str, Any]:
    """``{node name: NodeDef}``."""
    return {n.name: n for n in graph.node}


def _ancestors(nodes: Mapping[str, Any], outputs: Iterable[str], stop: Iterable[str] = ()) -> list[str]:
    """Names needed to compute ``outputs``, in topological order (inputs first); ``stop`` nodes are leaves."""
    stop = set(stop)
    order: list[str] = []
    state: dict[str, int] = {}
    for out in outputs:
        stack = [(out, False)]
        while stack:
            name, done = stack.pop()
            if done:
                if state.get(name) != 2:
                    state[name] = 2
                    order.append(name)
                continue
            if state.get(name):
                continue
            if name not in nodes:
                raise EncoderConfigError(f"GraphDef has no node named {name!r}")
            state[name] = 1
            stack.append((name, True))
            if name in stop:
                continue
            for inp in nodes[name].input:
                if inp.startswith("^"):
                    continue
                stack.append((_clean(inp), False))
    return order


def _attr_ints(node: Any, key: str) -> list[int]:
    return list(node.attr[key].list.i)


def _attr_str(node: Any, key: str, default: str = "") -> str:
    return node.attr[key].s.decode() if key in node.attr else default


def _check_nhwc(node: Any) -> None:
    fmt = _attr_str(node, "data_format", "NHWC")
    if fmt != "NHWC":
        raise EncoderConfigError(f"node {node.name!r} ({node.op}): data_format {fmt!r}, expected 'NHWC'")


def constant_values(graph: Any, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Evaluate every node whose value does not depend on a placeholder (float64 arithmetic).

    Returns ``{node name: array}`` for ``Const`` nodes and for Identity/Add/Sub/Mul/Rsqrt nodes over them
    (the frozen batch-norm arithmetic), restricted to ``names`` when given.
    """
    nodes = node_map(graph)
    order = names if names is not None else _ancestors(nodes, [n.name for n in graph.node])
    consts: dict[str, np.ndarray] = {}
    for name in order:
        n = nodes[name]
        ins = [_clean(i) for i in n.input if not i.startswith("^")]
        if n.op == "Const":
            consts[name] = tensor_to_numpy(n.attr["value"].tensor)
            continue
        if not ins or not all(i in consts for i in ins):
            continue
        v = [consts[i] for i in ins]
        if n.op == "Identity":
            consts[name] = v[0]
        elif n.op in ("Add", "AddV2", "BiasAdd"):
            consts[name] = (v[0].astype(np.float64) + v[1]).astype(v[0].dtype)
        elif n.op == "Sub":
            consts[name] = (v[0].astype(np.float64) - v[1]).astype(v[0].dtype)
        elif n.op == "Mul":
            consts[name] = (v[0].astype(np.float64) * v[1]).astype(v[0].dtype)
        elif n.op == "Rsqrt":
            consts[name] = (1.0 / np.sqrt(v[0].astype(np.float64))).astype(v[0].dtype)
    return consts


# ----------------------------------------------------------------------------------------------------------
# Conversion
# ----------------------------------------------------------------------------------------------------------
@dataclass
class _Val:
    """A converted tensor: an ONNX value name, or a pending conv whose weights later ops may still fold."""

    name: str | None  # ONNX value name once materialised
    rank: int  # rank in TF terms
    nchw: bool  # 4-D tensor held as NCHW inside the ONNX graph
    conv: dict | None = None  # pending conv: {x, W [Co,Ci/g,kh,kw], b [Co], attrs}


@dataclass
class _Builder:
    prefix: str
    nodes: list = field(default_factory=list)
    inits: list = field(default_factory=list)
    counter: int = 0

    def fresh(self, hint: str) -> str:
        self.counter += 1
        return f"{self.prefix}{hint}_{self.counter}"

    def const(self, hint: str, arr: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self.fresh(hint)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def node(self, op: str, inputs: Sequence[str], hint: str, **attrs: Any) -> str:
        from onnx import helper

        out = self.fresh(hint)
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=out, **attrs))
        return out


def _per_channel(c: np.ndarray, channels: int) -> np.ndarray | None:
    """A constant broadcast along the last (channel) axis only, as a 1-D [C] vector, else None."""
    c = np.asarray(c)
    if c.size == 1:
        return np.full(channels, float(c.reshape(())), dtype=np.float64)
    squeezed = c.reshape(-1) if all(d == 1 for d in c.shape[:-1]) else None
    if squeezed is not None and squeezed.shape[0] == channels:
        return squeezed.astype(np.float64)
    return None


def graphdef_to_onnx(
    graph: Any,
    *,
    input_name: str,
    outputs: Mapping[str, str],
    flatten_outputs: Iterable[str] = (),
    onnx_input_name: str = "pixels",
    image_size: int | None = None,
    channels: int = 3,
    opset: int = 17,
    prefix: str = "g/",
    graph_name: str = "converted_graphdef",
) -> Any:
    """Convert the sub-graph of ``graph`` between ``input_name`` and ``outputs`` to an ONNX model.

    Parameters
    ----------
    graph : GraphDef
        From :func:`load_graphdef`.
    input_name : str
        The NHWC float placeholder; becomes the ONNX input ``onnx_input_name`` of shape
        ``[N, H, W, C]`` (``N`` dynamic; ``H = W = image_size`` or the placeholder's static size).
    outputs : {tf node name: onnx output name}
        4-D outputs are returned NHWC (transposed back); names in ``flatten_outputs`` are reshaped to
        ``[N, -1]`` (e.g. a 1x1 average-pooled feature map to ``[N, 1024]``).
    opset : int
        ONNX opset (``Clip`` takes min/max as inputs from 11 on).

    Returns
    -------
    onnx.ModelProto
        Checked with ``onnx.checker``.

    Raises
    ------
    EncoderConfigError
        On an op outside :data:`SUPPORTED_OPS` or a layout the converter cannot keep (message names the node).
    """
    import onnx
    from onnx import TensorProto, helper

    nodes = node_map(graph)
    if input_name not in nodes:
        raise EncoderConfigError(f"GraphDef has no input node {input_name!r}")
    order = _ancestors(nodes, list(outputs), stop=[input_name])
    consts = constant_values(graph, order)
    flatten_outputs = set(flatten_outputs)

    consumers: dict[str, int] = {}
    for name in order:
        for inp in nodes[name].input:
            if not inp.startswith("^"):
                consumers[_clean(inp)] = consumers.get(_clean(inp), 0) + 1
    for out in outputs:  # a graph output is one more consumer (keeps a pending conv from folding further)
        consumers[out] = consumers.get(out, 0) + 1

    b = _Builder(prefix)
    vals: dict[str, _Val] = {}

    def materialise(v: _Val) -> str:
        if v.name is None:
            cv = v.conv
            w = b.const("W", cv["W"].astype(np.float32))
            bias = b.const("B", cv["b"].astype(np.float32))
            v.name = b.node("Conv", [cv["x"], w, bias], "conv", **cv["attrs"])
            v.conv = None
        return v.name

    def const_for(v: _Val, c: np.ndarray) -> str:
        # A constant operand broadcast against an NCHW tensor: [C] -> [C,1,1]; NHWC-shaped -> transposed.
        c = np.asarray(c, dtype=np.float32)
        if v.nchw:
            if c.ndim == 1:
                c = c.reshape(-1, 1, 1)
            elif c.ndim == 4:
                c = c.transpose(0, 3, 1, 2)
            elif c.ndim not in (0,):
                raise EncoderConfigError(f"cannot broadcast a constant of shape {c.shape} against an NCHW tensor")
        return b.const("k", c)

    for name in order:
        n = nodes[name]
        op = n.op
        ins = [_clean(i) for i in n.input if not i.startswith("^")]
        if name in consts and name != input_name:
            continue
        if op not in SUPPORTED_OPS:
            raise EncoderConfigError(
                f"node {name!r}: op {op!r} is not supported by graphdef_to_onnx (supported: {sorted(SUPPORTED_OPS)})"
            )
        if name == input_name:
            if op not in ("Placeholder", "PlaceholderWithDefault"):
                raise EncoderConfigError(f"input node {name!r} is a {op}, expected a Placeholder")
            dims = [int(d.size) for d in n.attr["shape"].shape.dim] if "shape" in n.attr else []
            if len(dims) != 4:
                raise EncoderConfigError(f"input {name!r}: expected an NHWC placeholder of rank 4, found dims {dims}")
            size_h = image_size or (dims[1] if dims[1] > 0 else None)
            size_w = image_size or (dims[2] if dims[2] > 0 else None)
            if dims[3] > 0 and dims[3] != channels:
                raise EncoderConfigError(f"input {name!r}: {dims[3]} channels, expected {channels}")
            graph_input = helper.make_tensor_value_info(
                onnx_input_name, TensorProto.FLOAT, ["N", size_h or "H", size_w or "W", channels]
            )
            x = b.node("Transpose", [onnx_input_name], "to_nchw", perm=[0, 3, 1, 2])
            vals[name] = _Val(x, 4, True)
            continue

        def val(i: int) -> _Val:
            src = ins[i]
            if src not in vals:
                raise EncoderConfigError(f"node {name!r}: input {src!r} was not converted")
            return vals[src]

        if op in ("Identity", "PlaceholderWithDefault"):
            vals[name] = val(0)
        elif op in ("Conv2D", "DepthwiseConv2dNative"):
            _check_nhwc(n)
            if ins[1] not in consts:
                raise EncoderConfigError(f"node {name!r}: {op} with non-constant weights is not supported")
            strides = _attr_ints(n, "strides")
            dil = _attr_ints(n, "dilations") or [1, 1, 1, 1]
            pad = _attr_str(n, "padding")
            if pad not in ("SAME", "VALID"):
                raise EncoderConfigError(f"node {name!r}: padding {pad!r} not supported")
            w = consts[ins[1]].astype(np.float64)  # TF: [kh, kw, Ci, Co] or depthwise [kh, kw, Ci, mult]
            kh, kw, ci, co = w.shape
            if op == "Conv2D":
                w_onnx = w.transpose(3, 2, 0, 1)  # [Co, Ci, kh, kw]
                group = 1
            else:
                # TF output channel c*mult + m  ==  ONNX group c, member m
                w_onnx = w.transpose(2, 3, 0, 1).reshape(ci * co, 1, kh, kw)
                group = ci
            attrs = dict(
                kernel_shape=[kh, kw], strides=[strides[1], strides[2]], dilations=[dil[1], dil[2]], group=group,
                auto_pad="SAME_UPPER" if pad == "SAME" else "VALID",
            )
            x = materialise(val(0))
            vals[name] = _Val(None, 4, True, conv=dict(x=x, W=w_onnx, b=np.zeros(w_onnx.shape[0]), attrs=attrs))
        elif op in ("Mul", "Add", "AddV2", "Sub", "BiasAdd"):
            if op == "BiasAdd":
                _check_nhwc(n)
            c_idx = [i for i, s in enumerate(ins) if s in consts]
            if len(c_idx) == 1:
                v = val(1 - c_idx[0])
                c = consts[ins[c_idx[0]]]
                # Fold into a pending conv this node alone consumes.
                vec = None
                if v.conv is not None and consumers.get(ins[1 - c_idx[0]], 0) == 1 and not (op == "Sub" and c_idx[0] == 0):
                    vec = _per_channel(c, v.conv["W"].shape[0])
                if vec is not None:
                    cv = dict(v.conv)
                    if op == "Mul":
                        cv["W"] = cv["W"] * vec[:, None, None, None]
                        cv["b"] = cv["b"] * vec
                    elif op == "Sub":
                        cv["b"] = cv["b"] - vec
                    else:
                        cv["b"] = cv["b"] + vec
                    vals[name] = _Val(None, 4, True, conv=cv)
                    continue
                xv = materialise(v)
                k = const_for(v, c)
                onnx_op = {"Mul": "Mul", "Sub": "Sub"}.get(op, "Add")
                pair = [xv, k] if c_idx[0] == 1 else [k, xv]
                vals[name] = _Val(b.node(onnx_op, pair, onnx_op.lower()), v.rank, v.nchw)
            elif len(c_idx) == 0:
                a, bb = val(0), val(1)
                if a.nchw != bb.nchw:
                    raise EncoderConfigError(f"node {name!r}: mixing NCHW and plain tensors is not supported")
                onnx_op = {"Mul": "Mul", "Sub": "Sub"}.get(op, "Add")
                vals[name] = _Val(b.node(onnx_op, [materialise(a), materialise(bb)], onnx_op.lower()), a.rank, a.nchw)
            else:  # pragma: no cover - constant_values already folded it
                raise EncoderConfigError(f"node {name!r}: unexpected all-constant {op}")
        elif op in ("Relu6", "Relu"):
            v = val(0)
            x = materialise(v)
            if op == "Relu":
                out = b.node("Relu", [x], "relu")
            else:
                lo = b.const("zero", np.array(0.0, np.float32))
                hi = b.const("six", np.array(6.0, np.float32))
                out = b.node("Clip", [x, lo, hi], "relu6")
            vals[name] = _Val(out, v.rank, v.nchw)
        elif op == "Rsqrt":
            v = val(0)
            vals[name] = _Val(b.node("Reciprocal", [b.node("Sqrt", [materialise(v)], "sqrt")], "rsqrt"), v.rank, v.nchw)
        elif op == "AvgPool":
            _check_nhwc(n)
            v = val(0)
            k = _attr_ints(n, "ksize")
            s = _attr_ints(n, "strides")
            pad = _attr_str(n, "padding")
            # TF AvgPool with SAME padding averages over the valid pixels only: count_include_pad=0 (default).
            out = b.node("AveragePool", [materialise(v)], "avgpool", kernel_shape=[k[1], k[2]],
                         strides=[s[1], s[2]], auto_pad="SAME_UPPER" if pad == "SAME" else "VALID")
            vals[name] = _Val(out, 4, True)
        elif op == "Mean":
            v = val(0)
            axes = sorted(int(a) % 4 for a in np.asarray(consts[ins[1]]).reshape(-1))
            keep = bool(n.attr["keep_dims"].b) if "keep_dims" in n.attr else False
            if not v.nchw or axes != [1, 2]:
                raise EncoderConfigError(f"node {name!r}: Mean over axes {axes} (only spatial [1, 2] is supported)")
            out = b.node("GlobalAveragePool", [materialise(v)], "gap")
            if keep:
                vals[name] = _Val(out, 4, True)
            else:
                vals[name] = _Val(b.node("Flatten", [out], "flatten", axis=1), 2, False)
        elif op == "Squeeze":
            v = val(0)
            dims = _attr_ints(n, "squeeze_dims")
            if v.nchw:
                if sorted(d % 4 for d in dims) != [1, 2]:
                    raise EncoderConfigError(f"node {name!r}: Squeeze dims {dims} of an NHWC tensor (only [1, 2])")
                out = b.node("Flatten", [materialise(v)], "squeeze", axis=1)  # [N,C,1,1] -> [N,C]
                vals[name] = _Val(out, 2, False)
            else:
                ax = b.const("axes", np.asarray(dims, np.int64))
                vals[name] = _Val(b.node("Squeeze", [materialise(v), ax], "squeeze"), v.rank - len(dims), False)
        elif op == "Reshape":
            v = val(0)
            if v.nchw:
                raise EncoderConfigError(f"node {name!r}: Reshape of a 4-D feature map is not supported")
            shape = np.asarray(consts[ins[1]], np.int64).reshape(-1)
            if shape.size and shape[0] > 0:  # a frozen batch size of 1 -> dynamic batch
                shape = shape.copy()
                shape[0] = -1
            out = b.node("Reshape", [materialise(v), b.const("shape", shape)], "reshape")
            vals[name] = _Val(out, int(shape.size), False)
        elif op == "MatMul":
            if n.attr["transpose_a"].b:
                raise EncoderConfigError(f"node {name!r}: MatMul transpose_a is not supported")
            v = val(0)
            if ins[1] in consts:
                w = consts[ins[1]]
                if n.attr["transpose_b"].b:
                    w = w.T
                rhs = b.const("W", w.astype(np.float32))
            else:
                rhs = materialise(val(1))
                if n.attr["transpose_b"].b:
                    rhs = b.node("Transpose", [rhs], "t", perm=[1, 0])
            vals[name] = _Val(b.node("MatMul", [materialise(v), rhs], "matmul"), 2, False)
        elif op == "Softmax":
            v = val(0)
            if v.nchw:
                raise EncoderConfigError(f"node {name!r}: Softmax over a 4-D feature map is not supported")
            vals[name] = _Val(b.node("Softmax", [materialise(v)], "softmax", axis=-1), v.rank, False)
        else:  # pragma: no cover - SUPPORTED_OPS and this chain agree
            raise EncoderConfigError(f"node {name!r}: op {op!r} has no conversion rule")

    graph_outputs = []
    for tf_name, onnx_name in outputs.items():
        if tf_name in consts:
            raise EncoderConfigError(f"output {tf_name!r} is a constant")
        v = vals[tf_name]
        x = materialise(v)
        if v.nchw:
            x = b.node("Transpose", [x], "to_nhwc", perm=[0, 2, 3, 1])
        if onnx_name in flatten_outputs:
            x = b.node("Flatten", [x], "flatten", axis=1)
            shape = ["N", None]
        else:
            shape = ["N"] + [None] * ((4 if v.nchw else v.rank) - 1)
        b.nodes.append(helper.make_node("Identity", [x], [onnx_name], name=onnx_name))
        graph_outputs.append(helper.make_tensor_value_info(onnx_name, TensorProto.FLOAT, shape))

    g = helper.make_graph(b.nodes, graph_name, [graph_input], graph_outputs, initializer=b.inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], producer_name="reco_ref.graphdef_to_onnx")
    model.ir_version = min(model.ir_version, 9)  # readable by older onnxruntime releases too
    onnx.checker.check_model(model)
    return model
