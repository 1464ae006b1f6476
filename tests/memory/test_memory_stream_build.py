"""Builds that stream (issue 23 item 2): a sharded build reads the pairs file in row ranges, each task its own, and
shards precomputed arrays (memory-mapped, each task slicing its rows); the shards are the ones the item-list build
makes, file for file."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
from memory_testlib import FakeEncoder, make_pairs

from reco_ref import cli
from reco_ref.errors import MemoryFormatError
from reco_ref.memory import Memory, build_memory_from_arrays, open_memory, read_pairs
from reco_ref.memory import commands as mem_commands
from reco_ref.memory.sources import read_pairs_range, scan_pairs

distributed = pytest.importorskip("distributed")
from reco_ref.memory.dask_build import (build_sharded, build_sharded_arrays,  # noqa: E402
                                        build_sharded_pairs)


def _unit(a: np.ndarray) -> np.ndarray:
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)


def _files(root) -> dict:
    """{shard dir: {file: sha256}} of a sharded memory (every file its manifest records)."""
    spec = json.loads((root / "shards.json").read_text())
    return {s["dir"]: {f: r["sha256"] for f, r in json.loads((root / s["dir"] / "manifest.json").read_text())
                       ["files"].items()} for s in spec["shards"]}


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, processes=False, threads_per_worker=1,
                                  dashboard_address=None) as c, distributed.Client(c) as cl:
        yield cl


def test_scan_and_ranges_hold_only_what_they_return(tmp_path):
    pairs = make_pairs(tmp_path, 40)
    items = read_pairs(pairs, split="train")
    n, any_caption, head = scan_pairs(pairs, head=5, split="train")
    assert (n, any_caption, head) == (len(items), True, items[:5])
    assert read_pairs_range(pairs, 7, 19, split="train") == items[7:19]
    assert read_pairs_range(pairs, 25, 99, split="train") == items[25:]


def test_streamed_build_equals_the_item_list_build(tmp_path, client):
    """Same ranges, same items, same item ids: every shard file has the same sha256 as the list build's."""
    pairs = make_pairs(tmp_path / "src", 150, bad=(4, 120))
    items = read_pairs(pairs, split="train")
    kw = dict(n_shards=3, client=client, chunk_size=16)
    build_sharded(tmp_path / "list", items, "memory_testlib:fake32", **kw)
    sm = build_sharded_pairs(tmp_path / "stream", pairs, "memory_testlib:fake32", split="train", **kw)
    spec = {d: json.loads((tmp_path / d / "shards.json").read_text()) for d in ("list", "stream")}
    assert spec["list"] == spec["stream"] and len(spec["stream"]["shards"]) == 3
    assert _files(tmp_path / "list") == _files(tmp_path / "stream")
    assert sm.metadata(np.arange(len(sm))) == open_memory(tmp_path / "list").metadata(np.arange(len(sm)))
    # a resume keeps the finished shards and builds the missing one
    (tmp_path / "stream" / "shards.json").unlink()
    import shutil

    shutil.rmtree(tmp_path / "stream" / "shard_001")
    build_sharded_pairs(tmp_path / "stream", pairs, "memory_testlib:fake32", split="train", resume=True, **kw)
    assert _files(tmp_path / "list") == _files(tmp_path / "stream")


