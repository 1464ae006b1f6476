"""reco_ref.eval.metrics against hand-computed values; reco_ref.eval.templates class embeddings."""

from __future__ import annotations

import numpy as np
import pytest

from reco_ref.errors import RecoError, ShapeError
from reco_ref.eval.metrics import (
    classification_metrics,
    knn_vote,
    knn_vote_scores,
    mean_per_class_recall,
    rank_of,
    recall_at_k,
    topk_accuracy,
)
from reco_ref.eval.templates import (
    TEMPLATE_SETS,
    class_embeddings,
    dataset_template_set,
    resolve_templates,
)

# 4 queries, 3 classes; ranks of the true class by hand: row0 y=0 -> 0; row1 y=2 -> 1 (0.5 beats 0.4);
# row2 y=1 -> tie with class 0 at 0.3, class 0 has the lower index -> rank 1; row3 y=2 -> 2
S = np.array([[0.9, 0.1, 0.0], [0.5, 0.1, 0.4], [0.3, 0.3, 0.1], [0.8, 0.7, 0.6]])
Y = np.array([0, 2, 1, 2])


def test_rank_and_topk_by_hand():
    assert rank_of(S, Y).tolist() == [0, 1, 1, 2]
    assert topk_accuracy(S, Y, 1) == 0.25
    assert topk_accuracy(S, Y, 2) == 0.75
    assert topk_accuracy(S, Y, 3) == 1.0
    # top-1 is exactly argmax (first maximum on ties)
    assert topk_accuracy(S, Y, 1) == float((np.argmax(S, axis=1) == Y).mean())
    assert topk_accuracy(S, Y, 2, abstain=np.array([True, False, False, False])) == 0.5
    with pytest.raises(ShapeError, match="positive integer"):
        topk_accuracy(S, Y, 0)


def test_mean_per_class_recall_by_hand():
    # class 0: rows 0,1 -> 1 of 2 right; class 1: row 2 -> 1 of 1; class 2: rows 3,4,5 -> 1 of 3; class 3 absent
    y = np.array([0, 0, 1, 2, 2, 2])
    p = np.array([0, 1, 1, 2, 0, -1])
    assert mean_per_class_recall(p, y, 4) == pytest.approx((0.5 + 1.0 + 1 / 3) / 3)
    assert float((p == y).mean()) == pytest.approx(0.5)  # differs from top-1 on imbalanced data


def test_classification_metrics_keys_and_values():
    m = classification_metrics(S, Y, 3)
    assert set(m) == {"top1", "top5", "mean_per_class_recall"}
    assert m["top1"] == 0.25 and m["top5"] == 1.0  # 3 classes: top-5 holds every class
    # predictions [0,0,0,0]: class 0 recall 1, classes 1, 2 recall 0
    assert m["mean_per_class_recall"] == pytest.approx(1 / 3)
    with pytest.raises(ShapeError):
        classification_metrics(S, Y, 4)


