"""Evaluation (spec §4): zero-shot classification, retrieval metrics, ablations, and the ``reco-ref demo`` verb.

The demo's logic lives in :mod:`reco_ref.demo` (:func:`reco_ref.demo.run_demo`); :mod:`.cli` only registers
the verb.
"""
