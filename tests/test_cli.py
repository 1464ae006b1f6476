"""reco_ref/cli.py: every listed verb module exists, and a missing one fails loudly (issue 8)."""

from __future__ import annotations

import importlib.util

import pytest

from reco_ref import cli


def test_every_listed_verb_module_exists_and_registers():
    for name in cli.VERB_MODULES:
        assert importlib.util.find_spec(name) is not None, name
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "verb")
    assert {"build-memory", "memory-info", "demo"} <= set(sub.choices)  # one verb of each of two rooms


def test_missing_verb_module_is_an_error_not_a_dropped_verb(monkeypatch):
    monkeypatch.setattr(cli, "VERB_MODULES", cli.VERB_MODULES + ("reco_ref.memroy.cli",))
    with pytest.raises(ModuleNotFoundError, match=r"VERB_MODULES lists 'reco_ref\.memroy\.cli', which does not exist"):
        cli.build_parser()


def test_verb_module_without_register_is_an_error(monkeypatch):
    monkeypatch.setattr(cli, "VERB_MODULES", ("reco_ref.errors",))
    with pytest.raises(AttributeError, match="defines no register"):
        cli.build_parser()


def test_a_verb_module_whose_dependency_is_missing_keeps_its_own_error(monkeypatch, tmp_path):
    (tmp_path / "verbs_needing_x.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli, "VERB_MODULES", ("verbs_needing_x",))
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency_xyz") as info:
        cli.build_parser()
    assert "VERB_MODULES" not in str(info.value)
