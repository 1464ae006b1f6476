"""Identical rows share one index element (issue 21 item 2: headline numbers moved with approximate search).

A memory captioned from class templates holds ~60 bit-identical text vectors per caption.  HNSW over every
copy found 0.854 same-class neighbours on Flowers-102 where exact search finds 1.0 (here: 0.873 on 100
classes x 60 copies).  Each distinct vector is now indexed once (``text.groups.npy`` maps every row to its
representative) and a search expands what it finds to all rows at the same score, ties by row id: exact
for duplicates, the same rows as exact search, and a smaller index.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from reco_ref.errors import MemoryFormatError, RecoError
from reco_ref.memory import Memory, add_arrays_to_memory, build_memory_from_arrays
from reco_ref.memory import build as build_mod
from reco_ref.memory import row_groups as row_groups_mod
from reco_ref.memory.index import expand_groups, group_table, row_groups

C, R, D = 100, 60, 32  # classes, copies of each caption, dim


def _unit(a):
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)


def _data(seed=0, classes=C, copies=R):
    """Template-captioned arrays: text row = its class's caption vector (identical copies, rows interleaved)."""
    rng = np.random.default_rng(seed)
    cls = _unit(rng.standard_normal((classes, D)))
    labels = rng.permutation(np.repeat(np.arange(classes), copies))  # a class's rows are scattered
    image = _unit(2 * cls[labels] + rng.standard_normal((labels.size, D)))
    return cls, labels, image, cls[labels]


def _reference(cls, labels, q, k):
    """Brute force with exact ties: one float64 score per caption, copied to its rows; ties by row id."""
    s = (q.astype(np.float64) @ cls.astype(np.float64).T)[:, labels]  # [N, n]
    order = np.lexsort((np.broadcast_to(np.arange(labels.size), s.shape), -s), axis=1)[:, :k]
    return order, np.take_along_axis(s, order, 1)


def _build(root, image, text, **kw):
    build_memory_from_arrays(root, image, text, name="t", fingerprint="c" * 64, chunk_size=1000, progress=False,
                             num_threads=2, **kw)
    return root


@pytest.fixture(scope="module")
def dup(tmp_path_factory):
    cls, labels, image, text = _data()
    root = _build(tmp_path_factory.mktemp("dedup") / "m", image, text)
    return {"root": root, "cls": cls, "labels": labels, "image": image, "text": text}


def _copy(src, tmp_path):
    return shutil.copytree(src, tmp_path / "case")


