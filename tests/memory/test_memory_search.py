"""Search: exact = brute-force reference, HNSW recall, exclusions, dedup, k > n masks, validation, retrieve()."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reco_ref.errors import SearchError, ShapeError
from reco_ref.memory import Memory, build_memory_from_arrays, retrieve
from reco_ref.memory.index import exact_search


def _unit(a):
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)


def _lowrank(rng, n, d, r=8, noise=0.05):
    z = rng.standard_normal((n, r)) @ rng.standard_normal((r, d))
    return _unit(z + noise * rng.standard_normal((n, d)))


@pytest.fixture(scope="module")
def mem(tmp_path_factory):
    rng = np.random.default_rng(7)
    img, txt = _lowrank(rng, 1500, 48), _lowrank(rng, 1500, 48)
    img[11] = _unit(img[10:11] + 1e-3 * rng.standard_normal((1, 48)))[0]  # a near-duplicate pair: rows 10, 11
    root = tmp_path_factory.mktemp("search") / "m"
    build_memory_from_arrays(root, img, txt, name="t", fingerprint="a" * 64, chunk_size=512, progress=False,
                             num_threads=2)
    return Memory.open(root)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    rng = np.random.default_rng(3)
    root = tmp_path_factory.mktemp("tiny") / "m"
    build_memory_from_arrays(root, _unit(rng.standard_normal((6, 8))), _unit(rng.standard_normal((6, 8))),
                             name="t", fingerprint="b" * 64, progress=False)
    return Memory.open(root)


def _brute(x, q, k):
    s = q.astype(np.float64) @ np.asarray(x, np.float64).T
    order = np.lexsort((np.broadcast_to(np.arange(x.shape[0]), s.shape), -s), axis=1)[:, :k]
    return order, np.take_along_axis(s, order, 1)


def test_exact_matches_brute_force_any_blocking(rng):
    x = _unit(rng.standard_normal((3000, 40)))
    q = _unit(rng.standard_normal((70, 40)))
    want_r, want_s = _brute(x, q, 12)
    for rb, qb in [(65536, 1024), (500, 16), (7, 3)]:
        r, s = exact_search(x, q, 12, row_block=rb, query_block=qb)
        np.testing.assert_array_equal(r, want_r)
        np.testing.assert_allclose(s, want_s, atol=1e-6)
    r16, _ = exact_search(x.astype(np.float16), q, 12)
    want16, _ = _brute(x.astype(np.float16).astype(np.float32), q, 12)
    np.testing.assert_array_equal(r16, want16)


def test_hnsw_recall_vs_exact_and_ef_per_call(mem):
    q = np.asarray(mem.text[:200]) + 0.0
    ex, _, _ = mem.search(q, "text", k=10, exact=True)
    recalls = {}
    for ef in (10, 200):
        hn, _, _ = mem.search(q, "text", k=10, ef=ef)
        assert mem.index("text").index.ef == ef  # the beam width of this call was used
        recalls[ef] = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(hn, ex)])
    assert recalls[200] >= 0.97
    assert recalls[200] >= recalls[10]


def test_self_exclusion_and_near_duplicates(mem):
    q = np.asarray(mem.image[:30], np.float32)
    rows, scores, valid = mem.search(q, "image", k=5, exact=True)
    np.testing.assert_array_equal(rows[:, 0], np.arange(30))  # without exclusion, each row finds itself
    rows, scores, valid = mem.search(q, "image", k=5, exact=True, exclude=np.arange(30))
    assert valid.all() and not (rows == np.arange(30)[:, None]).any()
    want, _ = _brute(np.asarray(mem.image), q, 6)
    np.testing.assert_array_equal(rows, want[:, 1:])
    assert rows[10, 0] == 11  # the near-duplicate of row 10 survives self-exclusion ...
    rows_d, scores_d, valid_d = mem.search(q, "image", k=5, exact=True, exclude=np.arange(30), dup_threshold=True)
    assert valid_d.all() and (scores_d < 0.98).all() and 11 not in rows_d[10]  # ... and not the dedup
    rows_h, scores_h, valid_h = mem.search(q, "image", k=5, exclude=np.arange(30), dup_threshold=0.98, ef=200)
    assert (scores_h < 0.98).all() and not (rows_h == np.arange(30)[:, None]).any()


def test_k_larger_than_memory_and_exclusions(tiny):
    q = np.asarray(tiny.image, np.float32)
    for exact in (True, False):
        rows, scores, valid = tiny.search(q, "image", k=10, exact=exact)  # capped at the 6 rows there are
        assert rows.shape == (6, 6) and rows.dtype == np.int64 and scores.dtype == np.float32 and valid.all()
        assert all(sorted(r) == list(range(6)) for r in rows)
        assert tiny.search(q, "image", k=200_000_000, exact=exact)[0].shape == (6, 6)  # no padding to k
        rows, scores, valid = tiny.search(q, "image", k=10, exact=exact, exclude=[np.array([0, 1, 2])] * 6)
        assert (valid.sum(1) == 3).all() and (np.sort(rows[:, :3], 1) == [3, 4, 5]).all()
        rows, _, valid = tiny.search(q, "image", k=4, exact=exact, exclude=np.arange(6, dtype=np.int32))
        assert (valid.sum(1) == 4).all()
        rows, _, valid = tiny.search(q, "image", k=3, exact=exact, exclude=np.tile(np.arange(6), (6, 1)))
        assert not valid.any() and (rows == -1).all()


@settings(max_examples=40, deadline=None)
@given(k=st.integers(1, 12), n_ex=st.integers(0, 8), seed=st.integers(0, 2**31 - 1), exact=st.booleans(),
       dup=st.sampled_from([None, 0.5, 0.98]))
def test_search_invariants(tiny, k, n_ex, seed, exact, dup):
    rng = np.random.default_rng(seed)
    q = _unit(rng.standard_normal((4, 8)))
    excl = [rng.integers(-1, 6, size=n_ex) for _ in range(4)]
    rows, scores, valid = tiny.search(q, "text", k=k, exact=exact, exclude=excl, dup_threshold=dup)
    x = np.asarray(tiny.text, np.float64)
    for i in range(4):
        r, s, v = rows[i], scores[i], valid[i]
        assert (r[~v] == -1).all() and np.isneginf(s[~v]).all()
        assert v[: v.sum()].all()  # valid slots first
        got = r[v]
        assert len(set(got.tolist())) == got.size and ((got >= 0) & (got < 6)).all()
        assert not set(got.tolist()) & set(excl[i].tolist())
        assert (np.diff(s[v]) <= 1e-6).all()
        np.testing.assert_allclose(s[v], x[got] @ q[i], atol=1e-5)
        allowed = [j for j in range(6) if j not in set(excl[i].tolist()) and (dup is None or x[j] @ q[i] < dup)]
        assert v.sum() == min(k, len(allowed))  # never fewer than the memory can give
        if exact:
            want = sorted(allowed, key=lambda j: (-(x[j] @ q[i]), j))[:k]
            assert got.tolist() == want


@pytest.mark.parametrize("bad, err, match", [
    (np.zeros((2, 9), np.float32), SearchError, "D=9 but the HNSW text index"),
    (np.full((2, 8), np.nan, np.float32), ShapeError, "NaN"),
    (np.zeros((2, 8), np.int64), ShapeError, "dtype int64"),
    (np.zeros(8, np.float32), ShapeError, "expected 2 dimensions"),
    ([[0.0] * 8], ShapeError, "expected a numpy array"),
])
def test_query_validation(tiny, bad, err, match):
    with pytest.raises(err, match=match):
        tiny.search(bad, "text", k=2)


def test_argument_validation(tiny):
    q = np.asarray(tiny.text[:2], np.float32)
    with pytest.raises(SearchError, match="k: expected an integer >= 1"):
        tiny.search(q, "text", k=0)
    with pytest.raises(SearchError, match="modality"):
        tiny.search(q, "audio", k=1)
    with pytest.raises(SearchError, match="exclude: shape"):
        tiny.search(q, "text", k=1, exclude=np.zeros(3, np.int64))
    with pytest.raises(SearchError, match="integer row ids"):
        tiny.search(q, "text", k=1, exclude=np.zeros(2, np.float32))
    with pytest.raises(SearchError, match="dup_threshold"):
        tiny.search(q, "text", k=1, dup_threshold=1.5)
    with pytest.raises(SearchError, match="ids must lie in"):
        tiny.embeddings("text", np.array([6]))


@pytest.mark.parametrize("query_modality", ["image", "text"])
@pytest.mark.parametrize("search", ["uni", "cross"])
@pytest.mark.parametrize("fuse", ["cross", "uni"])
def test_retrieve_four_combinations(mem, query_modality, search, fuse):
    q = np.asarray((mem.image if query_modality == "image" else mem.text)[100:120], np.float32)
    other = "text" if query_modality == "image" else "image"
    searched = query_modality if search == "uni" else other
    fed = other if fuse == "cross" else query_modality
    emb, valid, rows = retrieve(mem, q, query_modality, search=search, fuse=fuse, k=4, exact=True,
                                exclude=np.arange(100, 120))
    want_rows, _, want_valid = mem.search(q, searched, k=4, exact=True, exclude=np.arange(100, 120))
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_array_equal(valid, want_valid)
    assert emb.shape == (20, 4, 48) and emb.dtype == np.float32
    np.testing.assert_array_equal(emb, np.asarray(getattr(mem, fed))[rows])


def test_retrieve_masks_missing_slots(tiny):
    emb, valid, rows = retrieve(tiny, np.asarray(tiny.text, np.float32), "text", k=8, exclude=np.arange(6))
    assert valid.sum(1).tolist() == [5] * 6
    assert (emb[~valid] == 0).all() and (rows[~valid] == -1).all()
    with pytest.raises(SearchError, match="search"):
        retrieve(tiny, np.asarray(tiny.text, np.float32), "text", search="both")
