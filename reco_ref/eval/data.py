"""Labelled image datasets for evaluation and training: a manifest split, its embeddings, and overlap with a memory.

A *dataset manifest* is the ``../shared/data`` format: a CSV with columns ``file,label,class_name,split``, files
relative to the manifest's folder, labels ``0..C-1`` each naming one class. ::

    from reco_ref.eval.data import read_split, embed_split, own_rows
    ds = read_split("../shared/data/flowers102/manifest.csv", "test")   # Split(files, labels [N], class_names)
    img, keys = embed_split(ds, encoder, cache_dir="~/.cache/reco_ref")  # [N,D], [N,Dk] or None; cached on disk
    rows = own_rows(memory, keys)            # int64 [N]: the memory row holding each image itself, or -1

Embeddings are cached (optional) under ``cache_dir`` in one ``.npz`` per (encoder fingerprint, file list, file sizes
and modification times): a second evaluation of the same split with the same encoder does not decode an image.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DatasetError, RecoError
from ..io import atomic_save_npz, load_npz

MANIFEST_COLUMNS = ("file", "label", "class_name", "split")
#: cosine at or above which a memory image is taken to be the query image itself (float32 rounding of 1.0)
SELF_MATCH_COSINE = 0.9999


@dataclass(frozen=True)
class Split:
    """Rows of one split of a dataset manifest.

    Attributes
    ----------
    manifest : Path — the manifest file
    split : str | None — the split name (None = every row)
    files : list[str] — absolute image paths, in manifest order
    labels : int64 [N]
    class_names : list[str] — every class of the manifest (all splits), indexed by label
    """

    manifest: Path
    split: str | None
    files: list[str]
    labels: np.ndarray
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.files)

    @property
    def n_classes(self) -> int:
        return len(self.class_names)


def read_manifest_rows(path: str | os.PathLike) -> list[dict[str, str]]:
    """All rows of a dataset manifest as dicts, after checking the file, its encoding and its columns."""
    path = Path(path)
    if path.is_dir():
        path = path / "manifest.csv"
    if not path.is_file():
        raise FileNotFoundError(f"dataset manifest not found: {path} (expected a CSV with columns "
                                f"{','.join(MANIFEST_COLUMNS)})")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            cols = tuple(reader.fieldnames or ())
            rows = list(reader)
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason}); re-save the manifest as UTF-8") from None
    except csv.Error as exc:
        raise DatasetError(f"{path}: not a readable CSV ({exc})") from None
    missing = [c for c in MANIFEST_COLUMNS if c not in cols]
    if missing:
        raise DatasetError(f"{path}: columns {list(cols)}, missing {missing} (a dataset manifest has "
                           f"{','.join(MANIFEST_COLUMNS)})")
    return rows


def read_split(path: str | os.PathLike, split: str | None = None) -> Split:
    """Read one split of a dataset manifest (``split=None``: all rows).

    Raises
    ------
    FileNotFoundError  no manifest at ``path`` (a manifest file, or a folder holding ``manifest.csv``)
    DatasetError       not UTF-8, wrong columns, a non-integer label, labels not ``0..C-1``, a label naming two
                       classes, an empty ``file``, or no row in ``split`` (the message lists the splits present)
    """
    path = Path(path)
    if path.is_dir():
        path = path / "manifest.csv"
    rows = read_manifest_rows(path)
    base = path.parent.resolve()
    names: dict[int, str] = {}
    labels = np.empty(len(rows), np.int64)
    for i, r in enumerate(rows):
        line = i + 2  # header is line 1
        try:
            label = int(str(r["label"]).strip())
        except (TypeError, ValueError):
            raise DatasetError(f"{path}:{line}: label {r['label']!r} is not an integer") from None
        if label < 0:
            raise DatasetError(f"{path}:{line}: label {label} is negative (labels are 0..C-1)")
        name = (r["class_name"] or "").strip()
        if not name:
            raise DatasetError(f"{path}:{line}: empty class_name for label {label}")
        if names.setdefault(label, name) != name:
            raise DatasetError(f"{path}:{line}: label {label} names both {names[label]!r} and {name!r}")
        if not (r["file"] or "").strip():
            raise DatasetError(f"{path}:{line}: empty 'file'")
        labels[i] = label
    if sorted(names) != list(range(len(names))):
        gaps = sorted(set(range(max(names, default=-1) + 1)) - set(names))
        raise DatasetError(f"{path}: labels must be 0..C-1 without gaps; missing {gaps[:10]} ({len(names)} classes)")
    keep = [i for i, r in enumerate(rows) if split is None or r["split"] == split]
    if not keep:
        present = sorted({r["split"] for r in rows})
        raise DatasetError(f"{path}: no rows with split {split!r} (splits present: {present})")
    return Split(manifest=path, split=split, files=[str(base / rows[i]["file"]) for i in keep],
                 labels=labels[keep], class_names=[names[c] for c in range(len(names))])


def _cache_key(files: list[str], fingerprint: str) -> str:
    h = hashlib.sha256(fingerprint.encode())
    for f in files:
        try:
            st = os.stat(f)
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        h.update(f"{f}\0{stamp}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:32]


def default_cache_dir() -> Path | None:
    """``$RECO_REF_CACHE`` if set (``""`` or ``"off"`` = no cache), else None (no caching)."""
    env = os.environ.get("RECO_REF_CACHE")
    if env is None or env.strip().lower() in ("", "off", "0"):
        return None
    return Path(env).expanduser()


def embed_split(ds: Split, encoder: Any, *, cache_dir: str | os.PathLike | None = None, batch_size: int = 64,
                progress: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Image embeddings ``[N,D]`` and image search keys ``[N,Dk]`` (None if the encoder has none) of a split.

    Every image must decode (an evaluation over a silently shrunk set would be wrong): the first unreadable image
    raises :class:`~reco_ref.errors.ImageDecodeError` naming it. With ``cache_dir`` the arrays are stored there
    atomically and reused when the encoder fingerprint, the file list and every file's size and mtime match.
    """
    with_keys = getattr(encoder, "key_dim", None) is not None
    path = None
    if cache_dir is not None:
        cache = Path(cache_dir).expanduser()
        path = cache / f"emb-{_cache_key(ds.files, encoder.fingerprint)}.npz"
        if path.is_file():
            try:
                z = load_npz(path)
                img = z["image"]
                keys = z["keys"] if with_keys else None
                if img.shape == (len(ds), encoder.dim) and (keys is None or keys.shape == (len(ds), encoder.key_dim)):
                    return img, keys
            except (RecoError, KeyError):
                pass  # a damaged cache entry is rebuilt, never trusted
    if with_keys:
        img, keys = encoder.encode_images(ds.files, batch_size=batch_size, with_keys=True, progress=progress)
    else:
        img, keys = encoder.encode_images(ds.files, batch_size=batch_size, progress=progress), None
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"image": img, "meta": np.frombuffer(json.dumps(
            {"manifest": str(ds.manifest), "split": ds.split, "n": len(ds), "encoder": encoder.fingerprint}
        ).encode(), np.uint8)}
        if keys is not None:
            arrays["keys"] = keys
        atomic_save_npz(path, arrays)
    return img, keys


def own_rows(memory: Any, search_vectors: np.ndarray, *, threshold: float = SELF_MATCH_COSINE) -> np.ndarray:
    """The memory row that holds each query image itself, or -1: overlap detection without trusting paths.

    ``search_vectors`` are what the memory's image index holds (image keys where ``memory.key_dim`` is set, else
    image embeddings), ``[N, Dk]``. A row counts as the query's own when its cosine is ``>= threshold``
    (0.9999: the same image through the same encoder, up to float32 rounding). Exact search, so nothing is missed.
    """
    rows, scores, valid = memory.search(search_vectors, modality="image", k=1, exact=True)
    own = np.where(valid[:, 0] & (scores[:, 0] >= threshold), rows[:, 0], -1)
    return own.astype(np.int64)
