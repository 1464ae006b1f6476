"""reco_ref.eval.zeroshot / data / report on synthetic memories (build_memory_from_arrays): modes, surrogate, the
k-NN vote's labels, own-row exclusion, the report writers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from reco_ref.errors import ParamsFormatError, RecoError, ShapeError
from reco_ref.eval.data import caption_classes, memory_class_labels, own_rows
from reco_ref.eval.report import bar_chart_png, markdown_table, write_report
from reco_ref.eval.zeroshot import MODES, evaluate_zero_shot, surrogate_refine
from reco_ref.memory import Memory, build_memory_from_arrays
from reco_ref.reco.weights import init_reco_weights

D, C, PER = 64, 4, 10
NAMES = ["rose", "tulip", "daisy", "iris"]
FP = "synthetic-fingerprint"


def _unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Image prototypes P and unrelated text prototypes Q per class: the frozen encoder cannot name the images
    (⟨p_c, q_c⟩ ≈ 0), but an image's memory neighbours carry their class's text."""
    rng = np.random.default_rng(0)
    P, Q = _unit(rng.normal(size=(C, D))), _unit(rng.normal(size=(C, D)))
    y_mem = np.repeat(np.arange(C), PER)
    mem_img = _unit(P[y_mem] + 0.5 / np.sqrt(D) * rng.normal(size=(C * PER, D)))
    mem_txt = _unit(Q[y_mem] + 0.2 / np.sqrt(D) * rng.normal(size=(C * PER, D)))
    y_q = np.tile(np.arange(C), 5)
    q_img = _unit(P[y_q] + 0.5 / np.sqrt(D) * rng.normal(size=(y_q.size, D)))
    cls = _unit(Q + 0.1 / np.sqrt(D) * rng.normal(size=(C, D)))
    root = tmp_path_factory.mktemp("zs")
    items = [{"image": "", "caption": f"a photo of a {NAMES[c]}.", "source": f"train/{i}.jpg", "label": int(c),
              "split": "train", "tags": None} for i, c in enumerate(y_mem)]
    build_memory_from_arrays(root / "mem", mem_img, mem_txt, name="synthetic", fingerprint=FP, items=items,
                             progress=False)
    # the same arrays, labels from another dataset's numbering and captions naming nothing
    other = [{**it, "caption": "a picture.", "label": (it["label"] + 1) % C} for it in items]
    build_memory_from_arrays(root / "other", mem_img, mem_txt, name="synthetic", fingerprint=FP, items=other,
                             progress=False)
    return {"mem": Memory.open(root / "mem"), "other": Memory.open(root / "other"), "q_img": q_img, "y_q": y_q,
            "cls": cls, "mem_img": mem_img, "y_mem": y_mem}


def _weights(seed=0, **meta):
    return init_reco_weights(D, heads=4, seed=seed, meta={"encoder_fingerprint": FP, **meta})


def test_side_by_side_contract_and_identity_reco(world):
    r = evaluate_zero_shot(world["mem"], world["q_img"], world["y_q"], world["cls"], NAMES, weights=_weights(), k=5)
    for key in ("frozen", "reco", "knn_vote", "surrogate"):
        assert set(r[key]) >= {"top1", "top5", "mean_per_class_recall"}, key
    assert r["n"] == 20 and r["classes"] == C and r["k"] == 5 and r["mode"] == "both"
    # untrained RECO is the identity: exactly the frozen numbers, in every mode
    for m in MODES:
        assert r["by_mode"]["reco"][m] == r["frozen"]
    assert r["by_mode"]["surrogate"]["none"] == r["frozen"]
    # the world is built so that retrieval names the images: vote and surrogate win, frozen is near chance
    assert r["knn_vote"]["top1"] == 1.0 and "label column" in r["knn_vote_labels"]
    assert r["by_mode"]["surrogate"]["image"]["top1"] >= 0.9
    assert r["surrogate"]["top1"] >= r["frozen"]["top1"] + 0.3
    assert r["frozen"]["top1"] <= 0.5


