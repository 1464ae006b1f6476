"""Input validation shared by every room: shapes, dtypes and finiteness, with messages that name the array."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .errors import ShapeError

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def check_array(
    name: str,
    a: object,
    ndim: int | None = None,
    shape: Sequence[int | None] | None = None,
    dtypes: Sequence[np.dtype] | None = FLOAT_DTYPES,
    finite: bool = True,
) -> np.ndarray:
    """Return ``a`` as an ndarray after checking it, or raise :class:`ShapeError` naming ``name``.

    Parameters
    ----------
    name : str
        How the array is called in the message (e.g. ``"query [B,D]"``).
    ndim : int, optional
        Required number of dimensions.
    shape : sequence of int or None, optional
        Required shape; ``None`` entries match any size.
    dtypes : sequence of dtype, optional
        Allowed dtypes (default float32/float64); ``None`` allows any.
    finite : bool
        Refuse NaN / inf (only checked for floating dtypes).
    """
    if not isinstance(a, np.ndarray):
        raise ShapeError(f"{name}: expected a numpy array, got {type(a).__name__}")
    if dtypes is not None and a.dtype not in [np.dtype(d) for d in dtypes]:
        allowed = ", ".join(str(np.dtype(d)) for d in dtypes)
        raise ShapeError(f"{name}: dtype {a.dtype} not allowed (expected one of {allowed})")
    if shape is not None:
        ndim = len(shape)
    if ndim is not None and a.ndim != ndim:
        raise ShapeError(f"{name}: expected {ndim} dimensions, got shape {a.shape}")
    if shape is not None:
        for axis, (want, got) in enumerate(zip(shape, a.shape)):
            if want is not None and want != got:
                raise ShapeError(f"{name}: axis {axis} has size {got}, expected {want} (shape {a.shape})")
    if finite and a.dtype.kind == "f" and a.size and not np.isfinite(a).all():
        bad = int(np.size(a) - np.count_nonzero(np.isfinite(a)))
        raise ShapeError(f"{name}: contains {bad} NaN/inf value(s)")
    return a


def check_int(name: str, value: object, lo: int, hi: int | None = None, error: type = ShapeError) -> int:
    """``value`` as an int in ``[lo, hi]`` (``hi=None``: no upper bound), else ``error`` naming ``name``.

    The one range check every numeric option goes through, at the CLI (:func:`int_option`) and at the
    library function that receives it, so an out-of-range value never reaches a C extension (hnswlib
    segfaults on ``M=0``) or an allocation sized by it.  Booleans and non-integral floats are refused.
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) and not (
            isinstance(value, float) and value.is_integer()):
        raise error(f"{name}: expected an integer, got {value!r}")
    v = int(value)
    if v < lo or (hi is not None and v > hi):
        want = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise error(f"{name}: expected an integer {want}, got {v}")
    return v


def int_option(lo: int, hi: int | None = None):
    """An argparse ``type=`` that parses an integer and checks it lies in ``[lo, hi]`` (one-line usage error)."""
    import argparse

    def parse(text: str) -> int:
        try:
            v = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        try:
            return check_int("value", v, lo, hi)
        except ShapeError as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix("value: ")) from None

    parse.__name__ = "integer"
    return parse


def positive_int(text: str) -> int:
    """An argparse ``type=`` for options that must be an integer >= 1 (``-k``, ``--epochs``, ...)."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value
