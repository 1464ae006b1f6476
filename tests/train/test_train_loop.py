"""The training loop: determinism, kill -9 + resume (bit-identical), best-on-validation, self-exclusion, batches."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from reco_ref.errors import CheckpointError
from reco_ref.memory import Memory
from reco_ref.reco.refine import own_rows
from reco_ref.reco.weights import load_reco_weights
from reco_ref.train import loop as loop_mod
from reco_ref.train.loop import TrainConfig, ValSet, train
from reco_ref.train.pairs import caption_groups, epoch_batches, prepare_source

from train_testlib import build, clustered, make_run_data

ROOT = Path(__file__).resolve().parents[2]
CFG = dict(k=5, batch_size=16, epochs=3, heads=4, lr=2e-3, warmup_steps=5, checkpoint_every=4)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_run_data(tmp_path_factory.mktemp("run"))


def _val(d):
    return [ValSet("val", d["val"], d["train"], d["labels"][320:], d["class_text"])]


def _arrays(w):
    return {f"{m}.{n}": a for m in ("image", "text") for n, a in getattr(w, m).items()} | {"tau": np.array(w.tau)}


def _same(a, b):
    A, B = _arrays(a), _arrays(b)
    return A.keys() == B.keys() and all(np.array_equal(A[k], B[k]) for k in A)


def test_deterministic_and_learns(data, tmp_path):
    r1 = train([{"pairs": data["train"]}], tmp_path / "a", TrainConfig(**CFG), val=_val(data), progress=False)
    r2 = train([{"pairs": data["train"]}], tmp_path / "b", TrainConfig(**CFG), val=_val(data), progress=False)
    assert _same(r1.last, r2.last) and _same(r1.best, r2.best)
    assert r1.history == r2.history
    r3 = train([{"pairs": data["train"]}], tmp_path / "c", TrainConfig(**dict(CFG, seed=1)), val=_val(data),
               progress=False)
    assert not _same(r1.last, r3.last)
    h = r1.history
    assert [r["epoch"] for r in h] == [0, 1, 2, 3]
    assert h[0]["train_loss"] is None and h[-1]["top1"] > h[0]["top1"] and h[-1]["loss"] < h[0]["loss"]
    assert (tmp_path / "a" / "log.jsonl").read_text().count("\n") == 4
    w = load_reco_weights(tmp_path / "a" / "best.npz")
    assert w.meta["encoder_fingerprint"] == data["train"].fingerprint and w.meta["k"] == 5
    with pytest.raises(CheckpointError, match="checkpoint.npz exists: pass resume=True"):
        train([{"pairs": data["train"]}], tmp_path / "a", TrainConfig(**CFG), progress=False)
    with pytest.raises(CheckpointError, match="another configuration or other data"):
        train([{"pairs": data["train"]}], tmp_path / "a", TrainConfig(**dict(CFG, lr=1e-3)), val=_val(data),
              resume=True, progress=False)


def test_best_on_validation_is_kept(data, tmp_path, monkeypatch):
    scores = iter([0.1, 0.5, 0.3, 0.2])  # epochs 0..3: epoch 1 is best
    snaps = []

    def fake_validate(model, pv, cfg):
        snaps.append(model.snapshot({}))
        return {"set": pv.name, "loss": 1.0, "top1": next(scores), "n": 1}

    monkeypatch.setattr(loop_mod, "_validate", fake_validate)
    r = train([{"pairs": data["train"]}], tmp_path / "o", TrainConfig(**CFG), val=_val(data), progress=False)
    assert r.best_record["epoch"] == 1 and r.best.meta["selected"]["epoch"] == 1
    assert _same(r.best, snaps[1]) and not _same(r.best, r.last) and _same(r.last, snaps[3])


def test_self_exclusion_and_duplicates(tmp_path):
    image, text, keys, labels, _ = clustered(60, 16, 6, seed=3, key_dim=24)
    image[1], keys[1] = image[0], keys[0]  # row 1 is a duplicate image of row 0 (another caption's row)
    mem = build(tmp_path / "m", image, text, keys, labels, [f"c{i}" for i in range(6)])
    src = prepare_source(mem, k=8, exact=True)
    own = np.arange(60)[:, None]
    assert not (src.rows_i == own).any() and not (src.rows_t == own).any()
    assert 1 not in src.rows_i[0] and 0 not in src.rows_i[1]  # near-duplicate filter on the image index
    # text index: identical class captions of other rows are kept (the signal), own row is not
    same_class = labels[np.where(src.valid_t[0], src.rows_t[0], 0)]
    assert (same_class == labels[0]).all()
    # a separate retrieval memory holding some of the pairs: own rows found by self-match and excluded
    sub = build(tmp_path / "sub", image[::3], text[::3], keys[::3])
    found = own_rows(sub, keys)
    expect = np.where(np.arange(60) % 3 == 0, np.arange(60) // 3, -1)
    expect[1] = 0  # row 1's image is row 0's: its "own" image is in the small memory too
    np.testing.assert_array_equal(found, expect)
    src2 = prepare_source(mem, sub, k=5, exact=True)
    assert not (src2.rows_i == found[:, None])[found >= 0].any()
    assert not (src2.rows_t == found[:, None])[found >= 0].any()


def test_batches_unique_captions_and_interleave(tmp_path):
    image, text, keys, labels, _ = clustered(120, 16, 10, seed=1)
    mem = build(tmp_path / "m", image, text)
    a = prepare_source(mem, k=3, exact=True, name="a")
    b = prepare_source(mem, k=3, exact=True, name="b", weight=40.0)
    assert len(np.unique(caption_groups(text))) == 10
    plan = epoch_batches([a, b], 8, seed=0, epoch=2)
    again = epoch_batches([a, b], 8, seed=0, epoch=2)
    assert len(again) == len(plan) and all(x[0] == y[0] and np.array_equal(x[1], y[1]) for x, y in zip(plan, again))
    for _, idx in plan:
        assert len(np.unique(a.groups[idx])) == len(idx)  # each caption at most once per batch
    n_a = sum(1 for s, _ in plan if s == 0)
    n_b = sum(1 for s, _ in plan if s == 1)
    assert abs(n_a / (n_a + n_b) - 0.75) <= 1 / (n_a + n_b)  # in proportion to the weights 120 : 40 (rounded)
    assert [s for s, _ in plan] != sorted(s for s, _ in plan)  # interleaved
    other = epoch_batches([a, b], 8, seed=0, epoch=3)
    assert any(not np.array_equal(x[1], y[1]) for x, y in zip(plan, other))


def _cli(args, env_extra=None):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests" / "train")]))
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "reco_ref.cli", "train", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("recipe", [[], ["--init", "copy", "--relevance", "--rel-map", "memory", "--rel-beta", "2",
                                              "--rel-gamma", "-4", "--train-groups", "relevance", "--hold-threshold"]],
                         ids=["all-arrays", "relevance-only"])
def test_kill9_resume_bit_identical(data, tmp_path, recipe):
    """A SIGKILL mid-run and --resume give the uninterrupted run's files bit for bit; a relevance-only run's
    checkpoint holds only what trains (β, γ, τ and their moments), and the size said up front is what is written."""
    root = Path(data["train"].root).parent
    args = ["--memory", str(root / "train_mem"), "--val-memory", str(root / "val_mem"), "--val-retrieval",
            str(root / "train_mem"), "--val-classes", str(data["manifest"]), "--template", "a photo of a {}.",
            "--model", "train_testlib:class_encoder", "-k", "5", "--batch-size", "16", "--epochs", "3", "--heads",
            "4", "--lr", "2e-3", "--warmup-steps", "5", "--checkpoint-every", "4", "--no-progress", *recipe]
    full = _cli(args + ["--out", str(tmp_path / "full")])
    assert full.returncode == 0, full.stderr
    said = full.stdout.split("this run writes about ", 1)[1].split(" ", 2)  # the disk it takes, said up front
    written = sum(f.stat().st_size for f in (tmp_path / "full").iterdir() if f.suffix == ".npz")
    # the rest is npz headers, the meta and the checkpoint's JSON state (its validation history): tens of kB
    assert said[1] == "kB" and abs(float(said[0]) * 1e3 - written) < 0.15 * written + 64e3
    ckpt = (tmp_path / "full" / "checkpoint.npz").stat().st_size
    weights = (tmp_path / "full" / "last.npz").stat().st_size
    assert (ckpt < 0.1 * weights) if recipe else (ckpt > 2 * weights), (ckpt, weights)
    killed = _cli(args + ["--out", str(tmp_path / "k")], {"RECO_REF_TRAIN_KILL_AT_STEP": "27"})
    assert killed.returncode == -9, killed.stderr  # a real SIGKILL mid-run (epoch 2 of 3)
    assert not (tmp_path / "k" / "last.npz").exists()
    again = _cli(args + ["--out", str(tmp_path / "k")])
    assert again.returncode == 1 and "checkpoint.npz exists" in again.stderr and again.stderr.count("\n") == 1
    resumed = _cli(args + ["--out", str(tmp_path / "k"), "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    for name in ("last.npz", "best.npz"):
        a, b = load_reco_weights(tmp_path / "full" / name), load_reco_weights(tmp_path / "k" / name)
        assert _same(a, b), name
    assert (tmp_path / "full" / "log.jsonl").read_text() == (tmp_path / "k" / "log.jsonl").read_text()


@pytest.mark.parametrize("args, message", [
    (["--memory", "/nonexistent/mem"], "/nonexistent/mem: no such memory directory"),
    (["--memory", "{m}", "--retrieval", "same", "--retrieval", "same"], "--retrieval: given 2 time(s), expected once"),
    (["--memory", "{m}", "--val-memory", "{m}"], "--val-classes: a dataset manifest naming the classes"),
    (["--memory", "{m}", "--batch-size", "1"], "batch_size: expected at least 2"),
])
def test_cli_one_line_errors(data, tmp_path, args, message):
    from reco_ref.cli import main

    m = str(data["train"].root)
    args = [x.format(m=m) for x in args]
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["train", *args, "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc == 1
    line = err.getvalue().strip()
    assert line.startswith("reco-ref train: error: ") and message in line and "\n" not in line


def test_memory_reopen_is_what_the_loop_reads(data):
    m = Memory.open(data["train"].root, verify="size")
    assert len(m) == 320 and m.key_dim == 48


def test_mlp_control_trains(data, tmp_path):
    from reco_ref.train.loop import load_mlp_weights

    r = train([{"pairs": data["train"]}], tmp_path / "mlp", TrainConfig(**dict(CFG, model="mlp", epochs=2)),
              val=_val(data), progress=False)
    assert r.history[-1]["loss"] < r.history[0]["loss"]
    w = load_mlp_weights(tmp_path / "mlp" / "last.npz")
    assert w["meta"]["model"] == "mlp" and set(w["image"]) == {"ln_gamma", "ln_beta", "w_1", "b_1", "w_2", "b_2"}
