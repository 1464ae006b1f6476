"""reco_ref/chunks.py: the one resumable chunk-and-plan primitive of ``encode`` and the memory builds (issue 22
item 2). The kill -9 resumes themselves are tested where each writer lives (tests/encoders, tests/memory)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from reco_ref.chunks import (MAX_STATE_BYTES, chunk_path, missing_chunks, plan_differences, read_state_json,
                             write_chunks)
from reco_ref.errors import MemoryFormatError, RecoError

PKG = Path(__file__).resolve().parents[1] / "reco_ref"


def test_both_writers_name_find_and_write_chunks_through_the_primitive():
    for rel in ("encoders/stream.py", "memory/build.py"):
        src = (PKG / rel).read_text(encoding="utf-8")
        assert "from ..chunks import" in src, rel
        assert not re.search(r"chunk_\{", src), f"{rel} names chunk files itself (use reco_ref.chunks.chunk_path)"
        assert "atomic_save_npz" not in src, f"{rel} writes chunks itself (use reco_ref.chunks.write_chunks)"


def test_a_killed_run_resumes_with_the_missing_chunks_only(tmp_path):
    made = []

    def produce(c):
        if c == 2 and not made.count("resumed"):
            raise KeyboardInterrupt  # the kill, half-way through chunk 2
        made.append(c)
        return {"x": np.full(3, c, np.int64)}

    with pytest.raises(KeyboardInterrupt):
        write_chunks(tmp_path, missing_chunks(tmp_path, 4), produce)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chunk_000000.npz", "chunk_000001.npz"]
    made.append("resumed")
    todo = missing_chunks(tmp_path, 4)
    seen = []
    write_chunks(tmp_path, todo, produce, after=lambda c, k: seen.append((c, k)))
    assert todo == [2, 3] and seen == [(2, 1), (3, 2)]
    assert [int(np.load(chunk_path(tmp_path, c))["x"][0]) for c in range(4)] == [0, 1, 2, 3]


def test_plan_differences():
    old = {"kind": "images", "chunk_size": 5, "hint": "a"}
    assert plan_differences(old, {"kind": "images", "chunk_size": 2, "hint": "b"}) == ["chunk_size", "hint"]
    assert plan_differences(old, {"kind": "images", "chunk_size": 5, "hint": "b"}, keys=("kind", "chunk_size")) == []


def _texts_encoder():
    return SimpleNamespace(name="fake", fingerprint="f" * 64, dim=4,
                           encode_texts=lambda texts, **kw: np.eye(4, dtype=np.float32)[[len(t) % 4 for t in texts]])


@pytest.mark.parametrize("plan, match", [("{not json", r"not valid JSON .*re-run with --restart to discard it"),
                                         ("[]", r"expected a JSON object, found list")])
def test_encode_refuses_a_damaged_plan_in_one_line(tmp_path, plan, match):
    """encode read its plan with a bare json.loads: a damaged plan.json was an unexpected JSONDecodeError (or an
    AttributeError for a list); it now reads it as the memory builds do."""
    from reco_ref.encoders.stream import encode_to_file

    (tmp_path / "x.parts").mkdir()
    (tmp_path / "x.parts" / "plan.json").write_text(plan)
    with pytest.raises(RecoError, match=match) as e:
        encode_to_file(_texts_encoder(), ["a", "bb"], tmp_path / "x.npy", kind="texts", progress=False)
    assert "\n" not in str(e.value)
    meta = encode_to_file(_texts_encoder(), ["a", "bb"], tmp_path / "x.npy", kind="texts", progress=False,
                          resume=False)
    assert meta["n_ok"] == 2 and not (tmp_path / "x.parts").exists()


def test_an_oversized_state_file_is_refused_by_its_size(tmp_path):
    """The memory's reader caught its own size error as 'not valid JSON'; the size is now the message."""
    from reco_ref.memory.format import read_build_json

    p = tmp_path / ".build" / "plan.json"
    p.parent.mkdir()
    with open(p, "wb") as fh:
        fh.truncate(MAX_STATE_BYTES + 1)  # sparse: nothing is written or read
    with pytest.raises(MemoryFormatError) as e:
        read_build_json(p)
    assert str(e.value) == f"{p}: {MAX_STATE_BYTES + 1} bytes, not a build-state file (at most {MAX_STATE_BYTES})"
    p.write_text(json.dumps({"kind": "build"}))
    assert read_state_json(p) == {"kind": "build"}
