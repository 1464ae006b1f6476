#!/usr/bin/env python3
"""Why does training lower held-out-dataset accuracy? Curves from step 0 for three recipes (issue 18, Build 1).

Trains on CUB-100 train (a seeded 90 %) and logs, every ``--every`` steps from step 0:

* zero-shot top-1 on a held-out **dataset** (Flowers-102 ``valid``: never trained on, never used to choose
  anything) and on the training dataset's held-out 10 % of rows, each with image side only / text side only / both;
* how far each parameter group moved from its init (‖θ − θ₀‖ / ‖θ₀‖, or ‖θ − θ₀‖ where θ₀ = 0);
* the query row's attention: entropy (nats) and the share on the query token, on the held-out dataset;
* the norm of the fused update at the query token, ‖Y₀ − x‖, on the held-out dataset (image side and text side);
* each RECO loss term on the training batch, ℓ(v̄,t̄), ℓ(v̄,t), ℓ(v,t̄).

Recipes: ``paper`` (identity init, no relevance, every array trains, lr 2e-3 — the recipe shipped before),
``copy-all`` (copy init + relevance bias, every array trains, lr 2e-3), ``relevance`` (copy init + relevance, only
β, γ, τ train, lr 0.05, half the batches irrelevant-memory episodes: the shipped recipe). Search is exact, captions
"a photo of a {class}.", k = 10, batch 64 (one row per caption), AdamW as spec §3.

    python3 scripts/diagnose_transfer.py --out docs/diagnose_transfer      # JSON + PNG, ~5 min on 2 cores
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from reco_ref.fusion import RELEVANCE_NAMES, fusion_backward, fusion_forward, init_params  # noqa: E402
from reco_ref.io import atomic_write_bytes, atomic_write_json  # noqa: E402
from reco_ref.train.losses import DEFAULT_TAU, reco_loss_backward, reco_loss_forward  # noqa: E402
from reco_ref.train.optim import adamw_init, adamw_step, lr_at  # noqa: E402
from reco_ref.train.pairs import unrelated_score_stats  # noqa: E402

K = 10
CAPTION = "a photo of a {}."


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def load(name, data: Path, cache: Path, enc):
    rows = list(csv.DictReader(open(data / name / "manifest.csv", newline="", encoding="utf-8")))
    labels = np.array([int(r["label"]) for r in rows])
    split = np.array([r["split"] for r in rows])
    names = {}
    for r in rows:
        names.setdefault(int(r["label"]), r["class_name"])
    cls = unit(np.asarray(enc.encode_texts([CAPTION.format(names[i]) for i in range(len(names))]), np.float32))
    return {"labels": labels, "split": split, "cls": cls, "image": np.load(cache / name / "image.npy"),
            "keys": unit(np.load(cache / name / "keys.npy")), "text": cls[labels]}


def knn(q, m, k, exclude_self=False, exclude_mask=None):
    """Exact top-k by cosine: (rows [N,k], scores [N,k])."""
    s = q @ m.T
    if exclude_self:
        np.fill_diagonal(s, -np.inf)
    if exclude_mask is not None:
        s[exclude_mask] = -np.inf
    idx = np.argpartition(-s, k, axis=1)[:, :k]
    sc = np.take_along_axis(s, idx, 1)
    o = np.argsort(-sc, 1, kind="stable")
    return np.take_along_axis(idx, o, 1), np.take_along_axis(sc, o, 1).astype(np.float32)


def episodes(d, rows, irrelevant=False):
    """Training pairs of ``rows`` retrieving from a memory of the same rows (own row excluded); ``irrelevant``:
    every row of the query's class excluded too (the best wrong neighbours)."""
    lab = d["labels"][rows]
    same = lab[:, None] == lab[None, :] if irrelevant else None
    ri, si = knn(d["keys"][rows], d["keys"][rows], K, exclude_self=True, exclude_mask=same)
    tt = unit(d["text"][rows]) + np.random.default_rng(0).uniform(0, 1e-6, (len(rows), 1)).astype(np.float32)
    rt, st = knn(unit(tt), unit(d["text"][rows]), K, exclude_self=True, exclude_mask=same)
    return {"v": d["image"][rows], "t": d["text"][rows], "nb_i": d["text"][rows][ri], "s_i": si,
            "nb_t": d["image"][rows][rt], "s_t": np.minimum(st, 1.0), "lab": lab + (10**6 if irrelevant else 0)}


