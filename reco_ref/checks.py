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


def _float_range(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    """``"> 0"``, ``"in [0, 1)"``, ... — how a float range reads in a message."""
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo:g}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {hi:g}"
    return ""


def check_float(name: str, value: object, lo: float | None = None, hi: float | None = None, *,
                lo_open: bool = False, hi_open: bool = False, error: type = ShapeError) -> float:
    """``value`` as a finite float in the range (``lo``/``hi`` None: unbounded; ``*_open``: bound excluded), else
    ``error`` naming ``name``.

    The float twin of :func:`check_int`, used by :func:`float_option` at the CLI and by the library functions
    that receive the same value: NaN and inf are always refused (a NaN learning rate or weight only shows up
    steps later, as a NaN loss or a JSON error at save time), and so is a bool.
    """
    want = " ".join(["a finite number", _float_range(lo, hi, lo_open, hi_open)]).strip()
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise error(f"{name}: expected {want}, got {value!r}")
    v = float(value)
    if not np.isfinite(v) or (lo is not None and (v <= lo if lo_open else v < lo)) or (
            hi is not None and (v >= hi if hi_open else v > hi)):
        raise error(f"{name}: expected {want}, got {v!r}")
    return v


def float_option(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False):
    """An argparse ``type=`` that parses a finite float in the range (one-line usage error otherwise).

    ``float_option(0, lo_open=True)`` takes numbers > 0; ``float_option(0, 1, hi_open=True)`` takes [0, 1).
    ``nan``, ``inf`` and ``-inf``, which Python's ``float()`` accepts, are refused.
    """
    import argparse

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            want = " ".join(["a finite number", _float_range(lo, hi, lo_open, hi_open)]).strip()
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}") from None
        try:
            return check_float("value", v, lo, hi, lo_open=lo_open, hi_open=hi_open)
        except ShapeError as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix("value: ")) from None

    parse.__name__ = "number"
    return parse


def memory_rows(memory: object) -> int:
    """``len(memory)``, or a one-line :class:`~reco_ref.errors.SearchError` for a memory of 0 rows.

    A build whose every item failed to encode still writes a valid, empty memory (exit 0, the failures listed in
    its ``failures.jsonl``); anything that retrieves from it would index an empty neighbour array. Every verb
    that retrieves (query, eval, ablate, demo, train, classify) refuses it here, naming the folder.
    """
    from .errors import SearchError

    n = int(len(memory))
    if n == 0:
        root = getattr(memory, "root", "memory")
        raise SearchError(f"{root}: memory holds 0 rows, nothing to retrieve (did every item fail to encode when it "
                          f"was built? see {root}/failures.jsonl); build it again from inputs that encode")
    return n


def cap_k(k: int, memory: object, note=None) -> int:
    """The neighbours per query a memory can give: ``min(k, len(memory))`` (a memory of 0 rows is refused).

    A memory of n rows has at most n neighbours, and its search returns ``min(k, n)`` columns
    (:func:`reco_ref.memory.search_index`); the verbs size their arrays with this same number. ``note``
    (e.g. a print to stderr) is told ``note: k = 10 capped at the memory's 7 rows`` when the cap applies.
    """
    k = check_int("k", k, 1)
    n = memory_rows(memory)
    if k > n:
        if note is not None:
            note(f"note: k = {k} capped at the memory's {n} rows")
        return n
    return k
