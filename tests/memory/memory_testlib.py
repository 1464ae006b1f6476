"""A small deterministic fake encoder pair (same duck type as reco_ref.encoders' EncoderPair) and helpers.

Embeddings are pseudo-random unit vectors seeded by sha256 of the image file's bytes / the caption, so
any process computes the same bits for the same input (what the kill/resume tests compare).  A file
whose bytes start with ``BAD`` (or that does not exist) fails to "decode" with ImageDecodeError.
"""

from __future__ import annotations

import csv
import hashlib
import os
import time
from pathlib import Path

import numpy as np

from reco_ref.errors import ImageDecodeError


def _vec(seed_bytes: bytes, dim: int) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(seed_bytes).digest()[:8], "little")
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


class FakeEncoder:
    """encode_images / encode_texts / dim / key_dim / name / fingerprint / concurrent_towers, deterministic and fast."""

    def __init__(self, dim: int = 32, key_dim: int | None = None, salt: str = "", delay: float | None = None,
                 concurrent: bool | None = None):
        self.dim = dim
        self.key_dim = key_dim
        self.name = f"fake-{dim}"
        self.fingerprint = hashlib.sha256(f"fake|{dim}|{key_dim}|{salt}".encode()).hexdigest()
        # seconds per image (slows the build so a random-time kill lands mid-build); env for subprocesses
        self.delay = float(os.environ.get("FAKE_ENCODER_DELAY", 0)) if delay is None else delay
        # captions on a background thread in builds (EncoderProducer.produce); env for subprocesses
        self.concurrent_towers = os.environ.get("FAKE_ENCODER_CONCURRENT") == "1" if concurrent is None else concurrent
        self.calls = 0

    def _one(self, item) -> tuple[np.ndarray, np.ndarray | None]:
        p = Path(item)
        try:
            data = p.read_bytes()
        except OSError as exc:
            raise ImageDecodeError(f"{p}: cannot read ({exc})") from None
        if data.startswith(b"BAD"):
            raise ImageDecodeError(f"{p}: cannot decode image (fake corrupt file)")
        emb = _vec(b"img|" + data, self.dim)
        keys = _vec(b"key|" + data, self.key_dim) if self.key_dim else None
        return emb, keys

    def encode_images(self, items, batch_size: int = 64, on_error: str = "raise", with_keys: bool = False):
        self.calls += 1
        embs, keys, ok, errors = [], [], [], []
        for i, it in enumerate(items):
            if self.delay:
                time.sleep(self.delay)
            try:
                e, k = self._one(it)
            except ImageDecodeError as exc:
                if on_error == "raise":
                    raise
                errors.append((i, str(it), str(exc)))
                continue
            embs.append(e)
            keys.append(k)
            ok.append(i)
        E = np.stack(embs) if embs else np.zeros((0, self.dim), np.float32)
        K = (np.stack(keys) if keys else np.zeros((0, self.key_dim), np.float32)) if self.key_dim else None
        ok = np.asarray(ok, np.int64)
        if on_error == "skip":  # reco_ref.encoders' SkipResult / SkipResultWithKeys field order
            return (E, K, ok, errors) if with_keys else (E, ok, errors)
        return (E, K) if with_keys else E

    def encode_image_keys(self, items, batch_size: int = 64):
        return self.encode_images(items, batch_size, with_keys=True)[1]

    def encode_texts(self, texts, batch_size: int = 256):
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        return np.stack([_vec(b"txt|" + t.encode("utf-8"), self.dim) for t in texts])


def fake32():
    """Factory used by name (``memory_testlib:fake32``) in CLI / Dask / subprocess tests."""
    return FakeEncoder(32)


def fake32_concurrent():
    """As :func:`fake32`, declaring ``concurrent_towers = True`` (for ``--overlap-captions``)."""
    return FakeEncoder(32, concurrent=True)


def fake32_keys():
    return FakeEncoder(32, key_dim=16)


def make_pairs(folder: Path, n: int, *, bad: tuple[int, ...] = (), name: str = "pairs.csv", start: int = 0) -> Path:
    """``n`` fake image files + a pairs CSV (image,caption,label,split); items in ``bad`` are corrupt.

    Item i (``start <= i < start + n``) has the same bytes and caption in every folder: two calls with
    overlapping ranges make duplicate pairs.
    """
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "img").mkdir(exist_ok=True)
    rows = []
    for i in range(start, start + n):
        p = folder / "img" / f"{i:05d}.jpg"
        p.write_bytes((b"BAD" if i in bad else b"OK") + f"image-{i}".encode())
        rows.append({"image": f"img/{i:05d}.jpg", "caption": f"a photo of thing {i % 7} number {i}",
                     "label": str(i % 7), "split": "train" if i % 4 else "test"})
    csv_path = folder / name
    with open(csv_path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["image", "caption", "label", "split"])
        w.writeheader()
        w.writerows(rows)
    return csv_path


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def make_jpeg_pairs(folder: Path, n: int, *, broken_caption: str | None = "broken") -> Path:
    """``n`` small real JPEGs (distinct stripes) + pairs.csv; unless ``broken_caption`` is None, an undecodable
    ``broken.jpg`` with that caption is inserted as item 5 (for the real encoders, which decode with Pillow)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        a = (rng.random((40, 48, 3)) * 255).astype(np.uint8)
        a[:, : 8 + i] = [255 * (i % 2), 40 * (i % 5), 200]
        Image.fromarray(a).save(folder / f"{i}.jpg", quality=90)
        rows.append({"image": f"{i}.jpg", "caption": f"a picture of pattern {i}"})
    if broken_caption is not None:
        (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
        rows.insert(5, {"image": "broken.jpg", "caption": broken_caption})
    with open(folder / "pairs.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["image", "caption"])
        w.writeheader()
        w.writerows(rows)
    return folder / "pairs.csv"
