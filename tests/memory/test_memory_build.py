"""Building memories: sources, failures, determinism, in-process resume, add, arrays, the format on disk."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest
from memory_testlib import FakeEncoder, file_digest, make_pairs

from reco_ref.errors import MemoryFormatError, ShapeError
from reco_ref.memory import (Memory, add_arrays_to_memory, add_to_memory, build_memory, build_memory_from_arrays,
                             read_pairs)
from reco_ref.memory import format as fmt


def _build(out, items, enc=None, **kw):
    kw.setdefault("chunk_size", 16)
    kw.setdefault("progress", False)
    return build_memory(out, items, enc or FakeEncoder(32), **kw)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return make_pairs(tmp_path_factory.mktemp("src"), 90, bad=(5, 41))


def test_format_on_disk(tmp_path, pairs):
    items = read_pairs(pairs)
    m = _build(tmp_path / "mem", items)
    root = tmp_path / "mem"
    names = sorted(p.name for p in root.iterdir() if p.name not in (".lock", ".commit.lock"))  # advisory locks
    assert names == sorted(["manifest.json", "image.npy", "text.npy", "meta.sqlite", "image.hnsw", "text.hnsw",
                            "failures.jsonl"])
    assert m["format_version"] == fmt.FORMAT_VERSION and m["embed_dim"] == 32 and m["dtype"] == "float32"
    assert m["counts"] == {"rows": 88, "items": 90, "failed": 2}
    assert m["hnsw"]["image"]["M"] == 16 and m["hnsw"]["image"]["ef_construction"] == 200
    assert m["hnsw"]["text"]["space"] == "ip"
    for name, rec in m["files"].items():
        assert rec["sha256"] == file_digest(root / name)
    img = np.load(root / "image.npy", mmap_mode="r")
    assert img.shape == (88, 32) and img.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1, atol=1e-5)
    con = sqlite3.connect(root / "meta.sqlite")
    rows = con.execute("SELECT row, item, caption, source, label, split FROM rows ORDER BY row").fetchall()
    con.close()
    assert [r[0] for r in rows] == list(range(88))
    assert [r[1] for r in rows] == [i for i in range(90) if i not in (5, 41)]
    assert rows[5][1:] == (6, "a photo of thing 6 number 6", "img/00006.jpg", 6, "train")
    # the rows are the encoder's embeddings of those items, in item order
    enc = FakeEncoder(32)
    np.testing.assert_array_equal(img[5], enc.encode_images([items[6]["image"]])[0])


def test_failures_are_logged_and_counted(tmp_path, pairs):
    items = read_pairs(pairs)
    items[10] = dict(items[10], caption=None)  # a pair without a caption is a failure too, not a silent drop
    _build(tmp_path / "mem", items)
    mem = Memory.open(tmp_path / "mem")
    fails = mem.failures()
    assert [f["item"] for f in fails] == [5, 10, 41]
    assert "decode" in fails[0]["error"] and "caption" in fails[1]["error"]
    assert fails[2]["source"] == "img/00041.jpg"
    assert len(mem) + len(fails) == mem.manifest["counts"]["items"] == 90


def test_deterministic_and_chunk_size_independent_for_rows(tmp_path, pairs):
    items = read_pairs(pairs)
    _build(tmp_path / "a", items)
    _build(tmp_path / "b", items)
    _build(tmp_path / "c", items, chunk_size=7)
    for f in ("image.npy", "text.npy", "meta.sqlite", "failures.jsonl"):
        assert file_digest(tmp_path / "a" / f) == file_digest(tmp_path / "b" / f)
    np.testing.assert_array_equal(np.load(tmp_path / "a/image.npy"), np.load(tmp_path / "c/image.npy"))


class _Boom(Exception):
    pass


def test_in_process_resume_after_exception(tmp_path, pairs, monkeypatch):
    items = read_pairs(pairs)
    _build(tmp_path / "ref", items)
    enc = FakeEncoder(32)
    real = enc.encode_images
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise _Boom()
        return real(*a, **k)

    monkeypatch.setattr(enc, "encode_images", flaky)
    with pytest.raises(_Boom):
        _build(tmp_path / "mem", items, enc)
    assert len(list((tmp_path / "mem/.build/chunks").glob("chunk_*.npz"))) == 3
    with pytest.raises(MemoryFormatError, match="incomplete.*3 of 6 chunks.*resume"):
        Memory.open(tmp_path / "mem")
    with pytest.raises(MemoryFormatError, match="--resume"):
        _build(tmp_path / "mem", items, enc)  # not without resume=True
    n_before = calls["n"]
    _build(tmp_path / "mem", items, enc, resume=True)
    assert calls["n"] - n_before == 3  # only the 3 missing chunks were encoded
    for f in ("image.npy", "text.npy", "meta.sqlite", "failures.jsonl"):
        assert file_digest(tmp_path / "mem" / f) == file_digest(tmp_path / "ref" / f)
    assert not (tmp_path / "mem/.build").exists()


def test_resume_refuses_changed_inputs(tmp_path, pairs):
    items = read_pairs(pairs)
    enc = FakeEncoder(32)
    enc.encode_images = lambda *a, **k: (_ for _ in ()).throw(_Boom())
    with pytest.raises(_Boom):
        _build(tmp_path / "mem", items, enc)
    with pytest.raises(MemoryFormatError, match="n_items differs"):
        _build(tmp_path / "mem", items[:-1], resume=True)
    changed = items[:3] + [dict(items[3], caption="another caption")] + items[4:]
    with pytest.raises(MemoryFormatError, match="items_sha256 differs"):
        _build(tmp_path / "mem", changed, resume=True)
    with pytest.raises(MemoryFormatError, match="chunk_size differs"):
        _build(tmp_path / "mem", items, resume=True, chunk_size=8)
    with pytest.raises(MemoryFormatError, match="encoder differs"):
        _build(tmp_path / "mem", items, FakeEncoder(32, salt="other"), resume=True)
    _build(tmp_path / "mem", items, resume=True)
    assert len(Memory.open(tmp_path / "mem")) == 88
    with pytest.raises(MemoryFormatError, match="already exists"):
        _build(tmp_path / "mem", items)


def test_add_equals_building_all_at_once(tmp_path, pairs):
    items = read_pairs(pairs)
    _build(tmp_path / "all", items)
    _build(tmp_path / "inc", items[:50])
    add_to_memory(tmp_path / "inc", items[50:], FakeEncoder(32), chunk_size=16, progress=False)
    a, b = Memory.open(tmp_path / "all"), Memory.open(tmp_path / "inc")
    assert len(a) == len(b) == 88
    np.testing.assert_array_equal(np.asarray(a.image), np.asarray(b.image))
    np.testing.assert_array_equal(np.asarray(a.text), np.asarray(b.text))
    assert a.manifest["counts"] == b.manifest["counts"]
    assert [f["item"] for f in b.failures()] == [5, 41]
    assert a.metadata(range(88)) == b.metadata(range(88))
    assert [h["kind"] for h in b.manifest["history"]] == ["build", "add"]
    # the grown HNSW index finds every row, including the added ones
    q = np.asarray(b.image)
    rows, scores, valid = b.search(q, "image", k=1, ef=100)
    np.testing.assert_array_equal(rows[:, 0], np.arange(88))
    # a second add --resume of the same items is recognised as already done (nothing duplicated)
    add_to_memory(tmp_path / "inc", items[50:], FakeEncoder(32), chunk_size=16, progress=False, resume=True)
    assert len(Memory.open(tmp_path / "inc")) == 88


def test_add_refuses_other_encoder(tmp_path, pairs):
    items = read_pairs(pairs)
    _build(tmp_path / "m", items[:20])
    with pytest.raises(MemoryFormatError, match="cannot add with encoder"):
        add_to_memory(tmp_path / "m", items[20:], FakeEncoder(32, salt="x"), progress=False)


def test_interrupted_add_leaves_memory_usable(tmp_path, pairs):
    items = read_pairs(pairs)
    _build(tmp_path / "m", items[:40])
    before = file_digest(tmp_path / "m/image.npy")
    enc = FakeEncoder(32)
    real = enc.encode_images
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise _Boom()
        return real(*a, **k)

    enc.encode_images = flaky
    with pytest.raises(_Boom):
        add_to_memory(tmp_path / "m", items[40:], enc, chunk_size=16, progress=False)
    mem = Memory.open(tmp_path / "m")  # still the old, complete memory
    assert len(mem) == 39 and file_digest(tmp_path / "m/image.npy") == before
    add_to_memory(tmp_path / "m", items[40:], enc, chunk_size=16, progress=False, resume=True)
    assert len(Memory.open(tmp_path / "m")) == 88


def test_float16_and_keys(tmp_path, pairs):
    items = read_pairs(pairs)
    m = _build(tmp_path / "h", items, FakeEncoder(32, key_dim=16), dtype="float16")
    assert m["key_dim"] == 16 and m["hnsw"]["image"]["dim"] == 16 and m["hnsw"]["image"]["vectors"] == "image_keys.npy"
    mem = Memory.open(tmp_path / "h")
    assert mem.image.dtype == np.float16 and mem.image_keys.shape == (88, 16)
    keys = np.asarray(mem.image_keys, np.float32)
    rows, _, _ = mem.search(keys[:5], "image", k=1)
    np.testing.assert_array_equal(rows[:, 0], np.arange(5))
    from reco_ref.errors import SearchError

    with pytest.raises(SearchError, match=r"D=32 is the embedding dim.*search keys \(key_dim 16\).*encode_image_keys"):
        mem.search(np.asarray(mem.image[:2], np.float32), "image", k=1)
    # cross-modal search with an image embedding goes to the text index (dim 32): fine
    rows, _, valid = mem.search(np.asarray(mem.image[:2], np.float32), "text", k=3)
    assert valid.all()


def test_build_from_arrays_and_add_arrays(tmp_path, rng):
    x = rng.standard_normal((300, 24)).astype(np.float32)
    y = rng.standard_normal((300, 24)).astype(np.float32)
    xn, yn = x / np.linalg.norm(x, axis=1, keepdims=True), y / np.linalg.norm(y, axis=1, keepdims=True)
    with pytest.raises(ShapeError, match="L2 norm"):
        build_memory_from_arrays(tmp_path / "bad", x, y, name="e", fingerprint="f" * 64, progress=False)
    caps = [{"image": "", "caption": f"c{i}", "source": f"s{i}", "label": i % 3, "split": None, "tags": "a,b"}
            for i in range(200)]
    build_memory_from_arrays(tmp_path / "a", xn[:200], yn[:200], name="e", fingerprint="f" * 64, items=caps,
                             chunk_size=64, progress=False)
    add_arrays_to_memory(tmp_path / "a", x[200:], y[200:], name="e", fingerprint="f" * 64, normalize=True,
                         chunk_size=64, progress=False)
    mem = Memory.open(tmp_path / "a", fingerprint="f" * 64, embed_dim=24)
    assert len(mem) == 300
    np.testing.assert_allclose(np.asarray(mem.image), xn, atol=1e-6)
    meta = mem.metadata([3, 250])
    assert meta[0]["caption"] == "c3" and meta[0]["tags"] == "a,b" and meta[1]["source"] == "array:250"
    with pytest.raises(MemoryFormatError, match="fingerprint"):
        add_arrays_to_memory(tmp_path / "a", xn[:5], yn[:5], name="e", fingerprint="0" * 64, progress=False)


def test_sources(tmp_path):
    from reco_ref.memory import read_pairs_jsonl

    folder = tmp_path / "f"
    (folder / "sub").mkdir(parents=True)
    for i, name in enumerate(["b.jpg", "a.png", "sub/c.jpg"]):
        (folder / name).write_bytes(b"OK" + bytes([i]))
    (folder / "a.txt").write_text("an a\n")
    (folder / "sub/c.txt").write_text("a c")
    items = read_pairs(folder)
    assert [(it["source"], it["caption"]) for it in items] == [("a.png", "an a"), ("b.jpg", None),
                                                               ("sub/c.jpg", "a c")]
    _build(tmp_path / "m", items)
    mem = Memory.open(tmp_path / "m")
    assert len(mem) == 2 and mem.failures()[0]["source"] == "b.jpg"

    man = tmp_path / "d" / "manifest.csv"
    man.parent.mkdir()
    man.write_text("file,label,class_name,split\nimages/1.jpg,3,fire lily,train\nimages/2.jpg,4,rose,test\n")
    items = read_pairs(man, split="train", caption_template="a photo of a {class_name}, a flower.")
    assert items == [{"image": str(man.parent.resolve() / "images/1.jpg"), "caption": "a photo of a fire lily, a flower.",
                      "source": "images/1.jpg", "label": 3, "split": "train", "tags": None}]
    assert read_pairs(man)[1]["caption"] == "a photo of a rose."
    with pytest.raises(MemoryFormatError, match="no rows with split 'valid'"):
        read_pairs(man, split="valid")
    with pytest.raises(MemoryFormatError, match="names field"):
        read_pairs(man, caption_template="{species}")
    j = tmp_path / "p.jsonl"
    j.write_text(json.dumps({"image": "x.jpg", "caption": "x", "tags": ["t1", "t2"]}) + "\n\n")
    assert read_pairs_jsonl(j)[0]["tags"] == "t1,t2"
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(MemoryFormatError, match="neither a pairs CSV"):
        read_pairs(bad)


def test_concurrent_writers_are_refused(tmp_path, pairs):
    from reco_ref.memory.build import _exclusive

    items = read_pairs(pairs)
    with _exclusive(tmp_path / "m"):
        with pytest.raises(MemoryFormatError, match="another build or add is writing"):
            _build(tmp_path / "m", items)
    _build(tmp_path / "m", items)  # released


def test_memory_where_every_item_failed_is_valid_and_extendable(tmp_path):
    items = read_pairs(make_pairs(tmp_path / "s", 4, bad=(0, 1, 2, 3)))
    _build(tmp_path / "m", items)
    mem = Memory.open(tmp_path / "m")
    assert len(mem) == 0 and len(mem.failures()) == 4
    rows, scores, valid = mem.search(np.full((2, 32), 32 ** -0.5, np.float32), "text", k=3)
    assert (rows == -1).all() and not valid.any() and np.isneginf(scores).all()
    add_to_memory(tmp_path / "m", read_pairs(make_pairs(tmp_path / "s2", 3)), FakeEncoder(32), progress=False)
    assert len(Memory.open(tmp_path / "m")) == 3
