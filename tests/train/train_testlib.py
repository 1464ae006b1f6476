"""Small synthetic memories for the train room's tests: clustered unit vectors, built in well under a second."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from reco_ref.memory import Memory, build_memory_from_arrays

FINGERPRINT = hashlib.sha256(b"train-testlib").hexdigest()


def unit(a: np.ndarray) -> np.ndarray:
    return (a / np.linalg.norm(a, axis=-1, keepdims=True)).astype(np.float32)


def clustered(n: int, dim: int, n_classes: int, seed: int, key_dim: int | None = None, noise: float = 0.6):
    """(image [n,D], text [n,D], keys [n,Dk] | None, labels [n], class_text [C,D]) with class structure.

    Text of a row = its class's text vector (captions "a photo of a {class}." repeat per class); images =
    class image centre + noise; keys = a fixed random projection of the image plus noise.
    """
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % n_classes
    centre_i = unit(rng.standard_normal((n_classes, dim)))
    class_text = unit(centre_i + 0.8 * rng.standard_normal((n_classes, dim)))
    image = unit(centre_i[labels] + noise * rng.standard_normal((n, dim)) / np.sqrt(dim) * 4)
    text = class_text[labels].copy()
    keys = None
    if key_dim:
        proj = rng.standard_normal((dim, key_dim)).astype(np.float32)
        keys = unit(image @ proj + 0.1 * rng.standard_normal((n, key_dim)))
    return image, text, keys, labels.astype(np.int64), class_text


def build(out: Path, image, text, keys=None, labels=None, class_names=None) -> Memory:
    items = None
    if labels is not None:
        items = [{"image": "", "caption": f"a photo of a {class_names[c]}.", "source": f"array:{i}", "label": int(c),
                  "split": "train", "tags": None} for i, c in enumerate(labels)]
    build_memory_from_arrays(out, image, text, keys=keys, items=items, name="fake", fingerprint=FINGERPRINT,
                             progress=False)
    return Memory.open(out, fingerprint=FINGERPRINT, embed_dim=image.shape[1])
