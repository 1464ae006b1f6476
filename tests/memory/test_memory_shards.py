"""Shards: a 2-worker Dask LocalCluster build equals the single-machine build; sharded search merges exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
from memory_testlib import FakeEncoder, make_pairs

from reco_ref.errors import MemoryFormatError
from reco_ref.memory import (Memory, ShardedMemory, build_memory, open_memory, read_pairs, retrieve,
                             write_shards_manifest)
from reco_ref.memory.dask_build import build_sharded, shard_ranges

pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    items = read_pairs(make_pairs(d / "src", 150, bad=(4, 120)))
    build_memory(d / "single", items, FakeEncoder(32), chunk_size=16, progress=False)
    sharded = build_sharded(d / "sharded", items, "memory_testlib:fake32", n_shards=2, n_workers=2,
                            processes=False, chunk_size=16)
    return d, items, Memory.open(d / "single"), sharded


def test_shard_ranges():
    assert shard_ranges(150, 2, 16) == [(0, 80), (80, 150)]
    assert shard_ranges(10, 4, 16) == [(0, 10)]
    assert shard_ranges(64, 3, 16) == [(0, 32), (32, 64)]
    with pytest.raises(MemoryFormatError):
        shard_ranges(10, 0, 16)


def test_dask_build_equals_single_machine(built):
    d, items, single, sharded = built
    assert isinstance(sharded, ShardedMemory) and len(sharded.shards) == 2
    spec = json.loads((d / "sharded/shards.json").read_text())
    assert [s["offset"] for s in spec["shards"]] == [0, 79] and spec["counts"] == {"rows": 148, "items": 150,
                                                                                    "failed": 2}
    reopened = open_memory(d / "sharded")  # the one opener dispatches on the directory kind
    with pytest.raises(MemoryFormatError, match="sharded memory.*open_memory"):
        Memory.open(d / "sharded")
    assert isinstance(reopened, ShardedMemory) and len(reopened) == len(single) == 148
    every = np.arange(148)
    for modality in ("image", "text"):
        np.testing.assert_array_equal(sharded.embeddings(modality, every), np.asarray(getattr(single, modality)))
    assert sharded.metadata(every) == single.metadata(every)  # global rows, global item ids
    assert sorted(f["item"] for f in sharded.failures()) == [4, 120]


@pytest.mark.parametrize("modality", ["image", "text"])
def test_sharded_exact_search_equals_single(built, modality):
    _, _, single, sharded = built
    q = np.asarray(getattr(single, modality)[::7], np.float32)
    self_rows = np.arange(0, 148, 7)
    for kw in (dict(k=10), dict(k=10, exclude=self_rows), dict(k=200, exclude=self_rows, dup_threshold=True)):
        a = single.search(q, modality, exact=True, **kw)
        b = sharded.search(q, modality, exact=True, **kw)
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
    # HNSW over shards: same API, near-exact on this small set
    rows_h, _, _ = sharded.search(q, modality, k=10, ef=100)
    rows_e, _, _ = single.search(q, modality, k=10, exact=True)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows_h, rows_e)])
    assert recall >= 0.95
    emb, valid, rows = retrieve(sharded, q, modality, k=5, exact=True, exclude=self_rows)
    emb1, valid1, rows1 = retrieve(single, q, modality, k=5, exact=True, exclude=self_rows)
    np.testing.assert_array_equal(emb, emb1)
    np.testing.assert_array_equal(rows, rows1)


def test_shards_must_agree(built, tmp_path):
    d, items, _, _ = built
    build_memory(tmp_path / "a", items[:20], FakeEncoder(32), chunk_size=16, progress=False)
    build_memory(tmp_path / "b", items[20:40], FakeEncoder(32, salt="z"), chunk_size=16, progress=False)
    with pytest.raises(MemoryFormatError, match="encoder"):
        write_shards_manifest(tmp_path, ["a", "b"])
    with pytest.raises(MemoryFormatError, match="already exists"):
        build_sharded(d / "sharded", items, "memory_testlib:fake32", n_shards=2)


def test_each_worker_holds_its_own_encoder(built, tmp_path):
    from distributed import Client, LocalCluster

    _, items, single, _ = built
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        sm = build_sharded(tmp_path / "s4", items, "memory_testlib:fake32", n_shards=4, client=client, chunk_size=16)
        held = client.run(lambda dask_worker: [id(e) for e in getattr(dask_worker, "_reco_ref_encoders", {}).values()])
        by_address = build_sharded(tmp_path / "addr", items, "memory_testlib:fake32", n_shards=2,
                                   scheduler=cluster.scheduler_address, chunk_size=16)  # the "real cluster" path
    assert len(sm.shards) == 4
    ids = [i for v in held.values() for i in v]
    assert len(ids) == len(set(ids)) >= 1 and all(len(v) <= 1 for v in held.values())
    np.testing.assert_array_equal(sm.embeddings("text", np.arange(len(single))), np.asarray(single.text))
    np.testing.assert_array_equal(by_address.embeddings("image", np.arange(len(single))), np.asarray(single.image))
