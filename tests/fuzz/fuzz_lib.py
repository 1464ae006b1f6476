"""What every fuzz case asserts, and how cases run (in-process, or in a subprocess under a memory cap).

The contract (issue 11): for every input, the tool either succeeds correctly or stops with ONE line
``reco-ref VERB: error: ...`` (exit 1; argparse usage errors exit 2) — no traceback, no crash (a
negative return code is a signal: the interpreter died), peak memory bounded (subprocesses run under
``RLIMIT_AS``; in-process cases under ``tracemalloc``), and no pre-existing file changed.

Outcome counts per class are collected in :data:`COUNTS`; ``RECO_REF_FUZZ_REPORT=path.json`` makes
the session write them (docs/bad_inputs.md quotes the last full run).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import os
import resource
import subprocess
import sys
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
MEMLIB = ROOT / "tests" / "memory"
if str(MEMLIB) not in sys.path:
    sys.path.insert(0, str(MEMLIB))

from reco_ref.errors import RecoError  # noqa: E402

AS_LIMIT = 1 << 30  # address-space cap of a CLI subprocess with the fake encoder (its own need: ~0.5 GiB)
COUNTS: collections.Counter = collections.Counter()  # (class, outcome) -> cases
PEAKS: dict[str, int] = {}  # class -> the largest peak RSS (bytes) of its measured subprocess cases


def record(cls: str, outcome: str, peak: int | None = None) -> str:
    COUNTS[(cls, outcome)] += 1
    if peak is not None:
        PEAKS[cls] = max(PEAKS.get(cls, 0), peak)
    return outcome


def env(**extra: str) -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(MEMLIB), e.get("PYTHONPATH", "")])
    e.pop("RECO_REF_DEBUG", None)
    e.update({k: str(v) for k, v in extra.items()})
    return e


def _limit(nbytes: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (nbytes, nbytes))
    return apply


def run_cli(*args, limit: int = AS_LIMIT, timeout: float = 180, **extra_env: str) -> subprocess.CompletedProcess:
    """``python -m reco_ref.cli ARGS`` under an address-space cap of ``limit`` bytes."""
    return subprocess.run([sys.executable, "-m", "reco_ref.cli", *map(str, args)], env=env(**extra_env),
                          capture_output=True, text=True, timeout=timeout, preexec_fn=_limit(limit))


def run_py(code: str, *args, limit: int = AS_LIMIT, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], env=env(), capture_output=True, text=True,
                          timeout=timeout, preexec_fn=_limit(limit))


# A child's ru_maxrss starts from its parent's resident size at fork (Linux copies the page tables, and exec keeps
# the high-water mark of the image it replaces), so a measured case is started by this small launcher, not by
# pytest (whose own size grows with what the tests build in-process): the launcher forks the case under the cap
# and writes the case's own peak (os.wait4) to the file named first.
LAUNCH = """
import os, resource, signal, sys
peak_file, limit, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
pid = os.fork()
if pid == 0:
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    signal.alarm(timeout)  # kept across exec: the case is killed (SIGALRM) if it runs longer
    os.execv(sys.argv[4], sys.argv[4:])
