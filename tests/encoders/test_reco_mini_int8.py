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


def _quantize_script():
    import importlib.util
    import sys

    root = weights_dir().parent
    sys.path.insert(0, str(root / "scripts"))
    spec = importlib.util.spec_from_file_location("quantize_reco_mini", root / "scripts" / "quantize_reco_mini.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_proxy_scores_see_a_changed_neighbour():
    q = _quantize_script()
    rng = np.random.default_rng(1)
    unit = lambda a: (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    emb, keys = unit(rng.standard_normal((40, 8))), unit(rng.standard_normal((40, 16)))
    same = q.proxy_scores((emb, keys), (emb, keys))
    assert same["nn1_agree"] == 1.0 and abs(same["key_cos_mean"] - 1) < 1e-6 and abs(same["embed_cos_mean"] - 1) < 1e-6
    moved = keys.copy()
    nn = int(np.argmax(np.where(np.eye(40, dtype=bool)[0], -np.inf, keys[0] @ keys.T)))
    moved[0] = unit(keys[0:1] - 2 * keys[nn : nn + 1])[0]  # row 0 leaves its old neighbour: its 1-NN changes
    r = q.proxy_scores((emb, keys), (emb, moved))
    assert r["nn1_agree"] < 1.0 and r["key_cos_mean"] < 1.0 and r["key_cos_p01"] < 0.99


def test_choose_takes_the_best_proxy_among_fast_enough():
    q = _quantize_script()
    rows = {"a": {"nn1_agree": 0.9, "raw_speedup": 1.2}, "b": {"nn1_agree": 0.8, "raw_speedup": 2.0},
            "c": {"nn1_agree": 0.7, "raw_speedup": 2.5}}  # fmt: skip
    assert q.choose(rows) == "b"
    with pytest.raises(SystemExit, match="no candidate"):
        q.choose({"a": rows["a"]})


def test_shipped_graph_is_the_chosen_configuration():
    onnx = pytest.importorskip("onnx")
    q = _quantize_script()
    folder = weights_dir() / "reco-mini-int8"
    m = json.loads((folder / "metrics.json").read_text())
    config = m["build"]["quantization"]["config"]
    assert config == q.DEFAULT == m["selection"]["chosen"] == q.choose(m["selection"]["candidates"])
    assert set(m["selection"]["candidates"]) == set(q.CANDIDATES)
    kept = set(q.CANDIDATES[config]["exclude"])
    assert kept == set(m["build"]["quantization"]["float32_nodes"])
    convs = {n.name: n for n in onnx.load(str(folder / "image.onnx")).graph.node if n.op_type == "Conv"}
    assert len(convs) == 28
    for name, node in convs.items():  # a quantised conv reads dequantised weights, a float32 one its initializer
        assert node.input[1].endswith("_DequantizeLinear_Output") == (name not in kept), name


def test_scan_scores_candidates_and_keeps_their_float_layers(tmp_path, monkeypatch):
    """--scan end to end on random pixels (the OpenClipart proxy and calibration sets swapped for 12 / 8 images)."""
    onnx = pytest.importorskip("onnx")
    q = _quantize_script()
    rng = np.random.default_rng(2)
    proxy = rng.uniform(-1, 1, (12, 224, 224, 3)).astype(np.float32)
    calib = rng.uniform(-1, 1, (8, 224, 224, 3)).astype(np.float32)
    monkeypatch.setattr(q, "proxy_pixels", lambda enc, seed: (proxy, 6, {"images": 12, "heldout": 6, "skipped": 0}))
    monkeypatch.setattr(q, "calibration_files", lambda n, seed: ([], {}))
    monkeypatch.setattr(q, "calibration_pixels", lambda enc, files: (calib, 0))
    names = ["all-minmax-256", "fp32-first2-minmax-256"]
    sel = q.scan(weights_dir() / "reco-mini", tmp_path, names=names)
    assert list(sel["candidates"]) == names
    assert len(list(tmp_path.glob("ranges-*.json"))) == 1  # both candidates share one MinMax calibration
    for name, row in sel["candidates"].items():
        assert 0 <= row["nn1_agree"] <= 1 and -1 <= row["key_cos_p01"] <= row["key_cos_mean"] <= 1
        assert row["raw_speedup"] > 0
        kept = set(q.CANDIDATES[name]["exclude"])
        convs = [n for n in onnx.load(str(tmp_path / f"{name}.onnx")).graph.node if n.op_type == "Conv"]
        floats = {n.name for n in convs if not n.input[1].endswith("_DequantizeLinear_Output")}
        assert floats == kept & {n.name for n in convs}
    with pytest.raises(SystemExit, match="no Conv/Clip node named g/nope"):
        q.quantize_image_graph(weights_dir() / "reco-mini" / "image.onnx", tmp_path / "x.onnx", calib, "pixels",
                               exclude=("g/nope",))
