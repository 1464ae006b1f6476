"""One option vocabulary across verbs (issue 22, item 3): every verb's parser is walked and a new dialect fails.

The vocabulary is :mod:`reco_ref.options` (its table says option → canonical spelling → aliases). The checks
here read the built parsers, not the source, so an option added by hand that matches the vocabulary passes and
one that speaks another dialect fails, naming the verb and the option:

* ``-k`` and ``--k`` come together; the cache folder is ``--cache-dir`` (``--cache`` only as its alias); the
  weights file is ``--weights`` with the ``--fusion`` alias (both ways round);
* the trained layer is ``--layer`` (``--control`` only as its alias: ``--model`` names the encoder everywhere);
* ``--threads`` says whose threads (ONNX Runtime or hnswlib), and hnswlib threads are ``--index-threads`` first;
* a verb with ``--restart`` (resumes by default) also accepts ``--resume``; the ``memory-*`` verbs' positional
  memory also comes as ``--memory``;
* ``--backend`` offers the registry's backends less the ones excluded with a reason (:func:`options.add_backend`);
* a number is parsed by :mod:`reco_ref.checks` (a range check), never plain ``int``/``float`` or a string default.

:data:`TYPE_ALLOWED` lists the few value parsers outside :mod:`reco_ref.checks`, each with why.
"""

from __future__ import annotations

import argparse

import pytest

from reco_ref import options
from reco_ref.backends import BACKENDS
from reco_ref.checks import positive_int
from reco_ref.cli import build_parser

#: value parsers that are not numbers with a range, so they are not reco_ref.checks' (qualified name → why)
TYPE_ALLOWED = {
    "reco_ref.train.cli._cosine_or_off": "a cosine in (-1, 1] or the word 'off'/'none' (the threshold disabled)",
    "reco_ref.export.cli._module_list": "a comma list of fusion module names, not a number",
}

#: verbs whose --backend must equal a registry family's list: the classifier's backends are the registered ones
#: that carry classifier kernels (backends.backend_names("classify"), exported as classify.model.BACKENDS)
OWN_BACKENDS = {"classify train": "reco_ref.classify.model", "classify eval": "reco_ref.classify.model"}