_, status, usage = os.wait4(pid, 0)
open(peak_file, "w").write(str(usage.ru_maxrss * 1024))
rc = os.waitstatus_to_exitcode(status)
sys.exit(rc if rc >= 0 else 128 - rc)
"""


def measured(argv: list, *, limit: int, timeout: int = 300, **extra_env: str
             ) -> tuple[subprocess.CompletedProcess, int]:
    """Run ``argv`` under an address-space cap of ``limit`` bytes; -> (the finished process, its peak resident
    bytes). A case killed by a signal comes back with the negative return code ``check_cli`` reports.

    ``argv`` items may be bytes (a file name that is not UTF-8); the output is decoded as UTF-8 with undecodable
    bytes shown as ``\\xNN`` (a verb printing raw bytes then fails the escaping checks, not the harness).
    """
    with tempfile.TemporaryDirectory() as d:
        peak_file = Path(d) / "peak"
        args = [a if isinstance(a, bytes) else str(a) for a in argv]
        p = subprocess.run([sys.executable, "-c", LAUNCH, str(peak_file), str(limit), str(timeout), *args],
                           env=env(**extra_env), capture_output=True, encoding="utf-8", errors="backslashreplace",
                           timeout=timeout + 60)
        if p.returncode > 128:
            p.returncode = 128 - p.returncode  # the case's signal, as subprocess reports one
        return p, int(peak_file.read_text())


def check_cli(p: subprocess.CompletedProcess, cls: str, *, must_fail: bool = False) -> str:
    """Assert the contract on a finished CLI run; return and record "ok" or "error"."""
    assert p.returncode >= 0, f"crashed with signal {-p.returncode}: {p.stderr[-2000:]}"
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    assert p.returncode in (0, 1, 2), (p.returncode, p.stderr[-2000:])
    if p.returncode == 0:
        assert not must_fail, f"expected an error, got success: {p.stdout[-500:]} {p.stderr[-500:]}"
        return record(cls, "ok")
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    errs = [ln for ln in lines if ": error: " in ln]
    assert len(errs) == 1 and lines[-1] == errs[0], p.stderr[-2000:]
    assert "unexpected" not in errs[0] and "a bug" not in errs[0], errs[0]  # every error is a named one
    return record(cls, "error")


@contextlib.contextmanager
def peak_below(nbytes: int):
    """Fail if Python-tracked allocations (numpy's included) inside the block peak above ``nbytes``."""
    tracemalloc.start()
    try:
        yield
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= nbytes, f"peak allocation {peak} bytes > bound {nbytes}"


def call(cls: str, fn, *args, **kw):
    """Run a library call: success -> ("ok", value); a RecoError/FileNotFoundError -> ("error", message).

    Any other exception propagates (the test fails with its traceback): it would reach the user as an
    "unexpected" error.
    """
    try:
        value = fn(*args, **kw)
    except (RecoError, FileNotFoundError) as exc:
        return record(cls, "error"), str(exc)
    return record(cls, "ok"), value


def tree(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every regular file under ``folder`` (links not followed)."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        for f in files:
            p = Path(dirpath) / f
            if p.is_symlink() or not p.is_file():
                continue
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def assert_unchanged(before: dict[str, str], after: dict[str, str], what: str = "") -> None:
    changed = [k for k, v in before.items() if after.get(k) != v]
    assert not changed, f"{what}: pre-existing files changed or removed: {changed[:5]}"


def flip_bit(data: bytes, bit: int) -> bytes:
    b = bytearray(data)
    b[bit // 8] ^= 1 << (bit % 8)
    return bytes(b)


def unit_rows(a: np.ndarray) -> np.ndarray:
    """Rows of ``a`` scaled to unit L2 norm, float32."""
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)


def arrays_memory(out: Path, n: int, dim: int, name: str, fingerprint: str, key_dim: int | None = None,
                  seed: int = 0) -> Path:
    """A memory of ``n`` rows of random unit vectors (captions "a photo of a c{i % 3}.", labels 0..2); ``n`` may be 0."""
    from reco_ref.memory import build_memory_from_arrays

    rng = np.random.default_rng(seed)

    def rows(d):
        return unit_rows(rng.standard_normal((n, d))) if n else np.zeros((0, d), np.float32)

    items = [{"image": "", "caption": f"a photo of a c{i % 3}.", "source": f"array:{i}", "label": i % 3,
              "split": "train", "tags": None} for i in range(n)]
    build_memory_from_arrays(out, rows(dim), rows(dim), keys=rows(key_dim) if key_dim else None, items=items,
                             name=name, fingerprint=fingerprint, progress=False)
    return out
