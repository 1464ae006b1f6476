"""encoder.json validation: every key, type and range; files and their sha256; the fingerprint."""

from __future__ import annotations

import copy
import json

import pytest

from reco_ref.encoders import load
from reco_ref.encoders.config import parse_config, read_config
from reco_ref.errors import EncoderConfigError

from enc_graphs import FakeTokenizer, write_pair

GOOD = {
    "format_version": 1,
    "name": "x",
    "embed_dim": 8,
    "image": {
        "onnx": "image.onnx", "input": "pixels", "layout": "NHWC", "size": 224, "resize_shortest": 256,
        "interpolation": "bilinear", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "output": "image_embeds",
        "key_output": None, "normalize": True,
    },
    "text": {
        "onnx": "text.onnx", "tokenizer": {"kind": "wordpiece", "file": "tokenizer.json"}, "context_length": 128,
        "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "token_type_ids": "token_type_ids"},
        "output": "last_hidden_state", "pooling": "mean", "normalize": True,
    },
}


def _with(path: str, value):
    cfg = copy.deepcopy(GOOD)
    *head, last = path.split(".")
    d = cfg
    for h in head:
        d = d[h]
    if value is KeyError:
        del d[last]
    else:
        d[last] = value
    return cfg


def test_contract_example_parses_with_defaults():
    cfg = parse_config(GOOD)
    assert cfg.image.max_pixels == 89_478_485 and cfg.image.alpha == "white" and cfg.image.exif_transpose
    assert cfg.files() == ["image.onnx", "text.onnx", "tokenizer.json"]
    assert cfg.image.mean == (0.5, 0.5, 0.5)


@pytest.mark.parametrize(
    "path, value, needle",
    [
        ("format_version", 2, "format_version"),
        ("name", "", "'name'"),
        ("name", 3, "'name'"),
        ("embed_dim", 0, "embed_dim"),
        ("embed_dim", 8.0, "embed_dim"),
        ("embed_dim", True, "embed_dim"),
        ("image.layout", "HWC", "image.layout"),
        ("image.size", 4, "image.size"),
        ("image.resize_shortest", 200, "image.resize_shortest"),  # < size
        ("image.interpolation", "area", "image.interpolation"),
        ("image.mean", [0.5, 0.5], "image.mean"),
        ("image.mean", [0.5, "a", 0.5], "image.mean"),
        ("image.std", [0.5, 0.0, 0.5], "image.std"),
        ("image.std", [0.5, float("nan"), 0.5], "image.std"),
        ("image.onnx", "../image.onnx", "image.onnx"),
        ("image.onnx", "/abs/image.onnx", "image.onnx"),
        ("image.key_output", "image_embeds", "image.key_output"),
        ("image.normalize", "yes", "image.normalize"),
        ("image.max_pixels", 0, "image.max_pixels"),
        ("image.alpha", "black", "image.alpha"),
        ("text.tokenizer.kind", "sentencepiece", "text.tokenizer.kind"),
        ("text.tokenizer.file", None, "text.tokenizer.file"),  # wordpiece needs its file
        ("text.context_length", 1, "text.context_length"),
        ("text.pooling", "max", "text.pooling"),
        ("text.inputs.input_ids", None, "text.inputs.input_ids"),
        ("text.inputs.attention_mask", "input_ids", "text.inputs"),
        ("text.output", None, "text.output"),
        ("image", [], "image"),
    ],
)
def test_bad_field_is_named(path, value, needle):
    with pytest.raises(EncoderConfigError) as e:
        parse_config(_with(path, value), "cfg.json")
    assert "cfg.json" in str(e.value) and needle in str(e.value)


@pytest.mark.parametrize("path", ["name", "embed_dim", "image.onnx", "image.mean", "text.tokenizer", "text.inputs", "text.pooling"])
def test_missing_field_is_named(path):
    with pytest.raises(EncoderConfigError, match="missing"):
        parse_config(_with(path, KeyError))


def test_unknown_field_is_refused():
    with pytest.raises(EncoderConfigError, match="image.resize_shortest "):
        parse_config(_with("image.resize_shortest ", 256))
    with pytest.raises(EncoderConfigError, match="unknown"):
        parse_config(_with("extra", 1))


def test_sha256_table_checked_for_names_and_format():
    with pytest.raises(EncoderConfigError, match="sha256.other.onnx"):
        parse_config(_with("sha256", {"other.onnx": "0" * 64}))
    with pytest.raises(EncoderConfigError, match="64 lowercase hex"):
        parse_config(_with("sha256", {"image.onnx": "ABC"}))


def test_read_config_errors(tmp_path):
    with pytest.raises(EncoderConfigError, match="not found"):
        read_config(tmp_path)
    (tmp_path / "encoder.json").write_text("{not json")
    with pytest.raises(EncoderConfigError, match="not valid JSON"):
        read_config(tmp_path)


def test_file_sha_mismatch_and_missing_file(tmp_path, rng):
    write_pair(tmp_path, rng)
    data = bytearray((tmp_path / "text.onnx").read_bytes())
    (tmp_path / "text.onnx").write_bytes(bytes(data) + b"\0")
    with pytest.raises(EncoderConfigError, match=r"text.onnx: sha256 mismatch"):
        load(tmp_path, tokenizer=FakeTokenizer())
    (tmp_path / "text.onnx").unlink()
    with pytest.raises(EncoderConfigError, match="does not exist"):
        load(tmp_path, tokenizer=FakeTokenizer())


def test_fingerprint_is_stable_and_sensitive(tmp_path, rng):
    write_pair(tmp_path / "a", rng, with_sha=False)
    fp = load(tmp_path / "a", tokenizer=FakeTokenizer()).fingerprint
    assert len(fp) == 64 and fp == load(tmp_path / "a", tokenizer=FakeTokenizer()).fingerprint
    # listing the sha256 table does not change the fingerprint (the digests enter it anyway)
    cfg = json.loads((tmp_path / "a" / "encoder.json").read_text())
    from reco_ref.io import sha256_file

    cfg["sha256"] = {f: sha256_file(tmp_path / "a" / f) for f in ("image.onnx", "text.onnx")}
    (tmp_path / "a" / "encoder.json").write_text(json.dumps(cfg))
    assert load(tmp_path / "a", tokenizer=FakeTokenizer()).fingerprint == fp
    # a preprocessing change changes it
    cfg["image"]["resize_shortest"] += 1
    (tmp_path / "a" / "encoder.json").write_text(json.dumps(cfg))
    assert load(tmp_path / "a", tokenizer=FakeTokenizer()).fingerprint != fp
    # different graph weights change it
    write_pair(tmp_path / "b", rng, with_sha=False)
    assert load(tmp_path / "b", tokenizer=FakeTokenizer()).fingerprint != fp
