"""The validation stamp: a dict of arrays that remembers they passed the full check once.

The front door (:func:`reco_ref.fusion.check_params`) scans ~3–7 M floats for finiteness; that scan was half of
a batch-1 forward. After one full check it calls ``_set_stamp``, which keeps references to the checked array
objects with their shapes, strides and dtypes; ``_stamped`` then answers from 18 identity and attribute
comparisons (docs/performance.md) for as long as every entry is still the very same array. Every dict method
that replaces an entry drops the stamp. What this does and does not catch is :class:`FusionParams`'s contract.
"""

from __future__ import annotations

import numpy as np


class StampedDict(dict):
    """A ``dict`` of arrays with a validation stamp (a subclass may narrow the stamped entries: ``_stamp_names``)."""

    _stamp = None  # (D, dtype, names, arrays, metas) once validated

    def _stamp_names(self) -> tuple[str, ...]:
        """The names of the arrays a stamp covers: every entry (:class:`FusionParams`: those of its config)."""
        return tuple(self)

    def _set_stamp(self, D: int, dtype: np.dtype) -> None:
        """Record that the current arrays passed full validation (shapes, dtype, finiteness)."""
        names = self._stamp_names()
        arrays = tuple(dict.__getitem__(self, n) for n in names)
        self._stamp = (int(D), np.dtype(dtype), names, arrays, tuple((a.shape, a.strides, a.dtype) for a in arrays))

    def _stamped(self):
        """``(D, dtype)`` when the arrays are still exactly the stamped ones, else ``None``.

        18 identity and attribute comparisons (docs/performance.md); holding the stamped objects means an id
        can never be reused by another array while the stamp lives.
        """
        st = self._stamp
        if st is None:
            return None
        D, dtype, names, arrays, metas = st
        for name, a, meta in zip(names, arrays, metas):
            b = dict.get(self, name)
            if b is not a or (b.shape, b.strides, b.dtype) != meta:
                return None
        return D, dtype

    # Any change of an entry drops the stamp (and the references it holds).
    def __setitem__(self, key, value):
        self._stamp = None
        super().__setitem__(key, value)

    def __delitem__(self, key):
        self._stamp = None
        super().__delitem__(key)

    def __ior__(self, other):
        self._stamp = None
        return super().__ior__(other)

    def update(self, *args, **kwargs):
        self._stamp = None
        super().update(*args, **kwargs)

    def setdefault(self, key, default=None):
        self._stamp = None
        return super().setdefault(key, default)

    def pop(self, *args):
        self._stamp = None
        return super().pop(*args)

    def popitem(self):
        self._stamp = None
        return super().popitem()

    def clear(self):
        self._stamp = None
        super().clear()
