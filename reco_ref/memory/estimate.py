"""Estimate disk, RAM and time of a memory build before starting it (in the spirit of autofaiss).

Disk is computed from the formats: ``.npy`` = 128-byte header + n·D·itemsize; an hnswlib file (0.8) is

.. math::

    96 + n\\,(4D + 8M + 4 + 8) + 4n + \\bar{L}\\,n\\,(4M + 4),\\qquad \\bar{L} = \\sum_{l\\ge 1} M^{-l} = \\frac{1}{M-1}

(header; per element: level-0 links ``2M`` ids + count, the float32 vector, the label; a 4-byte upper-level
size; and upper-level links for the expected ``1/(M-1)`` levels per element, since hnswlib draws levels
with ``mult = 1/ln M``).  SQLite is estimated from the caption/source lengths.  RAM peak is one HNSW
index in hnswlib's memory (file layout + label map and per-element lock, ~64 B) plus one add block.
Time = items / encode rate (measured on a sample) + inserts / insert rate (measured on a small
calibration index, scaled by log n).
"""

from __future__ import annotations

import math
import time

import numpy as np

from .index import ADD_BLOCK, hnsw_build

NPY_HEADER = 128
HNSW_HEADER = 96
HNSW_RAM_EXTRA = 64  # per element in RAM beyond the file layout: label hash-map entry, mutex, level pointer
SQLITE_ROW_OVERHEAD = 24  # per row beyond the text bytes (record header, integer columns, b-tree slack)


def hnsw_file_bytes(n: int, dim: int, M: int) -> int:
    """Expected size of an hnswlib index file of ``n`` vectors (see module doc)."""
    level0 = 2 * M * 4 + 4 + 4 * dim + 8
    upper = (4 * M + 4) / (M - 1) if M > 1 else 0.0
    return int(HNSW_HEADER + n * (level0 + 4) + n * upper)


def hnsw_ram_bytes(n: int, dim: int, M: int) -> int:
    """Expected resident size of a loaded/building hnswlib index."""
    return hnsw_file_bytes(n, dim, M) + n * HNSW_RAM_EXTRA


def calibrate_inserts_per_s(dim: int, M: int = 16, ef_construction: int = 200, threads: int | None = None,
                            n_cal: int = 2000, seed: int = 0) -> float:
    """Inserts per second of hnswlib on ``n_cal`` random unit vectors of ``dim`` (a small, quick index)."""
    x = np.random.default_rng(seed).standard_normal((n_cal, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    t0 = time.perf_counter()
    hnsw_build(x, M=M, ef_construction=ef_construction, num_threads=threads)
    return n_cal / max(time.perf_counter() - t0, 1e-9)


def estimate_build(n_items: int, embed_dim: int, *, key_dim: int | None = None, dtype: str = "float32",
                   M: int = 16, ef_construction: int = 200, caption_bytes: float = 48.0,
                   source_bytes: float = 40.0, encode_items_per_s: float | None = None,
                   inserts_per_s: float | None = None, calibration_n: int = 2000, chunk_size: int = 1024) -> dict:
    """Disk bytes per file, RAM peak and time of building a memory of ``n_items`` pairs.

    ``inserts_per_s`` is measured with :func:`calibrate_inserts_per_s` when not given; the time per insert
    grows ~log n (graph depth), so the calibrated rate is scaled by ``log(calibration_n)/log(n)``.
    """
    n = int(n_items)
    item = np.dtype(dtype).itemsize
    disk = {
        "image.npy": NPY_HEADER + n * embed_dim * item,
        "text.npy": NPY_HEADER + n * embed_dim * item,
        "image.hnsw": hnsw_file_bytes(n, key_dim or embed_dim, M),
        "text.hnsw": hnsw_file_bytes(n, embed_dim, M),
        "meta.sqlite": int(n * (caption_bytes + source_bytes + SQLITE_ROW_OVERHEAD)) + 8192,
    }
    if key_dim:
        disk["image_keys.npy"] = NPY_HEADER + n * key_dim * item
    chunk_bytes = 2 * chunk_size * (2 * embed_dim + (key_dim or 0)) * 4  # float32 chunk + its cast copy
    ram_index = max(hnsw_ram_bytes(n, key_dim or embed_dim, M), hnsw_ram_bytes(n, embed_dim, M))
    ram_peak = ram_index + min(n, ADD_BLOCK) * max(key_dim or 0, embed_dim) * 4 + chunk_bytes
    if inserts_per_s is None and n > 0:
        inserts_per_s = calibrate_inserts_per_s(embed_dim, M, ef_construction, n_cal=min(calibration_n, max(n, 2)))
        inserts_per_s *= math.log(max(calibration_n, 2)) / math.log(max(n, calibration_n, 2))
    t_index = 2 * n / inserts_per_s if inserts_per_s else 0.0
    t_encode = n / encode_items_per_s if encode_items_per_s else None
    return {
        "n_items": n, "embed_dim": embed_dim, "key_dim": key_dim, "dtype": dtype, "M": M,
        "ef_construction": ef_construction,
        "disk_bytes": disk, "disk_total_bytes": int(sum(disk.values())),
        "ram_peak_bytes": int(ram_peak),
        "encode_items_per_s": encode_items_per_s, "inserts_per_s": inserts_per_s,
        "time_encode_s": t_encode, "time_index_s": t_index,
        "time_total_s": None if t_encode is None else t_encode + t_index,
    }


def _human(b: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(b) < 1024 or unit == "TiB":
            return f"{b:.1f} {unit}"
        b /= 1024
    return f"{b:.1f} TiB"


def _dur(s: float | None) -> str:
    if s is None:
        return "unknown (no encode rate measured)"
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def format_estimate(est: dict) -> str:
    """One paragraph a user reads before a long build."""
    files = ", ".join(f"{k} {_human(v)}" for k, v in est["disk_bytes"].items())
    rate = est["encode_items_per_s"]
    return (f"estimate for {est['n_items']:,} pairs (D={est['embed_dim']}, {est['dtype']}, M={est['M']}): "
            f"disk {_human(est['disk_total_bytes'])} ({files}); RAM peak {_human(est['ram_peak_bytes'])}; "
            f"time {_dur(est['time_total_s'])} (encode {_dur(est['time_encode_s'])}"
            f"{'' if rate is None else f' at {rate:.0f} items/s'}, index {_dur(est['time_index_s'])})")
