"""float16 rows and search keys (issue 23 item 3): ``--dtype float16`` carried through the image keys, the
sharded (Dask) build and the served search; a float16 memory searches as a float32 memory of its rounded rows."""

from __future__ import annotations

import json

import numpy as np
import pytest
from memory_testlib import FakeEncoder, make_pairs

from reco_ref import cli
from reco_ref.errors import MemoryFormatError
from reco_ref.memory import (Memory, ShardedMemory, add_arrays_to_memory, build_memory_from_arrays, open_memory,
                             write_shards_manifest)

D, DK = 32, 16
ENC = FakeEncoder(D, key_dim=DK)


def _unit(a: np.ndarray) -> np.ndarray:
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)


def _arrays(n: int, seed: int = 16) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image, text, keys = (_unit(rng.standard_normal((n, d))) for d in (D, D, DK))
    text[50:60] = text[0]  # template captions: identical rows share one index element (groups)
    return image, text, keys


def _build(out, image, text, keys, dtype):
    return build_memory_from_arrays(out, image, text, keys=keys, name=ENC.name, fingerprint=ENC.fingerprint,
                                    dtype=dtype, num_threads=1, progress=False)


def _same(a, b):
    for x, y in zip(a, b, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)


def test_float16_memory_searches_as_float32_of_its_rounded_rows(tmp_path):
    """Rows and keys stored as float16; exact and HNSW search, embeddings: the bits of a float32 memory built
    from the float16-rounded rows (the only cost of float16 is the rounding of the rows)."""
    image, text, keys = _arrays(300)
    _build(tmp_path / "h", image, text, keys, "float16")
    rounded = [a.astype(np.float16).astype(np.float32) for a in (image, text, keys)]
    _build(tmp_path / "r", *rounded, "float32")
    h, r = Memory.open(tmp_path / "h"), Memory.open(tmp_path / "r")
    assert h.dtype == "float16" and h.info()["dtype"] == "float16"
    for name, want in zip(("image", "text", "image_keys"), (image, text, keys)):
        assert getattr(h, name).dtype == np.float16
        np.testing.assert_array_equal(getattr(h, name), want.astype(np.float16))
    q = {"image": rounded[2][::13], "text": rounded[1][::13]}
    for modality in ("image", "text"):
        for exact in (True, False):
            kw = dict(k=12, exact=exact, exclude=np.arange(0, 300, 13))
            _same(h.search(q[modality], modality, **kw), r.search(q[modality], modality, **kw))
    rows = np.array([[0, 299, -1], [7, 55, 51]])
    for name in ("image", "text", "image_keys"):
        e = h.embeddings(name, rows)
        assert e.dtype == np.float32
        np.testing.assert_array_equal(e, r.embeddings(name, rows))
    # on disk: every vector file half the float32 one's data bytes
    for name in ("image.npy", "text.npy", "image_keys.npy"):
        assert (tmp_path / "h" / name).stat().st_size - 128 == ((tmp_path / "r" / name).stat().st_size - 128) // 2


def test_add_keeps_float16(tmp_path):
    image, text, keys = _arrays(120)
    _build(tmp_path / "m", image[:80], text[:80], keys[:80], "float16")
    add_arrays_to_memory(tmp_path / "m", image[80:], text[80:], keys=keys[80:], name=ENC.name,
                         fingerprint=ENC.fingerprint, num_threads=1, progress=False)
    m = Memory.open(tmp_path / "m")
    assert m.dtype == "float16" and len(m) == 120
    np.testing.assert_array_equal(m.image_keys, keys.astype(np.float16))


def test_shards_of_mixed_dtype_refused(tmp_path):
    image, text, keys = _arrays(100)
    _build(tmp_path / "a", image[:50], text[:50], keys[:50], "float16")
    _build(tmp_path / "b", image[50:], text[50:], keys[50:], "float32")
    with pytest.raises(MemoryFormatError, match="dtype 'float32' differs"):
        write_shards_manifest(tmp_path, ["a", "b"])


