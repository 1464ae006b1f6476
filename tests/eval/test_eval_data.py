"""reco_ref.eval.data: manifest splits, cached embeddings, overlap with a memory."""

from __future__ import annotations

import numpy as np
import pytest

from reco_ref.errors import DatasetError
from reco_ref.eval.data import embed_split, own_rows, read_split


def _manifest(tmp_path, text, encoding="utf-8"):
    p = tmp_path / "manifest.csv"
    p.write_bytes(text.encode(encoding))
    return p


def test_read_split_rows_labels_and_names(tmp_path):
    p = _manifest(tmp_path, "file,label,class_name,split\na.png,1,cat,test\nb.png,0,dog,train\nc.png,1,cat,train\n")
    ds = read_split(p, "train")
    assert [f.rsplit("/", 1)[1] for f in ds.files] == ["b.png", "c.png"]
    assert ds.labels.tolist() == [0, 1] and ds.class_names == ["dog", "cat"] and len(ds) == 2
    assert len(read_split(tmp_path)) == 3  # a folder holding manifest.csv, every split


@pytest.mark.parametrize("body, match", [
    ("a.png,x,cat,test\n", "not an integer"),
    ("a.png,1,cat,test\n", "0..C-1"),
    ("a.png,0,cat,test\nb.png,0,dog,test\n", "names both"),
    ("a.png,-1,cat,test\n", "negative"),
    (",0,cat,test\n", "empty 'file'"),
    ("a.png,0,cat,train\n", "no rows with split 'test'"),
])
def test_read_split_one_line_errors(tmp_path, body, match):
    p = _manifest(tmp_path, "file,label,class_name,split\n" + body)
    with pytest.raises(DatasetError, match=match):
        read_split(p, "test")


def test_read_split_refuses_latin1_and_wrong_columns(tmp_path):
    p = _manifest(tmp_path, "file,label,class_name,split\nä.png,0,café,test\n", encoding="latin-1")
    with pytest.raises(DatasetError, match="not UTF-8"):
        read_split(p, "test")
    p = _manifest(tmp_path, "image,caption\na.png,x\n")
    with pytest.raises(DatasetError, match="missing"):
        read_split(p)
    with pytest.raises(FileNotFoundError):
        read_split(tmp_path / "nope.csv")


class _FakeEncoder:
    """Deterministic 'encoder' that counts how many images it really encoded."""

    fingerprint, dim, key_dim = "fake-v1", 4, 3

    def __init__(self):
        self.calls = 0

    def encode_images(self, files, batch_size=64, with_keys=False, progress=False):
        self.calls += len(files)
        rng = np.random.default_rng([len(f) for f in files])
        img = rng.normal(size=(len(files), self.dim)).astype(np.float32)
        keys = rng.normal(size=(len(files), self.key_dim)).astype(np.float32)
        return img, keys


def test_embed_split_cache_hits_and_invalidates(tmp_path):
    for name in ("a.png", "bb.png"):
        (tmp_path / name).write_bytes(b"x")
    p = _manifest(tmp_path, "file,label,class_name,split\na.png,0,cat,test\nbb.png,0,cat,test\n")
    ds, enc, cache = read_split(p, "test"), _FakeEncoder(), tmp_path / "cache"
    img1, keys1 = embed_split(ds, enc, cache_dir=cache)
    img2, keys2 = embed_split(ds, enc, cache_dir=cache)
    assert enc.calls == 2 and np.array_equal(img1, img2) and np.array_equal(keys1, keys2)
    (tmp_path / "a.png").write_bytes(b"changed")  # size changes -> the cache entry no longer matches
    embed_split(ds, enc, cache_dir=cache)
    assert enc.calls == 4
    for f in cache.iterdir():  # a damaged entry is rebuilt, never trusted
        f.write_bytes(b"garbage")
    embed_split(ds, enc, cache_dir=cache)
    assert enc.calls == 6


def test_own_rows_finds_the_query_image_itself():
    class Mem:
        def __init__(self, vecs):
            self.v = vecs

        def search(self, q, modality, k, exact):
            s = q @ self.v.T
            r = np.argmax(s, axis=1)
            return r[:, None], s[np.arange(len(q)), r][:, None].astype(np.float32), np.ones((len(q), 1), bool)

    rng = np.random.default_rng(0)
    v = rng.normal(size=(6, 5))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    other = rng.normal(size=(1, 5))
    q = np.concatenate([v[[4, 1]], other / np.linalg.norm(other)])
    assert own_rows(Mem(v), q).tolist() == [4, 1, -1]
