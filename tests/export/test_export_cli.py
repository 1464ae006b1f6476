"""``reco-ref export-clip`` lives in the export room; without its extra it is a one-line error."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from reco_ref import cli


def test_export_clip_verb_is_registered_by_the_export_room():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "verb")
    assert "export-clip" in sub.choices and "reco_ref.export.cli" in cli.VERB_MODULES


def test_building_the_cli_loads_no_export_framework():
    code = ("import sys, reco_ref.cli as c; c.build_parser(); "
            "print(sorted(m for m in ('torch', 'onnx', 'open_clip') if m in sys.modules))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.strip()
    assert out == "[]", out


@pytest.mark.skipif(importlib.util.find_spec("open_clip") is not None, reason="open_clip_torch is installed here")
def test_export_clip_without_the_extra_is_a_one_line_error(tmp_path, capsys):
    assert cli.main(["export-clip", "--model", "ViT-B-32", "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("reco-ref export-clip: error:") and "clip-export" in err and "\n" not in err
    assert not (tmp_path / "x").exists()
