"""The ``reco-ref`` command: argument parsing and one-line errors only.

Each room that offers verbs has a ``cli`` module with ``register(subparsers)``; it adds its
sub-commands and sets ``func`` to a function taking the parsed ``argparse.Namespace`` and
returning an exit code.  Logic lives in the library, never here.

A room's verbs exist once its module is listed in :data:`VERB_MODULES` (one line). A listed module
that does not exist is a packaging bug, so :func:`build_parser` raises instead of dropping the verbs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import RecoError

# Rooms that contribute verbs, in the order they appear in --help; every entry must exist.
VERB_MODULES = (
    "reco_ref.encoders.cli",
    "reco_ref.memory.cli",
    "reco_ref.train.cli",
    "reco_ref.eval.cli",
    "reco_ref.export.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reco-ref", description="Retrieval-enhanced vision-text models, auditable.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
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
    return parser


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
    try:
        return int(args.func(args) or 0)
    except (RecoError, FileNotFoundError) as exc:
        print(f"reco-ref {args.verb}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"reco-ref {args.verb}: interrupted; re-run with the same arguments (and --resume where offered) to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
