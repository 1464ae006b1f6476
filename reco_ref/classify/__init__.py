"""The memory-attention classifier (CVPR 2023, docs/reco.md §5): a query image attends over its retrieved memory items.

Front door::

    from reco_ref.classify import init_params, classify_forward, classify_backward      # the module (model.py)
    from reco_ref.classify import ClassifyConfig, train_classifier, evaluate_classifier  # train.py
    reco-ref classify train --dataset M.csv --split train --memory DIR --out W.npz [--no-memory]
    reco-ref classify eval --weights W.npz --dataset M.csv --split test --memory DIR --json OUT.json

Modules: :mod:`.reference` (NumPy forward/backward on the fusion layer's primitives), :mod:`.numba_cpu` (the
Numba twin), :mod:`.model` (parameters, checks, backend dispatch), :mod:`.train` (memory plumbing, training loop,
evaluation, weights file), :mod:`.commands` (manifest → weights → JSON), :mod:`.report` (JSON/Markdown/PNG).
"""

from .model import classify_backward, classify_forward, cross_entropy_backward, cross_entropy_forward, init_params
from .train import ClassifyConfig, evaluate_classifier, load_classifier, save_classifier, train_classifier

__all__ = ["ClassifyConfig", "classify_backward", "classify_forward", "cross_entropy_backward",
           "cross_entropy_forward", "evaluate_classifier", "init_params", "load_classifier", "save_classifier",
           "train_classifier"]