def test_distinct_vectors_indexed_once_and_mapped(dup):
    m = json.loads((dup["root"] / "manifest.json").read_text())
    h = m["hnsw"]["text"]
    assert h["count"] == C and h["groups"] == "text.groups.npy" and m["counts"]["rows"] == C * R
    assert "groups" not in m["hnsw"]["image"] and m["hnsw"]["image"]["count"] == C * R  # distinct images
    rec = m["files"]["text.groups.npy"]
    assert rec["bytes"] == (dup["root"] / "text.groups.npy").stat().st_size and len(rec["sha256"]) == 64
    assert "text.groups.npy" in m["binding"]["digests"]
    g = np.load(dup["root"] / "text.groups.npy", allow_pickle=False)
    first = {c: int(np.flatnonzero(dup["labels"] == c)[0]) for c in range(C)}
    np.testing.assert_array_equal(g, [first[c] for c in dup["labels"]])  # the smallest row of each caption
    # one element per caption: the text index is ~R times smaller than the image index over as many rows
    assert (dup["root"] / "text.hnsw").stat().st_size * (R // 2) < (dup["root"] / "image.hnsw").stat().st_size


@pytest.mark.parametrize("k", [10, R, R + 15, 3 * R])
def test_hnsw_on_duplicates_equals_exact_search(dup, k):
    """Caption queries (the template texts themselves) and noisy ones: HNSW = exact = reference, row for row."""
    mem = Memory.open(dup["root"], verify="size")
    rng = np.random.default_rng(k)
    q = np.concatenate([dup["cls"], _unit(dup["cls"] + 0.3 * rng.standard_normal(dup["cls"].shape))])
    want_r, want_s = _reference(dup["cls"], dup["labels"], q, k)
    for exact in (False, True):
        rows, scores, valid = mem.search(q, "text", k=k, exact=exact)
        assert valid.all()
        np.testing.assert_array_equal(rows, want_r)  # recall 1.0 by row id, not only with ties as hits
        np.testing.assert_allclose(scores, want_s, atol=2e-6)
    same = dup["labels"][rows[:C, :min(k, R)]] == np.arange(C)[:, None]
    assert same.mean() == 1.0  # each caption's neighbours are its own class's rows


def test_exclusions_expand_past_the_excluded_rows(dup):
    mem = Memory.open(dup["root"], verify="size")
    text, labels = dup["text"], dup["labels"]
    q = text[:30]
    rows, _, valid = mem.search(q, "text", k=10, exclude=np.arange(30))  # self-exclusion
    assert valid.all() and not (rows == np.arange(30)[:, None]).any()
    assert (labels[rows] == labels[:30, None]).all()  # the other copies of the own caption
    ex, _, _ = mem.search(q, "text", k=10, exclude=np.arange(30), exact=True)
    np.testing.assert_array_equal(rows, ex)
    # class exclusion (what training's leave-class-out retrieval passes): a whole group excluded
    by_class = [np.flatnonzero(labels == c) for c in labels[:30]]
    rows, _, valid = mem.search(q, "text", k=10, exclude=by_class)
    ex, _, _ = mem.search(q, "text", k=10, exclude=by_class, exact=True)
    assert valid.all() and not (labels[rows] == labels[:30, None]).any()
    np.testing.assert_array_equal(rows, ex)
    # near-duplicate filter: every copy of the caption is dropped, the next caption's rows fill k
    rows, _, valid = mem.search(dup["cls"][:5], "text", k=10, dup_threshold=True)
    ex, _, _ = mem.search(dup["cls"][:5], "text", k=10, dup_threshold=True, exact=True)
    assert valid.all() and not (labels[rows] == np.arange(5)[:, None]).any()
    np.testing.assert_array_equal(rows, ex)


def test_memory_without_duplicates_is_unchanged(tmp_path):
    rng = np.random.default_rng(5)
    img, txt = _unit(rng.standard_normal((1200, 24))), _unit(rng.standard_normal((1200, 24)))
    root = _build(tmp_path / "m", img, txt)
    m = json.loads((root / "manifest.json").read_text())
    assert set(m["files"]) == {"image.npy", "text.npy", "meta.sqlite", "image.hnsw", "text.hnsw", "failures.jsonl"}
    assert all("groups" not in m["hnsw"][x] and m["hnsw"][x]["count"] == 1200 for x in ("image", "text"))
    assert sorted(m["binding"]["digests"]) == ["image.npy", "meta.sqlite", "text.npy"]
    mem = Memory.open(root)
    q = _unit(txt[:200] + 0.1 * rng.standard_normal((200, 24)))
    hn, _, _ = mem.search(q, "text", k=10)
    ex, _, _ = mem.search(q, "text", k=10, exact=True)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(hn, ex)])
    assert recall >= 0.95


def test_old_format_memory_opens_searches_and_is_reindexed_by_add(tmp_path, monkeypatch):
    """A memory written before the groups (every copy an element, no groups file) opens and searches as
    before; a memory-add re-indexes it over the distinct vectors once."""
    cls, labels, image, text = _data(1, classes=20, copies=30)
    monkeypatch.setattr(build_mod, "row_groups", lambda v: np.arange(v.shape[0], dtype=np.int64))
    root = _build(tmp_path / "old", image, text)
    monkeypatch.undo()
    m = json.loads((root / "manifest.json").read_text())
    assert not (root / "text.groups.npy").exists() and m["hnsw"]["text"]["count"] == 600
    mem = Memory.open(root)
    want_r, want_s = _reference(cls, labels, cls, 5)
    rows, scores, _ = mem.search(cls, "text", k=5, exact=True)
    np.testing.assert_allclose(scores, want_s, atol=2e-6)  # which copies: the gemm's rounding decides
    assert (labels[rows] == np.arange(20)[:, None]).all()
    rows, _, valid = mem.search(cls, "text", k=5)
    assert valid.all() and rows.shape == (20, 5)

    logs = []
    add_arrays_to_memory(root, image[:10], text[:10], name="t", fingerprint="c" * 64, progress=False, log=logs.append,
                         num_threads=2)
    assert any("rebuilding it over the distinct vectors" in x for x in logs), logs
    m = json.loads((root / "manifest.json").read_text())
    assert m["hnsw"]["text"]["count"] == 20 and m["hnsw"]["text"]["groups"] == "text.groups.npy"
    labels2 = np.concatenate([labels, labels[:10]])
    mem = Memory.open(root)
    want_r, _ = _reference(cls, labels2, cls, 35)
    for exact in (False, True):
        rows, _, _ = mem.search(cls, "text", k=35, exact=exact)
        np.testing.assert_array_equal(rows, want_r)


