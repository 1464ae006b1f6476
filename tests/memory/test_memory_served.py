"""Search served by a Dask cluster (issue 23 item 1): shards resident on 2 worker processes, answers identical
to in-process sharded search (exact and HNSW), worker loss -> a named error or a re-open, CLI --scheduler.

One 2-process LocalCluster for the module; the worker-killing tests run last (the nanny restarts the killed
worker under a new address, and the cluster is whole again for whatever follows).
"""

from __future__ import annotations

import json
import os
import signal
import time

import numpy as np
import pytest
from memory_testlib import FakeEncoder

from reco_ref import cli
from reco_ref.errors import SearchError
from reco_ref.memory import ShardedMemory, build_memory_from_arrays, open_memory, retrieve, write_shards_manifest
from reco_ref.memory import served as served_mod

distributed = pytest.importorskip("distributed")

N_SHARDS, ROWS, D, DK = 8, 250, 32, 16  # >= 8 shards: issue 23's bar


def _unit(a: np.ndarray) -> np.ndarray:
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def mem_dir(tmp_path_factory):
    """8 shards x 250 rows, D=32, image keys Dk=16; rows repeated within and across shards (ties, groups)."""
    root = tmp_path_factory.mktemp("served") / "mem"
    rng = np.random.default_rng(23)
    n = N_SHARDS * ROWS
    image, text, keys = (_unit(rng.standard_normal((n, d))) for d in (D, D, DK))
    for a in (image, text, keys):
        a[1500:1520] = a[10:30]  # shard 6 repeats shard 0's rows: equal scores across shards, ties by global row
        a[700:705] = a[600]  # five copies in shard 2: a groups file
    enc = FakeEncoder(D, key_dim=DK)
    dirs = []
    for s in range(N_SHARDS):
        sl = slice(s * ROWS, (s + 1) * ROWS)
        items = [{"image": "", "caption": f"caption {i}", "source": f"array:{i}", "label": i % 7, "split": None,
                  "tags": None} for i in range(sl.start, sl.stop)]
        build_memory_from_arrays(root / f"shard_{s:03d}", image[sl], text[sl], keys=keys[sl], items=items,
                                 name=enc.name, fingerprint=enc.fingerprint, num_threads=1, progress=False)
        dirs.append(f"shard_{s:03d}")
    write_shards_manifest(root, dirs)
    return root


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None,
                                  worker_dashboard_address=None) as c, distributed.Client(c) as client:
        client.wait_for_workers(2)
        yield c, client


@pytest.fixture(scope="module")
def local(mem_dir):
    return ShardedMemory.open(mem_dir)


@pytest.fixture(scope="module")
def served(mem_dir, cluster):
    with open_memory(mem_dir, client=cluster[1]) as m:
        yield m


def _same(a, b):
    for x, y in zip(a, b, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)


def _resident(client):
    """{worker address: [(token, shard path), ...]} as the workers hold them."""
    return client.run(lambda dask_worker: sorted(getattr(dask_worker, "_reco_ref_shards", {})))


