"""The shipped fusion weights for reco-mini: they load, match the encoder, and (slow, data) reproduce their card."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest

from reco_ref.reco.weights import check_weights_match, default_weights_path, load_reco_weights

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("RECO_REF_EMB_CACHE", "/work/cache/emb"))


def test_shipped_weights_load_and_match_reco_mini():
    from reco_ref.encoders import load

    w = load_reco_weights(default_weights_path())
    enc = load("reco-mini")
    check_weights_match(w, encoder_fingerprint=enc.fingerprint, dim=enc.dim, where=str(default_weights_path()))
    assert w.meta["encoder_name"] == "reco-mini" and w.meta["k"] == 10 and w.meta["search"] == "uni"
    assert w.meta["selected"]["select_on"] == "top1" and "test" not in json.dumps(w.meta["selected"])
    card = json.loads((default_weights_path().parent / "metrics.json").read_text())["runs"]["ship"]
    for d in ("flowers102", "cub100"):
        assert w.meta["metrics"][d]["reco"] == card["eval"][d]["reco"]["top1"]
    assert not np.array_equal(w.image["w_o"], 0) and not np.array_equal(w.text["w_o"], 0)  # trained, not identity


@pytest.mark.slow
@pytest.mark.data
def test_shipped_weights_reproduce_model_card(shared_data, tmp_path):
    if not (CACHE / "flowers102" / "image.npy").is_file():
        pytest.skip(f"embedding cache not found at {CACHE} (set RECO_REF_EMB_CACHE)")
    spec = importlib.util.spec_from_file_location("rebuild", ROOT / "scripts" / "train_reco_mini_fusion.py")
    rebuild = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rebuild)
    from reco_ref.encoders import load

    rebuild.check_inputs(shared_data, CACHE)
    enc = load("reco-mini")
    w = load_reco_weights(default_weights_path())
    for name in ("flowers102", "cub100"):
        ds = rebuild.Dataset(name, shared_data, CACHE, enc)
        mem = rebuild.memory(tmp_path, f"mem-{name}", ds, ds.rows("train"), enc)
        r = rebuild.evaluate(w, ds, mem, enc, 10, "numba")
        # a multi-threaded HNSW build is not bit-reproducible (insertion order), so a few neighbours may differ
        assert abs(r["reco"]["top1"] - w.meta["metrics"][name]["reco"]) <= 0.01, (name, r["reco"]["top1"])
