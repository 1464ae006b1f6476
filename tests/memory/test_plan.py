"""The billion-pair plan (``reco_ref.memory.plan``, ``build-memory --estimate-only --rows N``) and the run that
measures its figures (``scripts/scale_bench.py``), at a size that runs in seconds."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from reco_ref.errors import MemoryFormatError
from reco_ref.memory.estimate import hnsw_file_bytes
from reco_ref.memory.plan import RAM_USABLE, format_plan, load_constants, plan_for

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
GIB = 1 << 30

#: a measurement's shape with round numbers (the arithmetic is checked against them by hand)
FIG = {
    "command": "python3 scripts/scale_bench.py --rows 8000 ...", "when": "t", "machine": "test",
    "dim": 64, "dtype": "float32", "M": 16, "ef_construction": 200, "rows": 8000, "shards": 8, "shard_rows": 1000,
    "served_workers": 2, "hnsw_build_threads": 2,
    "disk_bytes_per_row": {"vectors_npy": 512.0, "hnsw": 800.0, "hnsw_one_index": 400.0, "meta_sqlite": 40.0,
                           "total": 1352.0},
    "ram_bytes_per_row_one_index_served": 500.0, "hnsw_inserts_per_s_per_thread": 1000.0,
    "encode_pairs_per_s": 50.0, "encode_threads": 2, "search_ef": 50, "recall@10": 0.99,
    "shard_query_s_batch1": 0.001, "shard_query_core_s_batch256": 0.0002,
    "served_latency_s_batch1": 0.020, "served_latency_s_batch256": 0.300, "dask_call_s": 0.005, "dask_task_s": 0.001,
}


def test_plan_arithmetic_by_hand():
    p = plan_for(1_000_000, 10, worker_ram_gib=1.0, constants=FIG)
    n_s = 100_000
    assert p["rows_per_shard"] == n_s
    assert p["disk_bytes_per_row"]["total"] == pytest.approx(2 * 64 * 4 + 2 * 400 + 40)  # same D, M: as measured
    assert p["disk_bytes_total"] == pytest.approx(1_000_000 * 1352)
    assert p["ram_bytes_per_shard"] == pytest.approx(n_s * 2 * 500)  # two indexes resident
    per_worker = int(RAM_USABLE * GIB // (n_s * 1000))
    assert p["shards_per_worker"] == per_worker and p["workers"] == math.ceil(10 / per_worker)
    assert p["fits"]
    grow = math.log(n_s) / math.log(1000)
    assert p["build_encode_s"] == pytest.approx(1_000_000 / (p["workers"] * 50))  # 50 pairs/s on 2 threads: T=2
    waves = math.ceil(10 / p["workers"])
    assert p["build_index_s"] == pytest.approx(waves * 2 * n_s / (2 * 1000 / grow))
    fixed = 0.020 - 8 * 0.001 - 4 * 0.001  # the served call less its 8 tasks' overhead and a worker's 4 searches
    assert p["search_latency_s_batch1"] == pytest.approx(fixed + 10 * 0.001
                                                         + math.ceil(10 / (p["workers"] * 2)) * 0.001 * grow)


def test_plan_scales_rates_with_threads_and_takes_a_given_encode_rate():
    assert plan_for(1_000_000, 10, threads_per_worker=4, constants=FIG)["encode_pairs_per_s"] == pytest.approx(100.0)
    p = plan_for(1_000_000, 10, worker_ram_gib=1.0, encode_pairs_per_s=1000.0, constants=FIG)
    assert p["build_encode_s"] == pytest.approx(1_000_000 / (p["workers"] * 1000))
    no_rate = plan_for(1_000_000, 10, constants={**FIG, "encode_pairs_per_s": None})
    assert no_rate["build_s"] is None and "pass --encode-rate" in format_plan(no_rate)


def test_plan_reproduces_its_own_measurement():
    """At the measured size and layout (8 shards, 2 workers of 1 thread) the plan gives back what was measured."""
    ram = 4 * 1000 * 500 / RAM_USABLE / GIB * 1.0001  # room for exactly 4 one-index shards a worker
    p = plan_for(8000, 8, worker_ram_gib=ram, threads_per_worker=1, resident_indexes=1, constants=FIG)
    assert p["workers"] == 2 and p["shards_per_worker"] == 4
    assert p["disk_bytes_total"] == pytest.approx(8000 * 1352)
    assert p["search_latency_s_batch1"] == pytest.approx(0.020)
    assert p["search_latency_s_batch256"] == pytest.approx(0.300)


def test_plan_moves_only_what_the_formats_fix():
    p = plan_for(1_000_000, 10, dim=128, dtype="float16", M=32, constants=FIG)
    d_hnsw = (hnsw_file_bytes(10**6, 128, 32) - hnsw_file_bytes(10**6, 64, 16)) / 10**6
    assert p["disk_bytes_per_row"]["vectors"] == 2 * 128 * 2
    assert p["disk_bytes_per_row"]["indexes"] == pytest.approx(2 * (400 + d_hnsw))
    assert p["ram_bytes_per_row"] == pytest.approx(2 * (500 + d_hnsw))


def test_plan_too_big_a_shard_says_how_many_shards_fit():
    p = plan_for(10_000_000, 1, worker_ram_gib=1.0, constants=FIG)
    assert not p["fits"] and p["workers"] is None and "does not fit" in format_plan(p)
    assert plan_for(10_000_000, p["min_shards"], worker_ram_gib=1.0, constants=FIG)["fits"]
    assert not plan_for(10_000_000, p["min_shards"] - 1, worker_ram_gib=1.0, constants=FIG)["fits"]
    with pytest.raises(MemoryFormatError, match="shards <= rows"):
        plan_for(5, 6, constants=FIG)


def test_plan_text_names_every_figure_and_its_command():
    text = format_plan(plan_for(10**9, 128, worker_ram_gib=256, constants=FIG))
    for word in ("1,000,000,000 pairs in 128 shards", "disk:", "RAM:", "workers:", "build:", "encode",
                 "search, batch 1:", "search, batch 256:", "recall@10 0.9900", FIG["command"]):
        assert word in text, word


def test_constants_file_refused_in_one_line(tmp_path):
    bad = tmp_path / "c.json"
    bad.write_text("{")
    with pytest.raises(MemoryFormatError, match="unreadable scale constants"):
        load_constants(bad)
    bad.write_text(json.dumps({"dim": 8}))
    with pytest.raises(MemoryFormatError, match="lack"):
        load_constants(bad)


def test_shipped_constants_were_measured_by_the_script():
    c = load_constants()
    assert c["command"].startswith("python3 scripts/scale_bench.py") and c["rows"] >= 2_000_000
    assert c["shards"] >= 8 and c["served_workers"] == 2 and c["dim"] == 768


def _cli(*args):
    e = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "reco_ref.cli", *map(str, args)], env=e, capture_output=True,
                          text=True, timeout=120)


def test_cli_estimate_only_rows_prints_the_plan():
    p = _cli("build-memory", "--estimate-only", "--rows", 1_000_000_000, "--shards", 128, "--worker-ram", 256)
    assert p.returncode == 0, p.stderr
    assert "plan for 1,000,000,000 pairs in 128 shards" in p.stdout and "workers:" in p.stdout
    assert "scripts/scale_bench.py" in p.stdout


@pytest.mark.parametrize("args, said", [
    (("--rows", 1000, "--shards", 2), "add --estimate-only"),
    (("--estimate-only", "--rows", 1000, "--pairs", "x.csv"), "drop --pairs"),
    (("--estimate-only", "--rows", 100, "--shards", 200), "shards <= rows"),
    ((), "--out DIR is required"),
])
def test_cli_plan_refusals_are_one_line(args, said):
    p = _cli("build-memory", *args)
    assert p.returncode == 1 and said in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def _script():
    spec = importlib.util.spec_from_file_location("scale_bench", ROOT / "scripts" / "scale_bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.filterwarnings("ignore:One of the clusters is empty", "ignore:invalid value encountered in divide")
def test_scale_bench_small_run_end_to_end(tmp_path):  # (a 250-row shard is too small for 256 PQ centroids: warned)
    """The whole measuring run at 2,000 rows x 32-d in 8 shards on a 2-process cluster; its constants feed the plan."""
    pytest.importorskip("distributed")
    out, const = tmp_path / "run.json", tmp_path / "const.json"
    rc = _script().main(["--work", str(tmp_path / "w"), "--rows", "2000", "--shards", "8", "--dim", "32",
                         "--queries", "20", "--batch1-queries", "5", "--repeats", "1", "--base", "random",
                         "--encode-sample", "0", "--pq", "4", "--pq-queries", "20", "--out", str(out),
                         "--constants", str(const), "--cleanup"])
    assert rc == 0 and not (tmp_path / "w" / "memory").exists()
    r = json.loads(out.read_text())
    assert all(r["served"]["bit_identical_to_in_process"].values()), r["served"]["bit_identical_to_in_process"]
    assert len(r["build"]) == 8 and r["disk"]["rows"] == 2000 and len(r["served"]["per_worker"]) == 2
    assert r["served"]["recall@10"] == r["in_process"]["recall@10"] > 0.5
    assert 0 <= r["pq"]["runs"][0]["recall@10"] <= r["pq"]["runs"][0]["recall@10_rerank100"] <= 1
    c = load_constants(const)
    assert c["disk_bytes_per_row"]["total"] == pytest.approx(r["disk"]["bytes_per_row"])
    p = plan_for(2000, 8, constants=c)
    assert p["disk_bytes_total"] == pytest.approx(r["disk"]["total_bytes"], rel=1e-9)
