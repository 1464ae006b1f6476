"""docs/fusion.md's first example runs as written (in a temp dir) and does what its comments say.

(tests/docs runs every block of every page; this one also checks the values the comments promise.)
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

PAGE = Path(__file__).resolve().parents[2] / "docs" / "fusion.md"


def test_docs_fusion_example_runs(tmp_path, monkeypatch):
    code = re.search(r"```python\n(.*?)```", PAGE.read_text(encoding="utf-8"), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(code, "docs/fusion.md", "exec"), ns)
    q, out, grads, phi = ns["q"], ns["out"], ns["grads"], ns["phi"]
    np.testing.assert_array_equal(out, q / np.linalg.norm(q, axis=1, keepdims=True))
    assert set(grads) == set(phi) and all(grads[n].shape == phi[n].shape for n in phi)
    assert (tmp_path / "phi_image.npz").is_file() and ns["config"].heads == 8
