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


N_CLASSES = 20
CLASS_NAMES = [f"c{i}" for i in range(N_CLASSES)]


class ClassEncoder:
    """Text-only encoder double: "... c7 ..." → class 7's text vector from :func:`clustered` (seed 0, D=32)."""

    def __init__(self, dim: int = 32):
        self.dim = dim
        self.key_dim = 48
        self.name = "class-double"
        self.fingerprint = FINGERPRINT
        *_, self.class_text = clustered(400, dim, N_CLASSES, seed=0, key_dim=48)

    def encode_images(self, *a, **k):  # pragma: no cover - never called by the train verbs
        raise NotImplementedError

    def encode_texts(self, texts, batch_size: int = 256):
        import re

        return np.stack([self.class_text[int(re.search(r"c(\d+)", t).group(1))] for t in texts])


def class_encoder() -> ClassEncoder:
    """Factory used by name (``train_testlib:class_encoder``) from subprocess CLI runs."""
    return ClassEncoder()


def make_run_data(root: Path) -> dict:
    """A training memory (320 rows), a validation memory (80 rows) and a manifest naming the 20 classes."""
    image, text, keys, labels, class_text = clustered(400, 32, N_CLASSES, seed=0, key_dim=48)
    train = build(root / "train_mem", image[:320], text[:320], keys[:320], labels[:320], CLASS_NAMES)
    val = build(root / "val_mem", image[320:], text[320:], keys[320:], labels[320:], CLASS_NAMES)
    manifest = root / "manifest.csv"
    manifest.write_text("file,label,class_name,split\n" + "".join(f"x{i}.jpg,{c},c{c},train\n" for i, c in
                                                                   enumerate(range(N_CLASSES))))
    return {"train": train, "val": val, "manifest": manifest, "labels": labels, "class_text": class_text,
            "image": image, "text": text, "keys": keys}
