"""Labelled image datasets for evaluation and training: a manifest split, its embeddings, and overlap with a memory.

A *dataset manifest* is the ``../shared/data`` format: a CSV with columns ``file,label,class_name,split``, files
relative to the manifest's folder, labels ``0..C-1`` each naming one class. It is read by :mod:`reco_ref.datasets`
(the one reader; ``read_split`` and ``Split`` are re-exported here). ::

    from reco_ref.eval.data import read_split, embed_split, own_rows
    ds = read_split("../shared/data/flowers102/manifest.csv", "test")   # Split(files, labels [N], class_names)
    img, keys = embed_split(ds, encoder, cache_dir="~/.cache/reco_ref")  # [N,D], [N,Dk] or None; cached on disk
    rows = own_rows(memory, keys)            # int64 [N]: the memory row holding each image itself, or -1

Embeddings are cached (optional) under ``cache_dir`` in one ``.npz`` per (encoder fingerprint, file list, file sizes
and modification times): a second evaluation of the same split with the same encoder does not decode an image.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

# the one manifest reader is a shared helper (memory, train, eval and classify read manifests); re-exported here
from ..datasets import (MANIFEST_COLUMNS, Split, class_labels, labels_by_source,  # noqa: F401
                        read_manifest_rows, read_split, read_table)
from ..errors import DatasetError, RecoError
from ..io import ArraySpec, atomic_save_npz, load_npz
# overlap detection by exact self-match is the model's self-exclusion (reco/, used by train too); re-exported
from ..reco.refine import SELF_MATCH_COSINE, own_rows  # noqa: F401


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


def cache_disabled(value: str | os.PathLike) -> bool:
    """``""``, ``"off"`` or ``"0"`` (any case, spaces trimmed): no embedding cache. The one reading of those words,
    for ``--cache-dir`` in every verb and for ``$RECO_REF_CACHE``."""
    return str(value).strip().lower() in ("", "off", "0")


def default_cache_dir() -> Path | None:
    """``$RECO_REF_CACHE`` if set (``""`` or ``"off"`` = no cache), else None (no caching)."""
    env = os.environ.get("RECO_REF_CACHE")
    if env is None or cache_disabled(env):
        return None
    return Path(env).expanduser()


def cache_dir_option(value: str | os.PathLike | None, default: Callable[[], Path | None]) -> Path | str | None:
    """What a verb's ``--cache-dir`` means: not given → ``default()``; a :func:`cache_disabled` word → None (no
    cache); else the folder given."""
    if value is None:
        return default()
    return None if cache_disabled(value) else value


def user_cache_dir() -> Path | None:
    """The embedding cache of commands that cache by default (``classify``): ``$RECO_REF_CACHE`` when set (``""``,
    ``"off"`` or ``"0"`` = no cache), else ``$XDG_CACHE_HOME/reco_ref/embeddings`` (``~/.cache/...``). Entries are
    keyed by the encoder fingerprint and the image files' paths, sizes and modification times."""
    env = os.environ.get("RECO_REF_CACHE")
    if env is not None:
        return default_cache_dir()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "reco_ref" / "embeddings"


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
                z = load_npz(path, expect={  # headers checked against this split and encoder before any data is read
                    "image": ArraySpec((len(ds), encoder.dim), kind="f"),
                    "keys": ArraySpec((len(ds), getattr(encoder, "key_dim", None)), kind="f"),
                    "meta": ArraySpec((None,), np.uint8, max_bytes=1 << 20)})
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


# ------------------------------------------------------------------------------ demo datasets (reco-ref demo)
#: prompt of the shipped clip-art sample and of dataset folders (one prompt per class in the demo)
SHIPPED_PROMPT = "a drawing of a {}."
DATA_PROMPT = "a photo of a {}."


