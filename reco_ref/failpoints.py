"""Fail points: make "the process was killed right here" reproducible, for the crash-recovery tests.

Runtime code marks the places where a crash must be survivable with ``failpoint("memory.commit")``
(optionally with a counter: ``failpoint("memory.chunk", 3)`` is the point ``memory.chunk:3``).
When the environment variable ``RECO_REF_FAILPOINT`` names that point, the process sends itself
SIGKILL there, exactly as ``kill -9`` would: no ``finally`` runs, no file is flushed.  When the
variable is unset (every normal run) a fail point costs one dictionary look-up.

``RECO_REF_FAILPOINT`` holds one point or several separated by commas, e.g.::

    RECO_REF_FAILPOINT=memory.chunk:2 reco-ref build-memory --pairs p.csv --out mem   # dies after chunk 2
    reco-ref build-memory --pairs p.csv --out mem --resume                             # finishes it

The points that exist (grep ``failpoint(`` for the list in the code) are documented in
``docs/failpoints.md``.  One older spelling is kept as an alias: ``RECO_REF_TRAIN_KILL_AT_STEP=N`` arms
``train.step:N`` (the training loop's kill hook before it became a fail point).  Where ``os.kill``/SIGKILL do not exist (Windows), ``os._exit(137)`` stands in.
"""

from __future__ import annotations

import os

ENV = "RECO_REF_FAILPOINT"
#: older environment variables, each arming one counted point: ``VAR=N`` arms ``point:N``
ALIASES = {"RECO_REF_TRAIN_KILL_AT_STEP": "train.step"}


def armed() -> set[str]:
    """The fail points named by ``$RECO_REF_FAILPOINT`` and its aliases (empty set when all are unset)."""
    points = {p.strip() for p in os.environ.get(ENV, "").split(",") if p.strip()}
    for var, point in ALIASES.items():
        count = os.environ.get(var, "").strip()
        if count:
            points.add(f"{point}:{count}")
    return points


def failpoint(name: str, count: int | None = None) -> None:
    """Kill this process (SIGKILL) if ``$RECO_REF_FAILPOINT`` (or an alias) names ``name`` (or ``name:count``)."""
    if not os.environ.get(ENV) and not any(os.environ.get(var) for var in ALIASES):
        return
    here = name if count is None else f"{name}:{count}"
    if here in armed():
        import signal

        sig = getattr(signal, "SIGKILL", None)
        if sig is None:  # pragma: no cover - not POSIX
            os._exit(137)
        os.kill(os.getpid(), sig)