def test_add_rows_duplicating_existing_ones_extends_the_index(dup, tmp_path):
    root = _copy(dup["root"], tmp_path)
    rng = np.random.default_rng(9)
    new_cls = _unit(rng.standard_normal((1, D)))
    add_lab = np.array([3, 3, 7, C, C, 0])  # copies of captions 3, 7, 0 and two rows of a new caption
    cls2 = np.concatenate([dup["cls"], new_cls])
    add_text = cls2[add_lab]
    add_img = _unit(rng.standard_normal((6, D)))
    logs = []
    add_arrays_to_memory(root, add_img, add_text, name="t", fingerprint="c" * 64, progress=False, log=logs.append,
                         num_threads=2)
    assert not any("rebuilding" in x for x in logs), logs  # extended with the one new distinct vector
    m = json.loads((root / "manifest.json").read_text())
    assert m["hnsw"]["text"]["count"] == C + 1 and m["counts"]["rows"] == C * R + 6
    g = np.load(root / "text.groups.npy", allow_pickle=False)
    old = np.load(dup["root"] / "text.groups.npy", allow_pickle=False)
    np.testing.assert_array_equal(g[:C * R], old)  # the old rows keep their representatives
    n0 = C * R
    assert g[n0] == g[n0 + 1] == old[np.flatnonzero(dup["labels"] == 3)[0]] and g[n0 + 4] == n0 + 3
    labels2 = np.concatenate([dup["labels"], add_lab])
    mem = Memory.open(root)
    want_r, _ = _reference(cls2, labels2, cls2, R + 4)
    for exact in (False, True):
        rows, _, valid = mem.search(cls2, "text", k=R + 4, exact=exact)
        np.testing.assert_array_equal(rows, want_r)
    assert n0 in rows[3] and n0 + 1 in rows[3] and set(rows[C, :2]) == {n0 + 3, n0 + 4}


def _rewrite_groups(root, g, *, fix_records=True):
    """Write a groups array over the memory's own and (optionally) make the manifest's size/sha256 agree."""
    from reco_ref.io import sha256_file

    np.save(root / "text.groups.npy", g, allow_pickle=g.dtype == object)
    if fix_records:
        m = json.loads((root / "manifest.json").read_text())
        p = root / "text.groups.npy"
        m["files"]["text.groups.npy"] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        (root / "manifest.json").write_text(json.dumps(m))


def _one_line(exc):
    msg = str(exc.value)
    assert "\n" not in msg and isinstance(exc.value, RecoError), msg
    return msg


@pytest.mark.parametrize("damage, verify, must", [
    (lambda g: np.where(np.arange(g.size) == 7, g.size, g), False, "row 7 maps to"),  # out of range
    (lambda g: np.where(np.arange(g.size) == 0, 5, g), False, "row 0 maps to 5"),  # a later row
    (lambda g: g.astype(np.float64), False, "dtype float64"),
    (lambda g: g[:-1], False, "shape"),
    (lambda g: np.array([{"x": 1}] * g.size, dtype=object), False, "pickle"),
    (lambda g: np.arange(g.size, dtype=np.int64), False, "representative rows, the index holds"),
    (lambda g: g, "sha256-only", "sha256"),  # the file changed behind the manifest's back
])
def test_damaged_groups_file_is_refused_at_open(dup, tmp_path, damage, verify, must):
    root = _copy(dup["root"], tmp_path)
    g = np.load(root / "text.groups.npy", allow_pickle=False)
    if verify == "sha256-only":
        raw = bytearray((root / "text.groups.npy").read_bytes())
        raw[-8] ^= 1  # one bit of the last row's representative
        (root / "text.groups.npy").write_bytes(bytes(raw))
        verify = True
    else:
        _rewrite_groups(root, damage(g))
    with pytest.raises(MemoryFormatError) as e:
        Memory.open(root, verify=verify)
    msg = _one_line(e)
    assert "text.groups.npy" in msg and must in msg, msg


def test_groups_mapping_rows_to_another_vector_is_refused(dup, tmp_path):
    """A well-formed map that sends a row to another caption: the fast open's binding (a changed file) and
    the sample check refuse it; without verification, the first search checks every row and refuses it."""
    root = _copy(dup["root"], tmp_path)
    g = np.load(root / "text.groups.npy", allow_pickle=False)
    reps = np.flatnonzero(g == np.arange(g.size))
    bad = g.copy()
    victim = int(np.flatnonzero(g != np.arange(g.size))[-1])  # a copy, not a representative
    bad[victim] = reps[reps != g[victim]][0]  # now claims another caption's representative
    _rewrite_groups(root, bad)
    with pytest.raises(MemoryFormatError) as e:
        Memory.open(root, verify="size")
    assert "text.groups.npy" in _one_line(e)
    mem = Memory.open(root, verify=False)
    for exact in (False, True):
        with pytest.raises(MemoryFormatError) as e:
            mem.search(dup["cls"][:2], "text", k=3, exact=exact)
        msg = _one_line(e)
        assert f"row {victim} differs from its representative" in msg, msg


