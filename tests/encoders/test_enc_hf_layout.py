"""The Hugging Face ONNX layout of CLIP (separate vision/text models) through an ordinary encoder.json."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from reco_ref.cli import main
from reco_ref.encoders import load
from reco_ref.encoders.hf_layout import hf_clip_config
from reco_ref.encoders.images import decode_image
from reco_ref.encoders.preprocess import preprocess_batch
from reco_ref.errors import EncoderConfigError

import enc_graphs as g
from enc_graphs import FakeTokenizer

S, D = 16, 6


@pytest.fixture
def hf_folder(tmp_path, rng):
    """vision_model.onnx: pixel_values -> image_embeds (+ last_hidden_state); text_model.onnx: input_ids +
    attention_mask -> text_embeds (pooled inside the graph); preprocessor_config.json like CLIPImageProcessor's."""
    W = rng.standard_normal((3 * S * S, D)).astype(np.float32)
    E = rng.standard_normal((FakeTokenizer.vocab_size, D)).astype(np.float32)
    g.image_graph(tmp_path / "vision_model.onnx", W, size=S, input_name="pixel_values", output="image_embeds", extra_output=True)
    g.text_graph(tmp_path / "text_model.onnx", E, mask="attention_mask", output="text_embeds", pooled=True)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": {"height": S, "width": S}, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3, "size": {"shortest_edge": S + 2}, "image_processor_type": "CLIPImageProcessor",
    }))
    (tmp_path / "config.json").write_text(json.dumps({"projection_dim": D, "text_config": {"max_position_embeddings": 10}}))
    return tmp_path, W, E


def test_hf_layout_loads_via_config(hf_folder, rng, monkeypatch):
    folder, W, E = hf_folder
    cfg = hf_clip_config(folder, name="hf-tiny")
    assert cfg["embed_dim"] == D and cfg["image"]["resize_shortest"] == S + 2 and cfg["image"]["size"] == S
    assert cfg["text"]["inputs"]["attention_mask"] == "attention_mask" and cfg["text"]["context_length"] == 10
    monkeypatch.setattr("reco_ref.encoders.onnx_pair.make_tokenizer", lambda f, c: FakeTokenizer())
    assert main(["hf-clip-config", str(folder), "--name", "hf-tiny"]) == 0
    enc = load(folder)
    assert enc.name == "hf-tiny" and enc.dim == D

    ims = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(20, 31), (40, 17), (18, 18)]]
    pixels = preprocess_batch([decode_image(im, alpha="drop") for im in ims], enc.config.image)  # [3,3,S,S]
    want = g.image_ref(pixels, W)
    np.testing.assert_allclose(enc.encode_images(ims), want / np.linalg.norm(want, axis=1, keepdims=True), atol=2e-6)

    texts = ["a photo", "one two three four five six seven eight nine ten eleven", ""]
    ids, mask = FakeTokenizer().encode_batch(texts, 10)
    h = (E[ids].astype(np.float64) * mask[:, :, None]).sum(1) / mask.sum(1, keepdims=True)
    np.testing.assert_allclose(enc.encode_texts(texts), h / np.linalg.norm(h, axis=1, keepdims=True), atol=2e-6)


def test_hf_layout_errors(hf_folder):
    folder, _, _ = hf_folder
    with pytest.raises(EncoderConfigError, match="graph file not found"):
        hf_clip_config(folder, vision="missing.onnx")
    (folder / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 3, "width": 4}}))
    with pytest.raises(EncoderConfigError, match="'size'"):
        hf_clip_config(folder)
