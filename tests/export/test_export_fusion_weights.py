"""``export-fusion`` on the weights files the project itself writes (issue 20, class 5).

The shipped ``weights/reco-mini-fusion/fusion.npz`` and every ``best.npz`` / ``last.npz`` of ``reco-ref train`` are
RECO weights (:mod:`reco_ref.reco.weights`): besides the scalar ``tau`` they carry ``meta_utf8``, the JSON
description of the run stored one byte per element. The export refused them ("extra 'meta_utf8' has shape (2828,),
expected a scalar"), after writing half its output; the older tests used weights without that extra. Now the
description goes into the manifest as ``meta``, and anything the export cannot represent is refused before a
single file is written.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from reco_ref.cli import main
from reco_ref.fusion import fusion_forward, load_param_set, onnx_backend, save_param_set
from reco_ref.paths import weights_dir

SHIPPED = weights_dir() / "reco-mini-fusion" / "fusion.npz"
TRAIN = Path(__file__).resolve().parents[1] / "train"

pytest.importorskip("onnx")


def _same_outputs(weights: Path, out: Path, score_map=None) -> None:
    """The exported graphs, attached without re-exporting, agree with the NumPy reference."""
    modules, _ = load_param_set(weights)
    onnx_backend.attach(out, modules)
    rng = np.random.default_rng(0)
    for phi in modules.values():
        D = phi.dim
        q, r = rng.standard_normal((3, D)).astype(np.float32), rng.standard_normal((3, 4, D)).astype(np.float32)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        mask = np.array([[True, True, False, True], [True] * 4, [False] * 4])
        kw = {}
        if phi.config.relevance:
            kw = {"scores": (0.5 + 0.3 * rng.random((3, 4))).astype(np.float32)}
            if phi.config.rel_source == "memory":
                kw["score_map"] = (0.6, 0.1)
        ref, _ = fusion_forward(phi, q, r, mask, **kw)
        got, _ = fusion_forward(phi, q, r, mask, backend="onnx", **kw)
        assert np.abs(got - ref).max() <= 1e-4


@pytest.mark.skipif(not SHIPPED.is_file(), reason="weights/reco-mini-fusion/fusion.npz not present")
def test_export_the_shipped_weights(tmp_path, capsys):
    out = tmp_path / "onnx"
    assert main(["export-fusion", "--fusion", str(SHIPPED), "--out", str(out)]) == 0, capsys.readouterr().err
    manifest = json.loads((out / "fusion_onnx.json").read_text())
    assert sorted(manifest["modules"]) == ["image", "text"]
    assert set(manifest["extras"]) == {"tau"} and np.isfinite(manifest["extras"]["tau"])
    from reco_ref.reco.weights import load_reco_weights

    assert manifest["meta"] == load_reco_weights(SHIPPED).meta  # the run's description, as JSON
    _same_outputs(SHIPPED, out)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``reco-ref train``'s own best.npz (a few steps on a 320-row, 32-d memory), with the relevance bias."""
    if str(TRAIN) not in sys.path:
        sys.path.insert(0, str(TRAIN))
    from train_testlib import make_run_data

    root = tmp_path_factory.mktemp("export_trained")
    d = make_run_data(root)
    run = root / "run"
    assert main(["train", "--memory", str(d["train"].root), "--epochs", "1", "--steps-per-epoch", "2", "--batch-size",
                 "8", "--heads", "4", "--relevance", "--no-progress", "--out", str(run)]) == 0
    return run


def test_export_a_freshly_trained_best_npz(trained, tmp_path, capsys):
    for name in ("best.npz", "last.npz"):
        out = tmp_path / name.replace(".npz", "")
        assert main(["export-fusion", "--fusion", str(trained / name), "--out", str(out)]) == 0
        manifest = json.loads((out / "fusion_onnx.json").read_text())
        assert manifest["meta"]["heads"] == 4 and manifest["meta"]["recipe"]["relevance"] is True
        assert manifest["modules"]["image"]["relevance"] is not None
        _same_outputs(trained / name, out)
    capsys.readouterr()


def _set(path: Path, extras: dict) -> Path:
    from export_testlib import nonidentity_params

    save_param_set(path, {"image": nonidentity_params(32, 4, 0), "text": nonidentity_params(32, 4, 1)},
                   extras=extras)
    return path


@pytest.mark.parametrize("extras, message", [
    ({"meta_utf8": np.frombuffer(b'{"a": 1', np.uint8).astype(np.float32)}, "not UTF-8 JSON"),
    ({"meta_utf8": np.frombuffer(b"[1, 2]", np.uint8).astype(np.float32)}, "expected a JSON object"),
    ({"meta_utf8": np.array([300.0, 1.5], np.float32)}, "byte values 0..255"),
    ({"meta_utf8": np.zeros((2, 2), np.float32)}, "byte values 0..255"),
    ({"centres": np.zeros(3, np.float32)}, "expected a scalar"),
])
def test_what_cannot_be_exported_is_refused_before_any_write(tmp_path, capsys, extras, message):
    weights = _set(tmp_path / "w.npz", extras)
    out = tmp_path / "onnx"
    assert main(["export-fusion", "--fusion", str(weights), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "unexpected" not in err[0], err
    assert not out.exists() or not any(out.iterdir())


def test_the_project_s_other_npz_files_are_named_as_not_fusion_weights(trained, tmp_path, capsys):
    """The run's checkpoint.npz is no fusion parameter set: one line naming it, nothing written."""
    out = tmp_path / "onnx"
    assert main(["export-fusion", "--fusion", str(trained / "checkpoint.npz"), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert "checkpoint.npz" in err and "unexpected" not in err and "\n" not in err, err
    assert not out.exists() or not any(out.iterdir())
