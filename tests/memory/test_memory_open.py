"""Memory.open validates everything: manifest fields, file hashes/sizes, arrays, SQLite, encoder fingerprint."""

from __future__ import annotations

import json
import shutil
import sqlite3

import numpy as np
import pytest
from memory_testlib import FakeEncoder, make_pairs

from reco_ref.errors import MemoryFormatError
from reco_ref.memory import Memory, build_memory, read_pairs
from reco_ref.memory import format as fmt


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("open")
    items = read_pairs(make_pairs(d / "src", 41, bad=(17,)))
    build_memory(d / "mem", items, FakeEncoder(32), chunk_size=16, progress=False)
    return d / "mem"


@pytest.fixture
def mem_copy(built, tmp_path):
    dst = tmp_path / "mem"
    shutil.copytree(built, dst)
    return dst


def _edit_manifest(root, fn):
    p = root / "manifest.json"
    m = json.loads(p.read_text())
    fn(m)
    p.write_text(json.dumps(m))


def test_open_ok_and_encoder_checks(built):
    mem = Memory.open(built, encoder=FakeEncoder(32))
    assert len(mem) == 40 and mem.dim == 32 and isinstance(mem.image, np.memmap)
    with pytest.raises(MemoryFormatError, match="fingerprint .* in use has fingerprint"):
        Memory.open(built, encoder=FakeEncoder(32, salt="retrained"))
    assert len(Memory.open(built, encoder=FakeEncoder(32, salt="x"), allow_fingerprint_mismatch=True)) == 40
    with pytest.raises(MemoryFormatError, match="embed_dim is 32 but the encoder in use has dim 64"):
        Memory.open(built, encoder=FakeEncoder(64))
    with pytest.raises(MemoryFormatError, match="fingerprint"):
        Memory.open(built, fingerprint="0" * 64)
    with pytest.raises(MemoryFormatError, match="fingerprint"):
        Memory.open(built).check_encoder(FakeEncoder(32, salt="y"))


@pytest.mark.parametrize("name", ["image.npy", "text.npy", "meta.sqlite", "image.hnsw", "text.hnsw", "failures.jsonl"])
def test_flipped_byte_is_caught(mem_copy, name):
    p = mem_copy / name
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(MemoryFormatError, match=f"{name}: sha256"):
        Memory.open(mem_copy)
    if name != "failures.jsonl":
        # SQLite itself notices a flipped page; the binding samples every row of a 40-row memory, and the
        # middle byte of an index lies in a stored vector, compared with the array's row at open
        with pytest.raises(MemoryFormatError, match=name):
            Memory.open(mem_copy, verify="size")
        return
    mem = Memory.open(mem_copy, verify="size")  # sizes alone cannot see it (documented) ...
    with pytest.raises(MemoryFormatError, match="sha256"):
        mem.verify()  # ... the full check later can


def test_truncated_and_missing_files(mem_copy):
    p = mem_copy / "text.npy"
    p.write_bytes(p.read_bytes()[:-8])
    with pytest.raises(MemoryFormatError, match="text.npy: size .* manifest says"):
        Memory.open(mem_copy, verify="size")
    (mem_copy / "image.hnsw").unlink()
    with pytest.raises(MemoryFormatError, match="image.hnsw: file listed in manifest.json is missing"):
        Memory.open(mem_copy, verify=False)


@pytest.mark.parametrize("edit, match", [
    (lambda m: m.update(format_version=99), "format_version 99 is not supported"),
    (lambda m: m.update(dtype="int8"), "dtype 'int8' not supported"),
    (lambda m: m.pop("encoder"), "field 'encoder' missing"),
    (lambda m: m["counts"].update(failed=3), "counts do not add up"),
    (lambda m: m["hnsw"]["text"].update(space="l2"), "space is 'l2', expected 'ip'"),
    (lambda m: m["hnsw"]["image"].update(count=39), "hnsw.image.count 39 != counts.rows 40"),
    (lambda m: m["files"].pop("meta.sqlite"), "files.meta.sqlite missing"),
    (lambda m: m.update(embed_dim=16), "hnsw.image.dim 32 != expected 16"),
])
def test_manifest_fields(mem_copy, edit, match):
    _edit_manifest(mem_copy, edit)
    with pytest.raises(MemoryFormatError, match=match):
        Memory.open(mem_copy)


def test_array_shape_and_dtype_checked_against_manifest(mem_copy):
    # a consistent-looking manifest whose array disagrees: rewrite text.npy as float16, update its hash
    a = np.load(mem_copy / "text.npy")
    np.save(mem_copy / "text.npy", a.astype(np.float16))
    _edit_manifest(mem_copy, lambda m: m["files"].update({"text.npy": fmt.file_record(mem_copy / "text.npy")}))
    with pytest.raises(MemoryFormatError, match="text.npy: dtype float16, manifest says float32"):
        Memory.open(mem_copy)


def test_meta_rows_checked(mem_copy):
    con = sqlite3.connect(mem_copy / "meta.sqlite")
    con.execute("DELETE FROM rows WHERE row = 7")
    con.commit()
    con.close()
    _edit_manifest(mem_copy, lambda m: m["files"].update({"meta.sqlite": fmt.file_record(mem_copy / "meta.sqlite")}))
    with pytest.raises(MemoryFormatError, match="holds 39 rows"):
        Memory.open(mem_copy)


def test_index_params_checked_at_open(mem_copy):
    _edit_manifest(mem_copy, lambda m: m["hnsw"]["text"].update(M=8))
    with pytest.raises(MemoryFormatError, match="text.hnsw: index M is 16, manifest says 8"):
        Memory.open(mem_copy)


def test_index_header_checked_at_open(mem_copy):
    p = mem_copy / "image.hnsw"
    data = bytearray(p.read_bytes())
    data[72:80] = (300).to_bytes(8, "little")  # M field of the header (after 6 u64, 2 u32, maxM, maxM0)
    p.write_bytes(bytes(data))
    with pytest.raises(MemoryFormatError, match="image.hnsw: not an hnswlib index header"):
        Memory.open(mem_copy, verify="size")


def test_hnsw_falls_back_to_exact_when_graph_walk_fails():
    from reco_ref.memory.index import HnswIndex, exact_search

    class Stuck:  # an hnswlib index whose walk never finds k points
        dim = 4

        def get_current_count(self):
            return 3

        def set_ef(self, ef):
            pass

        def knn_query(self, q, k, num_threads):
            raise RuntimeError("Cannot return the results in a contiguous 2D array")

    x = np.eye(4, dtype=np.float32)[:3]
    q = np.eye(4, dtype=np.float32)[:2]
    rows, scores = HnswIndex(Stuck(), x).search(q, 3)
    want = exact_search(x, q, 3)
    np.testing.assert_array_equal(rows, want[0])
    from reco_ref.errors import SearchError

    with pytest.raises(SearchError, match="could not return 3 neighbours"):
        HnswIndex(Stuck()).search(q, 3)


def test_not_a_memory(tmp_path):
    with pytest.raises(MemoryFormatError, match="no such memory directory"):
        Memory.open(tmp_path / "nope")
    with pytest.raises(MemoryFormatError, match="manifest.json missing"):
        Memory.open(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(MemoryFormatError, match="not valid JSON"):
        Memory.open(tmp_path)
