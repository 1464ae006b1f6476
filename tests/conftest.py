"""Shared fixtures and environment for the test-suite.

* CUDA: where no CUDA driver is present, the Numba CUDA tests run under the CUDA simulator.
  The variable must be set before numba is first imported, hence here at collection time.
  Set ``RECO_REF_REAL_CUDA=1`` to insist on a real GPU (the tests then fail rather than simulate).
* ``shared_data``: the read-only fine-grained sets at ``../shared/data``; tests skip cleanly where absent.
"""

from __future__ import annotations

import ctypes.util
import os
from pathlib import Path

import pytest

if os.environ.get("RECO_REF_REAL_CUDA") != "1" and ctypes.util.find_library("cuda") is None:
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("RECO_REF_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of ``../shared/data``; skips the test where it is absent."""
    if not (SHARED_DATA / "flowers102" / "manifest.csv").is_file():
        pytest.skip(f"shared data not found at {SHARED_DATA} (set RECO_REF_SHARED_DATA to point elsewhere)")
    return SHARED_DATA


@pytest.fixture
def rng():
    import numpy as np

    return np.random.default_rng(12345)