def test_trained_looking_weights_change_reco_and_modes_differ(world):
    w = _weights(seed=3)
    rng = np.random.default_rng(1)
    for phi in (w.image, w.text):  # leave the identity: non-zero output projections
        phi["w_o"][...] = rng.normal(0, 0.3, phi["w_o"].shape)
        phi["w_2"][...] = rng.normal(0, 0.3, phi["w_2"].shape)
    r = evaluate_zero_shot(world["mem"], world["q_img"], world["y_q"], world["cls"], NAMES, weights=w, k=5,
                           mode="image")
    assert r["reco"] == r["by_mode"]["reco"]["image"]
    assert r["by_mode"]["reco"]["none"] == r["frozen"]
    # each mode is the metrics of the refined sides it names, refined by reco.refine with these weights
    from reco_ref.eval.metrics import classification_metrics
    from reco_ref.reco.refine import refine

    v_bar = refine(w.image, world["mem"], world["q_img"], "image", k=5)[0]
    t_bar = refine(w.text, world["mem"], world["cls"], "text", k=5)[0]
    assert np.abs(v_bar - world["q_img"]).max() > 1e-3 and np.abs(t_bar - world["cls"]).max() > 1e-3
    for mode, v, t in (("image", v_bar, world["cls"]), ("text", world["q_img"], t_bar), ("both", v_bar, t_bar)):
        want = classification_metrics(v.astype(np.float64) @ t.astype(np.float64).T, world["y_q"], C)
        assert r["by_mode"]["reco"][mode] == want, mode


def test_surrogate_formula_by_hand(world):
    mem, q = world["mem"], world["q_img"][:3]
    out, rows, valid = surrogate_refine(mem, q, "image", alpha=0.5, k=3)
    txt = np.asarray(mem.text)[rows]  # [3,3,D]; all slots valid here
    assert valid.all()
    want = _unit(q.astype(np.float64) + 0.5 * txt.mean(axis=1))
    np.testing.assert_allclose(out, want, atol=1e-6)
    # α = 0 is the frozen embedding
    np.testing.assert_allclose(surrogate_refine(mem, q, "image", alpha=0.0, k=3)[0], q, atol=1e-6)
    with pytest.raises(RecoError, match="alpha"):
        surrogate_refine(mem, q, "image", alpha=-1.0)


def test_own_rows_are_excluded_when_evaluating_the_memory_itself(world):
    mem = world["mem"]
    own = own_rows(mem, world["mem_img"])
    assert own.tolist() == list(range(len(mem)))
    r = evaluate_zero_shot(mem, world["mem_img"], world["y_mem"], world["cls"], NAMES, weights=_weights(), k=1,
                           exclude=own)
    assert r["excluded_own_rows"] == len(mem)
    # with k=1 and no exclusion every image would retrieve itself; excluded, it still finds a class mate
    r_leak = evaluate_zero_shot(mem, world["mem_img"], world["y_mem"], world["cls"], NAMES, weights=_weights(), k=1)
    assert r_leak["knn_vote"]["top1"] == 1.0 and r["knn_vote"]["top1"] >= 0.9
    rows, _, _ = mem.search(world["mem_img"], "image", k=1, exclude=own)
    assert not (rows[:, 0] == np.arange(len(mem))).any()


def test_knn_vote_refuses_an_untied_label_column(world):
    r = evaluate_zero_shot(world["other"], world["q_img"], world["y_q"], world["cls"], NAMES, weights=_weights(), k=5)
    assert r["knn_vote"] is None
    assert r["knn_vote_labels"].startswith("not computed:") and "cannot be tied" in r["knn_vote_labels"]
    # tied through the sources (files of the dataset manifest with the same labels): used
    rows = np.array([[0, 1, -1]])
    lbs = {f"train/{i}.jpg": (int(c) + 1) % C for i, c in enumerate(world["y_mem"])}
    labels, how = memory_class_labels(world["other"], rows, NAMES, lbs)
    assert labels.tolist() == [[1, 1, -1]] and "files of the dataset manifest" in how
    # a label column that contradicts the captions falls back to the captions
    _, how = memory_class_labels(world["mem"], rows, ["tulip", "rose", "daisy", "iris"])
    assert how.startswith("captions") and "disagrees" in how


def test_caption_classes_whole_words_longest_and_ambiguous():
    names = ["rose", "desert-rose", "lily", "fire lily", "iris"]
    caps = ["a photo of a rose.", "a Desert-Rose in bloom", "fire  lily", "roses", "a rose and an iris", None, "lilyx"]
    assert caption_classes(caps, names).tolist() == [0, 1, 3, -1, -1, -1, -1]


