"""``reco-ref export-fusion`` and the edge path: exported graphs attached and run without the onnx package."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from export_testlib import nonidentity_params

from reco_ref.cli import main
from reco_ref.errors import BackendUnavailableError, ParamsFormatError
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
