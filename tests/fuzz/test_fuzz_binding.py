"""A memory's arrays, indexes and metadata are bound to it (issue 20, class 3: exit 0 with a wrong answer).

Before the binding, the default fast open (``verify="size"``, used by memory-search, query and eval)
checked file sizes only, so a ``text.npy`` + ``text.hnsw`` pair copied from another memory of the same
row count (or rows permuted with the index rebuilt to match) opened cleanly and answered with the other
memory's vectors under this memory's captions, at score 1.0.  The manifest now holds ``binding``: a
per-memory random id and, for each array and ``meta.sqlite``, a sha256 of a deterministic sample of
rows (keyed by that id); the fast open recomputes them and compares the index's stored vectors at the
same rows with the arrays.
"""

from __future__ import annotations

import json
import shutil
import sqlite3

import numpy as np
import pytest
from fuzz_lib import check_cli, record, run_cli

from reco_ref.errors import MemoryFormatError
from reco_ref.memory import Memory, add_to_memory, build_memory, read_pairs
from reco_ref.memory import format as fmt
from reco_ref.memory.index import hnsw_build

CLS = "memory binding: files copied between memories / rows permuted"


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """Two memories of 24 rows each with different pairs (A, B), and a keyed pair of the same shape (KA, KB)."""
    from memory_testlib import FakeEncoder, make_pairs

    d = tmp_path_factory.mktemp("twins")
    out = {}
    for name, start, key_dim in (("A", 0, None), ("B", 100, None), ("KA", 0, 16), ("KB", 100, 16)):
        pairs = make_pairs(d / f"src{name}", 24, start=start)
        build_memory(d / name, read_pairs(pairs), FakeEncoder(32, key_dim=key_dim), chunk_size=10, M=4,
                     ef_construction=20, progress=False)
        out[name] = d / name
    out["pairsA"] = d / "srcA" / "pairs.csv"
    return out


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _refused(case, verify, *must):
    with pytest.raises(MemoryFormatError) as e:
        Memory.open(case, verify=verify)
    msg = str(e.value)
    assert "\n" not in msg and all(m in msg for m in must), msg
    record(CLS, "error")
    return msg


@pytest.mark.parametrize("files", [("text.npy", "text.hnsw"), ("image.npy", "image.hnsw"),
                                   ("image_keys.npy", "image.hnsw")])
def test_pair_copied_from_another_memory_is_refused(twins, tmp_path, files):
    src, dst = ("KB", "KA") if files[0] == "image_keys.npy" else ("B", "A")
    case = _copy(twins[dst], tmp_path / "case")
    for f in files:
        assert (twins[src] / f).stat().st_size == (case / f).stat().st_size  # the size check cannot see it
        shutil.copyfile(twins[src] / f, case / f)
    _refused(case, "size", files[0], "binding")
    _refused(case, True, "sha256")  # full verification names the first changed file it hashes


def test_copied_pair_refused_by_memory_search(twins, tmp_path):
    """The CLI's fast path (memory-search defaults to verify="size") stops with one line, exit 1."""
    case = _copy(twins["A"], tmp_path / "case")
    for f in ("text.npy", "text.hnsw"):
        shutil.copyfile(twins["B"] / f, case / f)
    p = run_cli("memory-search", case, "--text", "a photo of thing 1 number 101", "--model", "memory_testlib:fake32")
    check_cli(p, CLS, must_fail=True)
    assert "text.npy" in p.stderr and "binding" in p.stderr, p.stderr


@pytest.mark.parametrize("modality", ["text", "image"])
def test_permuted_rows_with_rebuilt_index_are_refused(twins, tmp_path, modality):
    case = _copy(twins["A"], tmp_path / "case")
    m = json.loads((case / "manifest.json").read_text())
    a = np.load(case / f"{modality}.npy")
    perm = np.random.default_rng(0).permutation(len(a))
    np.save(case / f"{modality}.npy", a[perm])
    h = m["hnsw"][modality]
    index = hnsw_build(a[perm], M=h["M"], ef_construction=h["ef_construction"], seed=h["seed"])
    index.save_index(str(case / f"{modality}.hnsw"))
    for f in (f"{modality}.npy", f"{modality}.hnsw"):  # same sizes: only the rows moved
        assert (case / f).stat().st_size == m["files"][f]["bytes"], f
    _refused(case, "size", f"{modality}.npy", "binding")


def test_caption_changed_in_place_is_refused(twins, tmp_path):
    case = _copy(twins["A"], tmp_path / "case")
    size = (case / "meta.sqlite").stat().st_size
    con = sqlite3.connect(case / "meta.sqlite")
    old = con.execute("SELECT caption FROM rows WHERE row = 3").fetchone()[0]
    con.execute("UPDATE rows SET caption = ? WHERE row = 3", ("X" * len(old),))
    con.commit()
    con.close()
    assert (case / "meta.sqlite").stat().st_size == size
    _refused(case, "size", "meta.sqlite", "binding")


