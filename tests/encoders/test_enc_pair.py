"""The loader and the encoder pair on tiny ONNX graphs: outputs vs NumPy, graph validation, errors, batching."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reco_ref.encoders import load
from reco_ref.encoders.images import decode_image
from reco_ref.encoders.onnx_pair import SkipResult, SkipResultWithKeys, l2_normalize, pool_forward
from reco_ref.encoders.preprocess import preprocess_batch
from reco_ref.errors import EncoderConfigError, ImageDecodeError

import enc_graphs as g
from enc_graphs import FakeTokenizer, write_pair

TEXTS = ["a dog", "", "two cats on a mat", "word " * 40, "Mixed CASE words here"]


def _unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _images(rng, n=5):
    sizes = [(20, 30), (17, 17), (40, 21), (64, 33), (19, 25), (30, 30), (22, 50)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes[:n]]


def _set(folder: Path, dotted: str, value) -> None:
    cfg = json.loads((folder / "encoder.json").read_text())
    *head, last = dotted.split(".")
    d = cfg
    for h in head:
        d = d[h]
    d[last] = value
    (folder / "encoder.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_images_match_numpy(tmp_path, rng, layout):
    w = write_pair(tmp_path, rng, layout=layout, key_dim=5)
    enc = load(tmp_path, tokenizer=FakeTokenizer(), threads=1)
    ims = _images(rng)
    pixels = preprocess_batch([decode_image(im) for im in ims], enc.config.image)
    emb, keys = enc.encode_images(ims, batch_size=2, with_keys=True)
    assert emb.dtype == np.float32 and emb.shape == (5, 8) and keys.shape == (5, 5) and enc.key_dim == 5
    np.testing.assert_allclose(emb, _unit(g.image_ref(pixels, w["W"], layout)), atol=2e-6)
    np.testing.assert_allclose(keys, _unit(g.image_ref(pixels, w["K"], layout)), atol=2e-6)
    np.testing.assert_allclose(enc.encode_image_keys(ims), keys, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-6)


def test_paths_and_pil_give_same_rows(tmp_path, rng):
    write_pair(tmp_path / "m", rng)
    enc = load(tmp_path / "m", tokenizer=FakeTokenizer())
    ims = _images(rng, 3)
    for i, im in enumerate(ims):
        im.save(tmp_path / f"{i}.png")
    a = enc.encode_images([tmp_path / f"{i}.png" for i in range(3)])
    b = enc.encode_images(ims)
    np.testing.assert_array_equal(a, b)


def test_batch_size_does_not_change_results(tmp_path, rng):
    write_pair(tmp_path, rng)
    enc = load(tmp_path, tokenizer=FakeTokenizer(), threads=2)
    ims = _images(rng, 7)
    np.testing.assert_allclose(enc.encode_images(ims, batch_size=1), enc.encode_images(ims, batch_size=64), atol=1e-6)
    np.testing.assert_allclose(enc.encode_texts(TEXTS, batch_size=1), enc.encode_texts(TEXTS, batch_size=64), atol=1e-6)


@pytest.mark.parametrize("pooling", ["mean", "eot", "cls"])
def test_text_pooling_matches_numpy(tmp_path, rng, pooling):
    w = write_pair(tmp_path, rng, pooling=pooling)
    tok = FakeTokenizer()
    enc = load(tmp_path, tokenizer=tok)
    ids, mask = tok.encode_batch(TEXTS, 12)
    h = w["E"][ids].astype(np.float64)  # [N,L,D]
    if pooling == "mean":
        want = (h * mask[:, :, None]).sum(1) / mask.sum(1, keepdims=True)
    elif pooling == "cls":
        want = h[:, 0]
    else:
        want = h[np.arange(len(TEXTS)), ids.argmax(1)]  # the end token (99) has the largest id
    np.testing.assert_allclose(enc.encode_texts(TEXTS, batch_size=2), _unit(want), atol=2e-6)


def test_pool_forward_mean_ignores_padding():
    h = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    out = pool_forward(h, np.zeros((2, 3), np.int64), mask, "mean")
    np.testing.assert_allclose(out, [[1.0, 2.0], [6.0, 7.0]])


def test_with_real_tokenizers(tmp_path, rng):
    """The configured tokenizer is built from encoder.json (CLIP BPE: shipped vocab)."""
    write_pair(tmp_path, rng, context_length=77, pooling="eot")
    try:
        enc = load(tmp_path)  # E has only 100 rows: clip ids would be out of range, so only check the tokenizer
    except ImportError as exc:  # pragma: no cover - tokenizers room absent
        pytest.skip(f"reco_ref.tokenizers not importable: {exc}")
    assert type(enc.tokenizer).__name__ == "ClipBPE"
    feeds, ids, mask = enc.tokenize(["a photo of a dog"])
    assert ids.shape[1] <= 77 and ids[0, 0] == enc.tokenizer.start_id


def test_skip_mode_collects_errors(tmp_path, rng):
    write_pair(tmp_path, rng, key_dim=3)
    enc = load(tmp_path, tokenizer=FakeTokenizer())
    ims = _images(rng, 3)
    ims[0].save(tmp_path / "ok.png")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    items = [tmp_path / "ok.png", tmp_path / "bad.jpg", ims[1], tmp_path / "missing.png", ims[2]]
    res = enc.encode_images(items, on_error="skip", batch_size=2)
    assert isinstance(res, SkipResult)
    emb, ok, errors = res
    assert ok.tolist() == [0, 2, 4] and ok.dtype == np.int64 and emb.shape == (3, 8)
    assert [e.index for e in errors] == [1, 3] and "bad.jpg" in errors[0].message
    np.testing.assert_allclose(emb, enc.encode_images([items[i] for i in (0, 2, 4)]), atol=1e-6)
    res_k = enc.encode_images(items, on_error="skip", with_keys=True)
    assert isinstance(res_k, SkipResultWithKeys) and res_k.keys.shape == (3, 3)
    with pytest.raises(ImageDecodeError, match="bad.jpg"):
        enc.encode_images(items)
    all_bad = enc.encode_images([tmp_path / "bad.jpg"], on_error="skip")
    assert all_bad.embeddings.shape == (0, 8) and len(all_bad.errors) == 1


def test_empty_inputs_and_bad_arguments(tmp_path, rng):
    write_pair(tmp_path, rng)
    enc = load(tmp_path, tokenizer=FakeTokenizer())
    assert enc.encode_images([]).shape == (0, 8) and enc.encode_texts([]).shape == (0, 8)
    with pytest.raises(TypeError, match="single"):
        enc.encode_images(str(tmp_path / "x.png"))
    with pytest.raises(TypeError, match="single"):
        enc.encode_texts("a dog")
    with pytest.raises(TypeError, match="item 1"):
        enc.encode_texts(["a", 3])
    with pytest.raises(EncoderConfigError, match="no image search key"):
        enc.encode_images([], with_keys=True)
    with pytest.raises(ValueError):
        enc.encode_images([], batch_size=0)


def test_nan_output_is_an_error(tmp_path, rng):
    write_pair(tmp_path, rng, with_sha=False)
    g.image_graph(tmp_path / "image.onnx", rng.standard_normal((3 * 16 * 16, 8)).astype(np.float32), size=16, nan=True)
    enc = load(tmp_path, tokenizer=FakeTokenizer())
    with pytest.raises(EncoderConfigError, match=r"image.onnx output 'image_embeds'.*NaN"):
        enc.encode_images(_images(rng, 2))


def test_zero_embedding_is_an_error():
    with pytest.raises(EncoderConfigError, match="all-zero"):
        l2_normalize(np.zeros((2, 3), np.float32), "x")


def test_static_batch_graph_is_fed_exact_chunks(tmp_path, rng):
    w = write_pair(tmp_path, rng, with_sha=False)
    g.image_graph(tmp_path / "image.onnx", w["W"], size=16, batch=2)  # graph fixes N = 2
    enc = load(tmp_path, tokenizer=FakeTokenizer())
    ims = _images(rng, 5)
    pixels = preprocess_batch([decode_image(im) for im in ims], enc.config.image)
    np.testing.assert_allclose(enc.encode_images(ims, batch_size=3), _unit(g.image_ref(pixels, w["W"])), atol=2e-6)


def test_hf_style_graph_inputs_int32_and_static_seq(tmp_path, rng):
    """attention_mask + token_type_ids inputs, int32 ids, a static sequence length: fed, cast and padded."""
    w = write_pair(tmp_path, rng, with_sha=False, context_length=16)
    from onnx import TensorProto

    g.text_graph(tmp_path / "text.onnx", w["E"], mask="attention_mask", types="token_type_ids", seq=16, id_type=TensorProto.INT32)
    _set(tmp_path, "text.inputs", {"input_ids": "input_ids", "attention_mask": "attention_mask", "token_type_ids": "token_type_ids"})

    class ShortPad(FakeTokenizer):  # pads to the longest text only, like a dynamic tokenizer
        def encode_batch(self, texts, context_length):
            ids, mask = super().encode_batch(texts, context_length)
            L = int(mask.sum(1).max())
            return ids[:, :L], mask[:, :L]

    enc = load(tmp_path, tokenizer=ShortPad())
    feeds, ids, mask = enc.tokenize(TEXTS[:2])
    assert all(v.dtype == np.int32 and v.shape == (2, 16) for v in feeds.values())
    ids, mask = FakeTokenizer().encode_batch(TEXTS, 16)
    h = w["E"][ids].astype(np.float64) * mask[:, :, None]
    want = h.sum(1) / mask.sum(1, keepdims=True)
    np.testing.assert_allclose(enc.encode_texts(TEXTS), _unit(want), atol=2e-6)


# ------------------------------------------------------------------------------------- graph vs config checks
@pytest.mark.parametrize(
    "field, value, needle",
    [
        ("image.input", "pixel_values", "image.input': expected a graph input named 'pixel_values'"),
        ("image.output", "embeds", "image.output': expected a graph output named 'embeds'"),
        ("image.key_output", "keys", "image.key_output"),
        ("image.size", 24, "image.input': expected shape [N,3,24,24]"),
        ("image.layout", "NHWC", "image.input': expected shape [N,16,16,3]"),
        ("embed_dim", 9, "'embed_dim': expected image output last dim == embed_dim 9"),
        ("text.output", "text_embeds", "text.output"),
        ("text.pooling", "none", "text.output': expected rank 2"),
        ("text.inputs", {"input_ids": "ids"}, "text.inputs.input_ids"),
    ],
)
def test_graph_mismatch_named(tmp_path, rng, field, value, needle):
    write_pair(tmp_path, rng, with_sha=False)
    if field == "image.size":
        _set(tmp_path, "image.resize_shortest", 30)
    _set(tmp_path, field, value)
    with pytest.raises(EncoderConfigError) as e:
        load(tmp_path, tokenizer=FakeTokenizer())
    assert needle in str(e.value) and ".onnx" in str(e.value)


def test_unnamed_graph_input_refused(tmp_path, rng):
    w = write_pair(tmp_path, rng, with_sha=False)
    g.text_graph(tmp_path / "text.onnx", w["E"], mask="attention_mask")
    with pytest.raises(EncoderConfigError, match=r"unnamed inputs \['attention_mask'\]"):
        load(tmp_path, tokenizer=FakeTokenizer())


def test_static_seq_must_equal_context_length(tmp_path, rng):
    w = write_pair(tmp_path, rng, with_sha=False)
    g.text_graph(tmp_path / "text.onnx", w["E"], seq=77)
    with pytest.raises(EncoderConfigError, match="text.context_length': expected the graph's static sequence length 77, found 12"):
        load(tmp_path, tokenizer=FakeTokenizer())


def test_corrupt_graph_named(tmp_path, rng):
    write_pair(tmp_path, rng, with_sha=False)
    (tmp_path / "image.onnx").write_bytes(b"not onnx")
    with pytest.raises(EncoderConfigError, match="image.onnx: ONNX Runtime cannot load"):
        load(tmp_path, tokenizer=FakeTokenizer())


def test_name_resolution(tmp_path, rng, monkeypatch):
    write_pair(tmp_path / "w" / "mine", rng)
    monkeypatch.setenv("RECO_REF_WEIGHTS", str(tmp_path / "w"))
    assert load("mine", tokenizer=FakeTokenizer()).name == "tiny"
    with pytest.raises(EncoderConfigError, match="shipped encoders: mine"):
        load("other", tokenizer=FakeTokenizer())
    with pytest.raises(EncoderConfigError, match="not found"):
        load(str(tmp_path / "nope" / "x"), tokenizer=FakeTokenizer())


def test_providers_and_threads(tmp_path, rng):
    write_pair(tmp_path, rng)
    enc = load(tmp_path, tokenizer=FakeTokenizer(), providers=["CPUExecutionProvider"], threads=1)
    assert enc.providers == ["CPUExecutionProvider"]
    with pytest.raises(EncoderConfigError, match="NoSuchExecutionProvider not available"):
        load(tmp_path, tokenizer=FakeTokenizer(), providers=["NoSuchExecutionProvider"])
    with pytest.raises(EncoderConfigError, match="threads"):
        load(tmp_path, tokenizer=FakeTokenizer(), threads=0)


# ----------------------------------------------------------------------------------- the shipped default
def _reco_mini_or_skip():
    from reco_ref.paths import weights_dir

    try:
        folder = weights_dir() / "reco-mini"
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"weights folder not available: {exc}")
    if not (folder / "encoder.json").is_file():
        pytest.skip(f"reco-mini not built yet ({folder}/encoder.json missing; scripts/build_reco_mini.py makes it)")
    return folder


def test_reco_mini_default_loads_and_encodes(rng, tmp_path):
    _reco_mini_or_skip()
    enc = load(threads=2)  # the default name
    assert enc.name == "reco-mini" and len(enc.fingerprint) == 64
    ims = [Image.fromarray(rng.integers(0, 256, (160, 160, 3), dtype=np.uint8)), Image.new("RGBA", (300, 200))]
    ims[0].save(tmp_path / "a.jpg")
    emb = enc.encode_images([tmp_path / "a.jpg", ims[1]])
    txt = enc.encode_texts(["a photo of a flower.", "a red bird on a branch"])
    assert emb.shape == (2, enc.dim) and txt.shape == (2, enc.dim) and emb.dtype == txt.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(np.vstack([emb, txt]), axis=1), 1.0, atol=1e-5)
    if enc.key_dim is not None:
        e2, k2 = enc.encode_images([tmp_path / "a.jpg"], with_keys=True)
        assert k2.shape == (1, enc.key_dim)
        np.testing.assert_allclose(e2[0], emb[0], atol=1e-6)
    assert load("reco-mini").fingerprint == enc.fingerprint


def test_threaded_decoding_keeps_order_and_closes(tmp_path, rng):
    write_pair(tmp_path, rng)
    ims = _images(rng, 7)
    with load(tmp_path, tokenizer=FakeTokenizer(), threads=3) as enc:
        threaded = enc.encode_images(ims, batch_size=7)
        assert enc._pool  # the decode threads were used
    assert enc._pool is None
    single = load(tmp_path, tokenizer=FakeTokenizer(), threads=1).encode_images(ims, batch_size=7)
    np.testing.assert_array_equal(threaded, single)


def test_max_pixels_override(tmp_path, rng):
    write_pair(tmp_path, rng)
    big = Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))
    enc = load(tmp_path, tokenizer=FakeTokenizer(), max_pixels=1000)
    with pytest.raises(ImageDecodeError, match="exceeds the limit of 1000"):
        enc.encode_images([big])
    assert enc.fingerprint == load(tmp_path, tokenizer=FakeTokenizer()).fingerprint
    with pytest.raises(EncoderConfigError, match="max_pixels"):
        load(tmp_path, tokenizer=FakeTokenizer(), max_pixels=0)


def test_cuda_provider_first_when_available(monkeypatch):
    """With onnxruntime-gpu installed, CUDA comes first and CPU stays as the fallback."""
    import onnxruntime as ort

    from reco_ref.encoders.onnx_pair import choose_providers

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert choose_providers(None) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert choose_providers(None) == ["CPUExecutionProvider"]


def test_padding_trimmed_and_length_order_restored(tmp_path, rng):
    """A dynamic-L graph with an attention mask gets only the used columns; rows come back in input order."""
    w = write_pair(tmp_path, rng, with_sha=False, context_length=40)
    g.text_graph(tmp_path / "text.onnx", w["E"], mask="attention_mask")
    _set(tmp_path, "text.inputs", {"input_ids": "input_ids", "attention_mask": "attention_mask"})
    enc = load(tmp_path, tokenizer=FakeTokenizer())
    feeds, ids, mask = enc.tokenize(["a b c", "a"])
    assert feeds["input_ids"].shape == (2, 5) and mask[:, -1].any()
    texts = ["one two three four five six", "a", "", "x y", "p q r s t u v w x y z", "m n o"]
    ids, mask = FakeTokenizer().encode_batch(texts, 40)
    h = (w["E"][ids].astype(np.float64) * mask[:, :, None]).sum(1) / mask.sum(1, keepdims=True)
    np.testing.assert_allclose(enc.encode_texts(texts, batch_size=2), _unit(h), atol=2e-6)
