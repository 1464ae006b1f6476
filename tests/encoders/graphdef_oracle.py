"""Test oracle for the GraphDef → ONNX converter: the *unconverted* GraphDef re-executed op by op in NumPy.

float64, NHWC, TensorFlow's SAME padding, batch-norm arithmetic as written (no folding, no layout change):
an independent path to the numbers the converted ONNX graph must give. Its convolutions are in turn checked
against PyTorch in ``test_graphdef_to_onnx.py``. Only the GraphDef *reading* helpers (``node_map``,
``tensor_to_numpy``, attribute access) are shared with the converter; nothing that converts.

The converter is a build-only tool in ``scripts/tools/graphdef_to_onnx.py``; this module puts that folder on
``sys.path`` and imports it as ``graphdef_to_onnx`` (the same module object the rebuild scripts use).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

TOOLS = Path(__file__).resolve().parents[2] / "scripts" / "tools"
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))

from graphdef_to_onnx import _ancestors, _attr_ints, _attr_str, _check_nhwc, _clean, node_map, tensor_to_numpy  # noqa: E402
from reco_ref.errors import EncoderConfigError  # noqa: E402

__all__ = ["graphdef_forward_numpy"]


def _tf_same_pads(size: int, k: int, s: int, d: int) -> tuple[int, int]:
    # TF SAME: output = ceil(size / s); the odd pixel of padding goes at the end.
    eff = (k - 1) * d + 1
    out = -(-size // s)
    total = max((out - 1) * s + eff - size, 0)
    return total // 2, total - total // 2


def _pad_nhwc(x: np.ndarray, k: Sequence[int], s: Sequence[int], d: Sequence[int], padding: str) -> np.ndarray:
    if padding == "VALID":
        return x
    ph = _tf_same_pads(x.shape[1], k[0], s[0], d[0])
    pw = _tf_same_pads(x.shape[2], k[1], s[1], d[1])
    return np.pad(x, ((0, 0), ph, pw, (0, 0)))


def _windows(x: np.ndarray, kh: int, kw: int, sh: int, sw: int, dh: int, dw: int) -> np.ndarray:
    """Strided view ``[N, Ho, Wo, kh, kw, C]`` of the (already padded) NHWC input."""
    n, h, w, c = x.shape
    ho = (h - (kh - 1) * dh - 1) // sh + 1
    wo = (w - (kw - 1) * dw - 1) // sw + 1
    st = x.strides
    return np.lib.stride_tricks.as_strided(
        x, shape=(n, ho, wo, kh, kw, c), strides=(st[0], st[1] * sh, st[2] * sw, st[1] * dh, st[2] * dw, st[3]),
        writeable=False,
    )


def graphdef_forward_numpy(graph: Any, feeds: Mapping[str, np.ndarray], fetches: Sequence[str]) -> list[np.ndarray]:
    """Run the GraphDef op by op in NumPy (float64, NHWC, TF semantics) — no folding, no layout change.

    Parameters
    ----------
    feeds : {placeholder name: array}
        E.g. ``{"input": x}`` with ``x`` float32 ``[N, 224, 224, 3]``.
    fetches : node names to return.
    """
    nodes = node_map(graph)
    order = _ancestors(nodes, list(fetches), stop=list(feeds))
    env: dict[str, np.ndarray] = {k: np.asarray(v, dtype=np.float64) for k, v in feeds.items()}
    for name in order:
        if name in env:
            continue
        n = nodes[name]
        op = n.op
        x = [env[_clean(i)] for i in n.input if not i.startswith("^")]
        if op == "Const":
            t = tensor_to_numpy(n.attr["value"].tensor)
            env[name] = t.astype(np.float64) if t.dtype.kind == "f" else t
        elif op in ("Identity", "PlaceholderWithDefault"):
            env[name] = x[0]
        elif op in ("Add", "AddV2", "BiasAdd"):
            env[name] = x[0] + x[1]
        elif op == "Sub":
            env[name] = x[0] - x[1]
        elif op == "Mul":
            env[name] = x[0] * x[1]
        elif op == "Rsqrt":
            env[name] = 1.0 / np.sqrt(x[0])
        elif op == "Relu6":
            env[name] = np.minimum(np.maximum(x[0], 0.0), 6.0)
        elif op == "Relu":
            env[name] = np.maximum(x[0], 0.0)
        elif op in ("Conv2D", "DepthwiseConv2dNative"):
            _check_nhwc(n)
            s = _attr_ints(n, "strides")
            d = _attr_ints(n, "dilations") or [1, 1, 1, 1]
            w = x[1]
            kh, kw, ci, co = w.shape
            xp = _pad_nhwc(x[0], (kh, kw), (s[1], s[2]), (d[1], d[2]), _attr_str(n, "padding"))
            win = _windows(np.ascontiguousarray(xp), kh, kw, s[1], s[2], d[1], d[2])  # [N,Ho,Wo,kh,kw,Ci]
            if op == "Conv2D":
                env[name] = np.tensordot(win, w, axes=([3, 4, 5], [0, 1, 2]))  # [N,Ho,Wo,Co]
            else:
                # out[..., c*mult + m] = sum_{i,j} win[..., i, j, c] * w[i, j, c, m]
                out = np.einsum("nhwijc,ijcm->nhwcm", win, w)
                env[name] = out.reshape(out.shape[0], out.shape[1], out.shape[2], ci * co)
        elif op == "AvgPool":
            _check_nhwc(n)
            k = _attr_ints(n, "ksize")
            s = _attr_ints(n, "strides")
            pad = _attr_str(n, "padding")
            ones = np.ones(x[0].shape[:3] + (1,))
            xp = _pad_nhwc(x[0], (k[1], k[2]), (s[1], s[2]), (1, 1), pad)
            cp = _pad_nhwc(ones, (k[1], k[2]), (s[1], s[2]), (1, 1), pad)
            tot = _windows(np.ascontiguousarray(xp), k[1], k[2], s[1], s[2], 1, 1).sum(axis=(3, 4))
            cnt = _windows(np.ascontiguousarray(cp), k[1], k[2], s[1], s[2], 1, 1).sum(axis=(3, 4))
            env[name] = tot / cnt
        elif op == "Mean":
            axes = tuple(int(a) for a in np.asarray(x[1]).reshape(-1))
            keep = bool(n.attr["keep_dims"].b) if "keep_dims" in n.attr else False
            env[name] = x[0].mean(axis=axes, keepdims=keep)
        elif op == "Squeeze":
            dims = _attr_ints(n, "squeeze_dims")  # empty: every size-1 axis, as TF
            env[name] = np.squeeze(x[0], axis=tuple(dims) if dims else None)
        elif op == "Reshape":
            shape = [int(v) for v in np.asarray(x[1]).reshape(-1)]
            if shape and shape[0] > 0 and x[0].shape[0] != shape[0]:
                shape[0] = -1
            env[name] = x[0].reshape(shape)
        elif op == "MatMul":
            a, bm = x
            if n.attr["transpose_a"].b:
                a = a.T
            if n.attr["transpose_b"].b:
                bm = bm.T
            env[name] = a @ bm
        elif op == "Softmax":
            z = x[0] - x[0].max(axis=-1, keepdims=True)
            e = np.exp(z)
            env[name] = e / e.sum(axis=-1, keepdims=True)
        else:
            raise EncoderConfigError(f"node {name!r}: op {op!r} has no NumPy rule")
    return [env[f] for f in fetches]