def eval_set(d, q_rows, m_rows):
    ri, si = knn(d["keys"][q_rows], d["keys"][m_rows], K)
    rt, st = knn(d["cls"], unit(d["text"][m_rows]), K)
    return {"v": d["image"][q_rows], "y": d["labels"][q_rows], "cls": d["cls"], "nb_i": d["text"][m_rows][ri],
            "s_i": si, "nb_t": d["image"][m_rows][rt], "s_t": np.minimum(st, 1.0)}


def fwd(p, q, nb, s, backend):
    kw = {"scores": s} if "rel_beta" in p else {}
    return fusion_forward(p, np.ascontiguousarray(q, np.float32), np.ascontiguousarray(nb, np.float32), None,
                          backend=backend, **kw)


def measure(pi, pt, e, backend):
    out = {}
    vb, ci = fwd(pi, e["v"], e["nb_i"], e["s_i"], "numpy")
    tb, ct = fwd(pt, e["cls"], e["nb_t"], e["s_t"], "numpy")
    v, c = unit(e["v"]), unit(e["cls"])
    for mode, (a, b) in {"both": (vb, tb), "image": (vb, c), "text": (v, tb)}.items():
        out[f"top1_{mode}"] = float(((a @ b.T).argmax(1) == e["y"]).mean())
    for side, cache, x in (("image", ci, v), ("text", ct, c)):
        p0 = cache["att"]["p"][:, :, 0, :]  # [B,h,T] the query row
        out[f"entropy_{side}"] = float((-(p0 * np.log(np.maximum(p0, 1e-30))).sum(-1)).mean())
        out[f"query_share_{side}"] = float(p0[:, :, 0].mean())
        y0 = cache["l2"]["y"] * cache["l2"]["norm"]  # [B,D] Y at the query token
        out[f"update_norm_{side}"] = float(np.linalg.norm(y0 - x, axis=1).mean())
    return out


def groups_moved(p, p0):
    g = {"attention (w_q,w_k,b_q,b_k)": ("w_q", "w_k", "b_q", "b_k"), "values (w_v,b_v)": ("w_v", "b_v"),
         "output (w_o,b_o)": ("w_o", "b_o"), "mlp (w_1,b_1,w_2,b_2)": ("w_1", "b_1", "w_2", "b_2"),
         "layernorms": ("ln1_gamma", "ln1_beta", "ln2_gamma", "ln2_beta"), "type emb.": ("e_query", "e_neighbor"),
         "relevance (β,γ)": RELEVANCE_NAMES}
    out = {}
    for name, names in g.items():
        names = [n for n in names if n in p]
        if not names:
            continue
        d = np.sqrt(sum(float(((p[n] - p0[n]) ** 2).sum()) for n in names))
        base = np.sqrt(sum(float((p0[n] ** 2).sum()) for n in names))
        out[name] = d / base if base > 0 else d
    return out


def run(recipe, d_train, tr, ev, a):
    rel = recipe != "paper"
    stats_i, stats_t = unrelated_score_stats(d_train["keys"][tr]), unrelated_score_stats(d_train["text"][tr])
    kw = dict(init="copy", alpha=1.0, k=K, relevance=True) if rel else {}
    pi = init_params(768, 8, seed=0, **kw, **({"rel_center": stats_i[0], "rel_width": stats_i[1]} if rel else {}))
    pt = init_params(768, 8, seed=1, **kw, **({"rel_center": stats_t[0], "rel_width": stats_t[1]} if rel else {}))
    p0 = {"image": {n: x.copy() for n, x in pi.items()}, "text": {n: x.copy() for n, x in pt.items()}}
    src = episodes(d_train, tr)
    if recipe == "relevance":
        irr = episodes(d_train, tr, irrelevant=True)
        src = {k: np.concatenate([src[k], irr[k]]) for k in src}
    lr, only_rel = (0.05, True) if recipe == "relevance" else (2e-3, False)
    flat = {**{f"image.{n}": x for n, x in pi.items()}, **{f"text.{n}": x for n, x in pt.items()},
            "tau": np.array(DEFAULT_TAU)}
    opt = adamw_init(flat)
    rng = np.random.default_rng(0)
    log = []
    for step in range(a.steps + 1):
        if step % a.every == 0:
            rec = {"step": step, "tau": float(flat["tau"])}
            for name, e in ev.items():
                rec[name] = measure(pi, pt, e, a.backend)
            rec["moved_image"], rec["moved_text"] = groups_moved(pi, p0["image"]), groups_moved(pt, p0["text"])
            log.append(rec)
            print(recipe, step, {n: round(rec[n]["top1_both"], 3) for n in ev}, flush=True)
        if step == a.steps:
            break
        idx = rng.permutation(len(src["v"]))[: 4 * a.batch]
        _, first = np.unique(src["lab"][idx], return_index=True)
        idx = idx[np.sort(first)][: a.batch]
        v, t = src["v"][idx], src["t"][idx]
        vb, ci = fwd(pi, v, src["nb_i"][idx], src["s_i"][idx], a.backend)
        tb, ct = fwd(pt, t, src["nb_t"][idx], src["s_t"][idx], a.backend)
        loss, lc = reco_loss_forward(vb, tb, v, t, float(flat["tau"]))
        dvb, dtb, dtau = reco_loss_backward(lc)
        gi, gt = fusion_backward(pi, ci, dvb), fusion_backward(pt, ct, dtb)
        keep = (lambda n: n in RELEVANCE_NAMES) if only_rel else (lambda n: True)
        g = {**{f"image.{n}": x for n, x in gi.items() if keep(n)}, **{f"text.{n}": x for n, x in gt.items() if keep(n)},
             "tau": np.array(dtau)}
        adamw_step(flat, g, opt, lr_at(step, base_lr=lr, warmup_steps=10, total_steps=a.steps),
                   weight_decay=0.0 if only_rel else 0.2)
        if step % a.every == 0:
            log[-1]["loss_terms"] = [float(x) for x in lc["terms"]] if "terms" in lc else None
    return log