def test_index_alone_from_another_memory_is_refused_at_open(twins, tmp_path):
    """The sampled vectors of each index are compared with the arrays at open, not only at the first search."""
    case = _copy(twins["A"], tmp_path / "case")
    shutil.copyfile(twins["B"] / "text.hnsw", case / "text.hnsw")
    _refused(case, "size", "text.hnsw", "differ")


def test_memory_without_binding_opens_as_before(twins, tmp_path):
    """The stated rule for memories written before the binding: opened without it (no digest to compare);
    full verification (sha256 of every file) still detects a copied file."""
    case = _copy(twins["A"], tmp_path / "case")
    m = json.loads((case / "manifest.json").read_text())
    del m["binding"]
    (case / "manifest.json").write_text(json.dumps(m))
    for verify in ("size", True):
        assert len(Memory.open(case, verify=verify)) == 24
    for f in ("text.npy", "text.hnsw"):
        shutil.copyfile(twins["B"] / f, case / f)
    assert len(Memory.open(case, verify="size")) == 24  # the documented gap of old memories
    _refused(case, True, "sha256")


@pytest.mark.parametrize("bad", [
    [], {"version": 2}, {"memory_id": "zz"}, {"sample": 0}, {"sample": True}, {"edge": -1},
    {"digests": {"text.npy": "0" * 64}}, {"digests": None}, {"digests_extra": "../x"},
])
def test_malformed_binding_field_is_refused(twins, tmp_path, bad):
    case = _copy(twins["A"], tmp_path / "case")
    m = json.loads((case / "manifest.json").read_text())
    if isinstance(bad, dict) and "digests_extra" in bad:
        m["binding"]["digests"]["../x"] = "0" * 64
    elif isinstance(bad, dict):
        m["binding"].update(bad)
    else:
        m["binding"] = bad
    (case / "manifest.json").write_text(json.dumps(m))
    _refused(case, "size", "binding")


def test_add_keeps_the_memory_id_and_rebinds(twins, tmp_path):
    from memory_testlib import FakeEncoder, make_pairs

    case = _copy(twins["A"], tmp_path / "case")
    before = json.loads((case / "manifest.json").read_text())["binding"]
    add_to_memory(case, read_pairs(make_pairs(tmp_path / "more", 5, start=500)), FakeEncoder(32), progress=False)
    after = json.loads((case / "manifest.json").read_text())["binding"]
    assert after["memory_id"] == before["memory_id"] and after["digests"] != before["digests"]
    assert len(Memory.open(case, verify="size")) == 29


def test_two_builds_of_the_same_input_get_different_ids(twins, tmp_path):
    from memory_testlib import FakeEncoder

    build_memory(tmp_path / "again", read_pairs(twins["pairsA"]), FakeEncoder(32), chunk_size=10, M=4,
                 ef_construction=20, progress=False)
    a = json.loads((twins["A"] / "manifest.json").read_text())["binding"]
    b = json.loads((tmp_path / "again" / "manifest.json").read_text())["binding"]
    assert a["memory_id"] != b["memory_id"] and a["digests"] != b["digests"]
    assert (twins["A"] / "text.npy").read_bytes() == (tmp_path / "again" / "text.npy").read_bytes()


def test_sampled_rows_are_bounded_and_deterministic():
    assert fmt.binding_rows(0).tolist() == []
    assert fmt.binding_rows(37).tolist() == list(range(37))
    n = 10**8
    r = fmt.binding_rows(n)
    assert len(r) <= fmt.BINDING_SAMPLE + 2 * fmt.BINDING_EDGE and r[0] == 0 and r[-1] == n - 1
    assert (np.diff(r) > 0).all() and np.array_equal(r, fmt.binding_rows(n))
    assert set(range(fmt.BINDING_EDGE)) <= set(r.tolist()) and n - fmt.BINDING_EDGE in set(r.tolist())


def test_memory_in_a_folder_named_with_uri_characters(twins, tmp_path):
    """The metadata database is opened through a file URI: '#', '?' and '%' in a folder name must not cut it
    (the binding reads meta.sqlite at build and at every open; memory-add reads it for duplicates)."""
    from memory_testlib import FakeEncoder, make_pairs

    out = tmp_path / "a#b?c%20d" / "mem"
    build_memory(out, read_pairs(twins["pairsA"]), FakeEncoder(32), chunk_size=10, M=4, ef_construction=20,
                 progress=False)
    add_to_memory(out, read_pairs(make_pairs(tmp_path / "more", 3, start=700)), FakeEncoder(32), progress=False)
    mem = Memory.open(out, verify="size")
    assert len(mem) == 27 and mem.metadata([26])[0]["caption"].endswith("number 702")
