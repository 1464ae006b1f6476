"""``reco-ref encode``: chunked, resumable, errors reported; ``reco-ref hf-clip-config``."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import reco_ref.encoders.onnx_pair as onnx_pair
from reco_ref.cli import main
from reco_ref.encoders import load
from reco_ref.encoders.stream import encode_to_file, read_image_list, read_text_lines
from reco_ref.errors import RecoError
from reco_ref.io import load_npy

from enc_graphs import FakeTokenizer, write_pair


@pytest.fixture
def pair(tmp_path, rng, monkeypatch):
    """A tiny pair with an image key, loaded by name through the CLI (the fake tokenizer patched in)."""
    write_pair(tmp_path / "model", rng, key_dim=4)
    monkeypatch.setattr(onnx_pair, "make_tokenizer", lambda folder, cfg: FakeTokenizer())
    return tmp_path / "model"


@pytest.fixture
def image_dir(tmp_path, rng):
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    for i in range(7):
        Image.fromarray(rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8)).save(d / ("sub" if i % 2 else "") / f"im{i}.png")
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    return d


def test_encode_images_dir(pair, image_dir, tmp_path, capsys):
    out = tmp_path / "emb.npy"
    assert main(["encode", "--model", str(pair), "--images", str(image_dir), "--out", str(out), "--chunk-size", "3", "--no-progress"]) == 0
    emb, keys, ok = load_npy(out), load_npy(tmp_path / "emb.keys.npy"), load_npy(tmp_path / "emb.ok_index.npy")
    items = (tmp_path / "emb.items.txt").read_text().splitlines()
    meta = json.loads((tmp_path / "emb.meta.json").read_text())
    assert len(items) == 8 and emb.shape == (7, 8) and keys.shape == (7, 4) and len(ok) == 7
    assert [items[i] for i in range(8) if i not in ok.tolist()] == [str(image_dir / "broken.jpg")]
    assert meta["n_items"] == 8 and meta["n_ok"] == 7 and len(meta["errors"]) == 1 and "broken.jpg" in meta["errors"][0]["message"]
    enc = load(pair)
    assert meta["fingerprint"] == enc.fingerprint
    np.testing.assert_allclose(emb, enc.encode_images([items[i] for i in ok]), atol=1e-6)
    assert not (tmp_path / "emb.parts").exists()
    assert "broken.jpg" in capsys.readouterr().err


def test_encode_texts_file(pair, tmp_path):
    texts = ["a dog", "", "cats", "many words here"]
    (tmp_path / "t.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    out = tmp_path / "t.npy"
    assert main(["encode", "--model", str(pair), "--texts", str(tmp_path / "t.txt"), "--out", str(out), "--chunk-size", "3", "--no-progress"]) == 0
    np.testing.assert_allclose(load_npy(out), load(pair).encode_texts(texts), atol=1e-6)
    assert json.loads((tmp_path / "t.meta.json").read_text())["n_ok"] == 4


def test_interrupted_run_resumes_from_chunks(pair, image_dir, tmp_path, monkeypatch):
    enc = load(pair)
    items = [str(p) for p in read_image_list(image_dir)]
    calls = {"n": 0}
    real = type(enc).encode_images

    def flaky(self, chunk, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, chunk, **kw)

    monkeypatch.setattr(type(enc), "encode_images", flaky)
    out = tmp_path / "r.npy"
    with pytest.raises(KeyboardInterrupt):
        encode_to_file(enc, items, out, kind="images", chunk_size=2, progress=False)
    assert sorted(p.name for p in (tmp_path / "r.parts").iterdir()) == ["chunk_000000.npz", "chunk_000001.npz", "plan.json"]
    assert not out.exists()
    calls["n"] = 10  # no more interruptions; count what the resumed run encodes
    encode_to_file(enc, items, out, kind="images", chunk_size=2, progress=False)
    assert calls["n"] == 12  # only chunks 2 and 3
    monkeypatch.setattr(type(enc), "encode_images", real)
    full = tmp_path / "full.npy"
    encode_to_file(enc, items, full, kind="images", chunk_size=8, progress=False)
    np.testing.assert_allclose(load_npy(out), load_npy(full), atol=1e-6)
    np.testing.assert_array_equal(load_npy(tmp_path / "r.ok_index.npy"), load_npy(tmp_path / "full.ok_index.npy"))


def test_resume_refuses_different_settings(pair, image_dir, tmp_path):
    enc = load(pair)
    items = [str(p) for p in read_image_list(image_dir)]
    parts = tmp_path / "x.parts"
    parts.mkdir()
    (parts / "plan.json").write_text(json.dumps({"kind": "images", "chunk_size": 5}))
    with pytest.raises(RecoError, match="different settings"):
        encode_to_file(enc, items, tmp_path / "x.npy", kind="images", chunk_size=2, progress=False)
    encode_to_file(enc, items, tmp_path / "x.npy", kind="images", chunk_size=2, progress=False, resume=False)
    assert load_npy(tmp_path / "x.npy").shape == (7, 8)


def test_image_list_file_and_text_reading(tmp_path):
    (tmp_path / "l.txt").write_text("# comment\na.png\n\n/abs/b.png\n")
    assert read_image_list(tmp_path / "l.txt") == [tmp_path / "a.png", tmp_path.__class__("/abs/b.png")]
    with pytest.raises(FileNotFoundError):
        read_image_list(tmp_path / "none")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(RecoError, match="not UTF-8"):
        read_text_lines(tmp_path / "bad.txt")


def test_cli_error_is_one_line(tmp_path, capsys):
    assert main(["encode", "--model", str(tmp_path / "nope" / "m"), "--texts", "x", "--out", str(tmp_path / "o.npy")]) == 1
    assert "reco-ref encode: error:" in capsys.readouterr().err
