"""The shipped int8 image tower (weights/reco-mini-int8, scripts/quantize_reco_mini.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from reco_ref.eval.data import shipped_data
from reco_ref.encoders import load
from reco_ref.errors import MemoryFormatError
from reco_ref.memory import Memory, build_memory_from_arrays
from reco_ref.paths import weights_dir


@pytest.fixture(scope="module")
def pair():
    return load("reco-mini", threads=2), load("reco-mini-int8", threads=2)


def test_int8_loads_and_stays_close_to_fp32(pair):
    fp32, int8 = pair
    assert int8.name == "reco-mini-int8" and int8.dim == fp32.dim == 768
    assert int8.fingerprint != fp32.fingerprint
    photos = [q["image"] for q in shipped_data()["queries"][:8]]
    e32, k32 = fp32.encode_images(photos, with_keys=True)
    e8, k8 = int8.encode_images(photos, with_keys=True)
    assert k8.shape == k32.shape == (8, 1024) and np.allclose(np.linalg.norm(e8, axis=1), 1, atol=1e-5)
    cos_e, cos_k = (e8 * e32).sum(1), (k8 * k32).sum(1)
    print(f"int8 vs fp32 on 8 demo queries: embedding cos min {cos_e.min():.3f} mean {cos_e.mean():.3f}, "
          f"key cos min {cos_k.min():.3f} mean {cos_k.mean():.3f}")
    assert cos_k.mean() > 0.8 and cos_e.mean() > 0.5  # quantised, not broken (a broken graph gives ~0)
    assert not np.array_equal(e8, e32)  # it really is another image graph
    texts = ["a drawing of a cat.", "a photo of a pink primrose."]
    np.testing.assert_array_equal(int8.encode_texts(texts), fp32.encode_texts(texts))  # same text tower


def test_int8_graph_is_quantised_and_card_says_how():
    onnx = pytest.importorskip("onnx")
    folder = weights_dir() / "reco-mini-int8"
    ops = {n.op_type for n in onnx.load(str(folder / "image.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    build = json.loads((folder / "metrics.json").read_text())["build"]
    assert build["quantization"]["weights"].startswith("int8, per output channel")
    assert "alignment training" in build["calibration"]["source"] and build["calibration"]["drawn"] > 0
    assert (folder / "text.onnx").read_bytes() == (weights_dir() / "reco-mini" / "text.onnx").read_bytes()
    assert "calibrat" in (folder / "MODEL_CARD.md").read_text().lower()


def test_memory_built_with_fp32_refuses_int8(pair, tmp_path):
    fp32, int8 = pair
    rng = np.random.default_rng(0)
    unit = lambda a: (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    img, txt, keys = unit(rng.standard_normal((6, 768))), unit(rng.standard_normal((6, 768))), unit(rng.standard_normal((6, 1024)))
    build_memory_from_arrays(tmp_path / "m", img, txt, keys=keys, name=fp32.name, fingerprint=fp32.fingerprint, progress=False)
    Memory.open(tmp_path / "m", encoder=fp32)
    with pytest.raises(MemoryFormatError, match="fingerprint"):
        Memory.open(tmp_path / "m", encoder=int8)
