"""φ_I alone on the device (issue 21): ``export-image-weights`` + ``class-text`` on the build machine, then ``query``
with the image module alone gives the same classes and scores as ``query`` with the full weights, and refuses a
class-text file made for other weights, encoder, memory, k, class names or templates."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from reco_ref import cli
from reco_ref.encoders import load
from reco_ref.errors import ParamsFormatError, RecoError
from reco_ref.eval.data import shipped_data
from reco_ref.eval.edge import (check_class_text, is_image_only, load_class_text, load_fusion_weights,
                                load_image_weights, save_class_text, save_image_weights)
from reco_ref.eval.evaluate import make_class_text, query
from reco_ref.fusion.onnx_backend import params_digest
from reco_ref.memory import build_memory_from_arrays
from reco_ref.reco.weights import default_weights_path, load_reco_weights, save_reco_weights

NAMES = ["bird", "boat", "car", "dog", "fish", "fruit"]


@pytest.fixture(scope="module")
def edge(tmp_path_factory):
    """A 40-row memory of the demo sample, the shipped weights, a copy whose φ_I gate is open (rel_gamma + 4, so
    gated scores blend t_c and t̄_c), φ_I alone of both, and class text for both."""
    root = tmp_path_factory.mktemp("edge")
    enc = load("reco-mini")
    ds = shipped_data()
    items = ds["memory"][::4][:40]
    img, keys = enc.encode_images([it["image"] for it in items], with_keys=True)
    txt = enc.encode_texts([it["caption"] for it in items])
    build_memory_from_arrays(root / "mem", img, txt, keys=keys, name=enc.name, fingerprint=enc.fingerprint,
                             items=items, progress=False)
    build_memory_from_arrays(root / "mem2", img[:30], txt[:30], keys=keys[:30], name=enc.name,
                             fingerprint=enc.fingerprint, items=items[:30], progress=False)
    full = default_weights_path("reco-mini")
    w = load_reco_weights(full)
    w.image["rel_gamma"] = w.image["rel_gamma"] + 4.0  # the gate opens: query blends frozen and refined class text
    save_reco_weights(root / "gated.npz", w)
    out = SimpleNamespace(root=root, enc=enc, mem=root / "mem", mem2=root / "mem2", queries=ds["queries"],
                          full={"shipped": full, "gated": root / "gated.npz"}, phi={}, ct={})
    for name, path in out.full.items():
        out.phi[name] = root / f"phi_image_{name}.npz"
        save_image_weights(path, out.phi[name])
        header, frozen, refined = make_class_text(root / "mem", NAMES, k=7, fusion=path, model=enc)
        out.ct[name] = root / f"classes_{name}.npz"
        save_class_text(out.ct[name], header, frozen, refined)
    return out


@pytest.mark.parametrize("which", ["shipped", "gated"])
def test_phi_image_alone_with_class_text_answers_as_the_full_weights(edge, which):
    gates = []
    for q in edge.queries[::6][:5]:
        a = query(edge.mem, image=q["image"], fusion=edge.full[which], class_names=NAMES, k=7, top=6, model=edge.enc)
        b = query(edge.mem, image=q["image"], fusion=edge.phi[which], class_text=edge.ct[which], top=6, model=edge.enc)
        for side in ("frozen_top", "reco_top"):
            assert [c["class"] for c in a[side]] == [c["class"] for c in b[side]]
            np.testing.assert_allclose([c["score"] for c in a[side]], [c["score"] for c in b[side]], rtol=0, atol=1e-5)
        assert b["k"] == 7 and b["templates"] == a["templates"] == "generic" and b["class_text"] == str(edge.ct[which])
        assert a["relevance_gate"] == pytest.approx(b["relevance_gate"], abs=1e-12)
        gates.append(b["relevance_gate"])
    if which == "gated":  # the blend is exercised: t_c from the file carries real weight in the scores
        assert max(gates) > 0.05


def test_image_only_file_holds_phi_i_alone(edge):
    full = load_reco_weights(edge.full["shipped"])
    w = load_image_weights(edge.phi["shipped"])
    assert w.text is None and is_image_only(edge.phi["shipped"]) and not is_image_only(edge.full["shipped"])
    assert sorted(w.image) == sorted(full.image) and all(np.array_equal(w.image[n], full.image[n]) for n in w.image)
    assert w.tau == full.tau and w.meta["image_only"]["phi_text_sha256"] == params_digest(full.text)
    assert {k: v for k, v in w.meta.items() if k != "image_only"} == full.meta
    size, full_size = edge.phi["shipped"].stat().st_size, edge.full["shipped"].stat().st_size
    assert 0.45 * full_size < size < 0.55 * full_size  # ~28 MB of 57
    assert load_fusion_weights(edge.full["shipped"]).text is not None
    # train / eval still want both modules: a one-line refusal naming the file
    with pytest.raises(ParamsFormatError, match=r"modules \['image'\], expected \['image', 'text'\]"):
        load_reco_weights(edge.phi["shipped"])


def test_image_only_file_whose_phi_i_was_swapped_is_refused(edge, tmp_path):
    from reco_ref.fusion import load_param_set, save_param_set

    modules, extras = load_param_set(edge.phi["shipped"])
    modules["image"]["b_q"] = modules["image"]["b_q"] + 1.0
    save_param_set(tmp_path / "x.npz", modules, extras=extras)
    with pytest.raises(ParamsFormatError, match="φ_I hashes to"):
        load_image_weights(tmp_path / "x.npz")


def test_mismatches_are_refused_in_one_line(edge, tmp_path):
    img = edge.queries[0]["image"]
    ct = edge.ct["shipped"]
    cases = [
        (dict(fusion=edge.phi["gated"]), "made for other fusion weights"),  # φ_I of other weights
        (dict(fusion=edge.full["gated"]), "made for other fusion weights"),  # full other weights
        (dict(fusion=edge.phi["shipped"], k=5), "made with k = 7, this query uses k = 5"),
        (dict(fusion=edge.phi["shipped"], memory=edge.mem2), "made against another memory"),
        (dict(fusion=edge.phi["shipped"], class_names=NAMES[:3]), "holds 6 class names, the query gives 3"),
        (dict(fusion=edge.phi["shipped"], templates="flowers"), "made with templates 'generic'"),
        (dict(fusion="none"), "not --weights none"),
    ]
    for kw, msg in cases:
        kw = dict(dict(memory=edge.mem, image=img, class_text=ct, model=edge.enc), **kw)
        with pytest.raises(RecoError, match=msg) as e:
            query(**kw)
        assert "\n" not in str(e.value)
    other = SimpleNamespace(name="other", fingerprint="f" * 64)  # another encoder
    with pytest.raises(RecoError, match="made with encoder reco-mini"):
        check_class_text(load_class_text(ct), encoder=other)
    # φ_I alone cannot refine class text or a text query itself
    with pytest.raises(RecoError, match="holds φ_I alone: rank classes with --class-text"):
        query(edge.mem, image=img, fusion=edge.phi["shipped"], class_names=NAMES, model=edge.enc)
    with pytest.raises(RecoError, match="a text query needs φ_T"):
        query(edge.mem, text="a bird", fusion=edge.phi["shipped"], model=edge.enc)
    with pytest.raises(RecoError, match="refined class text needs φ_T"):
        make_class_text(edge.mem, NAMES, fusion=edge.phi["shipped"], model=edge.enc)
    # the neighbours and v̄ alone need nothing more than φ_I
    r = query(edge.mem, image=img, fusion=edge.phi["shipped"], k=4, model=edge.enc)
    assert len(r["neighbours"]) == 4 and "frozen_top" not in r and r["refined_minus_frozen_cosine"] > 0


def test_class_text_loader_refuses_other_files(edge, tmp_path):
    h = load_class_text(edge.ct["shipped"])
    assert h["frozen"].shape == h["refined"].shape == (6, 768) and h["frozen"].dtype == np.float32
    np.save(tmp_path / "p.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.savez(tmp_path / "obj.npz", __header__=np.array([{"a": 1}], dtype=object))
    header = dict(h["header"], class_names=NAMES + ["tree"])  # 7 names, arrays of 6 rows
    save_class_text(tmp_path / "short.npz", header, h["frozen"], h["refined"])
    for path, msg in [(edge.phi["shipped"], "header field 'format' is 'reco_ref.fusion.params'"),
                      (tmp_path / "obj.npz", "__header__"),
                      (tmp_path / "short.npz", r"entry '(frozen|refined)' has shape \(6, 768\), expected \(7, 768\)"),
                      (tmp_path / "p.npy", "not a readable .npz")]:
        with pytest.raises(ParamsFormatError, match=msg):
            load_class_text(path)


def test_export_fusion_image_module_alone(edge, tmp_path):
    pytest.importorskip("onnx")
    from reco_ref.export.fusion import export_fusion
    from reco_ref.fusion import fusion_forward, load_param_set, onnx_backend

    manifest = export_fusion(edge.phi["shipped"], tmp_path / "g1")  # φ_I alone in, φ_I alone out
    assert sorted(manifest["modules"]) == ["image"] and sorted(p.name for p in (tmp_path / "g1").iterdir()) == [
        "fusion_onnx.json", "phi_image.onnx"]
    assert cli.main(["export-fusion", "--fusion", str(edge.full["shipped"]), "--out", str(tmp_path / "g2"),
                     "--modules", "image"]) == 0
    assert not (tmp_path / "g2" / "phi_text.onnx").exists()
    modules, _ = load_param_set(edge.phi["shipped"])
    onnx_backend.attach(tmp_path / "g2", modules)  # φ_I alone attaches the graph exported from the full file
    rng = np.random.default_rng(0)
    q, r = rng.standard_normal((2, 768)).astype(np.float32), rng.standard_normal((2, 5, 768)).astype(np.float32)
    m, s = np.ones((2, 5), bool), rng.uniform(0.5, 1.0, (2, 5)).astype(np.float32)
    smap = (0.8, 0.05)  # the shipped φ_I maps scores with the searched memory's (center, width)
    a, _ = fusion_forward(modules["image"], q, r, m, backend="onnx", scores=s, score_map=smap)
    b, _ = fusion_forward(modules["image"], q, r, m, backend="numpy", scores=s, score_map=smap)
    assert np.abs(a - b).max() <= 1e-5
    with pytest.raises(ParamsFormatError, match="no module 'text' to export"):
        export_fusion(edge.phi["shipped"], tmp_path / "g3", modules=["text"])


def test_cli_build_machine_then_device(edge, tmp_path, capsys):
    names = tmp_path / "names.txt"
    names.write_text("\n".join(NAMES) + "\n")
    phi, ct = tmp_path / "phi_image.npz", tmp_path / "classes.npz"
    assert cli.main(["export-image-weights", "--fusion", str(edge.full["shipped"]), "--out", str(phi)]) == 0
    assert cli.main(["class-text", "--memory", str(edge.mem), "--class-names", str(names), "-k", "7",
                     "--out", str(ct)]) == 0
    out = capsys.readouterr().out
    assert "φ_I alone (28.4 MB" in out and "6 classes × 768" in out and "k = 7" in out
    img = edge.queries[3]["image"]
    assert cli.main(["query", img, "--memory", str(edge.mem), "--class-names", str(names), "-k", "7", "--top", "6",
                     "--json", "-"]) == 0
    full = json.loads(capsys.readouterr().out)
    assert cli.main(["query", img, "--memory", str(edge.mem), "--fusion", str(phi), "--class-text", str(ct),
                     "--top", "6", "--json", "-"]) == 0
    device = json.loads(capsys.readouterr().out)
    assert [c["class"] for c in device["reco_top"]] == [c["class"] for c in full["reco_top"]]
    np.testing.assert_allclose([c["score"] for c in device["reco_top"]], [c["score"] for c in full["reco_top"]],
                               rtol=0, atol=1e-5)
    # outputs are never replaced unless told to; a mismatch is one line
    assert cli.main(["export-image-weights", "--fusion", str(edge.full["shipped"]), "--out", str(phi)]) == 1
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert cli.main(["class-text", "--memory", str(edge.mem), "--class-names", str(names), "--out", str(ct)]) == 1
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert cli.main(["query", img, "--memory", str(edge.mem), "--fusion", str(phi), "--class-text", str(ct),
                     "-k", "3"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("reco-ref query: error:") and "made with k = 7" in err and err.count("\n") == 1
