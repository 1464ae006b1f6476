"""Issue 20, class 4: memories smaller than k, and empty memories, through every verb that retrieves.

A memory of n rows has at most n neighbours to give. ``query``, ``eval`` (zero-shot and retrieval), ``ablate``
and ``demo`` allocated their neighbour arrays at the requested k and then met k' = min(k, n) columns from the
search: "unexpected ValueError: could not broadcast ... (a bug ...)". Now each caps k at the memory's rows, says
so on one stderr line (``note: k = 10 capped at the memory's 3 rows``) and records the k it used (``k``, with
``k_requested``) in its JSON. A memory of 0 rows (every item failed to encode, the build still exits 0) is
refused with one line naming it, by every verb that retrieves from it, instead of an IndexError deep inside.

The memories here are written from random unit vectors with reco-mini's fingerprint and widths (no image is
encoded to build them); the CLI cases run the real reco-mini towers on a few shipped demo images.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fuzz_lib import arrays_memory, check_cli, record, run_cli, unit_rows as _unit

from reco_ref.paths import weights_dir

HAVE_RECO_MINI = (weights_dir() / "reco-mini" / "encoder.json").is_file()
HAVE_FUSION = (weights_dir() / "reco-mini-fusion" / "fusion.npz").is_file()
CAP = 3 << 30  # reco-mini's ONNX towers and the 57 MB shipped fusion weights: the encode verb's cap
CLS = "verbs: k above the memory's rows"
EMPTY = "verbs: 0-row memory"
TRAIN = Path(__file__).resolve().parents[1] / "train"


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    """reco-mini-compatible memories of 0, 3 and 12 rows, and a 4-image dataset folder of shipped demo images."""
    if not HAVE_RECO_MINI:
        pytest.skip("weights/reco-mini not present")
    from reco_ref.encoders import load

    enc = load("reco-mini")
    root = tmp_path_factory.mktemp("verbs_k")
    mems = {n: arrays_memory(root / f"mem{n}", n, enc.dim, enc.name, enc.fingerprint, key_dim=enc.key_dim, seed=n)
            for n in (0, 3, 12)}
    data = root / "data"
    (data / "img").mkdir(parents=True)
    rows = []
    demo = weights_dir() / "demo"
    with open(demo / "pairs.csv", newline="", encoding="utf-8") as fh:
        pairs = [p for p in csv.DictReader(fh) if p["category"] in ("bird", "car")]
    taken: dict = {}
    for p in pairs:  # 3 train + 2 test images of each class, copied so the manifest's paths stay inside it
        c = p["category"]
        split = "train" if taken.get(c, 0) < 3 else "test"
        if taken.get(c, 0) >= 5:
            continue
        taken[c] = taken.get(c, 0) + 1
        dst = data / "img" / Path(p["image"]).name
        shutil.copyfile(demo / p["image"], dst)
        rows.append([f"img/{dst.name}", 0 if c == "bird" else 1, c, split])
    with open(data / "manifest.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "label", "class_name", "split"])
        w.writerows(rows)
    with open(data / "pairs.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "caption", "split"])
        w.writerows([[f, f"a drawing of a {c}", s] for f, _, c, s in rows])
    return {"root": root, "mem": mems, "data": data, "enc": enc}


def _note(stderr: str, k: int, n: int) -> None:
    notes = [ln for ln in stderr.splitlines() if ln.startswith("note: k = ")]
    assert notes == [f"note: k = {k} capped at the memory's {n} rows"], stderr[-2000:]


# ------------------------------------------------------------------------------------------- the library
def test_refine_and_surrogate_cap_k_at_the_memory(mini):
    """refine / surrogate_refine / evaluate_zero_shot return k' = min(k, n) columns (they broadcast [N,k'] into
    [N,k] before), with every column of a 3-row memory a valid neighbour."""
    from reco_ref.eval.zeroshot import evaluate_zero_shot, surrogate_refine
    from reco_ref.memory import Memory
    from reco_ref.reco.refine import refine
    from reco_ref.reco.weights import init_reco_weights

    enc = mini["enc"]
    mem = Memory.open(mini["mem"][3], encoder=enc)
    rng = np.random.default_rng(1)
    q, keys = _unit(rng.standard_normal((5, enc.dim))), _unit(rng.standard_normal((5, enc.key_dim)))
    w = init_reco_weights(enc.dim, heads=8, seed=0)
    for k in (3, 10, 500):
        refined, rows, valid = refine(w.image, mem, q, "image", search_queries=keys, k=k)
        assert rows.shape == valid.shape == (5, 3) and valid.all() and np.isfinite(refined).all()
        out, rows, valid = surrogate_refine(mem, q, "text", k=k)
        assert rows.shape == (5, 3) and valid.all()
    labels = np.array([0, 1, 2, 0, 1])
    r = evaluate_zero_shot(mem, q, labels, _unit(rng.standard_normal((3, enc.dim))), ["c0", "c1", "c2"], keys=keys,
                           weights=w, k=10)
    assert (r["k"], r["k_requested"]) == (3, 10)
    record(CLS, "ok")


def test_library_refuses_an_empty_memory(mini):
    from reco_ref.errors import RecoError
    from reco_ref.eval.zeroshot import surrogate_refine
    from reco_ref.memory import Memory
    from reco_ref.reco.refine import refine
    from reco_ref.reco.weights import init_reco_weights

    enc = mini["enc"]
    mem = Memory.open(mini["mem"][0], encoder=enc)
    q = _unit(np.random.default_rng(0).standard_normal((2, enc.dim)))
    with pytest.raises(RecoError, match="memory holds 0 rows"):
        refine(init_reco_weights(enc.dim).text, mem, q, "text", k=5)
    with pytest.raises(RecoError, match="memory holds 0 rows"):
        surrogate_refine(mem, q, "text", k=5)
    record(EMPTY, "error")


# ---------------------------------------------------------------------------------------------- query
@pytest.mark.skipif(not HAVE_FUSION, reason="weights/reco-mini-fusion not present")
def test_query_caps_k_says_so_and_records_it(mini):
    """The shipped weights (the default) on a 3-row memory, with class names: exit 0, the note, k = 3 in the JSON."""
    names = mini["root"] / "names.txt"
    names.write_text("bird\ncar\n")
    p = run_cli("query", "--memory", mini["mem"][3], "--text", "a small bird", "--class-names", names, "--json", "-",
                limit=CAP)
    assert check_cli(p, CLS) == "ok", p.stderr
    _note(p.stderr, 10, 3)
    r = json.loads(p.stdout)
    assert (r["k"], r["k_requested"]) == (3, 10) and len(r["neighbours"]) == 3 and r["reco_top"]


def test_query_refuses_an_empty_memory(mini):
    for extra in ((), ("--fusion", "none")):
        p = run_cli("query", "--memory", mini["mem"][0], "--text", "a bird", *extra, limit=CAP)
        assert check_cli(p, EMPTY, must_fail=True) == "error"
        assert "memory holds 0 rows" in p.stderr and str(mini["mem"][0]) in p.stderr, p.stderr


# ----------------------------------------------------------------------------------------------- eval
@pytest.mark.skipif(not HAVE_FUSION, reason="weights/reco-mini-fusion not present")
def test_eval_zero_shot_and_retrieval_cap_k(mini, tmp_path):
    d = mini["data"]
    out = tmp_path / "zs.json"
    p = run_cli("eval", "--memory", mini["mem"][3], "--dataset", d / "manifest.csv", "--templates", "single",
                "--json", out, "--no-progress", limit=CAP)
    assert check_cli(p, CLS) == "ok", p.stderr
    _note(p.stderr, 10, 3)
    r = json.loads(out.read_text())
    assert (r["k"], r["k_requested"]) == (3, 10) and r["reco"] is not None
    out = tmp_path / "ret.json"
    p = run_cli("eval", "--memory", mini["mem"][3], "--pairs", d / "pairs.csv", "--split", "all", "-k", "40",
                "--json", out, "--no-progress", limit=CAP)
    assert check_cli(p, CLS) == "ok", p.stderr
    _note(p.stderr, 40, 3)
    r = json.loads(out.read_text())
    assert (r["k"], r["k_requested"]) == (3, 40)


def test_eval_refuses_an_empty_memory(mini, tmp_path):
    d = mini["data"]
    for extra in (("--dataset", d / "manifest.csv"), ("--pairs", d / "pairs.csv", "--split", "all")):
        p = run_cli("eval", "--memory", mini["mem"][0], *extra, "--fusion", "none", "--json", tmp_path / "r.json",
                    "--no-progress", limit=CAP)
        assert check_cli(p, EMPTY, must_fail=True) == "error"
        assert "memory holds 0 rows" in p.stderr, p.stderr
        assert not (tmp_path / "r.json").exists()


# ----------------------------------------------------------------------------------------------- demo
def test_demo_caps_k_at_its_memory(mini, tmp_path):
    """demo --data with a 4-row memory (--memory-limit 4) and the default k = 10."""
    out = tmp_path / "demo"
    p = run_cli("demo", "--data", mini["data"], "--memory-limit", "4", "--limit", "2", "--fusion", "none", "--out",
                out, limit=CAP)
    assert check_cli(p, CLS) == "ok", p.stderr
    _note(p.stderr, 10, 4)
    r = json.loads((out / "results.json").read_text())
    assert (r["search"]["k"], r["search"]["k_requested"]) == (4, 10)
    assert all(len(ex["neighbours"]) <= 4 for ex in r["examples"])


# --------------------------------------------------------------------------------------------- ablate
def _train_data(root: Path) -> dict:
    import sys

    if str(TRAIN) not in sys.path:
        sys.path.insert(0, str(TRAIN))
    from train_testlib import CLASS_NAMES, build, clustered

    image, text, keys, labels, _ = clustered(400, 32, 20, seed=0, key_dim=48)
    build(root / "train_mem", image[:320], text[:320], keys[:320], labels[:320], CLASS_NAMES)
    build(root / "eval_mem", image[320:325], text[320:325], keys[320:325], labels[320:325], CLASS_NAMES)
    build(root / "empty_mem", image[:0], text[:0], keys[:0], labels[:0], CLASS_NAMES)
    manifest = root / "manifest.csv"
    test = range(330, 350)
    manifest.write_text("file,label,class_name,split\n" + "".join(f"x{i}.jpg,{c},c{c},train\n" for i, c in
                                                                   enumerate(range(20)))
                        + "".join(f"t{i}.jpg,{labels[i]},c{labels[i]},test\n" for i in test))
    np.save(root / "eval_img.npy", image[list(test)])
    np.save(root / "eval_keys.npy", keys[list(test)])
    return {"manifest": manifest}


def _pythonpath() -> str:
    """The subprocess path with tests/train added (``--model train_testlib:class_encoder``)."""
    import os

    from fuzz_lib import MEMLIB, ROOT

    return os.pathsep.join([str(ROOT), str(MEMLIB), str(TRAIN)])


def _ablate(root: Path, eval_mem: str, *extra) -> list:
    return ["ablate", "--memory", root / "train_mem", "--model", "train_testlib:class_encoder", "--eval-memory",
            root / eval_mem, "--eval-dataset", root / "manifest.csv", "--eval-embeddings", root / "eval_img.npy",
            "--eval-keys", root / "eval_keys.npy", "--arms", "k", "--ks", "1,10,50", "--epochs", "1",
            "--steps-per-epoch", "1", "--batch-size", "8", "--no-progress", "--out", root / "out", *extra]


def test_ablate_caps_each_k_at_the_eval_memory(tmp_path):
    _train_data(tmp_path)
    p = run_cli(*_ablate(tmp_path, "eval_mem"), PYTHONPATH=_pythonpath())
    assert check_cli(p, CLS) == "ok", p.stderr
    notes = sorted(ln for ln in p.stderr.splitlines() if ln.startswith("note: k = "))
    assert notes == ["note: k = 10 capped at the memory's 5 rows", "note: k = 50 capped at the memory's 5 rows"], p.stderr
    rows = json.loads((tmp_path / "out" / "ablations.json").read_text())["rows"]
    got = sorted((r["k_requested"], r["k"]) for r in rows if r["arm"] == "k")
    assert got == [(1, 1), (10, 5), (50, 5)]
    assert all(r["k"] <= 5 for r in rows)


def test_ablate_refuses_an_empty_eval_memory(tmp_path):
    _train_data(tmp_path)
    p = run_cli(*_ablate(tmp_path, "empty_mem"), PYTHONPATH=_pythonpath())
    assert check_cli(p, EMPTY, must_fail=True) == "error"
    assert "memory holds 0 rows" in p.stderr, p.stderr


def test_ablate_checks_the_eval_arrays_before_any_arm_trains(tmp_path):
    """--eval-embeddings of the wrong kind (integers, 1-D), keys missing for a keyed memory, an empty
    --small-memory: one line each before training (they surfaced after it, or as "unexpected IndexError")."""
    _train_data(tmp_path)
    np.save(tmp_path / "int.npy", np.zeros((20, 32), np.int64))
    np.save(tmp_path / "flat.npy", np.load(tmp_path / "eval_img.npy")[0])
    base = _ablate(tmp_path, "eval_mem")
    cases = {
        "expected a 2-D float array": ("--eval-embeddings", tmp_path / "int.npy"),
        "expected a 2-D float array [20, 32]": ("--eval-embeddings", tmp_path / "flat.npy"),
        "pass --eval-keys": ("--eval-keys", None),
        "memory holds 0 rows": ("--small-memory", tmp_path / "empty_mem"),
    }
    for message, (opt, value) in cases.items():
        argv = list(base)
        if value is None:  # drop the option and its value
            i = argv.index(opt)
            del argv[i:i + 2]
        elif opt in argv:
            argv[argv.index(opt) + 1] = value
        else:
            argv[argv.index("--arms") + 1] = "small_memory"
            argv += [opt, value]
        p = run_cli(*argv, PYTHONPATH=_pythonpath())
        assert check_cli(p, "verbs: ablate eval arrays", must_fail=True) == "error"
        assert message in p.stderr, (message, p.stderr)
        assert not list((tmp_path / "out").glob("arm-*")), "an arm trained before the refusal"


def test_demo_seed_range(tmp_path):
    """demo --seed -1 reached numpy's generator mid-demo ("unexpected ValueError"); now a usage error, and the
    library refuses it before any work."""
    from reco_ref.errors import RecoError
    from reco_ref.eval.demo import run_demo

    p = run_cli("demo", "--seed", "-1", "--out", tmp_path / "d")
    assert check_cli(p, "verbs: demo --seed", must_fail=True) == "error" and p.returncode == 2
    assert "argument --seed" in p.stderr
    with pytest.raises(RecoError, match="seed"):
        run_demo(out_dir=tmp_path / "d", seed=-1, quiet=True)
    assert not (tmp_path / "d").exists()


def test_cuda_backend_without_a_device(mini, tmp_path):
    """--backend cuda on a machine without a CUDA driver: numba's CUDA module imports, the first kernel launch
    failed ("unexpected CudaSupportError"); now one line before any work."""
    import ctypes.util

    if ctypes.util.find_library("cuda") is not None:
        pytest.skip("a CUDA driver is present")
    d = mini["data"]
    for argv in (("query", "--memory", mini["mem"][3], "--text", "a bird", "--backend", "cuda"),
                 ("eval", "--memory", mini["mem"][3], "--dataset", d / "manifest.csv", "--backend", "cuda",
                  "--json", tmp_path / "r.json", "--no-progress")):
        p = run_cli(*argv, limit=CAP, NUMBA_ENABLE_CUDASIM="0")  # tests/conftest.py turns the simulator on
        assert check_cli(p, "verbs: --backend cuda without a device", must_fail=True) == "error"
        assert "no usable CUDA device" in p.stderr, p.stderr
    assert not (tmp_path / "r.json").exists()


def test_build_memory_where_every_item_fails_exits_1(tmp_path):
    """Every image undecodable: the build wrote a valid memory of 0 rows and exited 0, so a script went on to a
    query or an eval that could only fail. It still writes the memory (its failures.jsonl says why each item
    failed; memory-add can fill it later) but exits 1 with one line saying that nothing was embedded."""
    from memory_testlib import make_pairs

    pairs = make_pairs(tmp_path / "src", 3, bad=(0, 1, 2))
    p = run_cli("build-memory", "--pairs", pairs, "--model", "memory_testlib:fake32", "--out", tmp_path / "mem",
                "--no-progress")
    assert check_cli(p, EMPTY, must_fail=True) == "error"
    err = p.stderr.strip().splitlines()[-1]
    assert "every item failed to encode" in err and "failures.jsonl" in err, err
    assert len((tmp_path / "mem" / "failures.jsonl").read_text().splitlines()) == 3
    ok = make_pairs(tmp_path / "src2", 3, bad=(1,))
    p = run_cli("build-memory", "--pairs", ok, "--model", "memory_testlib:fake32", "--out", tmp_path / "mem2",
                "--no-progress")
    assert check_cli(p, EMPTY) == "ok", p.stderr  # some items failing is still a build
