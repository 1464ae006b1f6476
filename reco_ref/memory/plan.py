r"""The plan for a memory that outgrows one machine, from per-row figures measured at small scale.

``build-memory --estimate-only --rows N --shards S`` prints it. Every input is either a format fact or a
figure measured by ``scripts/scale_bench.py`` and stored, with the command that produced it and the
machine, in ``scale_constants.json`` beside this module (docs/scale.md shows the run). For a dim ``D``,
``M`` or dtype other than the measured ones, only the parts the formats fix move: ``D·itemsize`` per
vector row, and :func:`~reco_ref.memory.estimate.hnsw_file_bytes` per indexed row.

With ``n_s = N / S`` rows per shard, measured values subscripted 0 (``n_0`` rows per shard, ``S_0`` shards
on ``W_0`` workers of one thread), ``T`` threads per worker and ``W`` workers:

* **disk** per row: as measured (two ``.npy`` rows, two HNSW rows, the SQLite row and the small files),
  moved by ``2·Δ(D·itemsize)`` and ``2·Δh(D, M)``; the SQLite row holds synthetic metadata without a
  caption (real captions add their bytes). While a shard builds, its
  chunk files hold its vectors once more.
* **RAM** per shard: ``n_s · I · r(D, M)``, ``I`` the indexes resident (2: RECO searches image→image and
  text→text), ``r`` the RSS growth per row when a served worker loads one index (measured); the ``.npy``
  rows are memory-mapped and read per retrieved row, not held. A worker may fill :data:`RAM_USABLE` of its
  RAM: shards per worker ``= ⌊RAM_USABLE · RAM_w / shard RAM⌋``, workers ``W = ⌈S / that⌉``.
* **build time**: encoding ``N / (W · e)`` with ``e`` the encoder's pairs/s per worker (unless given: the
  reco-mini CPU rate measured per thread, times ``T``), then indexing ``⌈S/W⌉`` waves of ``2 n_s`` inserts at
  ``T · i_0 · log n_0 / log n_s`` inserts/s (``i_0`` measured per thread; an insert costs ~log n).
* **search** of a batch of ``b`` queries: one query on one shard takes ``t(n_s) = t_0 · log n_s / log n_0``
  on one thread (``t_0`` measured in-process; at batch 256 the core-seconds per query and shard); a worker
  searches its ``S/W`` shards ``T`` at a time; Dask adds ``τ`` a task (measured: the slope of a call's time
  over 1 to 256 trivial pinned tasks) and a fixed part ``F`` (client, scheduler, shipping queries and
  answers, the merge) that the measured served latency ``L_0`` fixes:
  ``F = L_0 - τ S_0 - ⌈S_0/W_0⌉ b t_0`` and ``latency = F + τ S + ⌈S/(W T)⌉ · b · t(n_s)``.
  At the measured layout the plan gives back ``L_0``.

What is not modelled: recall at a fixed ``ef`` falls slowly as shards grow (measured only at ``n_0``);
network time between machines (the measurement ran on one machine); a scheduler overloaded by thousands of
tasks a call.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MemoryFormatError
from .estimate import hnsw_file_bytes

CONSTANTS = Path(__file__).with_name("scale_constants.json")
#: share of a worker's RAM its resident shards may take: Dask pauses a worker at 80 % of its memory
#: limit (``distributed.worker.memory.pause``) and the rest is the worker itself, queries and results
RAM_USABLE = 0.7
GIB = 1 << 30


def load_constants(path: str | Path | None = None) -> dict:
    """The measured figures (``scale_constants.json`` unless ``path``), refused in one line if unreadable."""
    path = Path(path) if path else CONSTANTS
    try:
        c = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise MemoryFormatError(f"{path}: unreadable scale constants ({exc}); "
                                "re-run scripts/scale_bench.py --constants to measure them") from None
    need = ("dim", "dtype", "M", "shard_rows", "shards", "served_workers", "disk_bytes_per_row",
            "ram_bytes_per_row_one_index_served", "hnsw_inserts_per_s_per_thread", "shard_query_s_batch1",
            "shard_query_core_s_batch256", "served_latency_s_batch1", "served_latency_s_batch256", "dask_task_s",
            "command")
    missing = [k for k in need if k not in c]
    if missing:
        raise MemoryFormatError(f"{path}: scale constants lack {', '.join(missing)}")
    return c


def _hnsw_row(dim: int, M: int) -> float:
    """Bytes per indexed row of an hnswlib file (the format's per-row part, header amortised away)."""
    n = 1_000_000
    return (hnsw_file_bytes(n, dim, M) - hnsw_file_bytes(0, dim, M)) / n


def plan_for(rows: int, shards: int, *, dim: int | None = None, dtype: str | None = None, M: int | None = None,
             worker_ram_gib: float = 64.0, threads_per_worker: int | None = None,
             encode_pairs_per_s: float | None = None, resident_indexes: int = 2,
             constants: dict | None = None) -> dict:
    """Shards, workers, disk, build time and search latency of a memory of ``rows`` pairs in ``shards`` shards.

    Parameters
    ----------
    rows, shards : the memory's size and how many shards it is cut into
    dim, dtype, M : the memory's embedding dim, row dtype and HNSW M (default: the measured ones)
    worker_ram_gib : RAM of one worker machine (GiB)
    threads_per_worker : hnswlib threads a worker gives a build or a search (default: the measured build's)
    encode_pairs_per_s : encoder pairs/s of one worker (default: the measured reco-mini CPU rate a thread, times
        ``threads_per_worker``)
    resident_indexes : indexes each shard keeps in RAM (2: image and text; 1: one direction only)
    constants : measured figures (default :func:`load_constants`)

    Returns
    -------
    dict with per-shard and total figures (bytes, seconds) and ``fits`` (False: a shard exceeds a
    worker; ``min_shards`` says how many shards would fit).
    """
    c = constants if constants is not None else load_constants()
    rows, shards = int(rows), int(shards)
    if rows < 1 or shards < 1 or shards > rows:
        raise MemoryFormatError(f"plan: need 1 <= shards <= rows, got rows={rows}, shards={shards}")
    if worker_ram_gib <= 0 or resident_indexes not in (1, 2):
        raise MemoryFormatError("plan: worker RAM must be > 0 and resident indexes 1 or 2")
    D = int(dim or c["dim"])
    dtype = dtype or c["dtype"]
    M = int(M or c["M"])
    T = int(threads_per_worker or c["hnsw_build_threads"])
    item = np.dtype(dtype).itemsize
    d0 = c["disk_bytes_per_row"]
    # measured at (D0, M0, dtype0), moved by what the formats fix at (D, M, dtype): the .npy row, the HNSW row
    dv = 2 * (D * item - int(c["dim"]) * np.dtype(c["dtype"]).itemsize)
    dh = _hnsw_row(D, M) - _hnsw_row(int(c["dim"]), int(c["M"]))
    other = d0["total"] - d0["vectors_npy"] - d0["hnsw"] - d0["meta_sqlite"]  # manifest, failure log: amortised
    disk_row = {"vectors": d0["vectors_npy"] + dv, "indexes": d0["hnsw"] + 2 * dh,
                "metadata": d0["meta_sqlite"] + other}
    disk_row["total"] = sum(disk_row.values())
    ram_row = resident_indexes * (c["ram_bytes_per_row_one_index_served"] + dh)
    n_s = math.ceil(rows / shards)
    shard_ram = n_s * ram_row
    usable = RAM_USABLE * worker_ram_gib * GIB
    per_worker = int(usable // shard_ram)
    fits = per_worker >= 1
    workers = math.ceil(shards / per_worker) if fits else None
    min_shards = math.ceil(rows * ram_row / usable)

    n0 = float(c["shard_rows"])
    grow = math.log(max(n_s, 2)) / math.log(max(n0, 2))  # HNSW cost per insert or query ~ log n
    encode_rate = encode_pairs_per_s
    if encode_rate is None and c.get("encode_pairs_per_s"):  # measured on encode_threads threads: scaled to T
        encode_rate = c["encode_pairs_per_s"] / int(c.get("encode_threads") or 1) * T
    out: dict[str, Any] = {
        "rows": rows, "shards": shards, "rows_per_shard": n_s, "dim": D, "dtype": dtype, "M": M,
        "worker_ram_gib": worker_ram_gib, "threads_per_worker": T, "resident_indexes": resident_indexes,
        "disk_bytes_per_row": disk_row, "disk_bytes_per_shard": n_s * disk_row["total"],
        "disk_bytes_total": rows * disk_row["total"], "build_scratch_bytes_per_shard": n_s * 2 * D * item,
        "ram_bytes_per_row": ram_row, "ram_bytes_per_shard": shard_ram, "ram_bytes_total": rows * ram_row,
        "shards_per_worker": per_worker if fits else 0, "workers": workers, "fits": fits,
        "min_shards": min_shards, "encode_pairs_per_s": encode_rate, "constants": c,
    }
    if not fits:
        return out
    S0, W0 = int(c["shards"]), int(c["served_workers"])
    waves = math.ceil(shards / workers)
    out["build_encode_s"] = rows / (workers * encode_rate) if encode_rate else None
    out["build_index_s"] = waves * 2 * n_s / (T * c["hnsw_inserts_per_s_per_thread"] / grow)
    out["build_s"] = None if out["build_encode_s"] is None else out["build_encode_s"] + out["build_index_s"]
    local_waves = math.ceil(shards / (workers * T))  # shard searches one worker runs one after the other
    tau = max(float(c["dask_task_s"]), 0.0)
    for b, t_key, l_key in ((1, "shard_query_s_batch1", "served_latency_s_batch1"),
                            (256, "shard_query_core_s_batch256", "served_latency_s_batch256")):
        t0 = c[t_key]
        fixed = max(c[l_key] - tau * S0 - math.ceil(S0 / W0) * b * t0, 0.0)
        lat = fixed + tau * shards + local_waves * b * t0 * grow
        out[f"search_latency_s_batch{b}"] = lat
        out[f"search_qps_batch{b}"] = b / lat
        out[f"search_overhead_s_batch{b}"] = fixed + tau * shards
    return out


def _bytes(b: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(b) < 1000 or unit == "PB":
            return f"{b:,.1f} {unit}" if unit != "B" else f"{b:,.0f} B"
        b /= 1000
    return f"{b:.1f} PB"


#: (below this many seconds, multiply by, unit, format) — a plan spans milliseconds to days
_DURATIONS = ((1.0, 1e3, "ms", ".1f"), (120.0, 1.0, "s", ".1f"), (7200.0, 1 / 60, "min", ".0f"),
              (3 * 86400.0, 1 / 3600, "h", ".1f"), (math.inf, 1 / 86400, "days", ".1f"))


def _dur(s: float | None) -> str:
    if s is None:
        return "unknown (no encode rate: pass --encode-rate)"
    below, scale, unit, spec = next(d for d in _DURATIONS if s < d[0])
    return f"{s * scale:{spec}} {unit}"


def format_plan(p: dict) -> str:
    """The plan as the lines ``build-memory --estimate-only --rows N`` prints (decimal units: 1 GB = 1e9 B)."""
    c = p["constants"]
    lines = [f"plan for {p['rows']:,} pairs in {p['shards']:,} shards of {p['rows_per_shard']:,} rows "
             f"(D={p['dim']}, {p['dtype']}, HNSW M={p['M']}); workers of {p['worker_ram_gib']:g} GiB RAM and "
             f"{p['threads_per_worker']} thread{'s' if p['threads_per_worker'] > 1 else ''} each"]
    d = p["disk_bytes_per_row"]
    lines.append(f"  disk: {_bytes(p['disk_bytes_total'])} in all, {_bytes(p['disk_bytes_per_shard'])} a shard "
                 f"({d['total']:,.0f} B a row: vectors {d['vectors']:,.0f}, indexes {d['indexes']:,.0f}, "
                 f"metadata {d['metadata']:,.0f} without captions); a shard being built needs "
                 f"{_bytes(p['build_scratch_bytes_per_shard'])} more")
    held = "image and text HNSW indexes" if p["resident_indexes"] == 2 else "one HNSW index"
    lines.append(f"  RAM: {_bytes(p['ram_bytes_per_shard'])} a shard ({held} resident, {p['ram_bytes_per_row']:,.0f} B "
                 f"a row), {_bytes(p['ram_bytes_total'])} in all; vectors memory-mapped")
    if not p["fits"]:
        lines.append(f"  does not fit: one shard needs {_bytes(p['ram_bytes_per_shard'])} of RAM, a worker offers "
                     f"{_bytes(RAM_USABLE * p['worker_ram_gib'] * GIB)} ({RAM_USABLE:.0%} of its RAM); use at "
                     f"least {p['min_shards']:,} shards or bigger workers")
    else:
        lines.append(f"  workers: {p['workers']:,} ({p['shards_per_worker']} shards each, "
                     f"{RAM_USABLE:.0%} of a worker's RAM usable)")
        rate = p["encode_pairs_per_s"]
        lines.append(f"  build: {_dur(p['build_s'])} = encode {_dur(p['build_encode_s'])}"
                     + (f" at {rate:,.0f} pairs/s a worker" if rate else "")
                     + f" + index {_dur(p['build_index_s'])}")
        for b in (1, 256):
            lines.append(f"  search, batch {b}: {_dur(p[f'search_latency_s_batch{b}'])} a call "
                         f"({p[f'search_qps_batch{b}']:,.0f} queries/s; Dask overhead "
                         f"{_dur(p[f'search_overhead_s_batch{b}'])}), recall@10 {c.get('recall@10', float('nan')):.4f} "
                         f"at ef={c.get('search_ef')} as measured at {c['shard_rows']:,.0f} rows a shard")
    lines.append(f"  from figures measured by: {c['command']} ({c.get('machine', '')}, {c.get('when', '')})")
    return "\n".join(lines)


__all__ = ["plan_for", "format_plan", "load_constants", "RAM_USABLE", "CONSTANTS"]
