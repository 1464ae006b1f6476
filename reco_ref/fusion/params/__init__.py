"""Parameters as data: named NumPy arrays, a small config, and a checked ``.npz`` format.

A fusion module's parameters are a :class:`FusionParams` — a plain ``dict`` of the 18 arrays named in
:data:`PARAM_NAMES` that also carries its config (``heads``, ``mlp_ratio``) as read-only attributes.
Heads are not an array, so they travel with the dict: ``fusion_forward(params, ...)`` needs no
``heads=`` argument when given a :class:`FusionParams`.

One module per concern; everything is imported from here (``from reco_ref.fusion.params import ...``):

* ``config.py`` — the array names, :class:`FusionConfig`, the shape of every array, ``relevance_of``;
* ``fusion_params.py`` — the type :class:`FusionParams` and fresh parameters (``init_params``: identity, copy);
* ``stamp.py`` — its validation stamp (checked once at the door, then trusted while the arrays are the same);
* ``npz_format.py`` — the ``.npz`` file format (``save_params`` / ``load_params``, ``save_param_set`` /
  ``load_param_set``);
* ``decay.py`` — an optimiser rule that belongs to the parameters: which ones AdamW decays.
"""

from __future__ import annotations

# every name the single module ``params.py`` defined stays importable from here (REL_CENTER, HEADER_KEY, ...
# outside __all__, as before)
from .config import (  # noqa: F401
    PARAM_NAMES,
    REL_CENTER,
    REL_SOURCES,
    REL_WIDTH,
    RELEVANCE_NAMES,
    FusionConfig,
    config_shapes,
    param_shapes,
    relevance_of,
)
from .decay import adamw_decays
from .fusion_params import COPY_ALPHA, INIT_STD, INITS, FusionParams, count_params, init_params  # noqa: F401
from .npz_format import (  # noqa: F401
    FORMAT,
    FORMAT_VERSION,
    HEADER_KEY,
    HEADER_MAX_BYTES,
    load_param_set,
    load_params,
    save_param_set,
    save_params,
)

__all__ = [
    "PARAM_NAMES",
    "RELEVANCE_NAMES",
    "INITS",
    "config_shapes",
    "relevance_of",
    "COPY_ALPHA",
    "adamw_decays",
    "FORMAT",
    "FORMAT_VERSION",
    "FusionConfig",
    "FusionParams",
    "param_shapes",
    "init_params",
    "count_params",
    "save_params",
    "load_params",
    "save_param_set",
    "load_param_set",
]
