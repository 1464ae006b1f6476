"""Shared helpers for tests/classify: random non-identity parameters and inputs, and a tiny fake encoder."""

from __future__ import annotations

import numpy as np

from reco_ref.classify.model import init_params


def random_case(rng, *, B=4, k=5, D=6, Dk=5, Dv=7, W=8, C=4, heads=2, attention="softmax", memory=True,
                dtype=np.float64, p_valid=0.7):
    """Parameters perturbed away from the init (W_o = 0 would hide the attention's gradients) and inputs."""
    P = init_params(D, C, key_dim=Dk, value_dim=Dv, width=W, heads=heads, attention=attention, memory=memory,
                    seed=int(rng.integers(1 << 30)), dtype=dtype)
    for n in P:
        P[n] = (P[n] + 0.5 * rng.standard_normal(P[n].shape)).astype(dtype)
    q = rng.standard_normal((B, D)).astype(dtype)
    K = rng.standard_normal((B, k, Dk)).astype(dtype)
    V = rng.standard_normal((B, k, Dv)).astype(dtype)
    valid = rng.random((B, k)) < p_valid
    valid[0] = False  # a row without any retrieved item (empty or fully excluded memory)
    if B > 1:
        valid[1] = True
    y = rng.integers(0, C, B)
    return P, q, K, V, valid, y


class ClassEncoder:
    """Fake encoder pair whose embeddings carry the class: an image file holds ``"<class> <i>"``; its embedding
    is a unit vector near the class centre (noise ``0.6``), its search key another one; a caption ``"a photo of
    a <class name>."`` maps near the same centre. Deterministic from the file's bytes / the text."""

    dim, key_dim, name = 16, 12, "class-fake"
    fingerprint = "class-fake-v1"

    def _centre(self, c: int, dim: int, salt: int) -> np.ndarray:
        return np.random.default_rng([salt, c]).standard_normal(dim)

    def _vec(self, c: int, seed: int, dim: int, salt: int) -> np.ndarray:
        v = self._centre(c, dim, salt) + 0.6 * np.random.default_rng([salt, c, seed]).standard_normal(dim)
        return (v / np.linalg.norm(v)).astype(np.float32)

    def encode_images(self, items, batch_size=64, on_error="raise", with_keys=False, progress=False):
        embs, keys = [], []
        for it in items:
            c, i = (int(t) for t in open(it).read().split())
            embs.append(self._vec(c, i, self.dim, 1))
            keys.append(self._vec(c, i, self.key_dim, 2))
        E, K = np.stack(embs), np.stack(keys)
        if on_error == "skip":
            ok = np.arange(len(items))
            return (E, K, ok, []) if with_keys else (E, ok, [])
        return (E, K) if with_keys else E

    def encode_image_keys(self, items, batch_size=64):
        return self.encode_images(items, with_keys=True)[1]

    def encode_texts(self, texts, batch_size=256):
        return np.stack([self._vec(int(t.split("class")[-1].strip(" .")), 10**6, self.dim, 1) for t in texts])


def make_encoder():
    return ClassEncoder()


def write_dataset(root, per_class_train=(30, 12, 3), per_class_test=4, extra_splits=()):
    """Tiny dataset folder with manifest.csv; files hold ``"<class> <i>"`` for :class:`ClassEncoder`."""
    root.mkdir(parents=True, exist_ok=True)
    lines = ["file,label,class_name,split"]
    i = 0
    for split, counts in [("train", per_class_train), ("test", [per_class_test] * len(per_class_train)),
                          *extra_splits]:
        for c, n in enumerate(counts):
            for _ in range(n):
                (root / f"{i}.txt").write_text(f"{c} {i}")
                lines.append(f"{i}.txt,{c},class{c},{split}")
                i += 1
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    return root / "manifest.csv"



def central_differences(loss, arr, eps: float = 1e-6):
    """Float64 central differences of the scalar ``loss()`` with respect to every entry of ``arr`` (the fusion
    tests' ``central_diff``, entry by entry)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fusion"))
    from fusion_testlib import central_diff

    num = np.zeros_like(arr)
    for i in np.ndindex(arr.shape):
        num[i] = central_diff(loss, arr, i, eps)
    return num
