"""The disk/RAM/time estimator against a real small build, and the ``reco-ref`` memory verbs end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from memory_testlib import make_pairs

from reco_ref.memory import Memory, build_memory_from_arrays, estimate_build, format_estimate
from reco_ref.memory.estimate import hnsw_file_bytes

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


@pytest.mark.parametrize("n, dim, M", [(3000, 64, 16), (1200, 24, 8)])
def test_estimate_matches_actual_sizes(tmp_path, rng, n, dim, M):
    x = rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    items = [{"image": "", "caption": "c" * 40, "source": "s" * 30, "label": None, "split": None, "tags": None}
             for _ in range(n)]
    m = build_memory_from_arrays(tmp_path / "m", x, x[::-1].copy(), name="e", fingerprint="e" * 64, items=items,
                                 M=M, progress=False)
    est = estimate_build(n, dim, M=M, caption_bytes=40, source_bytes=30, encode_items_per_s=1000.0,
                         inserts_per_s=5000.0)
    actual = {f: r["bytes"] for f, r in m["files"].items() if f != "failures.jsonl"}
    assert set(actual) == set(est["disk_bytes"])
    assert est["disk_bytes"]["image.npy"] == actual["image.npy"]  # npy: exact
    for f in ("image.hnsw", "text.hnsw"):  # hnsw: exact up to the random level draw
        assert abs(est["disk_bytes"][f] - actual[f]) / actual[f] < 0.02, (f, est["disk_bytes"][f], actual[f])
    assert 0.5 < est["disk_bytes"]["meta.sqlite"] / actual["meta.sqlite"] < 2.0
    assert abs(est["disk_total_bytes"] - sum(actual.values())) / sum(actual.values()) < 0.1
    assert est["time_total_s"] == pytest.approx(n / 1000.0 + 2 * n / 5000.0)
    text = format_estimate(est)
    assert "disk" in text and "RAM peak" in text and "time" in text


def test_hnsw_bytes_formula_at_scale():
    # issue / spec §7: ~2.1 KB per vector at D=512, M=16
    per = hnsw_file_bytes(1_000_000, 512, 16) / 1_000_000
    assert 2100 < per < 2250


def test_estimate_calibrates_when_rate_unknown():
    est = estimate_build(50_000, 32, M=8, ef_construction=40, calibration_n=300)
    assert est["inserts_per_s"] > 0 and est["time_index_s"] > 0 and est["time_encode_s"] is None


def _cli(*args, **env):
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(HERE), str(ROOT), e.get("PYTHONPATH", "")])
    e.update(env)
    return subprocess.run([sys.executable, "-m", "reco_ref.cli", *map(str, args)], env=e, capture_output=True,
                          text=True, timeout=180)


def test_cli_build_resume_add_info_search(tmp_path):
    pairs = make_pairs(tmp_path / "src", 40, bad=(3,))
    more = make_pairs(tmp_path / "src2", 10, name="more.csv", start=40)
    out = tmp_path / "mem"
    p = _cli("build-memory", "--pairs", pairs, "--out", out, "--model", "memory_testlib:fake32", "--chunk-size", 8,
             "--no-progress", RECO_REF_FAILPOINT="memory.chunk:2")
    assert p.returncode == -9
    p = _cli("memory-info", out)
    assert p.returncode == 1 and "incomplete" in p.stderr and "--resume" in p.stderr and "build-memory" in p.stderr
    p = _cli("build-memory", "--pairs", pairs, "--out", out, "--model", "memory_testlib:fake32", "--chunk-size", 8,
             "--no-progress")
    assert p.returncode == 1 and "--resume" in p.stderr
    p = _cli("build-memory", "--pairs", pairs, "--out", out, "--model", "memory_testlib:fake32", "--chunk-size", 8,
             "--no-progress", "--resume")
    assert p.returncode == 0, p.stderr
    assert "estimate for 40 pairs" in p.stderr and "39 rows, 1 failed" in p.stderr
    p = _cli("memory-add", out, "--pairs", more, "--model", "memory_testlib:fake32", "--no-progress")
    assert p.returncode == 0, p.stderr
    info = json.loads(_cli("memory-info", out).stdout)
    assert info["rows"] == 49 and info["failed"] == 1 and info["items"] == 50 and info["embed_dim"] == 32
    p = _cli("memory-search", out, "--text", "a photo of thing 3 number 10", "-k", 3, "--model",
             "memory_testlib:fake32")
    assert p.returncode == 0, p.stderr
    hits = json.loads(p.stdout)
    assert hits[0][0]["caption"] == "a photo of thing 3 number 10" and hits[0][0]["score"] == pytest.approx(1, abs=1e-5)
    p = _cli("memory-search", out, "--text", "x", "--model", "memory_testlib:fake32_keys")
    assert p.returncode == 1 and "fingerprint" in p.stderr


def test_cli_manifest_split_template_and_arrays(tmp_path, rng):
    d = tmp_path / "ds"
    (d / "images").mkdir(parents=True)
    lines = ["file,label,class_name,split"]
    for i in range(12):
        (d / f"images/{i}.jpg").write_bytes(b"OK" + bytes([i]))
        lines.append(f"images/{i}.jpg,{i % 3},class {i % 3},{'train' if i < 8 else 'test'}")
    (d / "manifest.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "mem"
    p = _cli("build-memory", "--pairs", d / "manifest.csv", "--out", out, "--model", "memory_testlib:fake32",
             "--split", "train", "--caption-template", "a photo of a {class_name}.", "--no-progress")
    assert p.returncode == 0, p.stderr
    mem = Memory.open(out)
    assert len(mem) == 8 and mem.metadata([7])[0]["caption"] == "a photo of a class 1."
    x = rng.standard_normal((30, 16)).astype(np.float32)
    np.save(tmp_path / "img.npy", x)
    np.save(tmp_path / "txt.npy", x[::-1].copy())
    p = _cli("build-memory", "--image-embeddings", tmp_path / "img.npy", "--text-embeddings", tmp_path / "txt.npy",
             "--encoder-name", "mine", "--encoder-fingerprint", "c" * 64, "--out", tmp_path / "arr", "--no-progress")
    assert p.returncode == 1 and "L2 norm" in p.stderr
    p = _cli("build-memory", "--image-embeddings", tmp_path / "img.npy", "--text-embeddings", tmp_path / "txt.npy",
             "--encoder-name", "mine", "--encoder-fingerprint", "c" * 64, "--out", tmp_path / "arr", "--no-progress",
             "--normalize", "--dtype", "float16")
    assert p.returncode == 0, p.stderr
    mem = Memory.open(tmp_path / "arr", fingerprint="c" * 64)
    assert len(mem) == 30 and mem.dtype == "float16"


@pytest.mark.parametrize("verb", ["build", "add"])
def test_array_inputs_need_both_modalities(tmp_path, verb):
    from reco_ref.errors import MemoryFormatError
    from reco_ref.memory import commands

    np.save(tmp_path / "img.npy", np.eye(4, dtype=np.float32))
    where = {"out": str(tmp_path / "m")} if verb == "build" else {"memory": str(tmp_path / "m")}
    with pytest.raises(MemoryFormatError, match="--image-embeddings and --text-embeddings go together"):
        getattr(commands, verb)(image_embeddings=str(tmp_path / "img.npy"), encoder_fingerprint="c" * 64, **where)
