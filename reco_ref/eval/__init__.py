"""Evaluation (spec §4): zero-shot classification, retrieval metrics, the k-NN vote, reports, and the demo.

Modules: :mod:`.data` (dataset manifests, split embeddings, overlap with a memory, demo datasets),
:mod:`.metrics` (top-k, mean per-class recall, k-NN vote, Recall@K), :mod:`.demo` (``reco-ref demo``),
:mod:`.cli` (the verbs; parsing only).
"""
