"""Issue 20, classes 3, 4 and 6 for ``train``, ``ablate`` and ``classify train``: options, empty memories, one run
per output folder.

* Float options took any float: ``nan``, ``inf`` and negatives reached the internals (``classify train --lr nan``:
  "unexpected ValueError ... (a bug ...)"; ``train --weight nan``: a JSON error at save time, after the whole
  run; ``train --weight 0`` or ``-1``: accepted, the epoch collapsed to one step). ``train --seed -1`` and
  ``train --heads 7`` (7 does not divide the embedding width) reached numpy and the fusion config. Each is now
  refused at the parser (usage error, exit 2) and again where a Python caller enters (one named error).
* A training, retrieval or validation memory of 0 rows: an IndexError / ZeroDivisionError deep in the loop; now
  one line naming the memory.
* Two ``train`` runs on one ``--out`` both exited 0 with their files mixed; the run folder is now locked for the
  run and the second run stops at once, naming the folder and the holder's pid.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fuzz_lib import MEMLIB, ROOT, check_cli, env, record, run_cli

from reco_ref.cli import build_parser, main
from reco_ref.errors import RecoError

TRAIN = ROOT / "tests" / "train"
CLASSIFY = ROOT / "tests" / "classify"
for _p in (TRAIN, CLASSIFY):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

PYTHONPATH = os.pathsep.join(str(p) for p in (ROOT, MEMLIB, TRAIN, CLASSIFY))
CLS_PARSER = "train/classify options: CLI parser"
CLS_RUN = "train/classify: end to end"

#: option -> (values refused at the parser, one value accepted)
TRAIN_FLOATS = {
    "--lr": (["nan", "inf", "-inf", "-1e-3", "abc"], "1e-3"),
    "--min-lr": (["nan", "inf", "-1"], "0"),
    "--weight-decay": (["nan", "inf", "-0.1"], "0"),
    "--alpha": (["nan", "inf", "0", "-1"], "0.5"),
    "--rel-beta": (["nan", "inf", "-inf"], "-2"),
    "--rel-gamma": (["nan", "inf"], "3"),
    "--irrelevant-fraction": (["nan", "1", "-0.1", "inf"], "0.5"),
    "--weight": (["nan", "inf", "0", "-1", "-0"], "2.5"),
    "--seed": (["-1", "1.5", "nan", str(2**32)], str(2**32 - 1)),
    "--warmup-steps": (["-1", "nan"], "0"),
    "--batch-size": (["0", "-3"], "2"),  # 1: TrainConfig's own named error (InfoNCE needs 2), exit 1
}
CLASSIFY_FLOATS = {
    "--lr": (["nan", "inf", "-1"], "0.01"),
    "--weight-decay": (["nan", "inf", "-1"], "0"),
    "--logit-scale": (["nan", "inf", "0", "-3"], "16"),
    "--label-noise": (["nan", "1", "-0.5"], "0.2"),
    "--seed": (["-1", str(2**32)], "7"),
    "-k": (["0", "-3"], "1"),
    "--width": (["0", "-1"], "8"),
    "--heads": (["0", "-2"], "2"),
    "--epochs": (["0"], "1"),
    "--batch-size": (["0"], "1"),
}


def _parse(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            build_parser().parse_args(argv)
            return 0, err.getvalue()
        except SystemExit as exc:
            return int(exc.code), err.getvalue()


@pytest.mark.parametrize("verb", ["train", "ablate", "classify train"])
def test_parser_refuses_meaningless_numbers(verb):
    if verb == "classify train":
        base, table = ["classify", "train", "--dataset", "d", "--out", "o.npz"], CLASSIFY_FLOATS
    else:
        base, table = [verb, "--memory", "m", "--out", "o"], TRAIN_FLOATS
        if verb == "ablate":
            base += ["--eval-memory", "e", "--eval-dataset", "d"]
    for opt, (bad, good) in table.items():
        for v in bad:
            code, err = _parse(base + [f"{opt}={v}"])
            assert code == 2, (verb, opt, v)
            lines = err.strip().splitlines()
            assert f"argument {opt}" in lines[-1] and "error:" in lines[-1], (opt, v, err)
            record(CLS_PARSER, "error")
        code, err = _parse(base + [f"{opt}={good}"])
        assert code == 0, (verb, opt, good, err)
        record(CLS_PARSER, "ok")


# ------------------------------------------------------------------------------------------ train, end to end
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from train_testlib import CLASS_NAMES, build, clustered, make_run_data

    root = tmp_path_factory.mktemp("train_options")
    d = make_run_data(root)
    image, text, keys, labels, _ = clustered(400, 32, 20, seed=0, key_dim=48)
    d["empty"] = build(root / "empty_mem", image[:0], text[:0], keys[:0], labels[:0], CLASS_NAMES).root
    d["root"] = root
    return d


def _train(d: dict, out: Path, *extra) -> list:
    return ["train", "--memory", d["train"].root, "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "8",
            "--no-progress", "--out", out, *map(str, extra)]


def _one_error(capsys, argv: list, code: int = 1) -> str:
    assert main([str(a) for a in argv]) == code
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert ": error: " in lines[-1] and "unexpected" not in lines[-1] and "a bug" not in lines[-1], lines
    record(CLS_RUN, "error")
    return lines[-1]


def test_train_heads_that_do_not_divide_the_width(data, tmp_path, capsys):
    err = _one_error(capsys, _train(data, tmp_path / "run", "--heads", "7"))
    assert "--heads 7" in err and "dim 32" in err, err
    assert not (tmp_path / "run" / "best.npz").exists()
    assert main([str(a) for a in _train(data, tmp_path / "run8", "--heads", "8")]) == 0  # a divisor trains
    record(CLS_RUN, "ok")


def test_train_cuda_without_a_device(data, tmp_path):
    """numba's CUDA module imports without a driver; the first kernel launch failed after the run folder was
    written ("unexpected CudaSupportError"). Now one line, nothing written."""
    import ctypes.util

    if ctypes.util.find_library("cuda") is not None:
        pytest.skip("a CUDA driver is present")
    # tests/conftest.py turns numba's CUDA simulator on; this run has neither simulator nor driver
    p = run_cli(*_train(data, tmp_path / "run", "--backend", "cuda"), PYTHONPATH=PYTHONPATH, NUMBA_ENABLE_CUDASIM="0")
    assert check_cli(p, CLS_RUN, must_fail=True) == "error"
    assert "no usable CUDA device" in p.stderr, p.stderr
    assert not (tmp_path / "run").exists()


def test_train_refuses_empty_memories(data, tmp_path, capsys):
    e, tr = data["empty"], data["train"].root
    val = ["--val-classes", data["manifest"], "--model", "train_testlib:class_encoder"]
    cases = [  # the empty memory as the training pairs, their retrieval memory, a validation set, its retrieval
        ["--memory", e],
        ["--memory", tr, "--retrieval", e],
        ["--memory", tr, "--val-memory", e, "--val-retrieval", tr, *val],
        ["--memory", tr, "--val-memory", data["val"].root, "--val-retrieval", e, *val],
    ]
    for i, case in enumerate(cases):
        argv = ["train", *case, "--epochs", "1", "--batch-size", "8", "--no-progress", "--out", tmp_path / f"run{i}"]
        err = _one_error(capsys, argv)
        assert "memory holds 0 rows" in err and str(e) in err, err


def test_library_config_checks(data):
    """What a Python caller meets: the same ranges, as one named RecoError (not a ValueError from numpy)."""
    from reco_ref.train.commands import check_config
    from reco_ref.train.loop import TrainConfig

    for bad in (dict(seed=-1), dict(seed=1.5), dict(heads=7), dict(lr=math.nan), dict(alpha=-1.0)):
        with pytest.raises(RecoError):
            check_config(TrainConfig(**bad), dim=32)
        record(CLS_RUN, "error")
    check_config(TrainConfig(heads=8, seed=2**32 - 1), dim=32)
    check_config(TrainConfig(heads=7, model="mlp"), dim=32)  # the MLP control has no heads


def test_library_source_weights(data):
    from argparse import Namespace

    from reco_ref.train.commands import sources_from_args

    for w in (0.0, -1.0, math.nan, math.inf):
        a = Namespace(memory=[str(data["train"].root)], retrieval=None, weight=[w])
        with pytest.raises(RecoError, match="--weight"):
            sources_from_args(a)
        record(CLS_RUN, "error")
    a = Namespace(memory=[str(data["train"].root)], retrieval=None, weight=[0.5])
    assert sources_from_args(a)[0]["weight"] == 0.5


# --------------------------------------------------------------------------------------- one run per folder
def test_second_train_on_the_same_out_stops_at_once(data, tmp_path):
    """A long run holds OUT. A second run on OUT, with the same arguments and ``--resume`` (without the lock it
    continued from the first run's checkpoint and both wrote OUT), exits 1 at once naming OUT and the first run's
    pid, and the first run goes on. Once the first is gone (killed), the lock is free again: it dies with its
    holder."""
    from reco_ref.train.checkpoint import run_lock

    out = tmp_path / "run"
    argv = [str(a) for a in _train(data, out, "--epochs", "500", "--steps-per-epoch", "50")]
    first = subprocess.Popen([sys.executable, "-m", "reco_ref.cli", *argv], env=env(PYTHONPATH=PYTHONPATH),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (out / "log.jsonl").exists():  # the first run is training (its epoch 0 is logged)
            assert first.poll() is None, first.stderr.read()
            assert time.monotonic() < deadline, "the first run never started training"
            time.sleep(0.1)
        t0 = time.monotonic()
        p = run_cli(*argv, "--resume", PYTHONPATH=PYTHONPATH, timeout=60)
        assert check_cli(p, "train: a second run on one --out", must_fail=True) == "error"
        assert time.monotonic() - t0 < 30
        err = p.stderr.strip().splitlines()[-1]
        assert str(out) in err and f"pid {first.pid}" in err, err
        assert first.poll() is None  # the first run goes on
    finally:
        first.kill()
        first.wait()
    with run_lock(out):  # free once its holder is gone, however it went
        pass


# ------------------------------------------------------------------------------------------ classify train
@pytest.fixture(scope="module")
def cdata(tmp_path_factory):
    from classify_testlib import make_encoder, write_dataset

    from reco_ref.memory import build_memory_from_arrays

    root = tmp_path_factory.mktemp("classify_options")
    manifest = write_dataset(root / "data")
    enc = make_encoder()
    build_memory_from_arrays(root / "empty", np.zeros((0, enc.dim), np.float32), np.zeros((0, enc.dim), np.float32),
                             keys=np.zeros((0, enc.key_dim), np.float32), items=[], name=enc.name,
                             fingerprint=enc.fingerprint, progress=False)
    from reco_ref.memory import build_memory, read_pairs

    build_memory(root / "mem", read_pairs(manifest, split="train", caption_template="a photo of a {class_name}."),
                 enc, progress=False)
    return {"root": root, "manifest": manifest}


def _classify(c: dict, out: Path, *extra) -> list:
    return ["classify", "train", "--dataset", c["manifest"], "--memory", c["root"] / "mem", "--model",
            "classify_testlib:make_encoder", "--epochs", "1", "--batch-size", "8", "--cache-dir", "off", "--quiet",
            "--no-progress", "--out", out, *extra]


def test_classify_library_refuses_meaningless_numbers(cdata, tmp_path):
    """train_from_manifest (the library door) with a config built in Python: one named RecoError each."""
    from classify_testlib import make_encoder

    from reco_ref.classify.commands import train_from_manifest
    from reco_ref.classify.train import ClassifyConfig

    for bad in (dict(lr=math.nan), dict(lr=-1.0), dict(lr=math.inf), dict(logit_scale=math.nan),
                dict(logit_scale=0.0), dict(seed=-1), dict(weight_decay=math.nan),
                dict(readout=True, readout_template="{x}{}"), dict(readout=True, readout_template="{:>99999999}")):
        with pytest.raises(RecoError):
            train_from_manifest(cdata["manifest"], "train", cdata["root"] / "mem", tmp_path / "w.npz",
                                ClassifyConfig(**bad), encoder=make_encoder(), cache_dir="off", progress=False,
                                quiet=True)
        record(CLS_RUN, "error")
    assert not (tmp_path / "w.npz").exists()


def test_classify_cli_template_and_empty_memory(cdata, tmp_path, capsys):
    err = _one_error(capsys, _classify(cdata, tmp_path / "a.npz", "--readout", "--readout-template", "{x} {}"))
    assert "readout_template" in err or "--readout-template" in err, err
    argv = _classify(cdata, tmp_path / "b.npz")
    argv[argv.index("--memory") + 1] = cdata["root"] / "empty"
    err = _one_error(capsys, argv)
    assert "memory holds 0 rows" in err, err
    assert not (tmp_path / "a.npz").exists() and not (tmp_path / "b.npz").exists()
