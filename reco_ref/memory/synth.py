"""Benchmark vectors grown from real embeddings (the 1M-vector HNSW benchmark of issue 5).

Why not random vectors: the data decides HNSW recall more than the index does (tight iid clusters are
pathologically hard, low-rank data easy), so the benchmark starts from *real* embeddings of real
images and only perturbs them to reach the size.

Two steps:

1. :func:`pixel_features` / :func:`encoder_features` — real embeddings ``base [m, D]`` of the images of
   a dataset manifest: the encoder's image search vectors when an encoder is given (reco-mini's image
   keys = its MobileNetV1 features, reduced to 512-d by :func:`project`), else *PCA pixel features*: each image box-resized to 32×32 RGB, mean-centred,
   projected on the top ``D`` principal components of the whole set, L2-normalised (real image
   statistics, decaying spectrum — a stand-in, stated as such in every report).
2. :func:`expand` — ``n`` vectors from ``base``: row ``j`` starts at real point ``i = j mod m``, moves a
   fraction ``λ ~ U(0, mix)`` towards one of ``i``'s 10 nearest real neighbours (so points fill the
   data manifold between real neighbours instead of forming iid balls), adds low-rank noise in the
   top-32 principal subspace of ``base`` (scale ``lowrank``) and a little isotropic noise (``iid``),
   and is L2-normalised:

   .. math:: x_j = \\mathrm{normalize}\\big((1-λ) b_i + λ b_{nn(i)} + σ_{lr} U_{32} (s ⊙ z)/\\|s\\| + σ_{iid} ε/\\sqrt{D}\\big)

   Deterministic in ``seed``; streamed in blocks so 1M × 512 never needs more than the output.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from ..datasets import read_manifest_rows
from .index import exact_search


def _image_paths(manifest: Path) -> list[Path]:
    """Every image a dataset manifest lists (all splits, in order), read by the one manifest reader."""
    return [manifest.parent / r["file"] for r in read_manifest_rows(manifest)]


def pixel_features(manifests: list[Path], dim: int = 512, side: int = 32) -> np.ndarray:
    """PCA pixel features ``[m, dim]`` float32, unit rows, of every image listed in ``manifests``."""
    from PIL import Image

    paths = [p for m in manifests for p in _image_paths(Path(m))]
    x = np.empty((len(paths), side * side * 3), np.float32)  # [m, 3072]
    for i, p in enumerate(paths):
        with Image.open(p) as im:
            x[i] = np.asarray(im.convert("RGB").resize((side, side), Image.BOX), np.float32).reshape(-1) / 255.0
    x -= x.mean(0)
    # top principal directions from the small Gram side: x = U S Vt, features = x V[:, :dim] = U S
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    f = x @ vt[:dim].T  # [m, dim]
    return (f / np.linalg.norm(f, axis=1, keepdims=True)).astype(np.float32)


def encoder_features(manifests: list[Path], encoder, batch_size: int = 64) -> np.ndarray:
    """The encoder's image search vectors of every image listed in ``manifests``: its image keys
    (``encode_image_keys``) when it has them, else its image embeddings."""
    paths = [str(p) for m in manifests for p in _image_paths(Path(m))]
    if getattr(encoder, "key_dim", None):
        return np.asarray(encoder.encode_image_keys(paths, batch_size=batch_size), np.float32)
    return np.asarray(encoder.encode_images(paths, batch_size=batch_size), np.float32)


def project(x: np.ndarray, dim: int) -> np.ndarray:
    """Project unit rows ``x [m, D]`` on their top-``dim`` right singular vectors (uncentred), renormalise.

    Uncentred on purpose: ``x V_dim`` is the rank-``dim`` map that best preserves the inner products
    HNSW ranks by, so the neighbour structure of the real features is kept while D becomes ``dim``.
    """
    x = np.asarray(x, np.float32)
    if x.shape[1] == dim:
        return x
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    f = x @ vt[:dim].T
    return (f / np.linalg.norm(f, axis=1, keepdims=True)).astype(np.float32)


def expand(base: np.ndarray, n: int, *, seed: int = 0, mix: float = 0.3, lowrank: float = 0.1, iid: float = 0.02,
           n_neighbours: int = 10, rank: int = 32, block: int = 65536) -> Iterator[np.ndarray]:
    """Yield float32 blocks ``[b, D]`` (unit rows) totalling ``n`` rows grown from ``base [m, D]`` (module doc)."""
    base = np.ascontiguousarray(base, np.float32)
    m, D = base.shape
    nn, _ = exact_search(base, base, n_neighbours + 1)
    nn = nn[:, 1:]  # [m, n_neighbours] nearest real neighbours, self dropped
    centred = base - base.mean(0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    U, sv = vt[:rank].T.astype(np.float32), s[:rank].astype(np.float32)  # [D, r], [r]
    sv = sv / np.linalg.norm(sv)
    rng = np.random.default_rng(seed)
    for lo in range(0, n, block):
        hi = min(lo + block, n)
        b = hi - lo
        i = np.arange(lo, hi) % m
        j = nn[i, rng.integers(0, nn.shape[1], b)]
        lam = rng.uniform(0.0, mix, (b, 1)).astype(np.float32)
        x = (1 - lam) * base[i] + lam * base[j]
        x += lowrank * (rng.standard_normal((b, rank)).astype(np.float32) * sv) @ U.T
        x += (iid / np.sqrt(D)) * rng.standard_normal((b, D)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        yield x


def expand_array(base: np.ndarray, n: int, **kw) -> np.ndarray:
    """:func:`expand` collected into one array ``[n, D]``."""
    return np.concatenate(list(expand(base, n, **kw)))
