"""Fuzz suite fixtures: a small memory built once, and the outcome report (``RECO_REF_FUZZ_REPORT``)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fuzz_lib  # noqa: E402


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("RECO_REF_FUZZ_REPORT")
    if path and fuzz_lib.COUNTS:
        by_class: dict = {}
        for (cls, outcome), n in sorted(fuzz_lib.COUNTS.items()):
            by_class.setdefault(cls, {})[outcome] = n
        peaks = {cls: round(n / 2**20) for cls, n in sorted(fuzz_lib.PEAKS.items())}
        Path(path).write_text(json.dumps({"exit": int(exitstatus), "classes": by_class, "max_peak_rss_mib": peaks},
                                         indent=2) + "\n")


@pytest.fixture(scope="session")
def small_memory(tmp_path_factory):
    """A 40-row memory (fake 32-dim encoder, `memory_testlib:fake32`, 3 undecodable items) and its pairs file."""
    from memory_testlib import FakeEncoder, make_pairs

    from reco_ref.memory import build_memory, read_pairs

    d = tmp_path_factory.mktemp("fuzzmem")
    pairs = make_pairs(d / "src", 40, bad=(3, 17, 30))
    build_memory(d / "mem", read_pairs(pairs), FakeEncoder(32), chunk_size=16, M=4, ef_construction=20,
                 progress=False)
    return d / "mem", pairs
