"""``reco_ref.demo.run_demo`` — kept importable for the docs; the demo lives in :mod:`reco_ref.eval.demo`."""

from .eval.demo import run_demo

__all__ = ["run_demo"]
