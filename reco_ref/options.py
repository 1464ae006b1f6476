"""The command line's one option vocabulary: the options several verbs share, added by one helper each.

Every verb's ``cli.py`` adds these options through the functions below, so an option means one thing and is
spelled one way across verbs (``tests/test_cli_vocabulary.py`` walks every parser and fails on a new dialect):

==============================  =========================  ===============================================
option                          canonical spelling         also accepted (old spellings, kept working)
==============================  =========================  ===============================================
the memory a verb reads         ``--memory DIR``           ``memory-*`` verbs: the positional ``MEMORY``
neighbours per query            ``-k/--k N``               (both spellings everywhere)
continue an interrupted run     ``--resume``               ``encode`` resumes by default: ``--restart``
                                                           starts over, ``--resume`` is accepted (default)
ONNX Runtime threads            ``--threads N``            (help says "ONNX Runtime")
hnswlib threads (index build)   ``--index-threads N``      ``build-memory``/``memory-add``: ``--threads``
embedding cache folder          ``--cache-dir DIR``        ``eval``: ``--cache``
trained weights file            ``--weights FILE``         RECO weights: ``--fusion``
fusion backend                  ``--backend NAME``         choices read from :data:`reco_ref.backends.BACKENDS`
the encoder                     ``--model NAME``           (every verb that encodes)
the layer ``train`` trains      ``--layer reco|mlp``       ``--control``
a memory served by Dask         ``--scheduler ADDRESS``    (verbs that open a memory; ``build-memory``'s
                                                           ``--scheduler`` builds its shards there instead)
==============================  =========================  ===============================================

Numbers are parsed by :func:`reco_ref.checks.int_option`, :func:`~reco_ref.checks.float_option` and
:func:`~reco_ref.checks.positive_int` (a range check with a one-line usage error), never by plain ``int``.

A shared helper: imports no room (only :mod:`reco_ref.backends`, which names modules without importing them).
"""

from __future__ import annotations

import argparse
from typing import Callable, Mapping

from .backends import BACKENDS
from .checks import positive_int
from .errors import RecoError

__all__ = ["add_memory", "add_memory_positional", "memory_dir", "add_k", "add_resume", "add_restart",
           "add_threads", "add_index_threads", "add_cache_dir", "add_weights", "add_backend", "backend_choices",
           "add_scheduler",
           "BACKEND_EXCLUDED", "ONNX_NO_BACKWARD", "ONNX_NOT_ATTACHED"]

#: the attribute :func:`add_backend` leaves on its action: backend name → why the verb does not offer it
BACKEND_EXCLUDED = "backend_excluded"

#: why ``onnx`` (forward only, a session attached to the weights) is not offered: training needs the backward
ONNX_NO_BACKWARD = "its graph is forward only and training needs the backward"
#: ... and the inference verbs: none of them attaches exported graphs yet (Python: onnx_backend.attach)
ONNX_NOT_ATTACHED = ("this verb does not attach exported graphs; use reco_ref.fusion.onnx_backend.attach from "
                     "Python (docs/edge.md)")


def add_memory(p, *, help: str = "memory directory", required: bool = True, **kwargs) -> argparse.Action:
    """``--memory DIR``: the memory a verb reads (``**kwargs``: e.g. ``action="append"``)."""
    kwargs.setdefault("metavar", "DIR")
    return p.add_argument("--memory", required=required, help=help, **kwargs)


def add_memory_positional(p, *, help: str = "memory directory") -> None:
    """The ``memory-*`` verbs' memory: positional ``MEMORY`` as before, or ``--memory DIR`` as in every other verb.

    Both land in ``args.memory`` through :func:`memory_dir`, which the verb calls first. The positional is optional
    to argparse so that ``--memory`` alone parses; giving neither (or two different folders) is refused there.
    """
    p.add_argument("memory", nargs="?", metavar="MEMORY", help=f"{help} (or --memory DIR)")
    p.add_argument("--memory", dest="memory_option", metavar="DIR", help=f"{help}, instead of the positional MEMORY")


def memory_dir(args: argparse.Namespace) -> str:
    """The memory folder of a verb set up by :func:`add_memory_positional` (positional or ``--memory``).

    Raises
    ------
    RecoError
        Neither given, or both given naming different folders.
    """
    pos, opt = getattr(args, "memory", None), getattr(args, "memory_option", None)
    if pos is not None and opt is not None and pos != opt:
        raise RecoError(f"the memory is given twice ({pos!r} and --memory {opt!r}); give it once")
    if pos is None and opt is None:
        raise RecoError("the memory directory is required: give it as MEMORY or --memory DIR")
    args.memory = pos if pos is not None else opt
    return args.memory