def test_cli_sharded_build_never_reads_the_item_list_here(tmp_path, monkeypatch):
    """``build-memory --shards`` on the client: one scan (no list), ranges read by the tasks; LocalCluster of
    processes by default."""
    assert inspect.signature(build_sharded).parameters["processes"].default is True
    assert inspect.signature(build_sharded_arrays).parameters["processes"].default is True

    def refuse(*a, **k):
        raise AssertionError("the client read the whole item list")

    monkeypatch.setattr(mem_commands, "read_pairs", refuse)
    pairs = make_pairs(tmp_path / "src", 70, bad=(3,))
    rc = cli.main(["build-memory", "--pairs", str(pairs), "--model", "memory_testlib:fake32", "--chunk-size", "16",
                   "--no-progress", "--out", str(tmp_path / "sh"), "--shards", "2"])
    assert rc == 0
    monkeypatch.undo()
    single = tmp_path / "one"
    assert cli.main(["build-memory", "--pairs", str(pairs), "--model", "memory_testlib:fake32", "--chunk-size", "16",
                     "--no-progress", "--out", str(single)]) == 0
    sh, one = open_memory(tmp_path / "sh"), Memory.open(single)
    assert len(sh.shards) == 2 and len(sh) == len(one) == 69
    np.testing.assert_array_equal(np.asarray(sh.text), np.asarray(one.text))
    assert sh.metadata(np.arange(69)) == one.metadata(np.arange(69))


def test_sharded_arrays_equal_the_single_build(tmp_path, client):
    rng = np.random.default_rng(3)
    n, d, dk = 230, 24, 8
    image, text, keys = _unit(rng.standard_normal((n, d))), _unit(rng.standard_normal((n, d))), \
        _unit(rng.standard_normal((n, dk)))
    text[100:110] = text[0]
    for name, a in (("I", image), ("T", text), ("K", keys)):
        np.save(tmp_path / f"{name}.npy", a)
    enc = FakeEncoder(d, key_dim=dk)
    ident = dict(name=enc.name, fingerprint=enc.fingerprint)
    build_memory_from_arrays(tmp_path / "one", image, text, keys=keys, num_threads=1, progress=False,
                             dtype="float16", **ident)
    sm = build_sharded_arrays(tmp_path / "sh", tmp_path / "I.npy", tmp_path / "T.npy", keys=tmp_path / "K.npy",
                              n_shards=4, client=client, dtype="float16", **ident)
    one = Memory.open(tmp_path / "one")
    assert [len(m) for m in sm.shards] == [58, 58, 58, 56] and sm.dtype == "float16"
    for name in ("image", "text", "image_keys"):
        np.testing.assert_array_equal(np.asarray(getattr(sm, name)), getattr(one, name))
    every = np.arange(n)
    assert sm.metadata(every) == one.metadata(every)  # sources array:<global row>, global item ids
    q = np.asarray(one.text[::9], np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    for a, b in zip(sm.search(q, "text", k=15, exact=True), one.search(q, "text", k=15, exact=True)):
        np.testing.assert_array_equal(a, b)
    # metadata from a pairs file, read per range; a wrong row count is refused before any task runs
    pairs = make_pairs(tmp_path / "meta", n)
    sm2 = build_sharded_arrays(tmp_path / "sh2", tmp_path / "I.npy", tmp_path / "T.npy", pairs=pairs, n_shards=3,
                               client=client, **ident)
    assert [r["source"] for r in sm2.metadata(every)] == [it["source"] for it in read_pairs(pairs)]
    with pytest.raises(MemoryFormatError, match="rows of metadata"):
        build_sharded_arrays(tmp_path / "sh3", tmp_path / "I.npy", tmp_path / "T.npy",
                             pairs=make_pairs(tmp_path / "short", n - 1), client=client, **ident)


def test_cli_shards_precomputed_arrays(tmp_path):
    rng = np.random.default_rng(5)
    image, text = _unit(rng.standard_normal((90, 16))), _unit(rng.standard_normal((90, 16)))
    np.save(tmp_path / "I.npy", image)
    np.save(tmp_path / "T.npy", text)
    common = ["--image-embeddings", str(tmp_path / "I.npy"), "--text-embeddings", str(tmp_path / "T.npy"),
              "--encoder-name", "arr", "--encoder-fingerprint", "ab" * 32, "--no-progress"]
    assert cli.main(["build-memory", *common, "--out", str(tmp_path / "sh"), "--shards", "3"]) == 0
    sh = open_memory(tmp_path / "sh")
    assert len(sh.shards) == 3 and len(sh) == 90
    np.testing.assert_array_equal(np.asarray(sh.image), image)
