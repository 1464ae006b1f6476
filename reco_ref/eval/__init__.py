"""Evaluation (docs/reco.md §4): zero-shot classification and image↔text retrieval with a memory, side by side.

Modules: :mod:`.data` (dataset manifests, split embeddings, overlap with a memory, memory rows → classes, demo
datasets), :mod:`.metrics` (top-k, mean per-class recall, k-NN vote, Recall@K), :mod:`.templates` (prompt template
sets, class embeddings), :mod:`.zeroshot` (frozen / RECO / surrogate / k-NN vote, every enhancement mode),
:mod:`.retrieval` (Recall@1/5/10 both directions), :mod:`.evaluate` (what ``reco-ref eval`` and ``reco-ref query``
do), :mod:`.report` (JSON, Markdown, PNG writers), :mod:`.demo` (``reco-ref demo``), :mod:`.cli` (the verbs;
parsing only). See docs/evaluation.md.
"""