def verbs(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    """Every verb's parser, by its name on the command line (``classify train`` for a nested one)."""
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                nested = verbs(sub, f"{prefix}{name} ")
                found.update(nested or {f"{prefix}{name}": sub})
    return found


def _qualname(fn) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def dialects(verb: str, parser: argparse.ArgumentParser) -> list[str]:
    """The ways ``parser`` departs from the vocabulary, one line each (empty: it speaks it)."""
    bad = []
    acts = [a for a in parser._actions if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]
    flags = {s for a in acts for s in a.option_strings}
    for a in acts:
        s, name = a.option_strings, "/".join(a.option_strings) or a.dest
        if ("-k" in s) != ("--k" in s):
            bad.append(f"{verb}: {name}: neighbours are spelled -k/--k (options.add_k)")
        if "--cache" in s and "--cache-dir" not in s or any(x.startswith("--cache") for x in s) and s[0] != "--cache-dir":
            bad.append(f"{verb}: {name}: the cache folder is --cache-dir (--cache only as its alias; options.add_cache_dir)")
        if ("--weights" in s) != ("--fusion" in s) or "--weights" in s and s[0] != "--weights":
            bad.append(f"{verb}: {name}: a weights file is --weights with the alias --fusion (options.add_weights)")
        if "--threads" in s or "--index-threads" in s:
            said = a.help or ""
            if "ONNX Runtime" not in said and "hnswlib" not in said:
                bad.append(f"{verb}: {name}: help must say whose threads (ONNX Runtime or hnswlib)")
            if "hnswlib" in said and s[0] != "--index-threads":
                bad.append(f"{verb}: {name}: hnswlib threads are --index-threads (options.add_index_threads)")
        if "--control" in s and s[0] != "--layer":
            bad.append(f"{verb}: {name}: the trained layer is --layer (--control only as its alias; --model is the "
                       "encoder)")
        if not s and a.dest == "memory" and "--memory" not in flags:
            bad.append(f"{verb}: positional memory without --memory (options.add_memory_positional)")
        if "--backend" in s:
            bad += _backend_dialects(verb, a)
        bad += _type_dialects(verb, name, a)
    if "--restart" in flags and "--resume" not in flags:
        bad.append(f"{verb}: --restart without --resume accepted (options.add_restart)")
    return bad


def _backend_dialects(verb: str, a: argparse.Action) -> list[str]:
    excluded = getattr(a, options.BACKEND_EXCLUDED, None)
    if excluded is None:
        return [f"{verb}: --backend choices written by hand (use options.add_backend: the registry's names)"]
    bad = [f"{verb}: --backend excludes {n!r} without a reason" for n, why in excluded.items() if not str(why).strip()]
    if tuple(a.choices) != options.backend_choices(excluded):
        bad.append(f"{verb}: --backend offers {a.choices}, the registry less its exclusions is "
                   f"{options.backend_choices(excluded)}")
    missing = set(BACKENDS) - set(a.choices) - set(excluded)
    if missing:
        bad.append(f"{verb}: --backend neither offers nor excludes {sorted(missing)}")
    return bad


def _type_dialects(verb: str, name: str, a: argparse.Action) -> list[str]:
    t = a.type
    if t in (int, float):
        return [f"{verb}: {name}: type={t.__name__} (no range check): use checks.int_option/float_option/positive_int"]
    if t is None:
        numeric_default = isinstance(a.default, (int, float)) and not isinstance(a.default, bool)
        takes_value = a.nargs != 0 and not isinstance(a, (argparse._StoreConstAction, argparse._CountAction))
        if numeric_default and takes_value and a.choices is None:
            return [f"{verb}: {name}: a number default with no type: a typed value would arrive as a string"]
        return []
    if getattr(t, "__module__", None) != "reco_ref.checks" and _qualname(t) not in TYPE_ALLOWED:
        return [f"{verb}: {name}: value parser {_qualname(t)} is not reco_ref.checks' (or list it in TYPE_ALLOWED)"]
    return []


VERBS = verbs(build_parser())


def test_every_verb_is_walked():
    assert {"encode", "build-memory", "memory-search", "train", "eval", "query", "class-text", "classify train",
            "classify eval", "export-fusion"} <= set(VERBS)


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_verb_speaks_the_vocabulary(verb):
    assert dialects(verb, VERBS[verb]) == []


def test_own_backend_lists_match_their_dispatch():
    import importlib

    for verb, module in OWN_BACKENDS.items():
        (action,) = [a for a in VERBS[verb]._actions if "--backend" in a.option_strings]
        assert tuple(action.choices) == tuple(importlib.import_module(module).BACKENDS), verb


def test_allow_list_is_used():
    """A stale entry would let a future parser of that name through unchecked."""
    used = {_qualname(a.type) for p in VERBS.values() for a in p._actions if a.type is not None}
    assert set(TYPE_ALLOWED) <= used


def test_old_spellings_still_parse():
    """Nothing a user typed before the vocabulary stops working: the old spellings land where they did."""
    p = build_parser()
    a = p.parse_args(["eval", "--memory", "M", "--dataset", "D", "--cache", "C", "--fusion", "W", "--k", "3"])
    assert (a.cache_dir, a.fusion, a.k) == ("C", "W", 3)
    a = p.parse_args(["build-memory", "--out", "O", "--threads", "2"])
    assert a.threads == 2 and p.parse_args(["build-memory", "--out", "O", "--index-threads", "3"]).threads == 3
    a = p.parse_args(["classify", "eval", "--dataset", "D", "--json", "J", "--fusion", "W"])
    assert a.weights == "W"
    for argv in (["memory-info", "M"], ["memory-info", "--memory", "M"], ["memory-info", "--verify", "size", "M"]):
        assert options.memory_dir(p.parse_args(argv)) == "M"
    assert p.parse_args(["encode", "--texts", "t", "--out", "o.npy", "--resume"]).restart is False
    for flag in ("--control", "--layer"):
        assert p.parse_args(["train", "--memory", "M", "--out", "O", flag, "mlp"]).control == "mlp"
    with pytest.raises(SystemExit):  # resume and restart contradict each other
        p.parse_args(["encode", "--texts", "t", "--out", "o.npy", "--resume", "--restart"])


def test_memory_given_twice_or_never_is_refused():
    from reco_ref.errors import RecoError

    p = build_parser()
    with pytest.raises(RecoError, match="twice"):
        options.memory_dir(p.parse_args(["memory-info", "A", "--memory", "B"]))
    with pytest.raises(RecoError, match="required"):
        options.memory_dir(p.parse_args(["memory-info"]))


def test_the_walk_fails_on_each_dialect():
    """The checks are not vacuous: a parser written in each old dialect is caught."""
    p = argparse.ArgumentParser()
    p.add_argument("--k", type=int)
    p.add_argument("--cache")
    p.add_argument("--fusion")
    p.add_argument("--threads", type=positive_int, help="threads")
    p.add_argument("--backend", choices=("numpy", "numba", "cuda"))
    p.add_argument("--restart", action="store_true")
    p.add_argument("memory")
    p.add_argument("--control")
    p.add_argument("--width", default=64)
    p.add_argument("--alpha", type=lambda t: float(t))
    found = "\n".join(dialects("fake", p))
    for needle in ("-k/--k", "--cache-dir", "--weights with the alias --fusion", "whose threads",
                   "written by hand", "--restart without --resume", "positional memory", "type=int",
                   "a number default", "<lambda>", "the trained layer is --layer"):
        assert needle in found, needle
    ok = argparse.ArgumentParser()
    options.add_backend(ok, exclude={})
    assert dialects("ok", ok) == [] and tuple(ok._actions[-1].choices) == tuple(BACKENDS)
    with pytest.raises(ValueError, match="unregistered"):
        options.add_backend(argparse.ArgumentParser(), exclude={"tpu": "no such backend"})