def test_knn_vote_majority_ties_unlabelled_and_scores():
    labels = np.array([[1, 2, 2, 1], [0, 1, 0, 1], [3, 3, 3, 3], [2, 0, 0, 0], [-1, -1, 1, -1]])
    scores = np.array([[.9, .5, .4, .3], [.9, .8, .1, .1], [.5, .5, .5, .5], [.9, .1, .1, .1], [.9, .9, .1, .9]],
                      np.float32)
    valid = np.array([[1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], bool)
    # row 0: 2 votes each for 1 (1.2) and 2 (0.9) -> 1; row 1: tie 0 (1.0) vs 1 (0.9) -> 0
    # row 2: no valid neighbour -> -1; row 3: the invalid slot does not vote; row 4: unlabelled rows do not vote
    assert knn_vote(labels, scores, valid, 4).tolist() == [1, 0, -1, 0, 1]
    v = knn_vote_scores(labels, scores, valid, 4)
    assert v[0].tolist() == pytest.approx([0, 2 + 1.2 / 18, 2 + 0.9 / 18, 0])  # 2(2k+1) = 18 for k = 4
    # a count is never overturned by scores: 3 weak votes beat 2 strong ones
    assert knn_vote(np.array([[5, 5, 7, 7, 7]]), np.array([[1, 1, -1, -1, -1]], np.float32),
                    np.ones((1, 5), bool), 8).tolist() == [7]


def test_recall_at_k_by_hand():
    sim = np.array([[0.9, 0.8, 0.1], [0.2, 0.3, 0.1], [0.5, 0.5, 0.5]])
    # gt 1: ranks 1, 0, 2 (row 2: all tied, lower index first)
    r = recall_at_k(sim, np.array([1, 1, 2]), ks=(1, 2, 3))
    assert r == {"R@1": pytest.approx(1 / 3), "R@2": pytest.approx(2 / 3), "R@3": 1.0}
    rel = np.array([[False, True, True], [True, False, False], [False, False, True]])
    # several relevant: the best-ranked counts; row 0 -> rank 1, row 1 -> rank 1, row 2 -> rank 2
    assert recall_at_k(sim, rel, ks=(1, 2)) == {"R@1": 0.0, "R@2": pytest.approx(2 / 3)}
    with pytest.raises(ShapeError, match="no relevant"):
        recall_at_k(sim, np.zeros((3, 3), bool))
    with pytest.raises(ShapeError, match="candidate ids"):
        recall_at_k(sim, np.array([0, 1, 3]))


class _HashEncoder:
    """encode_texts: a fixed, non-normalised random vector per string (so normalisation is exercised)."""

    dim = 8

    def __init__(self):
        self.seen: list[str] = []

    def encode_texts(self, texts, batch_size=256):
        self.seen += list(texts)
        out = []
        for t in texts:
            rng = np.random.default_rng(sum(ord(ch) * (i + 1) for i, ch in enumerate(t)))
            out.append(rng.normal(size=self.dim) * (1 + len(t)))
        return np.array(out, np.float32)


def test_class_embeddings_normalised_mean_of_normalised():
    enc = _HashEncoder()
    templates = ("a photo of a {}.", "art of the {}.")
    t = class_embeddings(enc, ["rose", "iris"], templates)
    assert t.shape == (2, 8) and t.dtype == np.float32
    assert enc.seen == ["a photo of a rose.", "art of the rose.", "a photo of a iris.", "art of the iris."]
    raw = _HashEncoder().encode_texts(enc.seen).astype(np.float64)
    raw /= np.linalg.norm(raw, axis=1, keepdims=True)
    want = raw.reshape(2, 2, 8).mean(axis=1)
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    np.testing.assert_allclose(t, want, rtol=1e-6, atol=1e-7)
    # one template: the embedding is just that prompt's, normalised
    one = class_embeddings(_HashEncoder(), ["rose"], ("art of the {}.",))
    np.testing.assert_allclose(one[0], raw[1], rtol=1e-6, atol=1e-7)


def test_template_sets_and_resolution(tmp_path):
    assert dataset_template_set("../shared/data/flowers102/manifest.csv") == "flowers"
    assert dataset_template_set("/x/cub100/manifest.csv") == "birds"
    assert dataset_template_set("/x/pets/manifest.csv") == "generic"
    assert resolve_templates(None, "/x/cub100/manifest.csv") == ("birds", TEMPLATE_SETS["birds"])
    assert resolve_templates("single")[1] == ("a photo of a {}.",)
    assert len(TEMPLATE_SETS["generic"]) == 7 and all(t.count("{}") == 1 for s in TEMPLATE_SETS.values() for t in s)
    f = tmp_path / "t.txt"
    f.write_text("# mine\na {} flower.\n\nthe {}.\n")
    assert resolve_templates(str(f)) == (str(f), ("a {} flower.", "the {}."))
    f.write_text("no placeholder\n")
    with pytest.raises(RecoError, match="exactly once"):
        resolve_templates(str(f))
    with pytest.raises(RecoError, match="neither a template set"):
        resolve_templates("nope")
