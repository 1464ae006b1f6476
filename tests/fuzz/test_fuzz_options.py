"""Extreme option values at both doors: the CLI parser (one usage line, exit 2) and the library functions.

Every numeric option of every memory / encode verb is fed values from far below to far above its range
and non-numbers; the library receives the same values (a Python caller skips the parser).  Nothing may
reach hnswlib or an allocation unchecked: ``--M 0`` used to kill the interpreter.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
from fuzz_lib import call, check_cli, record, run_cli

from reco_ref.cli import build_parser
from reco_ref.memory.limits import LIMITS

VALUES = ["-1", "0", "1", "2", "3", "1024", "1025", "65536", "65537", "2147483648", "9223372036854775808", "1e3",
          "1.5", "nan", "", " 7", "0x10", "abc", "-0"]
OPTIONS = {  # verb -> (option, limits key)
    "build-memory": [("--M", "M"), ("--ef-construction", "ef_construction"), ("--chunk-size", "chunk_size"),
                     ("--batch-size", "batch_size"), ("--threads", "threads"), ("--shards", "shards"),
                     ("--workers", "workers"), ("--max-pixels", "max_pixels")],
    "memory-add": [("--chunk-size", "chunk_size"), ("--batch-size", "batch_size"), ("--threads", "threads")],
    "memory-search": [("-k", "k"), ("--ef", "ef"), ("--max-pixels", "max_pixels")],
    "encode": [("--threads", "threads"), ("--batch-size", "batch_size"), ("--chunk-size", "chunk_size"),
               ("--max-pixels", "max_pixels")],
}
BASE = {"build-memory": ["--out", "x", "--pairs", "p.csv"], "memory-add": ["mem", "--pairs", "p.csv"],
        "memory-search": ["mem", "--text", "a"], "encode": ["--texts", "t.txt", "--out", "o.npy"]}


def _in_range(text: str, key: str) -> bool:
    try:
        v = int(text, 10)
    except ValueError:
        return False
    lo, hi = LIMITS[key]
    return v >= lo and (hi is None or v <= hi)


@pytest.mark.parametrize("verb", sorted(OPTIONS))
def test_cli_parser_ranges(verb):
    parser = build_parser()
    for opt, key in OPTIONS[verb]:
        for v in VALUES:
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                try:
                    ns = parser.parse_args([verb, *BASE[verb], opt, v])
                    code = 0
                except SystemExit as exc:
                    code = exc.code
            if _in_range(v, key):
                assert code == 0, (verb, opt, v, err.getvalue())
                record("options: CLI parser", "ok")
                assert getattr(ns, opt.lstrip("-").replace("-", "_")) == int(v, 10)
            else:
                lines = [ln for ln in err.getvalue().splitlines() if ": error: " in ln]
                assert code == 2 and len(lines) == 1 and opt.lstrip("-") in lines[0], (verb, opt, v, err.getvalue())
                record("options: CLI parser", "error")


BAD_INTS = [0, -1, 1, 2**31, 2**63, 1.5, float("nan"), "16", None, True, np.int64(-3)]


def test_library_build_options(tmp_path):
    from memory_testlib import FakeEncoder, make_pairs

    from reco_ref.memory import build_memory, read_pairs

    items = read_pairs(make_pairs(tmp_path / "src", 6))
    for i, (name, v) in enumerate((k, v) for k in ("M", "ef_construction", "chunk_size", "batch_size", "num_threads",
                                                     "seed") for v in BAD_INTS):
        lo, hi = LIMITS[{"num_threads": "threads"}.get(name, name)]
        ok = isinstance(v, (int, np.integer)) and not isinstance(v, bool) and lo <= v <= (hi or v) or \
            (v is None and name == "num_threads")
        outcome, _ = call("options: library build_memory", build_memory, tmp_path / f"m{i}", items, FakeEncoder(8),
                          progress=False, **{name: v})
        assert outcome == ("ok" if ok else "error"), (name, v)


def test_library_search_options(small_memory):
    from reco_ref.memory import open_memory

    mem = open_memory(small_memory[0])
    q = np.asarray(mem.text[:3], np.float32)
    n = len(mem)
    cases = [dict(k=0), dict(k=-1), dict(k=True), dict(k=1.0), dict(k=2**62), dict(k=np.int32(5)), dict(ef=0),
             dict(ef=10**9), dict(ef=64), dict(dup_threshold="abc"), dict(dup_threshold=float("nan")),
             dict(dup_threshold=2.0), dict(dup_threshold=[0.5]), dict(dup_threshold=0.9), dict(modality="audio"),
             dict(exclude="x"), dict(exclude=np.zeros((3, 2), np.float32))]
    for kw in cases:
        kw = {"k": 5, **kw}
        outcome, value = call("options: library search", mem.search, q, modality=kw.pop("modality", "text"), **kw)
        if outcome == "ok":
            rows, scores, valid = value
            assert rows.shape == (3, min(int(kw["k"]), n))  # capped at the memory's size, never padded to k
    bad_q = {"unnormalised": q * 10, "zero": np.zeros_like(q), "nan": np.full_like(q, np.nan), "1-D": q[0],
             "int": q.astype(np.int64), "wrong dim": q[:, :5], "list": q.tolist(), "3-D": q[None]}
    for name, queries in bad_q.items():
        outcome, msg = call("options: library search queries", mem.search, queries, modality="text", k=3)
        assert outcome == "error", name
    assert "zero vector" in call("options: library search queries", mem.search, bad_q["zero"], "text", 3)[1]
    assert "L2-normalised" in call("options: library search queries", mem.search, bad_q["unnormalised"], "text", 3)[1]


@pytest.mark.parametrize("full", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["slice", "all"])
def test_cli_extremes_end_to_end(small_memory, tmp_path, full):
    mem, pairs = small_memory
    cases = [["build-memory", "--pairs", pairs, "--out", tmp_path / "a", "--M", "0"],
             ["memory-search", mem, "--text", "a photo", "-k", "200000000"]]
    if full:
        cases += [["build-memory", "--pairs", pairs, "--out", tmp_path / "b", "--M", "1"],
                  ["build-memory", "--pairs", pairs, "--out", tmp_path / "c", "--batch-size", "0"],
                  ["memory-search", mem, "--text", "   "],
                  ["memory-search", mem, "--text", "x", "--modality", "image", "--ef", "100000"]]
    for args in cases:
        extra = ["--no-progress"] if args[0] == "build-memory" else []
        p = run_cli(*args, "--model", "memory_testlib:fake32", *extra)
        outcome = check_cli(p, "options: CLI end to end")
        if "200000000" in args:
            assert outcome == "ok" and p.stdout.count('"score"') == 37  # all rows, not 200 million slots
    p = run_cli("memory-search", mem, "--text", "x", "--model", "memory_testlib:fake32", "-k", "0", "--debug")
    assert p.returncode == 2 and "Traceback" not in p.stderr  # usage errors stay one line even with --debug
    p = run_cli("memory-search", tmp_path / "nope", "--text", "x", "--model", "memory_testlib:fake32")
    assert check_cli(p, "options: CLI end to end") == "error"
    p = run_cli("--debug", "memory-search", tmp_path / "nope", "--text", "x", "--model", "memory_testlib:fake32")
    assert p.returncode == 1 and "Traceback" in p.stderr and "MemoryFormatError" in p.stderr  # --debug re-raises
