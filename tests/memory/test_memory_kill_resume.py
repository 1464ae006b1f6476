"""kill -9 a real build subprocess at chosen points (RECO_REF_FAILPOINT) and at a random time; resume; compare.

The fail point ``RECO_REF_FAILPOINT=memory.<stage>`` (reco_ref/failpoints.py) makes the process SIGKILL
itself right after that stage (``chunk:N`` = after its N-th chunk file, ``staged``, ``commit``, ``commit-move``, ``manifest``), so
every phase of the build/commit protocol is interrupted at least once.  The resumed memory must be
byte-identical (embeddings, metadata, failure log) to an uninterrupted build.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from memory_testlib import FakeEncoder, file_digest, make_pairs

from reco_ref.errors import MemoryFormatError
from reco_ref.memory import Memory, add_to_memory, build_memory, read_pairs

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
N_ITEMS, CHUNK = 60, 8
COMPARED = ("image.npy", "text.npy", "meta.sqlite", "failures.jsonl")

SCRIPT = """
import os
import sys
from memory_testlib import FakeEncoder
from reco_ref.memory import build_memory, add_to_memory, read_pairs
kind, pairs, out, lo, hi = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
items = read_pairs(pairs)[lo:hi]
fn = build_memory if kind == "build" else add_to_memory
fn(out, items, FakeEncoder(32), chunk_size=%d, resume=True, progress=False,
   overlap_captions=os.environ.get("FAKE_ENCODER_CONCURRENT") == "1")
""" % CHUNK


def _env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(ROOT), env.get("PYTHONPATH", "")])
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _run(kind, pairs, out, lo, hi, **env):
    return subprocess.run([sys.executable, "-c", SCRIPT, kind, str(pairs), str(out), str(lo), str(hi)],
                          env=_env(**env), capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("kill")
    pairs = make_pairs(d / "src", N_ITEMS, bad=(9, 33))
    ref = d / "ref"
    build_memory(ref, read_pairs(pairs), FakeEncoder(32), chunk_size=CHUNK, progress=False)
    return pairs, ref


def _same_as_ref(out: Path, ref: Path):
    assert not (out / ".build").exists()
    assert not list(out.glob(".trash-build*"))
    mem = Memory.open(out)  # full validation (sha256 of every file)
    assert mem.manifest["counts"] == Memory.open(ref).manifest["counts"]
    for f in COMPARED:
        assert file_digest(out / f) == file_digest(ref / f), f


@pytest.mark.parametrize("stage", ["chunk:1", "chunk:3", "staged", "commit", "commit-move", "manifest"])
def test_kill9_at_stage_then_resume(setup, tmp_path, stage):
    pairs, ref = setup
    out = tmp_path / "mem"
    p = _run("build", pairs, out, 0, N_ITEMS, RECO_REF_FAILPOINT=f"memory.{stage}")
    assert p.returncode == -signal.SIGKILL, p.stderr
    if stage.startswith("chunk"):
        n_done = int(stage.split(":")[1])
        assert len(list((out / ".build/chunks").glob("chunk_*.npz"))) == n_done
        with pytest.raises(MemoryFormatError, match=f"incomplete.*{n_done} of 8 chunks.*resume"):
            Memory.open(out)
    elif stage in ("staged",):
        with pytest.raises(MemoryFormatError, match="incomplete"):
            Memory.open(out)
    elif stage in ("commit", "commit-move", "manifest"):
        with pytest.raises(MemoryFormatError, match="interrupted while committing.*--resume"):
            Memory.open(out)
    # resume in a fresh process, exactly as a user would
    p = _run("build", pairs, out, 0, N_ITEMS)
    assert p.returncode == 0, p.stderr
    _same_as_ref(out, ref)


@pytest.mark.parametrize("concurrent", [False, True], ids=["serial", "captions-overlapped"])
def test_kill9_at_random_time_then_resume(setup, tmp_path, concurrent):
    pairs, ref = setup
    out = tmp_path / "mem"
    seed = int(os.environ.get("RECO_REF_TEST_SEED", time.time_ns() % 10_000))
    rnd = random.Random(seed)
    # overlapped: each chunk's captions encode on a background thread while its images (slowed) encode
    env = _env(FAKE_ENCODER_DELAY=0.01, FAKE_ENCODER_CONCURRENT=int(concurrent))
    argv = [sys.executable, "-c", SCRIPT, "build", str(pairs), str(out), "0", str(N_ITEMS)]
    # how long an uninterrupted run takes here (start-up included), so the kills land inside a build
    t0 = time.perf_counter()
    subprocess.run(argv[:5] + [str(tmp_path / "timing")] + argv[6:], env=env, capture_output=True, timeout=120,
                   check=True)
    duration = time.perf_counter() - t0
    kills = 0
    for attempt in range(10):  # 3 kills at random moments of a build (each resumes the previous one)
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(rnd.uniform(0.05, 0.9) * duration)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.communicate(timeout=60)
        if kills >= 3:
            break
        if (out / "manifest.json").is_file() and not (out / ".build").exists():
            import shutil

            shutil.rmtree(out)  # finished before the kill: start over, nothing was tested by that run
    p = _run("build", pairs, out, 0, N_ITEMS)
    assert p.returncode == 0, (seed, p.stderr)
    assert kills >= 1, f"seed {seed}: every build finished before its kill; nothing was tested"
    _same_as_ref(out, ref)


@pytest.mark.parametrize("stage", ["chunk:2", "commit-move"])
def test_kill9_during_add_then_resume(setup, tmp_path, stage):
    pairs, ref = setup
    out = tmp_path / "mem"
    build_memory(out, read_pairs(pairs)[:20], FakeEncoder(32), chunk_size=CHUNK, progress=False)
    p = _run("add", pairs, out, 20, N_ITEMS, RECO_REF_FAILPOINT=f"memory.{stage}")
    assert p.returncode == -signal.SIGKILL, p.stderr
    if stage == "chunk:2":
        assert len(Memory.open(out)) == 19  # the old memory is intact and usable
    else:
        with pytest.raises(MemoryFormatError, match="interrupted while committing"):
            Memory.open(out)
    p = _run("add", pairs, out, 20, N_ITEMS)
    assert p.returncode == 0, p.stderr
    mem, want = Memory.open(out), Memory.open(ref)
    np.testing.assert_array_equal(np.asarray(mem.image), np.asarray(want.image))
    np.testing.assert_array_equal(np.asarray(mem.text), np.asarray(want.text))
    assert mem.metadata(range(len(want))) == want.metadata(range(len(want)))
    assert mem.failures() == want.failures()
    # and re-running the finished add with resume adds nothing twice
    add_to_memory(out, read_pairs(pairs)[20:], FakeEncoder(32), chunk_size=CHUNK, progress=False, resume=True)
    assert len(Memory.open(out)) == len(want)