def test_weights_for_another_encoder_are_refused(world):
    w = init_reco_weights(D, heads=4, meta={"encoder_fingerprint": "another"})
    with pytest.raises(ParamsFormatError, match="fingerprint"):
        evaluate_zero_shot(world["mem"], world["q_img"], world["y_q"], world["cls"], NAMES, weights=w)
    with pytest.raises(ParamsFormatError, match="dim 8"):
        evaluate_zero_shot(world["mem"], world["q_img"], world["y_q"], world["cls"], NAMES,
                           weights=init_reco_weights(8, heads=4))
    with pytest.raises(RecoError, match="mode"):
        evaluate_zero_shot(world["mem"], world["q_img"], world["y_q"], world["cls"], NAMES, mode="all")


def test_report_writers(world, tmp_path):
    r = evaluate_zero_shot(world["mem"], world["q_img"], world["y_q"], world["cls"], NAMES, weights=_weights(), k=5)
    write_report(r, json_path=tmp_path / "r.json", markdown_path=tmp_path / "r.md", png_path=tmp_path / "r.png")
    assert json.loads((tmp_path / "r.json").read_text())["frozen"] == r["frozen"]
    md = (tmp_path / "r.md").read_text()
    assert "| frozen encoder |" in md and "| k-NN label vote (memory ceiling) | 1.000 |" in md
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert markdown_table(["a", "b"], [["x", None], ["y|z", 0.5]]) == \
        "| a | b |\n|:---|---:|\n| x | — |\n| y\\|z | 0.500 |\n"
    bar_chart_png(tmp_path / "g.png", {"k=1": {"top1": 0.5, "vote": None}, "k=5": {"top1": 0.7}})
    from PIL import Image

    with Image.open(tmp_path / "g.png") as im:
        assert im.size == (900, 480)


def test_retrieval_recalls_identity_reco_and_duplicate_captions(world):
    from reco_ref.eval.metrics import recall_at_k
    from reco_ref.eval.report import retrieval_rows, write_retrieval_report
    from reco_ref.eval.retrieval import evaluate_retrieval

    rng = np.random.default_rng(5)
    img = world["q_img"][:8]
    txt = _unit(img + 0.8 / np.sqrt(D) * rng.normal(size=img.shape))  # caption i near image i
    caps = [f"c{i}" for i in range(8)]
    caps[7] = caps[6]  # the same caption twice: either image is a right answer for it
    r = evaluate_retrieval(world["mem"], img, txt, caps, weights=_weights(), k=5)
    rel = np.eye(8, dtype=bool)
    rel[6, 7] = rel[7, 6] = True
    sim = img.astype(np.float64) @ txt.astype(np.float64).T
    assert r["frozen"]["image_to_text"] == recall_at_k(sim, rel)
    assert r["frozen"]["text_to_image"] == recall_at_k(sim.T, rel.T)
    assert set(r["reco"]) == {"image", "text", "both"}
    assert all(r["reco"][m] == r["frozen"] for m in r["reco"])  # untrained: the identity
    assert r["frozen"]["image_to_text"]["R@10"] == 1.0  # 8 candidates
    rows = retrieval_rows(r)
    assert rows[0][0] == "frozen encoder" and len(rows) == 7 and len(rows[0]) == 7
    with pytest.raises(ShapeError):
        evaluate_retrieval(world["mem"], img, txt[:4], caps)


def test_knn_vote_from_captions_when_the_memory_has_no_labels(world, tmp_path):
    items = [{"image": "", "caption": f"a {NAMES[c]} in a garden", "source": f"x{i}", "label": None, "split": None,
              "tags": None} for i, c in enumerate(world["y_mem"])]
    items[0]["caption"] = "a garden"  # names no class: casts no vote
    build_memory_from_arrays(tmp_path / "m", world["mem_img"], world["mem_img"], name="s", fingerprint=FP,
                             items=items, progress=False)
    mem = Memory.open(tmp_path / "m")
    labels, how = memory_class_labels(mem, np.array([[0, 1, 11, -1]]), NAMES)
    assert labels.tolist() == [[-1, 0, 1, -1]] and how.startswith("captions") and "no labels" in how
    r = evaluate_zero_shot(mem, world["q_img"], world["y_q"], world["cls"], NAMES, k=5)
    assert r["reco"] is None and r["knn_vote"]["top1"] == 1.0 and r["knn_vote"]["abstained"] == 0
    # nothing to map at all: null with the reason, never a guess
    bare = tmp_path / "bare"
    build_memory_from_arrays(bare, world["mem_img"], world["mem_img"], name="s", fingerprint=FP, progress=False)
    r = evaluate_zero_shot(Memory.open(bare), world["q_img"], world["y_q"], world["cls"], NAMES, k=5)
    assert r["knn_vote"] is None and "no labels" in r["knn_vote_labels"]