def add_k(p, *, default: int | None, help: str, type: Callable = positive_int) -> argparse.Action:
    """``-k/--k N``: neighbours per query (``type``: a :mod:`reco_ref.checks` parser; default ``positive_int``)."""
    return p.add_argument("-k", "--k", dest="k", type=type, default=default, help=help)


def add_resume(p, *, help: str = "continue an interrupted run") -> argparse.Action:
    """``--resume``: continue an interrupted run (verbs that start over unless told)."""
    return p.add_argument("--resume", action="store_true", help=help)


def add_restart(p, *, what: str) -> None:
    """``--restart`` for a verb that resumes by default (``encode``), and ``--resume`` accepted as that default.

    The default is not changed: an interrupted run resumes from ``what``; ``--restart`` discards it. ``--resume``
    is accepted so that the spelling of every other resumable verb works here too (it does nothing more).
    """
    g = p.add_mutually_exclusive_group()
    g.add_argument("--restart", action="store_true", help=f"discard {what} and start over (default: resume from them)")
    g.add_argument("--resume", action="store_true", help=f"resume from {what} (the default; for the same spelling "
                                                         "as the other resumable verbs)")


def add_threads(p, *, type: Callable = positive_int, help: str = "ONNX Runtime intra-op threads of the encoders "
                                                                  "(default: all cores)") -> argparse.Action:
    """``--threads N``: ONNX Runtime threads (encoding and decoding); ``help`` must say which threads."""
    return p.add_argument("--threads", type=type, default=None, metavar="N", help=help)


def add_index_threads(p, *, type: Callable) -> argparse.Action:
    """``--index-threads N`` (old spelling ``--threads``): the hnswlib threads that build the HNSW index.

    Kept in ``args.threads`` as before. ``--threads`` means ONNX Runtime threads in every other verb, hence the
    clear name; the old spelling stays an alias.
    """
    return p.add_argument("--index-threads", "--threads", dest="threads", type=type, default=None, metavar="N",
                          help="hnswlib threads building the HNSW index (not ONNX Runtime's; default all cores; "
                               "old spelling --threads)")


def add_cache_dir(p, *, help: str, dest: str = "cache_dir", alias: bool = False) -> argparse.Action:
    """``--cache-dir DIR``: the embedding cache folder (``alias``: also accept the old ``--cache``)."""
    flags = ("--cache-dir", "--cache") if alias else ("--cache-dir",)
    return p.add_argument(*flags, dest=dest, default=None, metavar="DIR", help=help)


def add_weights(p, *, help: str, dest: str = "fusion", **kwargs) -> argparse.Action:
    """``--weights FILE`` (alias ``--fusion``): the trained weights a verb applies or converts.

    ``dest`` stays what the verb read before (``fusion`` for RECO weights), so the code behind it is unchanged.
    """
    kwargs.setdefault("metavar", "WEIGHTS")
    return p.add_argument("--weights", "--fusion", dest=dest, help=help, **kwargs)


def add_scheduler(p, *, what: str = "search it there") -> argparse.Action:
    """``--scheduler ADDRESS``: open the memory on a Dask cluster's workers, each shard resident on one
    (:mod:`reco_ref.memory.served`); ``what`` says what the verb then does through it. Default: open it here."""
    return p.add_argument("--scheduler", metavar="ADDRESS", default=None,
                          help=f"Dask scheduler (tcp://host:8786): open each shard of the memory on that cluster's "
                               f"workers and {what} (the folder must be readable by every worker; needs the dask "
                               "extra; default: open it in this process)")


def backend_choices(exclude: Mapping[str, str] = {}) -> tuple[str, ...]:
    """The registered backends (:data:`reco_ref.backends.BACKENDS`) less ``exclude``, in registry order."""
    return tuple(name for name in BACKENDS if name not in exclude)


def add_backend(p, *, exclude: Mapping[str, str], default: str | None = "numpy",
                help: str = "fusion backend") -> argparse.Action:
    """``--backend NAME`` with the choices of the registry, so a registered backend is offered unless excluded.

    Parameters
    ----------
    exclude : mapping of str to str
        Backend name → why this verb cannot use it; each reason is printed in ``--help`` and kept on the action
        (attribute :data:`BACKEND_EXCLUDED`) for the vocabulary test. A name must be a registered backend.
    """
    unknown = sorted(set(exclude) - set(BACKENDS))
    if unknown:  # a stale exclusion would hide nothing and mislead the help
        raise ValueError(f"add_backend: exclude names unregistered backends {unknown}")
    why = "; ".join(f"not {name}: {reason}" for name, reason in exclude.items())
    action = p.add_argument("--backend", default=default, choices=backend_choices(exclude),
                            help=f"{help} ({why})" if why else help)
    setattr(action, BACKEND_EXCLUDED, dict(exclude))
    return action
