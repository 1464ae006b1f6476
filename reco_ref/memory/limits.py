"""The accepted range of every numeric option of the memory verbs and functions (one table, two doors).

The CLI parses each option with ``checks.int_option(*LIMITS[name])`` and the library functions check
the same range with :func:`check_option` when they receive it, so an out-of-range value is refused
before it reaches hnswlib (which crashes the interpreter on ``M=0``) or sizes an allocation.
Why each bound:

* ``M`` 2..1024 — hnswlib's level multiplier is 1/ln(M) (M=1 divides by zero); beyond 1024 the graph
  costs more than brute force.
* ``ef_construction``, ``ef`` 1..100000 — beam widths; larger only burns time.
* ``k`` >= 1 — no upper bound: results are capped at the memory's size (``search_index``).
* ``chunk_size`` 1..4194304, ``batch_size`` 1..65536 — the RAM of one chunk / one encoder batch.
* ``threads`` 1..4096, ``shards`` 1..1024, ``workers`` 1..256, ``seed`` 0..2**31-1.
* ``max_pixels`` 1..2**40 — the image decoder's pixel budget.
* ``rows`` 1..2**50, ``dim`` 1..65536 — a plan's size (``build-memory --estimate-only --rows N``).
"""

from __future__ import annotations

from ..checks import check_int
from ..errors import MemoryFormatError

LIMITS: dict[str, tuple[int, int | None]] = {
    "M": (2, 1024),
    "ef_construction": (1, 100_000),
    "ef": (1, 100_000),
    "k": (1, None),
    "chunk_size": (1, 1 << 22),
    "batch_size": (1, 65_536),
    "threads": (1, 4096),
    "shards": (1, 1024),
    "workers": (1, 256),
    "seed": (0, 2**31 - 1),
    "max_pixels": (1, 1 << 40),
    "rows": (1, 1 << 50),  # a plan's pairs (build-memory --estimate-only --rows N)
    "dim": (1, 1 << 16),  # a plan's embedding dim
}


def check_option(name: str, value: object) -> int:
    """``value`` checked against ``LIMITS[name]`` (:class:`MemoryFormatError` naming the option)."""
    lo, hi = LIMITS[name]
    return check_int(name, value, lo, hi, error=MemoryFormatError)
