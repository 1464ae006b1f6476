"""Subprocess side of test_fuzz_memory_files: open each case directory and use it as a reader would.

``python memory_runner.py VERIFY CASE_DIR...`` prints one JSON line per case: ``{"case", "outcome":
"ok"|"error", "msg"}``.  Named errors (RecoError) are outcomes; anything else escapes with its traceback
(the test then fails), and a segfault kills the process (the test sees a negative return code).
"""

from __future__ import annotations

import json
import sys

import numpy as np

from reco_ref.errors import RecoError
from reco_ref.memory import open_memory, retrieve


def use(case: str, verify) -> None:
    mem = open_memory(case, verify=verify)
    n = len(mem)
    for modality in ("image", "text"):
        vecs = np.asarray(mem.vectors(modality)[: min(n, 8)], np.float32)
        q = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
        for exact in (False, True):
            rows, scores, valid = mem.search(q, modality=modality, k=5, exact=exact)
            assert rows.shape[1] == min(5, n) and ((rows[valid] >= 0) & (rows[valid] < n)).all()
            assert np.isfinite(scores[valid]).all() and (rows[~valid] == -1).all()
            metas = mem.metadata(rows[valid])
            assert all(m is not None and m["row"] == r for m, r in zip(metas, rows[valid].tolist()))
        nb, ok, r = retrieve(mem, q, modality, k=3)
        assert np.isfinite(nb).all()
    mem.info()
    mem.failures()


if __name__ == "__main__":
    verify = {"sha256": True, "size": "size", "none": False}[sys.argv[1]]
    for case in sys.argv[2:]:
        try:
            use(case, verify)
            rec = {"case": case, "outcome": "ok", "msg": ""}
        except RecoError as exc:
            rec = {"case": case, "outcome": "error", "msg": str(exc)}
        print(json.dumps(rec), flush=True)
