"""Recipe pieces for transfer (docs/training.md, "Transfer"): class-disjoint hold-out, mixed caption templates,
and the generic OpenClipart training memory with the do-no-harm images excluded. Fast, no data needed."""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str):
    sys.path.insert(0, str(ROOT / "scripts"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class _Enc:
    """Deterministic text encoder stand-in: a unit vector seeded by the text's sha256."""

    def encode_texts(self, texts):
        out = []
        for t in texts:
            v = np.random.default_rng(int(hashlib.sha256(t.encode()).hexdigest()[:8], 16)).standard_normal(8)
            out.append(v / np.linalg.norm(v))
        return np.asarray(out, np.float32)


def _dataset(rebuild, n_classes=10, per_class=6):
    ds = object.__new__(rebuild.Dataset)  # no manifest/cache: only the fields the recipe code reads
    ds.name, ds.encoder, ds.manifest = "toy", _Enc(), Path("toy") / "manifest.csv"
    ds.files = [f"img{i}.jpg" for i in range(n_classes * per_class)]
    ds.class_names = [f"class {i}" for i in range(n_classes)]
    ds.labels = np.repeat(np.arange(n_classes), per_class).astype(np.int64)
    ds.split = np.array(["train", "train", "train", "train", "valid", "test"] * n_classes)
    ds.captions = [rebuild.CAPTION.format(ds.class_names[c]) for c in ds.labels]
    return ds


def test_class_holdout_is_class_disjoint_seeded_and_covers_train():
    rebuild = _load("train_reco_mini_fusion")
    ds = _dataset(rebuild)
    tr, ho, held = rebuild.class_holdout_split(ds, 0.2)
    assert len(held) == 2 and set(ds.labels[ho]) == set(held)
    assert not set(ds.labels[tr]) & set(held)  # no class on both sides
    assert sorted(np.concatenate([tr, ho]).tolist()) == ds.rows("train").tolist()  # only train rows, all of them
    tr2, ho2, held2 = rebuild.class_holdout_split(ds, 0.2)
    assert np.array_equal(held, held2) and np.array_equal(ho, ho2)
    _, _, held3 = rebuild.class_holdout_split(ds, 0.2, seed=1)
    assert not np.array_equal(held, held3)
    with pytest.raises(SystemExit, match="holdout-fraction"):
        rebuild.class_holdout_split(ds, 0.01)


def test_mix_captions_draws_templates_per_row_and_embeds_that_caption():
    rebuild = _load("train_reco_mini_fusion")
    ds = _dataset(rebuild)
    templates = ("a photo of a {}.", "art of the {}.", "a {} in a video game.")
    ds.mix_captions(templates, seed=0)
    expected = {t.format(ds.class_names[c]) for c in range(10) for t in templates}
    assert set(ds.captions_mixed) <= expected and len(set(ds.captions_mixed)) > 10  # more than one per class
    for i, c in enumerate(ds.labels):
        assert ds.class_names[c] in ds.captions_mixed[i]
        np.testing.assert_allclose(ds.text_mixed[i], _Enc().encode_texts([ds.captions_mixed[i]])[0], atol=1e-6)
    first = list(ds.captions_mixed)
    ds.mix_captions(templates, seed=0)
    assert ds.captions_mixed == first  # seeded
    assert ds.items(np.array([0]), mixed=True)[0]["caption"] == first[0]
    assert ds.items(np.array([0]))[0]["caption"] == "a photo of a class 0."  # eval memories keep the single caption


def test_generic_pairs_drop_demo_images_by_bytes_and_name_and_heldout(tmp_path, monkeypatch):
    gen = _load("build_generic_memory")
    png = tmp_path / "png"
    (png / "a").mkdir(parents=True)
    demo = tmp_path / "demo"
    (demo / "images" / "cat").mkdir(parents=True)
    rels = []
    for i in range(40):
        rel = f"a/img_{i:02d}.png"
        (png / rel).write_bytes(f"image {i}".encode())
        rels.append(rel)
    (demo / "images" / "cat" / "renamed.png").write_bytes(b"image 3")  # same bytes, other name
    (demo / "images" / "cat" / "img_05.png").write_bytes(b"other bytes")  # same name, other bytes
    with open(demo / "pairs.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "caption", "category", "label", "split", "source"])
        w.writerow(["images/cat/renamed.png", "x", "cat", 0, "memory", "b/img_07.png"])  # named by its source
    monkeypatch.setattr(gen.data, "openclipart_pairs", lambda paths: ([(r, f"caption {r}") for r in rels], {}))
    kept, report = gen.generic_pairs(png, tmp_path / "svg", demo)
    names = {p.name for p, _ in kept}
    assert not names & {"img_03.png", "img_05.png", "img_07.png"}
    assert report["demo_images_dropped"] == 3
    held = [r for r in rels if gen.data.is_heldout(r)]
    assert report["heldout_dropped"] == len(held) and not names & {Path(r).name for r in held}
    assert report["kept"] == len(kept) == 40 - 3 - len([r for r in held if Path(r).name not in
                                                        {"img_03.png", "img_05.png", "img_07.png"}])
