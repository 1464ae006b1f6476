"""Where a relevance module's gate sits, and which queries it keeps (docs/training.md, "Do no harm, second pass").

For each weights file: the image module's threshold ``f* = (γ − ln k)/β`` (mean over heads; the layer keeps its
query while every neighbour's feature is below it) and, for the demo's clip-art (195 images, ``weights/demo``) and
reco-mini's held-out OpenClipart drawings, each retrieving from Flowers-102 train + CUB-100 train joined: the median
top-1 feature ``(s − center)/width`` against that memory's own map, the share of queries whose gate exceeds one
half, and the median gate. A diagnosis only: nothing is selected on it.

    python3 scripts/gate_threshold.py --work WORK --held HELD weights/reco-mini-fusion/fusion.npz [more.npz ...]

``WORK`` = the ``--work`` folder of ``train_reco_mini_fusion.py`` (its cached arrays and memories); ``HELD`` = the
held-out drawings memory (``build_generic_memory.py --heldout``). ``--step0`` adds the untrained start of the first
file's recipe.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("weights", nargs="+")
    ap.add_argument("--work", required=True)
    ap.add_argument("--held", required=True, help="held-out drawings memory (build_generic_memory.py --heldout)")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--cache", default=str(ROOT.parent / "cache" / "emb"))
    ap.add_argument("--step0", action="store_true")
    ap.add_argument("--k", type=int, default=10)
    a = ap.parse_args(argv)

    import train_reco_mini_fusion as T
    from reco_ref.encoders import load
    from reco_ref.memory.score_map import memory_score_map
    from reco_ref.train.loop import TrainConfig, step0_weights
    from reco_ref.reco.refine import refine
    from reco_ref.reco.weights import load_reco_weights

    enc = load("reco-mini")
    work = Path(a.work)
    ds = {n: T.Dataset(n, Path(a.data), Path(a.cache), enc) for n in T.DATASETS}
    mem = T.union_memory(work, ds, enc)
    img, keys, _, _ = T.demo_images(work, enc)
    dr = T.drawings(a.held, enc, work)
    center, width = memory_score_map(mem, "image")
    sets = {"clip-art": (img, keys), "drawings": (dr["image"], dr["keys"])}
    ws = [(p, load_reco_weights(p)) for p in a.weights]
    if a.step0:
        w = ws[0][1]
        fields = TrainConfig.__dataclass_fields__
        cfg = TrainConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in w.meta["recipe"].items()
                             if k in fields})
        ws.insert(0, ("step 0 of " + Path(ws[0][0]).name, step0_weights(w, cfg)))
    print(f"memory {mem.root}: image map centre {center:.4f}, width {width:.4f}")
    for name, w in ws:
        b = np.asarray(w.image["rel_beta"], np.float64)
        g = np.asarray(w.image["rel_gamma"], np.float64)
        line = f"{name}: beta {b.mean():.2f} gamma {g.mean():.2f} threshold f* {((g - np.log(a.k)) / b).mean():+.2f}"
        for sname, (q, qk) in sets.items():
            _, _, _, gate = refine(w.image, mem, q, "image", search_queries=qk, k=a.k, backend="numba",
                                   with_gate=True)
            top = mem.search(qk, "image", k=1)[1][:, 0]
            line += (f" | {sname}: top-1 feature median {np.median((top - center) / width):+.2f}, gate > 0.5 "
                     f"{np.mean(gate > 0.5):.2f}, median gate {np.median(gate):.3f}")
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