def test_each_shard_resident_once_and_stays(served, cluster, mem_dir):
    _, client = cluster
    held = _resident(client)
    paths = [p for keys in held.values() for _, p in keys]
    assert sorted(paths) == sorted(str((mem_dir / f"shard_{s:03d}").absolute()) for s in range(N_SHARDS))
    assert all(len(v) == N_SHARDS // 2 for v in held.values()) and len(held) == 2  # round robin over both workers
    ids = client.run(lambda dask_worker: sorted(id(m) for m in dask_worker._reco_ref_shards.values()))
    q = _unit(np.random.default_rng(0).standard_normal((3, D)))
    for _ in range(3):
        served.search(q, "text", k=5)
    assert client.run(lambda dask_worker: sorted(id(m) for m in dask_worker._reco_ref_shards.values())) == ids
    assert "ServedMemory(" in repr(served) and len(served) == N_SHARDS * ROWS


@pytest.mark.parametrize("modality", ["image", "text"])
def test_served_search_is_bit_identical(served, local, modality):
    members = local.embeddings("image_keys" if modality == "image" else "text", np.arange(0, 2000, 37))  # [55, d]
    q = np.concatenate([members, _unit(np.random.default_rng(2).standard_normal((20, members.shape[1])))])
    self_rows = np.concatenate([np.arange(0, 2000, 37), np.full(20, -1)])
    for exact in (True, False):
        for kw in (dict(k=10), dict(k=10, exclude=self_rows), dict(k=30, exclude=self_rows, dup_threshold=True),
                   dict(k=600, ef=700), dict(k=1, exclude=[np.arange(10, 30)] * len(q))):
            _same(served.search(q, modality, exact=exact, **kw), local.search(q, modality, exact=exact, **kw))


def test_served_embeddings_metadata_retrieve_info(served, local):
    rows = np.array([[0, 499, 500, -1], [1999, 1500, 10, 1000]])
    for modality in ("image", "text", "image_keys"):
        np.testing.assert_array_equal(served.embeddings(modality, rows), local.embeddings(modality, rows))
    assert served.metadata(rows) == local.metadata(rows)
    assert served.metadata(np.array([], np.int64)) == [] and served.embeddings("text", np.full((2, 3), -1)).shape == (2, 3, D)
    some = np.arange(5, 2000, 101)
    for query, qm, search, fuse in (("text", "text", "uni", "cross"), ("image_keys", "image", "uni", "cross"),
                                    ("image", "image", "cross", "uni"), ("text", "text", "uni", "uni")):
        q = local.embeddings(query, some)
        for exact in (True, False):
            kw = dict(search=search, fuse=fuse, k=8, exact=exact, exclude=some, with_scores=True)
            _same(retrieve(served, q, qm, **kw), retrieve(local, q, qm, **kw))
    info = served.info()
    assert set(info.pop("served")["placement"]) == {f"shard_{s:03d}" for s in range(N_SHARDS)}
    assert info == local.info()
    assert served.failures() == local.failures() == []
    served.verify()


def test_bad_requests_keep_their_errors(served):
    with pytest.raises(SearchError, match="D=8 but"):
        served.search(np.ones((1, 8), np.float32) / np.sqrt(8), "text")
    with pytest.raises(SearchError, match="k: expected an integer"):  # raised on a worker, re-raised here as is
        served.search(_unit(np.ones((1, D))), "text", k=0)
    with pytest.raises(SearchError, match="ids must lie"):
        served.embeddings("text", np.array([2000]))


def test_single_memory_served_whole(mem_dir, cluster):
    one = mem_dir / "shard_001"
    local = open_memory(one)
    with open_memory(one, client=cluster[1]) as m:
        q = local.embeddings("text", np.arange(0, 250, 25))
        for exact in (True, False):
            _same(m.search(q, "text", k=7, exact=exact, exclude=np.arange(10)),
                  local.search(q, "text", k=7, exact=exact, exclude=np.arange(10)))
        assert m.metadata([3, -1]) == local.metadata([3, -1])
        token = m._token
    assert not any(t == token for keys in _resident(cluster[1]).values() for t, _ in keys)  # released on close
    with pytest.raises(SearchError, match="closed"):
        m.search(q, "text")


def test_cli_scheduler(mem_dir, cluster, capsys, monkeypatch):
    addr = cluster[0].scheduler_address
    assert cli.main(["memory-info", str(mem_dir), "--verify", "size", "--scheduler", addr]) == 0
    got = json.loads(capsys.readouterr().out)
    assert cli.main(["memory-info", str(mem_dir), "--verify", "size"]) == 0
    want = json.loads(capsys.readouterr().out)
    assert got.pop("served")["scheduler"] == addr and got == want
    args = ["memory-search", str(mem_dir), "--text", "a", "b c", "-k", "4", "--model", "memory_testlib:fake32_keys"]
    assert cli.main(args + ["--scheduler", addr]) == 0
    got = json.loads(capsys.readouterr().out)
    assert cli.main(args) == 0
    assert got == json.loads(capsys.readouterr().out) and len(got) == 2 and len(got[0]) == 4
    monkeypatch.setattr(served_mod, "CONNECT_TIMEOUT_S", 1.0)
    t0 = time.perf_counter()
    assert cli.main(["memory-info", str(mem_dir), "--scheduler", "tcp://127.0.0.1:9"]) == 1
    err = capsys.readouterr().err
    assert time.perf_counter() - t0 < 15
    assert err.count("\n") == 1 and "--scheduler tcp://127.0.0.1:9: no Dask scheduler answered within 1 s" in err
    assert cli.main(["memory-search", str(mem_dir), "--text", "a", "--scheduler", "no-port-here"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a Dask scheduler address" in err


def _kill(client, address):
    """Kill the worker process at ``address`` (the nanny restarts it under a new address) and wait for that."""
    pid = client.run(os.getpid, workers=[address])[address]
    os.kill(pid, signal.SIGKILL)  # kill -9: no goodbye to the scheduler, as a crashed machine would leave
    deadline = time.monotonic() + 60
    while address in client.nthreads() or len(client.nthreads()) < 2:
        assert time.monotonic() < deadline, "the killed worker did not come back"
        time.sleep(0.1)


def test_worker_loss_is_a_named_error_with_retries_0(mem_dir, cluster, local):
    _, client = cluster
    with open_memory(mem_dir, client=client, retries=0, verify="size", poll_s=0.2) as m:
        q = local.embeddings("text", np.arange(0, 2000, 97))
        _same(m.search(q, "text", k=5), local.search(q, "text", k=5))
        victim = m.placement[1]
        _kill(client, victim)
        with pytest.raises(SearchError) as info:
            m.search(q, "text", k=5)
        msg = str(info.value)
        assert "\n" not in msg and "shard 1 (" in msg and victim in msg and "no answer returned" in msg


def test_worker_loss_reopens_the_shard_elsewhere(mem_dir, cluster, local):
    _, client = cluster
    with open_memory(mem_dir, client=client, verify="size", poll_s=0.2) as m:  # retries=1 (default)
        q = local.embeddings("image_keys", np.arange(3, 2000, 89))
        victim = m.placement[2]
        lost = [i for i, w in enumerate(m.placement) if w == victim]
        _kill(client, victim)
        for exact in (False, True):
            _same(m.search(q, "image", k=12, exact=exact), local.search(q, "image", k=12, exact=exact))
        assert victim not in m.placement and set(m.placement) <= set(client.nthreads())
        held = {p for keys in _resident(client).values() for t, p in keys if t == m._token}
        assert {m.paths[i] for i in lost} <= held  # re-opened on the survivors


def test_worker_killed_mid_search_gives_the_full_answer(mem_dir, cluster, local):
    import threading

    _, client = cluster
    with open_memory(mem_dir, client=client, verify="size", poll_s=0.2) as m:
        q = local.embeddings("text", np.arange(7, 2000, 131))
        victim = m.placement[0]
        # the victim's one thread is busy, so the search's tasks for its shards wait there when it is killed
        busy = client.submit(time.sleep, 3, workers=[victim], allow_other_workers=False, pure=False)
        pid = client.run(os.getpid, workers=[victim])[victim]
        killer = threading.Timer(0.5, os.kill, (pid, signal.SIGKILL))
        killer.start()
        try:
            got = m.search(q, "text", k=9, exclude=np.arange(7, 2000, 131))
        finally:
            killer.join()
            busy.cancel()
        assert not killer.is_alive() and victim not in m.placement
        _same(got, local.search(q, "text", k=9, exclude=np.arange(7, 2000, 131)))
