"""Per-stage wall times of the numba fusion steps: :func:`profile_steps` and the ``_tick`` the layer calls."""

from __future__ import annotations

import time
from contextlib import contextmanager


#: Stage timings of the last steps when a list (see :func:`profile_steps`); None = off (then a tick
#: costs one ``is None`` test).
_PROFILE = None


def _tick(stage: str) -> None:
    """Close the stage that ran since the previous tick (profiling only)."""
    if _PROFILE is not None:
        _PROFILE.append((stage, time.perf_counter()))


@contextmanager
def profile_steps():
    """Record per-stage wall times of the forward/backward steps run inside the block.

    Yields a list of ``(stage, seconds)``; a stage's time is from the previous tick to its own
    (GEMMs and kernels are synchronous, so this is exact up to the few Python statements per stage).
    Used by ``benchmarks/bench_fusion_query.py`` for the profile table.
    """
    global _PROFILE
    raw, out = [], []
    _PROFILE = raw
    try:
        yield out
    finally:
        _PROFILE = None
        for (_, t0), (name, t1) in zip(raw, raw[1:]):
            if name != "start":
                out.append((name, t1 - t0))