def plot(logs, out: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for recipe, log in logs.items():
        s = [r["step"] for r in log]
        for mode, ls in (("both", "-"), ("image", "--"), ("text", ":")):
            axes[0].plot(s, [r["heldout_dataset"][f"top1_{mode}"] for r in log], ls, label=f"{recipe} {mode}")
        axes[1].plot(s, [r["train_holdout_rows"]["top1_both"] for r in log], label=recipe)
        axes[2].plot(s, [r["heldout_dataset"]["update_norm_text"] for r in log], ":", label=f"{recipe} text")
        axes[2].plot(s, [r["heldout_dataset"]["update_norm_image"] for r in log], label=f"{recipe} image")
        axes[3].plot(s, [r["moved_text"].get("values (w_v,b_v)", 0) for r in log], ":", label=f"{recipe} text w_v")
        axes[3].plot(s, [r["moved_text"].get("output (w_o,b_o)", 0) for r in log], label=f"{recipe} text w_o")
    axes[0].set_title("held-out DATASET (Flowers valid) top-1")
    axes[1].set_title("training dataset, held-out rows (CUB 10 %)")
    axes[2].set_title("‖Y₀ − x‖ on the held-out dataset")
    axes[3].set_title("text module: relative move from init")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend(fontsize=6)
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    atomic_write_bytes(out.with_suffix(".png"), buf.getvalue())
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--cache", default="/work/cache/emb", help="cached reco-mini image.npy / keys.npy per dataset")
    ap.add_argument("--out", default=str(ROOT / "docs" / "diagnose_transfer"), help="writes OUT.json and OUT.png")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--every", type=int, default=25)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--backend", default="numba", choices=("numpy", "numba"))
    ap.add_argument("--recipes", default="paper,copy-all,relevance")
    a = ap.parse_args(argv)
    data, cache = Path(a.data), Path(a.cache)
    for n in ("flowers102", "cub100"):
        if not (data / n / "manifest.csv").is_file() or not (cache / n / "keys.npy").is_file():
            sys.exit(f"diagnose_transfer: error: {data / n / 'manifest.csv'} or {cache / n / 'keys.npy'} missing")
    from reco_ref.encoders import load as load_encoder

    enc = load_encoder("reco-mini")
    fl, cub = load("flowers102", data, cache, enc), load("cub100", data, cache, enc)
    train_rows = np.flatnonzero(cub["split"] == "train")
    pick = np.random.default_rng(0).permutation(len(train_rows))[: len(train_rows) // 10]
    ho = np.zeros(len(train_rows), bool)
    ho[pick] = True
    tr, cho = train_rows[~ho], train_rows[ho]
    ev = {"heldout_dataset": eval_set(fl, np.flatnonzero(fl["split"] == "valid"), np.flatnonzero(fl["split"] == "train")),
          "train_holdout_rows": eval_set(cub, cho, tr)}
    logs = {r: run(r, cub, tr, ev, a) for r in a.recipes.split(",") if r}
    out = Path(a.out)
    atomic_write_json(out.with_suffix(".json"), {"command": "python3 scripts/diagnose_transfer.py " + " ".join(argv or sys.argv[1:]),
                                                 "trained_on": "cub100 train (90 %)", "logs": logs})
    print("wrote", out.with_suffix(".json"), "and .png" if plot(logs, out) else "(no matplotlib: no PNG)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
