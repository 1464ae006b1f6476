"""Fuzz a memory's files: bit flips, truncation, appended bytes, crafted manifests — with and without the
manifest re-hashed to match (an attacker, or a disk that fails after a rebuild of the manifest).

Every case is opened and used (search both indexes, HNSW and exact, metadata, retrieve) in a subprocess
under an address-space cap: it must succeed with sane answers or stop with a named error; the interpreter
must never die (a flipped neighbour id in an ``.hnsw`` file used to segfault it).  With full verification
every change to a listed file must be detected; ``verify="size"`` (memory-search's default) must never
crash, and what it does not detect is counted (docs/bad_inputs.md).
"""

from __future__ import annotations

import json
import random
import shutil
import sqlite3
import sys
from pathlib import Path

import numpy as np
import pytest
from fuzz_lib import assert_unchanged, flip_bit, record, run_py, tree

from reco_ref.io import sha256_file

HERE = Path(__file__).resolve().parent
FILES = ["image.npy", "text.npy", "meta.sqlite", "image.hnsw", "text.hnsw", "failures.jsonl"]


def _rehash(case: Path, name: str) -> None:
    m = json.loads((case / "manifest.json").read_text())
    m["files"][name] = {"sha256": sha256_file(case / name), "bytes": (case / name).stat().st_size}
    (case / "manifest.json").write_text(json.dumps(m))


def _mutate(rnd: random.Random, data: bytes) -> tuple[str, bytes]:
    kind = rnd.choice(["flip", "flip", "flip", "flips", "truncate", "append", "zero"])
    if kind == "flip":
        return kind, flip_bit(data, rnd.randrange(len(data) * 8))
    if kind == "flips":
        for _ in range(8):
            data = flip_bit(data, rnd.randrange(len(data) * 8))
        return kind, data
    if kind == "truncate":
        return kind, data[:rnd.randrange(len(data))]
    if kind == "append":
        return kind, data + bytes(rnd.randrange(256) for _ in range(rnd.randint(1, 64)))
    lo = rnd.randrange(len(data))
    return kind, data[:lo] + bytes(min(64, len(data) - lo)) + data[lo + 64:]


def _json_mutation(rnd: random.Random, m: dict) -> dict:
    values = [None, True, -1, 0, 1, 2**63, 1.5, "x", [], {}, "../../etc/passwd", 10**9]
    path = rnd.choice([("format_version",), ("embed_dim",), ("key_dim",), ("dtype",), ("counts", "rows"),
                       ("counts", "items"), ("hnsw", "text", "M"), ("hnsw", "image", "count"), ("hnsw", "text", "dim"),
                       ("files",), ("files", "image.npy", "bytes"), ("encoder", "name"), ("history",)])
    node = m
    for k in path[:-1]:
        node = node.setdefault(k, {}) if isinstance(node, dict) else node
    if rnd.random() < 0.2:
        node.pop(path[-1], None)
    elif path == ("files",):
        node["files"] = dict(m["files"], **{"../outside": {"sha256": "0" * 64, "bytes": 1}})
    else:
        node[path[-1]] = rnd.choice(values)
    return m


def make_cases(mem: Path, root: Path, n: int, seed: int, rehash: bool) -> list[tuple[Path, str, str]]:
    rnd = random.Random(seed)
    cases = []
    for i in range(n):
        case = root / f"case{i:04d}"
        shutil.copytree(mem, case)
        name = rnd.choice(FILES + ["manifest.json"])
        if name == "manifest.json" and rnd.random() < 0.6:
            m = json.loads((case / name).read_text())
            (case / name).write_text(json.dumps(_json_mutation(rnd, m)))
            kind = "json"
        else:
            orig = (case / name).read_bytes()
            kind, data = _mutate(rnd, orig)
            if data == orig:  # e.g. zeros written over zeros: not a change, not a case
                kind = "no-op"
            (case / name).write_bytes(data)
            if rehash and name != "manifest.json":
                _rehash(case, name)
        cases.append((case, name, kind))
    return cases


def _run(cases, verify: str) -> dict[str, dict]:
    """Run the reader over every case; the case folders must be byte-identical afterwards (readers write nothing)."""
    before = {str(c): tree(c) for c, _, _ in cases}
    out = _run_batches(cases, verify)
    for c, _, _ in cases:
        assert_unchanged(before[str(c)], tree(c), str(c))
        assert set(tree(c)) == set(before[str(c)]), f"{c}: a reader created files"
    return out


