"""The memory with the real default encoder (reco-mini ONNX pair); skipped until its weights are shipped."""

from __future__ import annotations

import numpy as np
import pytest
from memory_testlib import make_jpeg_pairs

from reco_ref.errors import MemoryFormatError
from reco_ref.memory import Memory, build_memory, read_pairs
from reco_ref.paths import weights_dir

try:
    HAVE_RECO_MINI = (weights_dir() / "reco-mini" / "encoder.json").is_file()
except Exception:  # weights folder absent altogether
    HAVE_RECO_MINI = False

pytestmark = pytest.mark.skipif(not HAVE_RECO_MINI, reason="weights/reco-mini/encoder.json not shipped yet")


@pytest.fixture(scope="module")
def enc():
    from reco_ref.encoders import load

    return load("reco-mini")


def test_build_open_search_with_reco_mini(enc, tmp_path):
    pairs = make_jpeg_pairs(tmp_path / "src", 20)
    m = build_memory(tmp_path / "mem", read_pairs(pairs), enc, chunk_size=8, progress=False)
    assert m["encoder"] == {"name": enc.name, "fingerprint": enc.fingerprint} and m["embed_dim"] == enc.dim
    assert m["counts"] == {"rows": 20, "items": 21, "failed": 1}
    mem = Memory.open(tmp_path / "mem", encoder=enc)
    assert "broken.jpg" in mem.failures()[0]["source"]
    q = np.asarray(mem.image[:5], np.float32) if not mem.key_dim else np.asarray(mem.image_keys[:5], np.float32)
    rows, scores, valid = mem.search(q, "image", k=3, exact=True)
    np.testing.assert_array_equal(rows[:, 0], np.arange(5))
    t = np.asarray(enc.encode_texts(["a picture of pattern 3"]), np.float32)
    rows, _, _ = mem.search(t, "text", k=1, exact=True)
    assert mem.metadata(rows[0])[0]["caption"] == "a picture of pattern 3"


def test_reco_mini_dask_shards_equal_single(enc, tmp_path):
    pytest.importorskip("distributed")
    from reco_ref.memory.dask_build import build_sharded

    items = read_pairs(make_jpeg_pairs(tmp_path / "src", 30))
    build_memory(tmp_path / "one", items, enc, chunk_size=8, progress=False)
    sh = build_sharded(tmp_path / "sh", items, "reco-mini", n_shards=2, n_workers=2, processes=False, chunk_size=8)
    one = Memory.open(tmp_path / "one", encoder=enc)
    np.testing.assert_array_equal(sh.embeddings("image", np.arange(len(one))), np.asarray(one.image))
    np.testing.assert_array_equal(sh.embeddings("text", np.arange(len(one))), np.asarray(one.text))


def test_other_encoder_refused(enc, tmp_path):
    pairs = make_jpeg_pairs(tmp_path / "src", 4)
    build_memory(tmp_path / "mem", read_pairs(pairs), enc, chunk_size=8, progress=False)

    class Other:
        fingerprint = "0" * 64
        dim = enc.dim

    with pytest.raises(MemoryFormatError, match="fingerprint"):
        Memory.open(tmp_path / "mem", encoder=Other())


@pytest.mark.data
def test_memory_from_shared_manifest(enc, shared_data, tmp_path):
    items = read_pairs(shared_data / "flowers102" / "manifest.csv", split="valid",
                       caption_template="a photo of a {class_name}.")[:64]
    build_memory(tmp_path / "mem", items, enc, chunk_size=32, progress=False)
    mem = Memory.open(tmp_path / "mem", encoder=enc)
    assert len(mem) == 64 and mem.metadata([0])[0]["split"] == "valid"
    q = np.asarray(mem.text[:10], np.float32)
    rows, scores, valid = mem.search(q, "text", k=5, exclude=np.arange(10), dup_threshold=True)
    assert not (rows == np.arange(10)[:, None]).any() and (scores[valid] < 0.98).all()
