"""The ``reco-ref`` command: argument parsing and one-line errors only.

Each room that offers verbs has a ``cli`` module with ``register(subparsers)``; it adds its
sub-commands and sets ``func`` to a function taking the parsed ``argparse.Namespace`` and
returning an exit code.  Logic lives in the library, never here.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import RecoError

# Rooms that contribute verbs, in the order they appear in --help.
VERB_MODULES = (
    "reco_ref.encoders.cli",
    "reco_ref.memory.cli",
    "reco_ref.fusion.cli",
    "reco_ref.train.cli",
    "reco_ref.eval.cli",
    "reco_ref.classify.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reco-ref", description="Retrieval-enhanced vision-text models, auditable.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name in VERB_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # room has no verbs (yet); anything else is a real import error
                continue
            raise
        module.register(sub)
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
