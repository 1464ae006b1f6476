"""The README's fusion example runs as written (in a temp dir) and does what its comments say."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_fusion_example_runs(tmp_path, monkeypatch):
    text = README.read_text(encoding="utf-8")
    section = text[text.index("<!-- BEGIN fusion -->") : text.index("<!-- END fusion -->")]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(code, "README.md[fusion]", "exec"), ns)
    q, out, grads, phi = ns["q"], ns["out"], ns["grads"], ns["phi"]
    np.testing.assert_array_equal(out, q / np.linalg.norm(q, axis=1, keepdims=True))
    assert set(grads) == set(phi) and all(grads[n].shape == phi[n].shape for n in phi)
    assert (tmp_path / "phi_image.npz").is_file() and ns["config"].heads == 8
