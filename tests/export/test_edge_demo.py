"""The edge path on the shipped demo data: encode → exact search → fuse with backend "onnx" predicts as "numpy"."""

from __future__ import annotations

import numpy as np
import pytest
from export_testlib import nonidentity_params

pytest.importorskip("onnx")

from reco_ref.eval.data import SHIPPED_PROMPT, shipped_data  # noqa: E402
from reco_ref.encoders import load  # noqa: E402
from reco_ref.export.fusion import attach_in_memory  # noqa: E402
from reco_ref.fusion import fusion_forward  # noqa: E402

K = 10


def _topk(queries: np.ndarray, base: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k rows [Q,k] and a mask (all valid here)."""
    s = queries @ base.T  # [Q,M]
    rows = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return rows, np.ones(rows.shape, bool)


def test_onnx_backend_predicts_like_numpy_on_demo_data():
    ds = shipped_data()
    enc = load("reco-mini")
    paths = [it["image"] for it in ds["memory"]] + [it["image"] for it in ds["queries"]]
    img, keys = enc.encode_images(paths, with_keys=True)  # [M+Q,D], [M+Q,Dk]
    n_mem = len(ds["memory"])
    mem_img, q_img, mem_keys, q_keys = img[:n_mem], img[n_mem:], keys[:n_mem], keys[n_mem:]
    mem_txt = enc.encode_texts([it["caption"] for it in ds["memory"]])  # [M,D]
    cls = enc.encode_texts([SHIPPED_PROMPT.format(c) for c in ds["class_names"]])  # [C,D]
    # uni-modal search, cross-modal fusion (spec §1)
    rows_i, m_i = _topk(q_keys, mem_keys, K)
    rows_t, m_t = _topk(cls, mem_txt, K)
    phi_i, phi_t = nonidentity_params(enc.dim, 8, 0), nonidentity_params(enc.dim, 8, 1)
    attach_in_memory(phi_i, phi_t)
    preds, outs = {}, {}
    for backend in ("numpy", "onnx"):
        v_bar, _ = fusion_forward(phi_i, q_img, mem_txt[rows_i], m_i, backend=backend)  # [Q,D]
        t_bar, _ = fusion_forward(phi_t, cls, mem_img[rows_t], m_t, backend=backend)  # [C,D]
        outs[backend] = (v_bar, t_bar)
        preds[backend] = np.argmax(v_bar @ t_bar.T, axis=1)  # [Q]
    frozen = np.argmax(q_img @ cls.T, axis=1)
    assert not np.array_equal(preds["numpy"], frozen) or not np.allclose(outs["numpy"][0], q_img, atol=1e-3)  # φ acts
    np.testing.assert_array_equal(preds["onnx"], preds["numpy"])
    for a, b in zip(outs["onnx"], outs["numpy"]):
        assert np.abs(a - b).max() <= 1e-5
