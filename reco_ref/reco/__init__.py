"""The RECO model: trained weights, applied (docs/reco.md §1–§2). Retrieve from a memory, then fuse.

* :mod:`reco_ref.reco.weights` — :class:`RecoWeights` (φ_I, φ_T, τ, meta) and its file: init / save / load /
  ``decode_meta`` / ``check_weights_match``, the shipped file's path.
* :mod:`reco_ref.reco.refine` — ``refine(phi, memory, queries, modality, ...)``: retrieval + fusion, batched;
  ``retrieve_for`` (the neighbours φ is fed), ``own_rows`` (self-exclusion), ``check_backend``.

Training (:mod:`reco_ref.train`) writes these weights; ``eval``, ``query``, the demo, the edge files and
``export-fusion`` read them. This room imports memory and fusion, never train or eval
(``tests/test_architecture.py``).
"""

from .refine import SELF_MATCH_COSINE, check_backend, own_rows, refine, retrieve_for, searched_score_map
from .weights import (RecoWeights, check_weights_match, decode_meta, default_weights_path, init_reco_weights,
                      load_reco_weights, save_reco_weights)

__all__ = [
    "RecoWeights",
    "init_reco_weights",
    "save_reco_weights",
    "load_reco_weights",
    "decode_meta",
    "default_weights_path",
    "check_weights_match",
    "refine",
    "retrieve_for",
    "searched_score_map",
    "own_rows",
    "SELF_MATCH_COSINE",
    "check_backend",
]
