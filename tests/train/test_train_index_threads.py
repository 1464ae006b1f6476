"""scripts/train_reco_mini_fusion.py --index-threads N: every memory the script builds gets num_threads=N
(one thread: the same HNSW graph on every build, which is how the shipped record was measured)."""
import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location("rebuild_threads", ROOT / "scripts" / "train_reco_mini_fusion.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("threads", [None, 1])
def test_memory_builds_with_the_index_threads_given(tmp_path, monkeypatch, threads):
    import reco_ref.memory as memory

    rebuild = _script()
    seen = {}
    monkeypatch.setattr(memory, "build_memory_from_arrays", lambda out, *a, **kw: seen.update(kw))
    monkeypatch.setattr(memory.Memory, "open", staticmethod(lambda *a, **kw: "opened"))
    monkeypatch.setattr(rebuild, "INDEX_THREADS", threads)
    n = 4
    ds = SimpleNamespace(image=np.zeros((n, 2), np.float32), text=np.zeros((n, 2), np.float32),
                         keys=np.zeros((n, 2), np.float32), items=lambda idx, mixed=False: [{}] * len(idx))
    enc = SimpleNamespace(name="x", fingerprint="y")
    assert rebuild.memory(tmp_path, "m", ds, np.arange(n), enc) == "opened"
    assert seen["num_threads"] == threads


def test_index_threads_rejects_zero(capsys):
    rebuild = _script()
    with pytest.raises(SystemExit) as e:
        rebuild.main(["--index-threads", "0", "--prepare-only"])
    assert e.value.code == 2 and "--index-threads/--threads: expected a positive integer" in capsys.readouterr().err
