"""scripts/make_lt_splits.py: the exponential profile, and the same bytes on every run."""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("make_lt_splits", ROOT / "scripts" / "make_lt_splits.py")
lt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lt)


def _synthetic(tmp_path: Path, per_class=(40, 35, 30, 30, 25, 22), n_test=3) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    lines = ["file,label,class_name,split"]
    for c, n in enumerate(per_class):
        lines += [f"img/c{c}_{i}.jpg,{c},class {c},train" for i in range(n)]
        lines += [f"img/c{c}_t{i}.jpg,{c},class {c},test" for i in range(n_test)]
    (data / "manifest.csv").write_text("\n".join(lines) + "\n")
    return data / "manifest.csv"


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_same_bytes_twice_and_seed_matters(tmp_path):
    src = _synthetic(tmp_path)
    out = tmp_path / "out"
    assert lt.main(["--manifest", str(src), "--name", "syn", "--out", str(out), "--ratios", "10"]) == 0
    first = _digest(out / "syn-lt-r10")
    assert lt.main(["--manifest", str(src), "--name", "syn", "--out", str(out), "--ratios", "10"]) == 0
    assert _digest(out / "syn-lt-r10") == first
    lt.main(["--manifest", str(src), "--name", "syn", "--out", str(tmp_path / "o2"), "--ratios", "10", "--seed", "1"])
    assert _digest(tmp_path / "o2" / "syn-lt-r10")["manifest.csv"] != first["manifest.csv"]


def test_profile_is_exponential_and_test_split_untouched(tmp_path):
    src = _synthetic(tmp_path)
    path = lt.make_lt_manifest(src, tmp_path / "lt", 10, seed=0)
    rows = list(csv.DictReader(open(path)))
    train = np.bincount([int(r["label"]) for r in rows if r["split"] == "train"], minlength=6)
    # n_max = min_i a_(i) 10^(i/5) = 40 (rank 0 binds); targets round(40·10^(-i/5))
    assert sorted(train.tolist(), reverse=True) == [40, 25, 16, 10, 6, 4]
    assert sum(r["split"] == "test" for r in rows) == 18  # every test row kept
    for r in rows:  # files resolve to the original images, relative to the new manifest's folder
        assert (path.parent / r["file"]).resolve() == (src.parent / r["file"].split("data/", 1)[1]).resolve()
    s = json.loads((path.parent / "lt_summary.json").read_text())
    assert s["train_counts"] == train.tolist() and s["reached_ratio"] == 10.0
    assert s["shot_groups"] == {"many": 2, "medium": 3, "few": 1}


def test_tail_floor_and_refusals(tmp_path):
    counts, n_max = lt.lt_counts(np.array([30, 30, 30]), 50, 0)
    assert n_max == 30 and sorted(counts.tolist()) == [1, 4, 30]  # 30·50^-1 = 0.6 → floored to 1
    src = _synthetic(tmp_path)
    with pytest.raises(SystemExit):
        lt.main(["--manifest", str(src), "--name", "s", "--out", str(ROOT / "lt_out")])  # inside the repo
    with pytest.raises(SystemExit):
        lt.main(["--manifest", str(src), "--name", "s", "--out", str(src.parent / "lt")])  # inside the data


@pytest.mark.data
def test_shared_sets_profiles_match_the_docs(shared_data, tmp_path):
    """The four LT splits of docs/classify.md: train images, reached ratio, shot groups; test split untouched."""
    expect = {("flowers102", 10): (5050, 9.692308, {"many": 80, "medium": 22, "few": 0}),
              ("flowers102", 50): (3951, 51.0, {"many": 52, "medium": 40, "few": 10}),
              ("cub100", 10): (1177, 10.0, {"many": 17, "medium": 65, "few": 18}),
              ("cub100", 50): (764, 30.0, {"many": 10, "medium": 39, "few": 51})}
    for (name, ratio), (n, reached, groups) in expect.items():
        path = lt.make_lt_manifest(shared_data / name / "manifest.csv", tmp_path / f"{name}-{ratio}", ratio)
        s = json.loads((path.parent / "lt_summary.json").read_text())
        assert (s["train_images"], s["reached_ratio"], s["shot_groups"]) == (n, reached, groups)
        rows = list(csv.DictReader(open(path)))
        src = list(csv.DictReader(open(shared_data / name / "manifest.csv")))
        assert [r["file"].rsplit("/", 1)[1] for r in rows if r["split"] == "test"] == \
            [r["file"].rsplit("/", 1)[1] for r in src if r["split"] == "test"]
        assert all((path.parent / r["file"]).is_file() for r in rows[:50])
