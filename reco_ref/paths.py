"""Where shipped files live.

The repository's top-level ``weights/`` folder holds everything the package needs offline (reco-mini's ONNX
pair and config, tokenizer vocabularies, licences).  An editable install (``pip install -e .``) or a source
checkout finds it beside the package; ``RECO_REF_WEIGHTS`` points elsewhere (e.g. a copied folder on an edge
device).
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import RecoError


def weights_dir() -> Path:
    """The folder of shipped weights: ``$RECO_REF_WEIGHTS`` if set, else ``<repo>/weights``."""
    env = os.environ.get("RECO_REF_WEIGHTS")
    path = Path(env) if env else Path(__file__).resolve().parents[1] / "weights"
    if not path.is_dir():
        raise RecoError(
            f"weights folder not found at {path}: install reco_ref from a source checkout "
            "(pip install -e .) or set RECO_REF_WEIGHTS to a copy of the repository's weights/ folder"
        )
    return path


def weights_file(*parts: str) -> Path:
    """A file inside :func:`weights_dir`, with an error naming it when it is missing."""
    path = weights_dir().joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(f"shipped file missing: {path} (the repository's weights/ folder is incomplete)")
    return path
