"""``reco-ref export-fusion`` and the edge path: exported graphs attached and run without the onnx package."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from export_testlib import nonidentity_params

from reco_ref.cli import main
from reco_ref.errors import BackendUnavailableError, ParamsFormatError, ShapeError
from reco_ref.fusion import fusion_forward, init_params, load_param_set, onnx_backend, save_param_set


@pytest.fixture
def weights(tmp_path):
    path = tmp_path / "fusion.npz"
    save_param_set(path, {"image": nonidentity_params(32, 4, 0), "text": nonidentity_params(32, 4, 1)},
                   extras={"logit_scale": np.array(np.log(1 / 0.07), np.float32)})
    return path


def test_export_fusion_cli_then_attach_without_onnx(tmp_path, weights, monkeypatch, capsys):
    pytest.importorskip("onnx")
    out = tmp_path / "onnx"
    assert main(["export-fusion", "--fusion", str(weights), "--out", str(out)]) == 0
    assert "phi_image.onnx" in capsys.readouterr().out
    manifest = json.loads((out / "fusion_onnx.json").read_text())
    assert sorted(manifest["modules"]) == ["image", "text"]
    assert abs(manifest["extras"]["logit_scale"] - np.log(1 / 0.07)) < 1e-6
    assert (out / "phi_image.onnx").is_file() and (out / "phi_text.onnx").is_file()

    # the edge machine: no onnx package, only onnxruntime + numpy
    monkeypatch.setitem(sys.modules, "onnx", None)
    modules, _ = load_param_set(weights)
    with pytest.raises(BackendUnavailableError, match="export-fusion"):  # nothing attached, nothing to build with
        fusion_forward(modules["image"], np.ones((1, 32), np.float32), np.ones((1, 2, 32), np.float32), backend="onnx")
    onnx_backend.attach(out, modules)
    rng = np.random.default_rng(3)
    for prefix in ("image", "text"):
        for B, k, p_valid in ((5, 10, 0.6), (1, 0, 0.5), (3, 4, 0.0)):
            q = rng.standard_normal((B, 32)).astype(np.float32)
            r = rng.standard_normal((B, k, 32)).astype(np.float32)
            mask = rng.random((B, k)) < p_valid
            ref, _ = fusion_forward(modules[prefix], q, r, mask)
            got, _ = fusion_forward(modules[prefix], q, r, mask, backend="onnx")
            assert np.abs(got - ref).max() <= 1e-5


def test_attach_refuses_graphs_from_other_weights(tmp_path, weights):
    pytest.importorskip("onnx")
    from reco_ref.export.fusion import export_fusion

    export_fusion(weights, tmp_path / "onnx")
    other = tmp_path / "other.npz"
    save_param_set(other, {"image": nonidentity_params(32, 4, 5), "text": nonidentity_params(32, 4, 6)})
    modules, _ = load_param_set(other)
    with pytest.raises(ParamsFormatError, match="exported from other weights"):
        onnx_backend.attach(tmp_path / "onnx", modules)
    with pytest.raises(ParamsFormatError, match="missing"):
        onnx_backend.attach(tmp_path, modules)


def test_export_needs_onnx_and_float32(tmp_path, weights, monkeypatch, capsys):
    pytest.importorskip("onnx")
    f64 = tmp_path / "f64.npz"
    save_param_set(f64, {"image": init_params(8, 2, dtype=np.float64)})
    assert main(["export-fusion", "--fusion", str(f64), "--out", str(tmp_path / "x")]) == 1
    assert "expected float32" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "onnx", None)
    assert main(["export-fusion", "--fusion", str(weights), "--out", str(tmp_path / "y")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("reco-ref export-fusion: error:") and "export extra" in err


def _rel_params(D: int, heads: int, seed: int, **kw):
    """``init_params(..., relevance=True, init="copy")`` with every array perturbed and distinct β, γ per head."""
    p = init_params(D, heads, relevance=True, init="copy", seed=seed, **kw)
    rng = np.random.default_rng(seed + 1000)
    for a in p.values():
        a += (rng.standard_normal(a.shape) * (0.5 / np.sqrt(a.shape[0]) if a.ndim == 2 else 0.1)).astype(a.dtype)
    p["rel_beta"][...] = rng.uniform(0.3, 2.0, heads)
    p["rel_gamma"][...] = rng.normal(0.0, 2.0, heads)
    return p


def test_export_relevance_module_then_attach_without_onnx(tmp_path, monkeypatch):
    """φ_I with the relevance bias, φ_T without: one more graph input `scores` (the features) for φ_I only."""
    onnx = pytest.importorskip("onnx")
    import onnxruntime as ort

    from reco_ref.export.fusion import export_fusion
    from reco_ref.fusion import reference, score_features

    weights = tmp_path / "fusion.npz"
    save_param_set(weights, {"image": _rel_params(32, 4, 0, rel_center=0.95, rel_width=0.03),
                             "text": nonidentity_params(32, 4, 1)})  # fmt: skip
    out = tmp_path / "onnx"
    manifest = export_fusion(weights, out)
    img, txt = manifest["modules"]["image"], manifest["modules"]["text"]
    assert img["relevance"] == {"center": 0.95, "width": 0.03} and img["inputs"][-1] == "scores"
    assert "feature" in img["scores"]
    assert "relevance" not in txt and "inputs" not in txt and "scores" not in txt  # the paper's layer: as before
    g_img, g_txt = onnx.load(out / "phi_image.onnx"), onnx.load(out / "phi_text.onnx")
    assert [i.name for i in g_img.graph.input] == ["query", "retrieved", "mask", "scores"]
    assert [i.name for i in g_txt.graph.input] == ["query", "retrieved", "mask"]
    meta_img = {p.key: p.value for p in g_img.metadata_props}
    meta_txt = {p.key: p.value for p in g_txt.metadata_props}
    assert meta_img["relevance"] == "1" and meta_img["inputs"] == "query,retrieved,mask,scores"
    assert float(meta_img["rel_center"]) == 0.95 and float(meta_img["rel_width"]) == 0.03
    assert not {"relevance", "rel_center", "rel_width", "inputs", "scores"} & set(meta_txt)

    monkeypatch.setitem(sys.modules, "onnx", None)  # the edge machine
    modules, _ = load_param_set(weights)
    onnx_backend.attach(out, modules)
    phi = modules["image"]
    rng = np.random.default_rng(7)
    for B, k, p_valid in ((5, 10, 0.6), (1, 0, 0.5), (3, 4, 0.0), (4, 6, 1.0)):
        q = rng.standard_normal((B, 32)).astype(np.float32)
        r = rng.standard_normal((B, k, 32)).astype(np.float32)
        mask = rng.random((B, k)) < p_valid
        raw = (0.85 + 0.15 * rng.random((B, k))).astype(np.float32)  # cosines
        r[~mask], raw[~mask] = np.nan, np.nan  # masked slots may hold anything
        ref, _ = fusion_forward(phi, q, r, mask, scores=raw)
        got, _ = fusion_forward(phi, q, r, mask, backend="onnx", scores=raw)
        assert np.abs(got - ref).max() <= 1e-5
        # the raw graph (no reco_ref front door): inputs as documented, `scores` = the features
        sess = ort.InferenceSession(str(out / "phi_image.onnx"), providers=["CPUExecutionProvider"])
        feats = score_features(phi, raw, mask)
        (direct,) = sess.run(["out"], {"query": q, "retrieved": r, "mask": mask, "scores": feats})
        ref_np, _ = reference.fusion_forward(phi, q, np.where(mask[..., None], r, 0).astype(np.float32), mask,
                                             heads=4, scores=feats)
        assert np.abs(direct - ref_np).max() <= 1e-5
    # the relevance bias acts: the same module with beta = gamma = 0 answers otherwise
    q, r = rng.standard_normal((3, 32)).astype(np.float32), rng.standard_normal((3, 5, 32)).astype(np.float32)
    raw = (0.85 + 0.15 * rng.random((3, 5))).astype(np.float32)
    a, _ = fusion_forward(phi, q, r, scores=raw, backend="onnx")
    zero = {n: (np.zeros_like(v) if n.startswith("rel_") else v) for n, v in phi.items()}
    b, _ = reference.fusion_forward(zero, q, r, heads=4, scores=score_features(phi, raw))
    assert np.abs(a - b).max() > 1e-3
    # a relevance module called without scores: refused by name
    with pytest.raises(ShapeError, match="relevance bias"):
        fusion_forward(phi, q, r, backend="onnx")


def test_attach_refuses_relevance_graph_for_other_rel_arrays(tmp_path):
    pytest.importorskip("onnx")
    from reco_ref.export.fusion import export_fusion

    weights = tmp_path / "fusion.npz"
    save_param_set(weights, {"image": _rel_params(16, 2, 3)})
    export_fusion(weights, tmp_path / "onnx")
    modules, _ = load_param_set(weights)
    modules["image"]["rel_beta"][0] += 1.0  # same 18 arrays, other beta
    with pytest.raises(ParamsFormatError, match="exported from other weights"):
        onnx_backend.attach(tmp_path / "onnx", modules)


def test_export_memory_relative_module_says_where_its_map_comes_from(tmp_path):
    """A module whose score map comes from the searched memory: the graph is the same kind of graph, its metadata
    and manifest say that the `scores` features are taken against the searched memory's map, and the ONNX backend
    agrees with the reference given that map."""
    onnx = pytest.importorskip("onnx")

    from reco_ref.export.fusion import export_fusion

    weights = tmp_path / "fusion.npz"
    save_param_set(weights, {"image": _rel_params(32, 4, 0, rel_center=0.9, rel_width=0.05, rel_source="memory")})
    manifest = export_fusion(weights, tmp_path / "onnx")
    img = manifest["modules"]["image"]
    assert img["relevance"]["source"] == "memory" and "searched memory" in img["scores"]
    meta = {p.key: p.value for p in onnx.load(tmp_path / "onnx" / "phi_image.onnx").metadata_props}
    assert meta["rel_source"] == "memory" and "searched memory" in meta["scores"]
    modules, _ = load_param_set(weights)
    onnx_backend.attach(tmp_path / "onnx", modules)
    phi = modules["image"]
    rng = np.random.default_rng(3)
    q, r = rng.standard_normal((4, 32)).astype(np.float32), rng.standard_normal((4, 6, 32)).astype(np.float32)
    raw = (0.7 + 0.3 * rng.random((4, 6))).astype(np.float32)
    with pytest.raises(ShapeError, match="rel_source='memory'"):
        fusion_forward(phi, q, r, scores=raw, backend="onnx")
    ref, _ = fusion_forward(phi, q, r, scores=raw, score_map=(0.8, 0.07))
    got, _ = fusion_forward(phi, q, r, scores=raw, score_map=(0.8, 0.07), backend="onnx")
    assert np.abs(got - ref).max() <= 1e-5