def _run_batches(cases, verify: str) -> dict[str, dict]:
    out = {}
    for lo in range(0, len(cases), 60):  # batches keep a crash's blast radius (and argv) small
        batch = [str(c) for c, _, _ in cases[lo:lo + 60]]
        p = run_py((HERE / "memory_runner.py").read_text(), verify, *batch, timeout=600)
        assert p.returncode >= 0, f"interpreter crashed (signal {-p.returncode}) on one of {batch}: {p.stderr[-1500:]}"
        assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-3000:]
        for line in p.stdout.splitlines():
            rec = json.loads(line)
            assert "\n" not in rec["msg"]
            out[rec["case"]] = rec
    assert len(out) == len(cases)
    return out


def _check(mem_dir: Path, tmp_path: Path, n: int, seed: int) -> None:
    for rehash in (False, True):
        cases = make_cases(mem_dir, tmp_path / f"r{int(rehash)}", n, seed + rehash, rehash)
        for verify in ("sha256", "size"):
            res = _run(cases, verify)
            for case, name, kind in cases:
                outcome = res[str(case)]["outcome"]
                cls = f"memory files: {'crafted (manifest re-hashed)' if rehash else 'damaged'}, verify={verify}"
                if kind == "no-op":
                    assert outcome == "ok"
                    continue
                record(cls, outcome)
                if outcome == "ok" and name != "manifest.json":
                    record(cls, f"ok although {name} changed (answers checked sane)")
                if verify == "sha256" and not rehash and name != "manifest.json":
                    assert outcome == "error", (name, kind, "a change to a listed file passed full verification")
                if name.endswith(".npy"):
                    # the indexed vectors (this memory has no keys: both .npy are indexed) are compared with
                    # the index whatever the verify mode
                    assert outcome == "error", (name, kind, res[str(case)])
                # an .hnsw change that passes the structure check (a stale slot past a neighbour list's
                # count) leaves every answer correct: the runner has checked them


def test_memory_file_damage_slice(small_memory, tmp_path):
    mem, _ = small_memory
    _check(mem, tmp_path, n=24, seed=1)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(10))
def test_memory_file_damage_full(small_memory, tmp_path, seed):
    mem, _ = small_memory
    _check(mem, tmp_path, n=60, seed=100 + seed)


def test_crafted_nan_rows_and_sqlite(small_memory, tmp_path):
    """A memory whose manifest matches its (crafted) files: NaN rows, a foreign SQLite schema, too few rows."""
    mem, _ = small_memory
    cases = []
    for i, what in enumerate(["nan_image", "nan_text", "schema", "rows", "garbage_db"]):
        case = tmp_path / what
        shutil.copytree(mem, case)
        if what.startswith("nan"):
            name = what[4:] + ".npy"
            a = np.load(case / name)
            a[5, 2] = np.nan
            np.save(case / name, a)
        else:
            name = "meta.sqlite"
            (case / name).unlink()
            if what == "garbage_db":
                (case / name).write_bytes(b"SQLite format 3\x00" + bytes(4080))
            else:
                con = sqlite3.connect(case / name)
                if what == "schema":
                    con.execute("CREATE TABLE rows (row INTEGER PRIMARY KEY, x TEXT)")
                    con.executemany("INSERT INTO rows VALUES (?, ?)", [(r, "x") for r in range(37)])
                else:
                    con.execute("CREATE TABLE rows (row INTEGER PRIMARY KEY, item INTEGER NOT NULL, caption TEXT, "
                                "source TEXT, label INTEGER, split TEXT, tags TEXT)")
                    con.execute("INSERT INTO rows VALUES (0, 0, 'c', 's', 1, 'train', NULL)")
                con.commit()
                con.close()
        _rehash(case, name)
        cases.append((case, name, what))
    for verify in ("sha256", "size"):
        res = _run(cases, verify)
        for case, name, what in cases:
            rec = res[str(case)]
            record(f"memory files: crafted NaN rows / SQLite, verify={verify}", rec["outcome"])
            assert rec["outcome"] == "error", (what, verify, rec)
            if what.startswith("nan"):
                assert "NaN" in rec["msg"] or "differ" in rec["msg"], rec["msg"]


def test_oversized_manifest(small_memory, tmp_path):
    from reco_ref.errors import MemoryFormatError
    from reco_ref.memory import Memory

    case = tmp_path / "big"
    shutil.copytree(small_memory[0], case)
    with open(case / "manifest.json", "ab") as fh:
        fh.truncate(65 << 20)  # sparse: 65 MiB of zeros after the JSON
    with pytest.raises(MemoryFormatError, match="not a manifest"):
        Memory.open(case)
    record("memory files: oversized manifest", "error")
