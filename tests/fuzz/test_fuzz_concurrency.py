"""Readers during a writer: while ``memory-add`` runs (a real subprocess), readers open and search the same
memory over and over.  Each must see one committed state — the old one or the new one, never a mix —
or get the clear "being modified" message; a handle opened before the add keeps answering from the
state it opened (its indexes are loaded lazily, after the commit, from the files it opened).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from fuzz_lib import env, record

from reco_ref.errors import MemoryFormatError
from reco_ref.memory import Memory, format as fmt, open_memory


def _read_once(root, sizes):
    mem = open_memory(root, verify="size")
    n = len(mem)
    assert n in sizes, n
    q = np.asarray(mem.text[: 4], np.float32)
    for modality in ("text", "image"):
        rows, scores, valid = mem.search(np.asarray(mem.vectors(modality)[:4], np.float32), modality=modality, k=8)
        assert ((rows[valid] >= 0) & (rows[valid] < n)).all()
        metas = mem.metadata(rows[valid])
        assert all(m is not None and m["row"] == r for m, r in zip(metas, rows[valid].tolist()))
    assert mem.info()["rows"] == n and mem.embeddings("text", np.arange(n)).shape == (n, mem.dim)
    del q
    return n


def _concurrent(small_memory, tmp_path, n_add: int, delay: float):
    from memory_testlib import make_pairs

    src, _ = small_memory
    root = tmp_path / "mem"
    shutil.copytree(src, root)
    more = make_pairs(tmp_path / "more", n_add, start=1000)
    old = Memory.open(root, verify="size")  # opened before the add, used after it
    n_old = len(old)
    sizes = {n_old, n_old + n_add}
    writer = subprocess.Popen([sys.executable, "-m", "reco_ref.cli", "memory-add", str(root), "--pairs", str(more),
                               "--model", "memory_testlib:fake32", "--no-progress", "--chunk-size", "8"],
                              env=env(FAKE_ENCODER_DELAY=str(delay)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    seen, errors, failures = [], [], []

    def reader():
        while writer.poll() is None:
            try:
                seen.append(_read_once(root, sizes))
                record("concurrency: reader during memory-add", "consistent state")
            except MemoryFormatError as exc:
                if "being modified" not in str(exc):
                    failures.append(str(exc))
                errors.append(str(exc))
                record("concurrency: reader during memory-add", "being modified")
            except Exception as exc:  # noqa: BLE001 - collected and asserted below
                failures.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    _, err = writer.communicate(timeout=300)
    for t in threads:
        t.join()
    assert writer.returncode == 0, err
    assert not failures, failures[:3]
    assert seen and n_old in seen
    # the handle opened before the add: same length, its indexes (first loaded now) hold the old rows
    rows, _, valid = old.search(np.asarray(old.text[:5], np.float32), modality="text", k=10)
    assert len(old) == n_old and (rows[valid] < n_old).all() and valid.all()
    assert all(m is not None for m in old.metadata(rows[valid]))
    assert len(open_memory(root)) == n_old + n_add
    record("concurrency: handle held across memory-add", "old snapshot")


def test_readers_during_add(small_memory, tmp_path):
    _concurrent(small_memory, tmp_path, n_add=24, delay=0.02)


@pytest.mark.slow
@pytest.mark.parametrize("rep", range(5))
def test_readers_during_add_full(small_memory, tmp_path, rep):
    _concurrent(small_memory, tmp_path, n_add=64, delay=0.01)


def test_reader_waits_then_says_being_modified(small_memory, tmp_path, monkeypatch):
    root = tmp_path / "mem"
    shutil.copytree(small_memory[0], root)
    (root / fmt.COMMIT_LOCK).touch()
    monkeypatch.setattr(fmt, "READ_WAIT_S", 0.3)
    held, release = threading.Event(), threading.Event()

    def committer():
        with fmt.commit_lock(root, shared=False):
            held.set()
            release.wait(10)

    t = threading.Thread(target=committer)
    t.start()
    held.wait(10)
    t0 = time.monotonic()
    with pytest.raises(MemoryFormatError, match="being modified"):
        Memory.open(root)
    assert time.monotonic() - t0 >= 0.3
    record("concurrency: open during a commit", "being modified")
    release.set()
    t.join()
    assert len(Memory.open(root)) == 37