def test_manifest_and_groups_must_agree(dup, tmp_path):
    root = _copy(dup["root"], tmp_path)
    m = json.loads((root / "manifest.json").read_text())
    m["hnsw"]["text"]["count"] = C * R  # a groups file with an index said to hold every row
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(MemoryFormatError) as e:
        Memory.open(root, verify=False)
    assert "hnsw.text.count" in _one_line(e)
    del m["hnsw"]["text"]["groups"]  # a listed groups file no index names
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(MemoryFormatError) as e:
        Memory.open(root, verify=False)
    assert "text.groups.npy" in _one_line(e)


def test_row_groups_survives_hash_collisions(monkeypatch):
    rng = np.random.default_rng(2)
    base = _unit(rng.standard_normal((7, 8)))
    pick = rng.integers(0, 7, 300)
    x = base[pick]
    want = np.array([np.flatnonzero(pick == p)[0] for p in pick])
    np.testing.assert_array_equal(row_groups(x), want)
    monkeypatch.setattr(row_groups_mod, "_row_hashes", lambda v, block=0: np.zeros(v.shape[0], np.uint64))
    np.testing.assert_array_equal(row_groups(x), want)  # every row collides: regrouped by bytes
    np.testing.assert_array_equal(row_groups(x.astype(np.float16)), want)


def test_expand_groups_orders_ties_by_row_and_clips_big_groups():
    groups = np.array([0, 1, 0, 3, 1, 0, 3, 0])  # groups {0,2,5,7}, {1,4}, {3,6}
    table = group_table(groups)
    reps = np.array([[3, 1, 0], [0, 3, 1]])
    scores = np.array([[0.9, 0.9, 0.5], [0.7, 0.2, 0.1]], np.float32)
    rows, sc = expand_groups(reps, scores, 3, table)
    np.testing.assert_array_equal(rows, [[1, 3, 4], [0, 2, 5]])  # a tie across groups: by row id
    np.testing.assert_array_equal(sc, np.float32([[0.9, 0.9, 0.9], [0.7, 0.7, 0.7]]))


def test_mutated_groups_file_never_gives_a_wrong_answer(tmp_path):
    """Bit flips, truncations and zeroed runs in ``text.groups.npy``, with the manifest's sha256/size re-made to
    match (so only the structure, binding and vector checks stand in the way): every case either answers
    exactly like the undamaged memory or stops with a one-line MemoryFormatError."""
    import random

    from reco_ref.io import sha256_file

    cls, labels, image, text = _data(4, classes=12, copies=10)
    src = _build(tmp_path / "src", image, text)
    good = np.load(src / "text.groups.npy", allow_pickle=False)
    want, _ = _reference(cls, labels, cls, 15)
    data = (src / "text.groups.npy").read_bytes()
    rnd = random.Random(21)
    outcomes = {"refused": 0, "same": 0}
    for i in range(40):
        raw = bytearray(data)
        kind = rnd.choice(["flip", "flip", "truncate", "zero"])
        if kind == "flip":
            pos = rnd.randrange(len(raw) * 8)
            raw[pos // 8] ^= 1 << (pos % 8)
        elif kind == "truncate":
            raw = raw[:rnd.randrange(len(raw))]
        else:
            lo = rnd.randrange(len(raw))
            raw[lo:lo + 16] = bytes(len(raw[lo:lo + 16]))
        case = tmp_path / f"case{i}"
        shutil.copytree(src, case)
        (case / "text.groups.npy").write_bytes(bytes(raw))
        m = json.loads((case / "manifest.json").read_text())
        m["files"]["text.groups.npy"] = {"sha256": sha256_file(case / "text.groups.npy"), "bytes": len(raw)}
        (case / "manifest.json").write_text(json.dumps(m))
        for verify in ("size", False):
            try:
                mem = Memory.open(case, verify=verify)
                got = [mem.search(cls, "text", k=15, exact=exact)[0] for exact in (False, True)]
            except MemoryFormatError as exc:
                assert "\n" not in str(exc), str(exc)
                outcomes["refused"] += 1
                continue
            g = np.load(case / "text.groups.npy", allow_pickle=False)
            assert np.array_equal(g, good), f"case {i} ({kind}): a changed map was used"  # e.g. a header-only flip
            for rows in got:
                np.testing.assert_array_equal(rows, want)
            outcomes["same"] += 1
    assert outcomes["refused"] >= 60, outcomes
