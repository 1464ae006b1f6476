"""Truncate and pad token id lists into the fixed-shape arrays an ONNX text tower takes."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import TokenizerError


def pad_truncate(
    seqs: Sequence[list[int]], context_length: int, *, pad_id: int, end_id: int, truncate: bool = True,
    texts: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Stack id lists into ``[N, L]`` arrays, cutting long ones and padding short ones.

    A sequence longer than ``L`` keeps its first ``L - 1`` ids and gets ``end_id`` as its last one,
    which is what OpenAI CLIP / open_clip (``truncate=True``) and HF ``tokenizers`` (``LongestFirst``
    on a single sequence, then the ``[SEP]`` template) produce.

    Parameters
    ----------
    seqs : sequence of list[int]
        Full encodings, start and end tokens included.
    context_length : int
        ``L``, at least 2 (room for the start and end tokens).
    pad_id, end_id : int
    truncate : bool
        ``False`` raises :class:`TokenizerError` for a sequence longer than ``L`` instead of cutting it.
    texts : sequence of str, optional
        The source texts, only to name the offending one in that error.

    Returns
    -------
    ids : int64 [N, L]
        Token ids, ``pad_id`` after the end token.
    attention_mask : int64 [N, L]
        1 on real tokens (start/end included), 0 on padding.
    """
    if not isinstance(context_length, (int, np.integer)) or isinstance(context_length, bool) or context_length < 2:
        raise TokenizerError(f"context_length must be an integer >= 2 (start + end token), got {context_length!r}")
    n = len(seqs)
    ids = np.full((n, context_length), pad_id, dtype=np.int64)        # [N, L]
    mask = np.zeros((n, context_length), dtype=np.int64)              # [N, L]
    for i, seq in enumerate(seqs):
        if len(seq) > context_length:
            if not truncate:
                what = f" (text {i}: {texts[i][:60]!r}...)" if texts is not None else f" (text {i})"
                raise TokenizerError(
                    f"text encodes to {len(seq)} tokens, more than context_length={context_length}{what}; "
                    "pass truncate=True to cut it"
                )
            seq = seq[: context_length - 1] + [end_id]
        ids[i, : len(seq)] = seq
        mask[i, : len(seq)] = 1
    return ids, mask