def test_sharded_cli_build_float16_keys_equals_single(tmp_path):
    """``build-memory --shards 2 --dtype float16`` with an encoder that has image keys: every shard's rows and keys
    are float16 and the same bits as the single-machine float16 build."""
    pytest.importorskip("distributed")
    pairs = make_pairs(tmp_path / "src", 60, bad=(7,))
    common = ["--pairs", str(pairs), "--model", "memory_testlib:fake32_keys", "--chunk-size", "16", "--dtype",
              "float16", "--no-progress", "--index-threads", "1"]
    assert cli.main(["build-memory", *common, "--out", str(tmp_path / "one")]) == 0
    assert cli.main(["build-memory", *common, "--out", str(tmp_path / "sh"), "--shards", "2"]) == 0
    spec = json.loads((tmp_path / "sh" / "shards.json").read_text())
    assert spec["dtype"] == "float16" and spec["key_dim"] == DK and len(spec["shards"]) == 2
    one, sh = Memory.open(tmp_path / "one"), open_memory(tmp_path / "sh")
    assert isinstance(sh, ShardedMemory)
    for m in sh.shards:
        assert m.dtype == "float16" and {m.image.dtype, m.text.dtype, m.image_keys.dtype} == {np.dtype(np.float16)}
    for name in ("image", "text", "image_keys"):
        got = np.asarray(getattr(sh, name))
        assert got.dtype == np.float16
        np.testing.assert_array_equal(got, getattr(one, name))
    q = np.asarray(one.image_keys[::5], np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    _same(sh.search(q, "image", k=8, exact=True), one.search(q, "image", k=8, exact=True))


@pytest.fixture(scope="module")
def served_f16(tmp_path_factory):
    """4 float16 shards of 100 rows (keys Dk=16) served by a 2-process LocalCluster, and the same opened here."""
    distributed = pytest.importorskip("distributed")
    root = tmp_path_factory.mktemp("f16") / "mem"
    image, text, keys = _arrays(400, seed=7)
    for s in range(4):
        sl = slice(100 * s, 100 * (s + 1))
        _build(root / f"shard_{s:03d}", image[sl], text[sl], keys[sl], "float16")
    write_shards_manifest(root, [f"shard_{s:03d}" for s in range(4)])
    with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None,
                                  worker_dashboard_address=None) as c, distributed.Client(c) as client:
        with open_memory(root, client=client) as served:
            yield served, ShardedMemory.open(root), keys


def test_served_float16_same_bits_and_rows_travel_as_float16(served_f16, monkeypatch):
    served, local, keys = served_f16
    assert served.dtype == local.dtype == "float16" and served.info()["dtype"] == "float16"
    q = _unit(keys[::9].astype(np.float16).astype(np.float32))
    for exact in (True, False):
        _same(served.search(q, "image", k=10, exact=exact, exclude=np.arange(0, 400, 9)),
              local.search(q, "image", k=10, exact=exact, exclude=np.arange(0, 400, 9)))
    rows = np.array([[0, 399, -1, 150], [250, 99, 100, 3]])
    sent = []
    fan_out = served._fan_out

    def spy(method, calls):
        res = fan_out(method, calls)
        sent.extend(np.asarray(r).dtype for r in res.values())
        return res

    monkeypatch.setattr(served, "_fan_out", spy)
    for name in ("image", "text", "image_keys"):
        sent.clear()
        e = served.embeddings(name, rows)
        assert e.dtype == np.float32
        np.testing.assert_array_equal(e, local.embeddings(name, rows))
        assert sent and set(sent) == {np.dtype(np.float16)}  # the workers send the stored rows: half the bytes
        sent.clear()
        part = served.image_keys[np.array([3, 250, 120])] if name == "image_keys" else getattr(served, name)[5:9]
        assert part.dtype == np.float16 and set(sent) == {np.dtype(np.float16)}
        want = local.image_keys[np.array([3, 250, 120])] if name == "image_keys" else getattr(local, name)[5:9]
        np.testing.assert_array_equal(part, want)