def balanced_subset(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``n`` rows spread evenly over the classes (seeded), in their original order.

    Rows are ranked inside their class in a random (seeded) order; all rank-0 rows come first, then rank 1, ...,
    so every class gets ``n // C`` or one more row while it has them.
    """
    if n >= labels.size:
        return np.arange(labels.size)
    perm = rng.permutation(labels.size)
    rank = np.empty(labels.size, np.int64)  # rank of each row inside its class, in permuted order
    for c in np.unique(labels):
        members = perm[labels[perm] == c]
        rank[members] = np.arange(members.size)
    order = np.lexsort((np.argsort(perm), rank))  # by rank, then by permuted position
    return np.sort(order[:n])


def pairs_data(pairs: str | os.PathLike, *, name: str, prompt: str) -> dict:
    """A pairs CSV of ``image,caption,category,label,split`` (split ``memory`` or ``query``) as a demo dataset dict
    (keys: see :func:`manifest_data`); ``category`` names the class of each ``label`` (``0..C-1``)."""
    from ..memory import read_pairs_csv

    cols, rows = read_table(pairs)
    need = ("image", "caption", "category", "label", "split")
    if any(c not in cols for c in need):
        raise DatasetError(f"{pairs}: columns {list(cols)}, expected {', '.join(need)}")
    _, class_names = class_labels(rows, pairs, name="category")
    memory = read_pairs_csv(pairs, split="memory")
    queries = read_pairs_csv(pairs, split="query")
    return {"name": name, "memory": memory, "queries": queries,
            "query_labels": np.array([q["label"] for q in queries], np.int64), "class_names": class_names,
            "prompt": prompt}


def shipped_data() -> dict:
    """The shipped sample (``weights/demo/pairs.csv``) as a demo dataset dict (keys: see :func:`manifest_data`)."""
    from ..paths import weights_file

    return pairs_data(weights_file("demo", "pairs.csv"), name="weights/demo (OpenClipart sample)",
                      prompt=SHIPPED_PROMPT)


def _split_items(ds: Split, caption: str) -> list[dict]:
    """Memory items (``reco_ref.memory`` pair dicts) of a split, captions ``caption.format(class_name)``."""
    base = ds.manifest.parent.resolve()
    return [{"image": f, "caption": caption.format(ds.class_names[y]), "source": os.path.relpath(f, base),
             "label": int(y), "split": ds.split, "tags": None} for f, y in zip(ds.files, ds.labels)]


def manifest_data(folder: str | os.PathLike, *, limit: int | None = 100, memory_limit: int | None = None,
                  seed: int = 0) -> dict:
    """A dataset folder holding ``manifest.csv`` as a demo dataset: ``train`` = memory, ``test`` = queries.

    Parameters
    ----------
    folder : e.g. ``../shared/data/flowers102``
    limit : queries taken from the ``test`` split (class-balanced, seeded); None = all
    memory_limit : memory rows taken from the ``train`` split (class-balanced, seeded); None = all

    Returns
    -------
    dict with ``name``, ``memory`` (items as :func:`reco_ref.memory.read_pairs`, captions
    ``"a photo of a {class_name}."``), ``queries`` (items), ``query_labels`` int64 ``[Q]``, ``class_names``
    (indexed by label), ``prompt``.

    Raises
    ------
    FileNotFoundError  the folder or its manifest.csv is missing
    DatasetError       what :func:`read_split` refuses (columns, labels, a missing train/test split)
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"data folder {folder}: not a directory (expected a dataset folder holding "
                                f"manifest.csv with columns {','.join(MANIFEST_COLUMNS)})")
    if not (folder / "manifest.csv").is_file():
        raise FileNotFoundError(f"data folder {folder}: no manifest.csv in it (expected columns "
                                f"{','.join(MANIFEST_COLUMNS)})")
    for name, value in (("limit", limit), ("memory_limit", memory_limit)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise RecoError(f"{name}: expected a positive integer or None, got {value!r}")
    train, test = read_split(folder, "train"), read_split(folder, "test")
    rng = np.random.default_rng(seed)
    memory = _split_items(train, DATA_PROMPT)
    memory = [memory[i] for i in balanced_subset(train.labels, memory_limit or len(train), rng)]
    keep = balanced_subset(test.labels, limit or len(test), rng)
    queries = _split_items(test, DATA_PROMPT)
    return {"name": str(folder), "memory": memory, "queries": [queries[i] for i in keep],
            "query_labels": test.labels[keep], "class_names": list(train.class_names), "prompt": DATA_PROMPT}


# ------------------------------------------------------------------------- memory rows → dataset classes
def caption_classes(captions: list[str | None], class_names: list[str]) -> np.ndarray:
    """The class each caption names, or -1: whole-word, case-insensitive; the longest name found wins, and a
    caption naming two classes of which neither contains the other is ambiguous (-1).

    Returns int64 [len(captions)].
    """
    import re

    pats = [(c, re.compile(r"(?<!\w)" + re.escape(" ".join(name.lower().split())) + r"(?!\w)"))
            for c, name in enumerate(class_names)]
    memo: dict[str, int] = {}
    out = np.full(len(captions), -1, np.int64)
    for i, cap in enumerate(captions):
        text = " ".join((cap or "").lower().split())
        if text not in memo:
            found = [c for c, p in pats if p.search(text)]
            best = -1
            if found:
                longest = max(found, key=lambda c: len(class_names[c]))
                lname = class_names[longest].lower()
                if all(class_names[c].lower() in lname for c in found):
                    best = longest
            memo[text] = best
        out[i] = memo[text]
    return out


def memory_class_labels(memory: Any, rows: np.ndarray, class_names: list[str],
                        labels_by_source: dict[str, int] | None = None, *, min_agreement: float = 0.95
                        ) -> tuple[np.ndarray | None, str]:
    """Dataset class of each retrieved memory row, for the k-NN vote: ``(labels like rows, -1 = no vote; how)``.

    The memory's ``label`` column is used when it can be tied to this dataset's classes: either the rows'
    ``source`` is a file of the dataset's manifest carrying the same label (``labels_by_source``, relative path →
    label), or the captions that name a class of the dataset agree with the label on >= ``min_agreement`` of
    rows. A label column that cannot be tied (another dataset's numbering) is not used. Without a usable label
    column, captions that name a class give it (:func:`caption_classes`); rows naming none cast no vote.
    Where nothing maps, returns ``(None, reason)``: no vote rather than a silently wrong one.

    Parameters
    ----------
    rows : int [N,k] memory row ids (−1 = empty slot)
    class_names : the dataset's C classes (indexed by label)
    labels_by_source : the dataset manifest's ``file`` → label, every split
    """
    rows = np.asarray(rows)
    uniq = np.unique(rows[rows >= 0])
    C = len(class_names)
    if uniq.size == 0:
        return None, "no memory row was retrieved"
    meta = memory.metadata(uniq)
    col = np.array([-1 if m is None or m["label"] is None else int(m["label"]) for m in meta], np.int64)
    caps = [None if m is None else m["caption"] for m in meta]
    from_caps = caption_classes(caps, class_names)
    has = col >= 0
    chosen: np.ndarray | None = None
    how = ""
    if has.any():
        srcs = [None if m is None else m["source"] for m in meta]
        by_src = np.array([-2 if labels_by_source is None or s not in labels_by_source else labels_by_source[s]
                           for s in srcs], np.int64)
        src_known = has & (by_src >= 0)
        both = has & (from_caps >= 0)
        if (col[has] >= C).any():
            how = f"its label column has labels >= {C} (another dataset's numbering)"
        elif src_known.sum() >= 0.5 * has.sum() and (col[src_known] == by_src[src_known]).all():
            chosen, how = col, f"label column ({int(src_known.sum())} of {int(has.sum())} rows are files of the dataset " \
                               "manifest with the same label)"
        elif both.any() and (col[both] == from_caps[both]).mean() >= min_agreement:
            agree = float((col[both] == from_caps[both]).mean())
            chosen, how = col, (f"label column (checked against captions: {agree:.0%} of {int(both.sum())} rows "
                                "naming a class agree)")
        elif both.any():
            how = (f"its label column disagrees with the class its captions name on "
                   f"{float((col[both] != from_caps[both]).mean()):.0%} of rows (another dataset's numbering)")
        else:
            how = ("its label column cannot be tied to this dataset's classes (row sources are not files of the "
                   "manifest and no caption names a class)")
    else:
        how = "the memory has no labels"
    if chosen is None:
        if (from_caps >= 0).any():
            chosen = from_caps
            how = (f"captions ({int((from_caps >= 0).sum())} of {uniq.size} retrieved rows name a class; "
                   f"label column not used: {how})")
        else:
            return None, f"{how}, and no retrieved row's caption names a class of the dataset"
    lut = np.full(int(uniq.max()) + 1, -1, np.int64)
    lut[uniq] = chosen
    return np.where(rows >= 0, lut[np.maximum(rows, 0)], -1), how

