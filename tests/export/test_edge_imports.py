"""The edge path (encode -> search -> fuse with backend "onnx") runs with numpy, onnxruntime, hnswlib, Pillow only.

A child Python blocks imports of numba, llvmlite, scipy, onnx and torch, then encodes with reco-mini-int8, builds
and searches a small memory and fuses with attached exported graphs. docs/edge.md's install line relies on this.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]

BLOCK = r"""
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in ('numba', 'llvmlite', 'scipy', 'onnx', 'torch'):
            raise ImportError('blocked on the edge: ' + name)
sys.meta_path.insert(0, Block())
"""

CHILD = BLOCK + r"""
from reco_ref.eval.data import shipped_data
from reco_ref.encoders import load
from reco_ref.fusion import fusion_forward, load_param_set, onnx_backend
from reco_ref.memory import Memory, build_memory_from_arrays, retrieve
weights, graphs, out = sys.argv[1:4]
enc = load('reco-mini-int8', threads=2)
ds = shipped_data()
img, keys = enc.encode_images([it['image'] for it in ds['memory'][:12]], with_keys=True)
txt = enc.encode_texts([it['caption'] for it in ds['memory'][:12]])
build_memory_from_arrays(out, img, txt, keys=keys, name=enc.name, fingerprint=enc.fingerprint, progress=False)
mem = Memory.open(out, encoder=enc)
mods, _ = load_param_set(weights)
onnx_backend.attach(graphs, mods)
v, k = enc.encode_images([ds['queries'][0]['image']], with_keys=True)
r, m, _ = retrieve(mem, k, 'image', k=5)
v_bar, _ = fusion_forward(mods['image'], v, r, m, backend='onnx')
assert v_bar.shape == (1, 768)
print('EDGE-OK', sorted(x for x in sys.modules if x.split('.')[0] in ('numba', 'llvmlite', 'scipy', 'onnx')))
"""


def test_edge_path_needs_no_numba_scipy_onnx(tmp_path):
    pytest.importorskip("onnx")  # the parent exports the graphs (a build machine)
    from reco_ref.export.fusion import export_fusion
    from reco_ref.fusion import init_params, save_param_set

    save_param_set(tmp_path / "fusion.npz", {"image": init_params(768, 8, seed=0), "text": init_params(768, 8, seed=1)},
                   extras={"logit_scale": np.array(2.6592, np.float32)})
    export_fusion(tmp_path / "fusion.npz", tmp_path / "onnx")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "fusion.npz"), str(tmp_path / "onnx"),
                          str(tmp_path / "memory")], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert "EDGE-OK []" in res.stdout


CLI_CHILD = BLOCK + r"""
from reco_ref.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_edge_cli_verbs_run_without_numba_scipy_onnx(tmp_path):
    """The verbs docs/edge.md promises — encode, build-memory, memory-search, query (with the shipped fusion
    weights, NumPy backend) — in a child Python where numba, llvmlite, scipy, onnx and torch cannot be imported
    (issue 21: `query` used to fail on scipy's erf). Each exits 0 and prints no traceback."""
    demo = ROOT / "weights" / "demo"
    bird = sorted((demo / "images" / "bird").iterdir())[0]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    names = tmp_path / "names.txt"
    names.write_text("bird\nboat\ncar\ndog\nfish\n")
    runs = [
        ["encode", "--images", str(demo / "images" / "bird"), "--out", str(tmp_path / "birds.npy"), "--no-progress"],
        ["build-memory", "--pairs", str(demo / "pairs.csv"), "--out", str(tmp_path / "mem"), "--no-progress"],
        ["memory-search", str(tmp_path / "mem"), "--text", "a drawing of a bird.", "-k", "3"],
        ["query", str(bird), "--memory", str(tmp_path / "mem"), "-k", "5", "--class-names", str(names)],
    ]
    for argv in runs:
        r = subprocess.run([sys.executable, "-c", CLI_CHILD, *argv], env=env, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, (argv[0], r.stdout[-2000:], r.stderr[-2000:])
        assert "Traceback" not in r.stderr and "a bug" not in r.stderr, (argv[0], r.stderr[-2000:])
    assert "refined (RECO) top classes" in r.stdout  # the shipped fusion weights ran (NumPy GELU without SciPy)
