#!/usr/bin/env python3
r"""The memory at scale, measured in one run (issue 23 item 4): build, serve, search, size; then the constants.

Usage::

    nice -n 15 python3 scripts/scale_bench.py --work /work/scale/run --rows 2000000 --shards 8 --dim 768 \
        --out docs/scale_run.json --constants reco_ref/memory/scale_constants.json

What one run does, in order (every figure lands in ``--out``, a JSON with the command and the machine):

1. **Base vectors** (cached in ``CACHE/base_<kind>_<dim>.npy``; ``--cache``, default ``WORK``): real
   embeddings that the synthetic rows are grown from (:mod:`reco_ref.memory.synth`; random iid vectors
   would make HNSW recall meaningless).
   ``--base reco-mini`` (``auto`` when its weights exist): reco-mini's 768-d image embeddings of the
   ``../shared/data`` images; ``pixels``: PCA pixel features of the same images; ``random``: iid Gaussian
   base points (tests only). Encoding the base also times the encoder (``encode``: pairs/s on a sample).
2. **Build** ``--shards`` shards from arrays: the image rows are one ``synth.expand(base, seed=10000)``
   stream cut into consecutive shards, the text rows another (``seed=20000``) (:class:`RowStream`), built
   by :func:`build_memory_from_arrays` (chunked and resumable: a re-run skips finished shards and resumes
   a broken one), then ``shards.json``. Each shard's build time and its two HNSW times (from the build's
   own log lines) are kept in ``WORK/build_times.json``. Before each shard the free disk is checked against
   the shard's size from :mod:`.estimate` plus its chunk copy; a run that would fill the disk stops (exit 3)
   and resumes later.
3. **Ground truth**: exact search over every shard (in-process, timed) for ``--queries`` held-out queries
   (``expand`` of a permuted base, its own seed).
4. **In-process** :class:`ShardedMemory` (shards searched one after the other here, hnswlib on
   ``--search-threads`` threads): anonymous RSS growth when the image indexes load, QPS at batch 1 and batch 256,
   recall@10 of HNSW against exact (a hit scores at least the 10th true score).
5. **Served** on ``LocalCluster(n_workers=--workers, threads_per_worker=1, processes=True)``: each worker's
   anonymous RSS growth when its shards' image indexes load, the same QPS and recall, whether every answer is
   bit-identical to the in-process one (HNSW, and exact on the first 64 queries), and the Dask overhead of
   a call of 1, 8, 64 and 256 trivial pinned tasks (:func:`dask_round_trip`).
6. Disk per shard and per row from the files.
7. What compression would cost: recall@10 of flat product quantization at ``--pq`` bytes a row on shard 0
   (:func:`pq_recall`), alone and re-ranked with the exact rows.
8. ``--constants`` writes the per-row figures the 1B plan
   (:mod:`reco_ref.memory.plan`, ``build-memory --estimate-only --rows N``) is computed from.

Only image→image search is timed; a memory also holds a text index of the same format and size, which the
plan counts. ``--cleanup`` deletes the built memory at the end (the base cache stays).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout; Dask's spawned workers inherit sys.path
SHARED = Path(os.environ.get("RECO_REF_SHARED_DATA", ROOT.parent / "shared" / "data"))
MANIFESTS = ("flowers102", "cub100")
K = 10
EXACT_CHECK = 64  # queries whose served exact answer is compared bit for bit (exact over 2M rows is slow)
DISK_MARGIN = 2 << 30  # bytes left free on the work disk after a shard's build, at least
FINGERPRINT = "5ca1e" + "0" * 59  # the synthetic encoder's identity (no encoder made these rows)
INDEXED = re.compile(r"^(image|text)\.hnsw: (\d+) distinct of (\d+) vectors indexed in ([0-9.]+)s")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def rss_bytes() -> int:
    """Anonymous resident memory of the calling process (``RssAnon``; runs on Dask workers too).

    Anonymous, not the whole RSS: the memory-mapped ``.npy`` and ``.hnsw`` pages that opening a memory touches
    count in RSS but are page cache the kernel takes back; an hnswlib index lives in anonymous memory.
    """
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise OSError("/proc/self/status has no RssAnon line")


def machine() -> dict:
    mem = {}
    with open("/proc/meminfo") as fh:
        for line in fh:
            key, val = line.split(":", 1)
            if key in ("MemTotal", "MemAvailable"):
                mem[key] = int(val.split()[0]) * 1024
    cpu = ""
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import dask

    return {"cpus": os.cpu_count(), "cpu": cpu, "loadavg": os.getloadavg(), "mem_total": mem.get("MemTotal"),
            "mem_available": mem.get("MemAvailable"), "python": platform.python_version(),
            "numpy": np.__version__, "dask": dask.__version__,
            "note": f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the start"}


# ---- 1. base vectors ---------------------------------------------------------------------------------------
def _manifests() -> list[Path]:
    return [SHARED / d / "manifest.csv" for d in MANIFESTS]


def _have_reco_mini() -> bool:
    from reco_ref.paths import weights_dir

    return (weights_dir() / "reco-mini" / "encoder.json").is_file()


def base_vectors(kind: str, dim: int, work: Path, threads: int) -> tuple[np.ndarray, str, dict | None]:
    """``(base [m, dim] float32 unit rows, description, encode timing or None)``, cached in ``work``."""
    from reco_ref.io import atomic_save_npy, atomic_write_json, load_npy
    from reco_ref.memory import synth

    if kind == "auto":
        kind = "reco-mini" if _have_reco_mini() and all(m.is_file() for m in _manifests()) else "pixels"
    path, side = work / f"base_{kind}_{dim}.npy", work / f"base_{kind}_{dim}.json"
    if kind == "random":
        x = np.random.default_rng(7).standard_normal((max(4 * dim, 2000), dim)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True), f"iid Gaussian base ({len(x)} points)", None
    if not path.is_file():
        if not all(m.is_file() for m in _manifests()):
            raise SystemExit(f"--base {kind}: needs {SHARED} (the shared images); use --base random")
        t0 = time.perf_counter()
        if kind == "reco-mini":
            from reco_ref.encoders import load

            enc = load("reco-mini", threads=threads)
            paths = [str(p) for m in _manifests() for p in synth._image_paths(m)]
            feats = np.asarray(enc.encode_images(paths, batch_size=64), np.float32)  # [m, 768] embeddings
            timing = {"what": "reco-mini encode_images of the base images", "images": len(paths),
                      "seconds": time.perf_counter() - t0, "threads": threads}
            feats = synth.project(feats, dim)
        else:
            feats, timing = synth.pixel_features(_manifests(), dim=dim), None
        atomic_save_npy(path, feats)
        atomic_write_json(side, {"kind": kind, "timing": timing})
    meta = json.loads(side.read_text())
    x = np.asarray(load_npy(path, mmap=False), np.float32)
    desc = {"reco-mini": f"reco-mini image embeddings (768-d) of the {len(x):,} ../shared/data images"
                         + (f", projected to {dim}-d" if dim != 768 else ""),
            "pixels": f"PCA-{dim} pixel features (32x32 RGB) of the {len(x):,} ../shared/data images"}[kind]
    return x, desc, meta.get("timing")


def encode_rate(sample: int, threads: int) -> dict | None:
    """reco-mini pairs/s on ``sample`` image+caption pairs of ``../shared/data`` (both towers), or None."""
    if sample <= 0 or not _have_reco_mini() or not _manifests()[0].is_file():
        return None
    from reco_ref.encoders import load
    from reco_ref.memory import read_pairs

    items = read_pairs(_manifests()[0], caption_template="a photo of a {class_name}.")
    items = items[:: max(1, len(items) // sample)][:sample]
    enc = load("reco-mini", threads=threads)
    enc.encode_images([it["image"] for it in items[:8]])  # warm the sessions
    enc.encode_texts([it["caption"] for it in items[:8]])
    t0 = time.perf_counter()
    enc.encode_images([it["image"] for it in items])
    t_img = time.perf_counter() - t0
    t0 = time.perf_counter()
    enc.encode_texts([it["caption"] for it in items])
    t_txt = time.perf_counter() - t0
    return {"encoder": "reco-mini (ONNX Runtime, CPU)", "pairs": len(items), "threads": threads,
            "image_s": t_img, "text_s": t_txt, "pairs_per_s": len(items) / (t_img + t_txt)}


# ---- 2. build ----------------------------------------------------------------------------------------------
def shard_sizes(rows: int, shards: int) -> list[int]:
    return [rows // shards + (1 if s < rows % shards else 0) for s in range(shards)]


class RowStream:
    """Rows ``[lo, lo+n)`` of one :func:`synth.expand` stream over the whole memory (state: where it stands).

    One stream per modality, read in order shard after shard: ``expand``'s set-up (exact neighbours and an SVD
    of the base) runs once, and a resumed run regenerates the finished shards' rows only to skip them (cheap).
    """

    def __init__(self, base: np.ndarray, seed: int):
        from reco_ref.memory.synth import expand

        self.blocks = expand(base, 1 << 40, seed=seed)  # endless: every shard is a slice of the same sequence
        self.pos, self.carry = 0, np.zeros((0, base.shape[1]), np.float32)

    def take(self, lo: int, n: int) -> np.ndarray:
        """float32 ``[n, D]``: rows ``lo .. lo+n-1`` (``lo`` at or after the first row of the block held)."""
        if lo < self.pos:
            raise ValueError(f"rows from {lo}: the stream has passed row {self.pos}")
        out, want, end = [], lo, lo + n
        while want < end:
            if want >= self.pos + len(self.carry):  # the block held ends before the next row wanted
                self.pos, self.carry = self.pos + len(self.carry), next(self.blocks)
                continue
            b = min(end - self.pos, len(self.carry))
            out.append(self.carry[want - self.pos:b])
            want = self.pos + b
        return np.ascontiguousarray(np.concatenate(out))


def build_shards(work: Path, base: np.ndarray, rows: int, shards: int, *, M: int, efc: int, threads: int,
                 dtype: str) -> tuple[Path, list[dict]]:
    """Build (or finish) ``work/memory/shard_XXX`` and ``shards.json``; returns the root and per-shard times."""
    from reco_ref.io import atomic_write_json
    from reco_ref.memory import build_memory_from_arrays
    from reco_ref.memory.estimate import estimate_build
    from reco_ref.memory.format import MANIFEST
    from reco_ref.memory.shards import write_shards_manifest
    root = work / "memory"
    root.mkdir(parents=True, exist_ok=True)
    times_path = work / "build_times.json"
    times = json.loads(times_path.read_text()) if times_path.is_file() else {}
    dirs = []
    streams = {"image": RowStream(base, seed=10_000), "text": RowStream(base, seed=20_000)}
    for s, (lo, n) in enumerate(zip(np.cumsum([0] + shard_sizes(rows, shards)[:-1]).tolist(),
                                    shard_sizes(rows, shards))):
        d = f"shard_{s:03d}"
        dirs.append(d)
        if (root / d / MANIFEST).is_file() and d in times:
            continue
        est = estimate_build(n, base.shape[1], dtype=dtype, M=M, inserts_per_s=1.0)
        need = est["disk_total_bytes"] + 2 * n * base.shape[1] * 4 + DISK_MARGIN  # + the chunk copy
        free = shutil.disk_usage(root).free
        if free < need:
            log(f"{d}: {free / 2**30:.1f} GiB free, {need / 2**30:.1f} GiB needed; stopping (re-run to resume)")
            raise SystemExit(3)
        t0 = time.perf_counter()
        image, text = streams["image"].take(lo, n), streams["text"].take(lo, n)
        t_gen = time.perf_counter() - t0
        lines: list[str] = []
        t0 = time.perf_counter()
        build_memory_from_arrays(root / d, image, text, name="synthetic", fingerprint=FINGERPRINT, dtype=dtype,
                                 M=M, ef_construction=efc, num_threads=threads, resume=True, progress=False,
                                 log=lines.append)
        t_build = time.perf_counter() - t0
        hnsw = {m.group(1): {"count": int(m.group(2)), "seconds": float(m.group(4))}
                for m in map(INDEXED.match, lines) if m}
        times[d] = {"rows": n, "generate_s": t_gen, "build_s": t_build, "hnsw": hnsw, "threads": threads,
                    "loadavg_after": os.getloadavg(), "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        atomic_write_json(times_path, times)
        log(f"{d}: {n:,} rows built in {t_build:.0f} s (HNSW image {hnsw.get('image', {}).get('seconds')} s, "
            f"text {hnsw.get('text', {}).get('seconds')} s); load {os.getloadavg()[0]:.1f}")
        del image, text
        gc.collect()
    write_shards_manifest(root, dirs)
    return root, [times[d] for d in dirs]


# ---- 3-5. search -------------------------------------------------------------------------------------------
def queries(base: np.ndarray, n: int) -> np.ndarray:
    """``n`` held-out queries: the generator on a permuted base with its own seed (not memory rows)."""
    from reco_ref.memory.synth import expand_array

    perm = np.random.default_rng(3).permutation(len(base))
    return expand_array(base[perm], n, seed=999)


def recall_at_k(got_scores: np.ndarray, truth_scores: np.ndarray, k: int = K) -> float:
    """Mean fraction of the k answers scoring at least the k-th true score (ties count as hits)."""
    kth = truth_scores[:, k - 1]
    return float(np.mean((got_scores[:, :k] >= kth[:, None] - 1e-6).sum(1) / k))


def time_search(mem, q: np.ndarray, *, ef: int, threads: int, batch: int, repeats: int) -> dict:
    """Search ``q`` in batches of ``batch`` (best of ``repeats`` passes); rows/scores of the last pass."""
    best, lat = np.inf, []
    for _ in range(repeats):
        rows, scores, lat_pass = [], [], []
        t_all = time.perf_counter()
        for lo in range(0, len(q), batch):
            t0 = time.perf_counter()
            r, s, _v = mem.search(q[lo:lo + batch], modality="image", k=K, ef=ef, num_threads=threads)
            lat_pass.append(time.perf_counter() - t0)
            rows.append(r)
            scores.append(s)
        t_all = time.perf_counter() - t_all
        if t_all < best:
            best, lat = t_all, lat_pass
    lat = np.asarray(lat)
    return {"batch": batch, "queries": len(q), "seconds": best, "qps": len(q) / best,
            "latency_ms_median": float(np.median(lat) * 1e3), "latency_ms_p95": float(np.percentile(lat, 95) * 1e3),
            "rows": np.concatenate(rows), "scores": np.concatenate(scores)}


def _strip(res: dict) -> dict:
    return {k: v for k, v in res.items() if k not in ("rows", "scores")}


def measure_in_process(root: Path, q: np.ndarray, truth_s: np.ndarray, *, ef: int, threads: int,
                       b1_queries: int, repeats: int) -> tuple[dict, dict]:
    from reco_ref.memory import open_memory

    gc.collect()
    r0 = rss_bytes()
    mem = open_memory(root, verify="size")
    r_open = rss_bytes()
    mem.search(q[:1], modality="image", k=K, ef=ef, num_threads=threads)  # loads every shard's image index
    r_loaded = rss_bytes()
    b1 = time_search(mem, q[:b1_queries], ef=ef, threads=threads, batch=1, repeats=1)
    b256 = time_search(mem, q, ef=ef, threads=threads, batch=256, repeats=repeats)
    out = {"threads": threads, "ef": ef, "rss_open_bytes": r_open - r0, "rss_index_bytes": r_loaded - r_open,
           "batch1": _strip(b1), "batch256": _strip(b256), "recall@10": recall_at_k(b256["scores"], truth_s),
           "batch1_same_as_batch256": bool(np.array_equal(b1["rows"], b256["rows"][:b1_queries]))}
    answers = {"b1": b1, "b256": b256}
    del mem
    gc.collect()
    return out, answers


def dask_round_trip(client, tasks=(1, 8, 64, 256), repeats: int = 15) -> dict:
    """What one call of ``tasks`` trivial tasks costs on this cluster (pinned round robin, as served calls are).

    Returns the median seconds for each task count and the least-squares line ``call_s + task_s * tasks``:
    the Dask overhead of a served call apart from the searching itself.
    """
    workers = sorted(client.nthreads())
    med = []
    for k in tasks:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            futs = [client.submit(abs, -i, workers=[workers[i % len(workers)]], allow_other_workers=False, pure=False)
                    for i in range(k)]
            client.gather(futs)
            times.append(time.perf_counter() - t0)
        med.append(float(np.median(times)))
    task_s, call_s = np.polyfit(np.asarray(tasks, float), np.asarray(med), 1)
    return {"tasks": list(tasks), "median_s": med, "call_s": float(call_s), "task_s": float(task_s),
            "repeats": repeats}


def measure_served(root: Path, q: np.ndarray, truth_s: np.ndarray, local: dict, exact_local: tuple, *,
                   ef: int, workers: int, b1_queries: int, repeats: int) -> dict:
    from distributed import Client, LocalCluster

    from reco_ref.memory import open_memory

    t0 = time.perf_counter()
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
    client = Client(cluster)
    t_cluster = time.perf_counter() - t0
    try:
        r0 = client.run(rss_bytes)
        t0 = time.perf_counter()
        mem = open_memory(root, client=client, verify="size")
        t_open = time.perf_counter() - t0
        r_open = client.run(rss_bytes)
        mem.search(q[:1], modality="image", k=K, ef=ef, num_threads=1)  # each worker loads its shards' indexes
        r_loaded = client.run(rss_bytes)
        placement = list(mem.placement)
        round_trip = dask_round_trip(client)
        b1 = time_search(mem, q[:b1_queries], ef=ef, threads=1, batch=1, repeats=1)
        b256 = time_search(mem, q, ef=ef, threads=1, batch=256, repeats=repeats)
        n_x = min(EXACT_CHECK, len(q))
        xr, xs, _ = mem.search(q[:n_x], modality="image", k=K, exact=True)
        identical = {
            "hnsw_batch1": bool(np.array_equal(b1["rows"], local["b1"]["rows"])
                                and np.array_equal(b1["scores"], local["b1"]["scores"])),
            "hnsw_batch256": bool(np.array_equal(b256["rows"], local["b256"]["rows"])
                                  and np.array_equal(b256["scores"], local["b256"]["scores"])),
            f"exact_first_{n_x}": bool(np.array_equal(xr, exact_local[0][:n_x])
                                       and np.array_equal(xs, exact_local[1][:n_x])),
        }
        per_worker = {w: {"shards": placement.count(w), "rss_open_bytes": r_open[w] - r0[w],
                          "rss_index_bytes": r_loaded[w] - r_open[w]} for w in sorted(r0)}
        mem.close()
    finally:
        client.close()
        cluster.close()
    return {"workers": workers, "threads_per_worker": 1, "processes": True, "ef": ef,
            "cluster_start_s": t_cluster, "open_s": t_open, "per_worker": per_worker, "dask_round_trip": round_trip,
            "rss_index_bytes": sum(w["rss_index_bytes"] for w in per_worker.values()),
            "batch1": _strip(b1), "batch256": _strip(b256), "recall@10": recall_at_k(b256["scores"], truth_s),
            "bit_identical_to_in_process": identical}


# ---- 6. sizes ----------------------------------------------------------------------------------------------
def disk_report(root: Path) -> dict:
    spec = json.loads((root / "shards.json").read_text())
    shards = []
    for s in spec["shards"]:
        files = {p.name: p.stat().st_size for p in sorted((root / s["dir"]).iterdir()) if p.is_file()}
        shards.append({"dir": s["dir"], "rows": s["rows"], "bytes": sum(files.values()), "files": files})
    rows = sum(s["rows"] for s in shards)
    by_file: dict[str, int] = {}
    for s in shards:
        for f, b in s["files"].items():
            by_file[f] = by_file.get(f, 0) + b
    return {"rows": rows, "total_bytes": sum(by_file.values()), "bytes_per_row": sum(by_file.values()) / rows,
            "bytes_per_row_by_file": {f: b / rows for f, b in by_file.items()}, "shards": shards}


# ---- 7. what compression would cost -----------------------------------------------------------------------
def pq_recall(x: np.ndarray, q: np.ndarray, m: int, *, train: int = 20_000, rerank: int = 100, seed: int = 0,
              block: int = 32_768) -> dict:
    """Recall@10 of flat product quantization (``m`` bytes a row) on one shard's rows, against exact.

    ``x [n, D]`` is cut into ``m`` sub-vectors of ``D/m`` dims, each replaced by the nearest of 256 k-means
    centroids (scipy ``kmeans2``, trained on ``train`` rows); a query scores every row by table lookups
    (asymmetric distance: the query stays exact). Reported: recall@10 of that score alone, and after
    re-scoring its top ``rerank`` with the exact rows (what a memory keeping its ``.npy`` on disk would do).
    IVF (searching only a few coarse lists) would lose more on top; it is not measured here.
    """
    from scipy.cluster.vq import kmeans2

    from reco_ref.memory.index import exact_search

    n, D = x.shape
    if D % m:
        raise SystemExit(f"--pq {m}: must divide the dim {D}")
    sub = D // m
    rng = np.random.default_rng(seed)
    sample = np.asarray(x[np.sort(rng.choice(n, min(train, n), replace=False))], np.float32)
    t0 = time.perf_counter()
    books = np.stack([kmeans2(sample[:, j * sub:(j + 1) * sub], 256, iter=20, minit="++", seed=seed + j)[0]
                      for j in range(m)]).astype(np.float32)  # [m, 256, sub]
    t_train = time.perf_counter() - t0
    codes = np.empty((n, m), np.uint8)
    t0 = time.perf_counter()
    for lo in range(0, n, block):
        xb = np.asarray(x[lo:lo + block], np.float32)
        for j in range(m):
            v = xb[:, j * sub:(j + 1) * sub]
            d = (books[j] ** 2).sum(1)[None, :] - 2 * v @ books[j].T  # [b, 256] squared distance less |v|^2
            codes[lo:lo + block, j] = d.argmin(1)
    t_encode = time.perf_counter() - t0
    tables = np.einsum("qjs,jcs->qjc", q.reshape(len(q), m, sub), books)  # [nq, m, 256] query · centroid
    t0 = time.perf_counter()
    scores = np.zeros((len(q), n), np.float32)
    for lo in range(0, n, block):
        c = codes[lo:lo + block]
        acc = np.zeros((len(q), c.shape[0]), np.float32)
        for j in range(m):
            acc += tables[:, j, c[:, j]]
        scores[:, lo:lo + block] = acc
    t_search = time.perf_counter() - t0
    truth_r, truth_s = exact_search(x, q, K)
    top = np.argpartition(-scores, K, axis=1)[:, :K]
    pq_s = np.take_along_axis(scores, top, 1)
    exact_of_top = np.einsum("qd,qkd->qk", q, np.asarray(x[np.sort(top, 1)], np.float32))  # true scores of PQ's picks
    cand = np.sort(np.argpartition(-scores, rerank, axis=1)[:, :rerank], 1)  # [nq, rerank]
    re = np.einsum("qd,qkd->qk", q, np.asarray(x[cand], np.float32))
    re_top = np.sort(re, 1)[:, ::-1][:, :K]
    del scores, pq_s
    return {"bytes_per_row": m, "sub_dim": sub, "train_rows": len(sample), "rows": n, "queries": len(q),
            "recall@10": recall_at_k(np.sort(exact_of_top, 1)[:, ::-1], truth_s),
            f"recall@10_rerank{rerank}": recall_at_k(re_top, truth_s), "train_s": t_train, "encode_s": t_encode,
            "adc_scan_s": t_search}


def constants(res: dict) -> dict:
    """The per-row figures :mod:`reco_ref.memory.plan` reads (a small JSON, the command beside them)."""
    per_file = res["disk"]["bytes_per_row_by_file"]
    n = res["rows"]
    shard_rows = n / res["shards"]
    hn = [t["hnsw"][m] for t in res["build"] for m in ("image", "text")]
    inserts = sum(h["count"] for h in hn)
    # the build logs HNSW seconds to 0.1 s: a tiny test run reads 0 there and falls back to its whole build time
    hnsw_s = sum(h["seconds"] for h in hn) or sum(t["build_s"] for t in res["build"])
    loc, srv = res["in_process"], res["served"]
    wk = srv["workers"]
    return {
        "command": res["command"], "when": res["when"], "machine": res["machine"]["note"],
        "loadavg_at_start": res["machine"]["loadavg"],
        "dim": res["dim"], "dtype": res["dtype"], "M": res["M"], "ef_construction": res["ef_construction"],
        "rows": n, "shards": res["shards"], "shard_rows": shard_rows,
        "disk_bytes_per_row": {"vectors_npy": per_file["image.npy"] + per_file["text.npy"],
                               "hnsw": per_file["image.hnsw"] + per_file["text.hnsw"],
                               "hnsw_one_index": per_file["image.hnsw"],
                               "meta_sqlite": per_file["meta.sqlite"],
                               "total": res["disk"]["bytes_per_row"]},
        "ram_bytes_per_row_one_index_served": srv["rss_index_bytes"] / n,
        "ram_bytes_per_row_one_index_in_process": loc["rss_index_bytes"] / n,
        "hnsw_inserts_per_s_per_thread": inserts / hnsw_s / res["build"][0]["threads"],
        "hnsw_build_threads": res["build"][0]["threads"],
        "encode_pairs_per_s": (res["encode"] or {}).get("pairs_per_s"),
        "encode_threads": (res["encode"] or {}).get("threads"),
        "search_ef": loc["ef"],
        "recall@10": srv["recall@10"],
        # per shard of shard_rows rows, one query, one thread: the in-process batch-1 latency over its shards
        "shard_query_s_batch1": loc["batch1"]["latency_ms_median"] / 1e3 / res["shards"],
        # core-seconds per query per shard at batch 256 (in-process, its hnswlib threads busy)
        "shard_query_core_s_batch256": loc["batch256"]["seconds"] * loc["threads"] / loc["batch256"]["queries"]
        / res["shards"],
        "dask_call_s": srv["dask_round_trip"]["call_s"],
        "dask_task_s": srv["dask_round_trip"]["task_s"],
        "served_latency_s_batch1": srv["batch1"]["latency_ms_median"] / 1e3,
        "served_latency_s_batch256": srv["batch256"]["seconds"] / srv["batch256"]["queries"] * 256,
        "served_workers": wk,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--work", required=True, help="work folder (outside the repository): base cache + the memory")
    p.add_argument("--rows", type=int, default=2_000_000)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--dtype", default="float32", choices=("float32", "float16"))
    p.add_argument("--M", type=int, default=16)
    p.add_argument("--ef-construction", type=int, default=200)
    p.add_argument("--ef", type=int, default=50, help="HNSW search beam (default 50, the memory's default)")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--batch1-queries", type=int, default=200, help="queries timed one at a time")
    p.add_argument("--repeats", type=int, default=2, help="passes at batch 256 (best kept)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--index-threads", type=int, default=2, help="hnswlib threads of the build")
    p.add_argument("--search-threads", type=int, default=2, help="hnswlib threads of in-process search")
    p.add_argument("--base", default="auto", choices=("auto", "reco-mini", "pixels", "random"))
    p.add_argument("--cache", help="folder of the base-vector cache (default: WORK)")
    p.add_argument("--encode-sample", type=int, default=256, help="pairs timed through reco-mini (0: skip)")
    p.add_argument("--pq", default="48,96", help="bytes a row of the product-quantization runs ('' = none)")
    p.add_argument("--pq-queries", type=int, default=200, help="queries of the PQ runs (one shard)")
    p.add_argument("--out", required=True, help="results JSON")
    p.add_argument("--constants", help="also write the plan's per-row constants JSON here")
    p.add_argument("--cleanup", action="store_true", help="delete WORK/memory at the end")
    a = p.parse_args(argv)
    from reco_ref.io import atomic_write_json
    from reco_ref.memory import open_memory

    work = Path(a.work).absolute()
    if ROOT in work.parents or work == ROOT:
        raise SystemExit(f"--work {work}: put it outside the repository")
    work.mkdir(parents=True, exist_ok=True)
    t_run = time.perf_counter()
    res = {"command": "python3 scripts/scale_bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
           "rows": a.rows, "shards": a.shards, "dim": a.dim, "dtype": a.dtype, "M": a.M,
           "ef_construction": a.ef_construction, "k": K}
    cache = Path(a.cache).absolute() if a.cache else work
    cache.mkdir(parents=True, exist_ok=True)
    base, desc, base_timing = base_vectors(a.base, a.dim, cache, a.index_threads)
    res.update(base=desc, base_encode=base_timing)
    log(f"base: {desc}")
    res["encode"] = encode_rate(a.encode_sample, a.index_threads)
    if res["encode"]:
        log(f"encode: {res['encode']['pairs_per_s']:.1f} pairs/s")
    root, res["build"] = build_shards(work, base, a.rows, a.shards, M=a.M, efc=a.ef_construction,
                                      threads=a.index_threads, dtype=a.dtype)
    q = queries(base, a.queries)
    res["queries"] = f"{a.queries} held-out vectors (synth.expand of a permuted base, seed 999)"

    mem = open_memory(root, verify="size")
    mem.search(q[:4], modality="image", k=K, exact=True)  # page the vectors in once
    t0 = time.perf_counter()
    truth_r, truth_s, _ = mem.search(q, modality="image", k=K, exact=True)
    res["exact"] = {"queries": len(q), "seconds": time.perf_counter() - t0}
    res["exact"]["qps"] = len(q) / res["exact"]["seconds"]
    del mem
    gc.collect()
    log(f"exact: {res['exact']['qps']:.1f} QPS")
    b1q = min(a.batch1_queries, a.queries)
    res["in_process"], local = measure_in_process(root, q, truth_s, ef=a.ef, threads=a.search_threads,
                                                  b1_queries=b1q, repeats=a.repeats)
    log(f"in-process: b1 {res['in_process']['batch1']['qps']:.0f} QPS, b256 {res['in_process']['batch256']['qps']:.0f}"
        f" QPS, recall@10 {res['in_process']['recall@10']:.4f}")
    res["served"] = measure_served(root, q, truth_s, local, (truth_r, truth_s), ef=a.ef, workers=a.workers,
                                   b1_queries=b1q, repeats=a.repeats)
    log(f"served: b1 {res['served']['batch1']['qps']:.0f} QPS, b256 {res['served']['batch256']['qps']:.0f} QPS, "
        f"recall@10 {res['served']['recall@10']:.4f}, identical {res['served']['bit_identical_to_in_process']}")
    res["disk"] = disk_report(root)
    if a.pq:
        from reco_ref.io import load_npy

        x = load_npy(root / "shard_000" / "image.npy")  # memory-mapped
        qp = q[:a.pq_queries]
        res["pq"] = {"shard": "shard_000", "queries": len(qp), "runs": []}
        for m in (int(v) for v in a.pq.split(",")):
            r = pq_recall(x, qp, m)
            res["pq"]["runs"].append(r)
            log(f"PQ {m} B/row: recall@10 {r['recall@10']:.3f}, re-ranked {r['recall@10_rerank100']:.3f}")
    res["machine_at_end"] = {"loadavg": os.getloadavg()}
    res["run_s"] = time.perf_counter() - t_run
    atomic_write_json(a.out, res)
    if a.constants:
        atomic_write_json(a.constants, constants(res))
    if a.cleanup:
        shutil.rmtree(root)
    log(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
