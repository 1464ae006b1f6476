"""The ``reco-ref`` command: argument parsing and one-line errors only.

Whatever goes wrong, the user sees one line, ``reco-ref VERB: error: ...``, and exit code 1 (argparse
usage errors: 2; Ctrl-C: 130): library errors (:class:`~reco_ref.errors.RecoError`) carry their own
message naming the file and field; OS errors are shown with their file name; anything else is a bug and
says so.  ``--debug`` (anywhere on the line) or ``RECO_REF_DEBUG=1`` re-raises instead, with the traceback.

Each room that offers verbs has a ``cli`` module with ``register(subparsers)``; it adds its
sub-commands and sets ``func`` to a function taking the parsed ``argparse.Namespace`` and
returning an exit code.  Logic lives in the library, never here.

A room's verbs exist once its module is listed in :data:`VERB_MODULES` (one line). A listed module
that does not exist is a packaging bug, so :func:`build_parser` raises instead of dropping the verbs.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .errors import RecoError
from .paths import printable

# Rooms that contribute verbs, in the order they appear in --help; every entry must exist.
VERB_MODULES = (
    "reco_ref.encoders.cli",
    "reco_ref.memory.cli",
    "reco_ref.train.cli",
    "reco_ref.eval.cli",
    "reco_ref.eval.edge_cli",
    "reco_ref.classify.cli",
    "reco_ref.export.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reco-ref", description="Retrieval-enhanced vision-text models, auditable.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name in VERB_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and (name + ".").startswith(exc.name + "."):  # the module (or its room) itself is missing
                raise ModuleNotFoundError(f"reco_ref.cli.VERB_MODULES lists {name!r}, which does not exist; "
                                          f"fix or remove that line", name=name) from exc  # fmt: skip
            raise
        register = getattr(module, "register", None)
        if not callable(register):
            raise AttributeError(f"reco_ref.cli.VERB_MODULES lists {name!r}, which defines no register(subparsers)")
        register(sub)
    for p in sub.choices.values():  # --debug is accepted after the verb too
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def one_line(exc: BaseException) -> str:
    """The message the CLI prints for ``exc``: one line, naming the file where the error has one."""
    if isinstance(exc, (RecoError, FileNotFoundError)):
        msg = str(exc)
    elif isinstance(exc, UnicodeDecodeError):
        msg = f"input is not UTF-8 text ({exc}); re-save it as UTF-8"
    elif isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        msg = f"{where}{exc.strerror or exc}"
    elif isinstance(exc, MemoryError):
        msg = "out of memory (the input asks for more RAM than this machine allows)"
    else:
        msg = f"unexpected {type(exc).__name__}: {exc} (a bug: re-run with --debug and report the traceback)"
    # one line, and control characters escaped: messages quote file names and text read from files
    return printable(" ".join(msg.split()) or type(exc).__name__)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from . import __version__

        print(__version__)
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    debug = getattr(args, "debug", False) or os.environ.get("RECO_REF_DEBUG") == "1"
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"reco-ref {args.verb}: interrupted; re-run with the same arguments (and --resume where offered) to continue", file=sys.stderr)
        return 130
    except Exception as exc:  # the one door every error leaves through
        if debug:
            raise
        print(f"reco-ref {args.verb}: error: {one_line(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
