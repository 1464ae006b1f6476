"""Memory plumbing of the classifier: the search vectors, the ``k`` retrieved items (keys, values, scores, rows),
and the memory rows' classes the label readout [ours] reads."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import DatasetError, SearchError

__all__ = ["search_vectors", "retrieve_items", "memory_row_labels", "label_values"]


def search_vectors(memory: Any, image: np.ndarray, keys: np.ndarray | None) -> np.ndarray:
    """What the memory's image index holds for these queries: image search keys where it has them, else images."""
    if memory.key_dim:
        if keys is None:
            raise SearchError(f"memory {memory.root} indexes images by search keys (key_dim {memory.key_dim}) but "
                              "the encoder gave none; embed the dataset with the memory's encoder")
        return keys
    return image


def retrieve_items(memory: Any, search: np.ndarray, k: int, values: str = "text", exclude: np.ndarray | None = None,
                   dtype=np.float32, with_scores: bool = False, with_rows: bool = False) -> tuple[np.ndarray, ...]:
    """The ``k`` nearest memory items of each query: keys ``[B,k,Dk]``, values ``[B,k,Dv]``, valid ``[B,k]``.

    Keys are the items' image search keys (image embeddings where the memory has no keys); values their text
    embeddings (``values="text"``), image embeddings, or both concatenated ``[text, image]``. Missing slots
    (memory smaller than ``k``, excluded own item) are zero with ``valid=False``. ``with_scores``: also the
    items' search cosines ``[B,k]`` (0 where invalid; what the score readout weighs them by). ``with_rows``: also
    the items' memory rows ``[B,k]`` (−1 where invalid), last.
    """
    rows, scores, valid = memory.search(np.ascontiguousarray(search, np.float32), modality="image", k=k, exclude=exclude)
    K = memory.embeddings("image_keys" if memory.key_dim else "image", rows)  # [B, k, Dk]
    if values == "text":
        V = memory.embeddings("text", rows)  # [B, k, D]
    elif values == "image":
        V = memory.embeddings("image", rows)
    else:
        V = np.concatenate([memory.embeddings("text", rows), memory.embeddings("image", rows)], axis=-1)  # [B,k,2D]
    out = (K.astype(dtype, copy=False), V.astype(dtype, copy=False), valid)
    if with_scores:
        out += (np.where(valid, scores, 0).astype(dtype),)
    return out + (np.where(valid, rows, -1),) if with_rows else out


def memory_row_labels(memory: Any, class_names: list[str]) -> tuple[np.ndarray, str]:
    """The dataset class of every memory row, int64 ``[len(memory)]`` (−1: the row names none), and how it was
    read — for the label readout [ours]. One decision for the whole memory
    (:func:`reco_ref.eval.data.memory_class_labels`: its ``label`` column where that is tied to these classes, else
    the class its caption names), so training and evaluation read the same labels. Reads every row's metadata once.
    DatasetError when no row can be tied to a class."""
    from ..eval.data import memory_class_labels

    n = len(memory)
    lab, how = memory_class_labels(memory, np.arange(n, dtype=np.int64)[:, None], class_names, None) if n else \
        (None, "the memory is empty")
    if lab is None or not (lab >= 0).any():
        raise DatasetError(f"readout values 'label': no memory row can be tied to one of the {len(class_names)} "
                           f"classes ({how or 'no caption names a class'}); use --readout-values caption")
    return np.asarray(lab, np.int64).reshape(n), how


def label_values(row_labels: np.ndarray, rows: np.ndarray, valid: np.ndarray, classes: int, dtype=np.float32
                 ) -> np.ndarray:
    """One-hot labels ``[B, k, C]`` of the retrieved ``rows`` [B, k] (zero where invalid or unlabelled): what the
    label readout reads, against ``ro_class_text = I`` (then ``r·T_cᵀ = Σ_j a_j onehot(y_j)``)."""
    lab = np.where(valid & (rows >= 0), row_labels[np.maximum(rows, 0)], -1)  # [B, k]
    out = np.zeros(rows.shape + (classes,), dtype)
    b, j = np.nonzero(lab >= 0)
    out[b, j, lab[b, j]] = 1
    return out


def _dims(memory: Any, values: str) -> tuple[int, int]:
    Dk = memory.key_dim or memory.dim
    return Dk, memory.dim * (2 if values == "both" else 1)
