"""Moved to :mod:`reco_ref.reco.weights` (the inference room, issue 22): this path is kept so that code which
imported it keeps working. New code imports from :mod:`reco_ref.reco`; patch the names there, not here."""

from ..reco.weights import *  # noqa: F401,F403
from ..reco.weights import __all__  # noqa: F401
