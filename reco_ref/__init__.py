"""reco_ref — auditable NumPy/Numba reference of retrieval-enhanced vision-text models.

Rooms, in the order data flows (each imports only from rooms above it):

* :mod:`reco_ref.tokenizers` — CLIP BPE and BERT WordPiece, pure Python
* :mod:`reco_ref.encoders`   — frozen image/text towers through ONNX Runtime (default ``reco-mini``)
* :mod:`reco_ref.memory`     — on-disk image-text memory, HNSW + exact uni/cross-modal search, shards
* :mod:`reco_ref.fusion`     — the RECO fusion layer: NumPy reference, Numba CPU, Numba CUDA
* :mod:`reco_ref.train`      — InfoNCE / RECO loss, AdamW + schedule, training loop
* :mod:`reco_ref.eval`       — zero-shot, retrieval metrics, ablations, the demo
* :mod:`reco_ref.classify`   — the CVPR 2023 memory-attention classifier
* :mod:`reco_ref.export`     — tools that write ONNX graphs (CLIP export); export extras, never imported at run time
* :mod:`reco_ref.cli`        — the ``reco-ref`` command

Shared helpers import no room: ``errors``, ``io``, ``checks``, ``paths``, ``backends`` (the backend
registry used by fusion and training). Map, convention and registry: ``docs/architecture.md``.

Sub-packages are imported lazily so that ``import reco_ref`` stays cheap (no numba/onnxruntime start-up).
"""

__version__ = "0.1.0"

from .errors import RecoError  # noqa: F401  (the one name every caller may want)
