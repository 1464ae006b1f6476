#!/usr/bin/env python3
"""The memory-attention classifier's experiments (issue 10; results in docs/classify.md), resumable, run by run.

    python3 scripts/make_lt_splits.py --out /work/tmp_classify/lt
    nice -n 10 python3 scripts/classify_experiments.py --lt /work/tmp_classify/lt --work /work/tmp_classify/exp
    nice -n 10 python3 scripts/classify_experiments.py ... --only flowers102-r10/mem-b   # one row again

Each trained row runs exactly what ``reco-ref classify train`` / ``eval`` run (the library functions behind the
CLI, :mod:`reco_ref.classify.commands`), with one difference: the images' reco-mini embeddings and search keys
come from precomputed arrays (``--emb``, rows in the shared manifests' order) instead of running the image encoder
on every image again — :class:`ArrayEncoder` has reco-mini's fingerprint and returns those rows for the files
asked (the arrays equal reco-mini's output bit for bit; ``--check-encoder`` re-encodes a few images to show it).
The printed CLI command of each row gives the same result from the images (slower: ~60 ms an image here).

Memories (built once under WORK/mem from the same arrays; captions ``"a photo of a {class_name}."`` encoded by
reco-mini's text tower; no label stored in any memory):
  a   the long-tailed train split itself (image + caption); the training images are in it → self-exclusion
  b   the full (balanced) train split of the same dataset as image–caption pairs
  c   irrelevant: every image + caption of the *other* shared dataset (birds for flowers, flowers for birds)
  d   b plus irrelevant items from c, as many as b has where c has enough (CUB: 50 %; Flowers: all 5,902 CUB
      items against 6,552 relevant = 47.4 %)
Rows per (dataset, ratio): no-memory classifier; memory attention over a/b/c/d; uniform average of the
neighbours' values (attention removed) over b and d; k-NN vote (k = 10) over a, b, d (uses the memory rows'
labels, which the attention classifier never sees); 20 % and 40 % symmetric label noise, no-memory and mem-b.
[ours] rows: ``readout-b`` (+ the score readout), ``readonly-b`` (the readout without the attention module); suffix
``-pinit``: the linear head starts at the logistic probe, ``-prinit``: at the class prompts' text embeddings
(``--head-init probe|prompts``).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from reco_ref.classify.commands import eval_from_manifest, train_from_manifest  # noqa: E402
from reco_ref.classify.report import markdown_table, write_png  # noqa: E402
from reco_ref.classify.train import ClassifyConfig, shot_groups  # noqa: E402
from reco_ref.eval.data import own_rows, read_split  # noqa: E402
from reco_ref.io import atomic_write_json, atomic_write_text  # noqa: E402

DATASETS = ("flowers102", "cub100")
OTHER = {"flowers102": "cub100", "cub100": "flowers102"}
RATIOS = (10, 50)
EPOCHS = {"cub100": 8, "flowers102": 3}
TEMPLATE = "a photo of a {class_name}."


class ArrayEncoder:
    """reco-mini with its image tower replaced by a lookup into precomputed rows (same fingerprint, same bits)."""

    def __init__(self, encoder, lookup: dict[str, tuple[np.ndarray, np.ndarray]]):
        self.enc, self.lookup = encoder, lookup
        self.name, self.fingerprint, self.dim, self.key_dim = encoder.name, encoder.fingerprint, encoder.dim, \
            encoder.key_dim

    def encode_images(self, files, batch_size=64, with_keys=False, progress=False, **kw):
        rows = [self.lookup[str(Path(f).resolve())] for f in files]
        img = np.stack([r[0] for r in rows]).astype(np.float32)
        keys = np.stack([r[1] for r in rows]).astype(np.float32)
        return (img, keys) if with_keys else img

    def encode_texts(self, texts, batch_size=256):
        return self.enc.encode_texts(texts, batch_size=batch_size)


def shared_rows(data: Path, name: str) -> list[dict]:
    with open(data / name / "manifest.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        r["path"] = str((data / name / r["file"]).resolve())
    return rows


def caption_embeddings(encoder, rows: list[dict]) -> np.ndarray:
    names = sorted({r["class_name"] for r in rows})
    emb = dict(zip(names, encoder.encode_texts([TEMPLATE.format(class_name=n) for n in names])))
    return np.stack([emb[r["class_name"]] for r in rows]).astype(np.float32)


def build_memories(work: Path, data: Path, lt: Path, encoder, emb: Path) -> dict[str, np.ndarray]:
    """Build every memory once; returns memory name → int64 label of each row (-1: irrelevant item)."""
    from reco_ref.memory import Memory, build_memory_from_arrays

    labels = {}
    rows = {d: shared_rows(data, d) for d in DATASETS}
    arrays = {d: (np.load(emb / d / "image.npy"), np.load(emb / d / "keys.npy")) for d in DATASETS}
    text = {d: caption_embeddings(encoder, rows[d]) for d in DATASETS}
    rng = np.random.default_rng(0)
    for d in DATASETS:
        index = {r["path"]: i for i, r in enumerate(rows[d])}
        train = [i for i, r in enumerate(rows[d]) if r["split"] == "train"]
        other = list(range(len(rows[OTHER[d]])))
        n_irr = min(len(train), len(other))
        irr = np.sort(rng.permutation(other)[:n_irr]).tolist()
        plans = {"b": [(d, i) for i in train], "c": [(OTHER[d], i) for i in other],
                 "d": [(d, i) for i in train] + [(OTHER[d], i) for i in irr]}
        for ratio in RATIOS:
            lt_rows = [r for r in csv.DictReader(open(lt / f"{d}-lt-r{ratio}" / "manifest.csv"))
                       if r["split"] == "train"]
            plans[f"a-r{ratio}"] = [(d, index[str((lt / f"{d}-lt-r{ratio}" / r["file"]).resolve())]) for r in lt_rows]
        for tag, plan in plans.items():
            name = f"{d}-{tag}"
            labels[name] = np.array([int(rows[s][i]["label"]) if s == d else -1 for s, i in plan], np.int64)
            out = work / "mem" / name
            try:
                Memory.open(out, encoder=encoder, verify="size")
                continue
            except Exception:  # not built yet (or interrupted: resume below)
                pass
            img = np.stack([arrays[s][0][i] for s, i in plan])
            keys = np.stack([arrays[s][1][i] for s, i in plan])
            txt = np.stack([text[s][i] for s, i in plan])
            items = [{"image": rows[s][i]["path"], "caption": TEMPLATE.format(class_name=rows[s][i]["class_name"]),
                      "source": f"{s}:{rows[s][i]['file']}", "label": None, "split": None, "tags": None}
                     for s, i in plan]
            t0 = time.time()
            # one index thread: the same HNSW graph on every build, so a fresh WORK folder reproduces the tables
            build_memory_from_arrays(out, img, txt, keys=keys, items=items, name=encoder.name,
                                     fingerprint=encoder.fingerprint, resume=out.exists(), progress=False,
                                     num_threads=INDEX_THREADS)
            print(f"memory {name}: {len(plan)} items ({time.time() - t0:.0f} s)", flush=True)
    return labels


def knn_vote(memory, mem_labels: np.ndarray, keys: np.ndarray, k: int) -> np.ndarray:
    """Majority label of the k nearest memory items (irrelevant items do not vote; ties → the nearer class)."""
    rows, scores, valid = memory.search(keys, modality="image", k=k, exclude=own_rows(memory, keys))
    pred = np.full(len(keys), -1, np.int64)
    for i in range(len(keys)):
        labs = [mem_labels[r] for r, v in zip(rows[i], valid[i]) if v and mem_labels[r] >= 0]
        if labs:
            u, c = np.unique(labs, return_counts=True)
            top = set(u[c == c.max()].tolist())
            pred[i] = next(lab for lab in labs if lab in top)  # neighbours come nearest first
    return pred


SETTINGS = [("cub100", 50), ("cub100", 10), ("flowers102", 50), ("flowers102", 10)]
#: hnswlib threads of the memories this script builds: one builds the same graph every time (several race on the
#: order of insertion, and a rebuilt memory then moves a cell by a test image or two)
INDEX_THREADS = 1
#: display order of a setting's rows
ROW_ORDER = ["no-memory", "no-memory-pinit", "no-memory-prinit", "mem-a", "mem-b", "mem-b-pinit", "mem-b-prinit",
             "mem-c", "mem-d", "uniform-b", "uniform-d", "readout-b", "readout-b-prinit", "readonly-b",
             "readonly-b-pinit", "readonly-b-prinit",
             "no-memory-pinit-bv", "no-memory-pinit-la-bv", "mem-b-pinit-bv", "mem-b-pinit-la-bv",
             "readout-b-pinit-bv", "readout-b-pinit-la-bv", "readonly-b-pinit-bv", "readonly-b-pinit-la-bv",
             "no-memory-pinit-la-xf", "mem-b-pinit-la-xf", "readout-b-pinit-la-xf", "readonly-b-pinit-la-xf",
             "readout-b-lab-pinit-la-xf", "readonly-b-lab-pinit-la-xf", "readout-b-lab-pinit-la-bv",
             "readonly-b-lab-pinit-la-bv",
             "knn-a", "knn-b", "knn-d", "no-memory-noise20", "mem-b-noise20", "no-memory-noise40", "mem-b-noise40",
             "readout-c-pinit-la-xf", "readout-d-lab-pinit-la-xf", "no-memory-noise20-pinit-la-xf",
             "readout-b-noise20-lab-pinit-la-xf", "no-memory-noise40-pinit-la-xf", "readout-b-noise40-lab-pinit-la-xf"]


def _run(d: str, ratio: int, row: str) -> dict:
    r = dict(id=f"{d}-r{ratio}/{row}", d=d, ratio=ratio, row=row, mem=None)
    if row.endswith("-bv"):  # [ours] balanced validation: tail-covering held-out rows, class-mean top-1
        r["validation"] = "balanced"
        row = row[:-3]
    if row.endswith("-xf"):  # [ours] every choice by cross-fitting the training rows (5 folds)
        r["validation"] = "crossfit"
        row = row[:-3]
    if row.endswith("-la"):  # [ours] logit-adjusted loss, tau = 1
        r["logit_adjust"] = 1.0
        row = row[:-3]
    for suffix, init in (("-pinit", "probe"), ("-prinit", "prompts")):  # [ours] where the linear head starts
        if row.endswith(suffix):
            r["head_init"] = init
            row = row[: -len(suffix)]
    if row.endswith("-lab"):  # [ours] the label readout: the items' labels instead of their captions
        r["readout_values"] = "label"
        row = row[:-4]
    base, _, noise = row.partition("-noise")
    if noise:
        r["noise"] = int(noise) / 100
    if base.startswith(("mem-", "uniform-", "knn-", "readout-", "readonly-")):
        r["mem"] = base[-1]
    if base.startswith("uniform-"):
        r["attention"] = "uniform"
    if base.startswith(("readout-", "readonly-")):  # [ours] the score readout, with / without the attention module
        r["readout"] = True
        if base.startswith("readonly-"):
            r["attention"] = "none"
    if base.startswith("knn-"):
        r["knn"] = True
    return r


def run_plan() -> list[dict]:
    """Every run, most important first (the whole matrix takes longer than one sitting on a shared machine)."""
    tiers = [["no-memory", "mem-b", "knn-b", "uniform-b", "mem-d", "uniform-d", "knn-d", "mem-c", "readout-b",
              "readonly-b", "no-memory-pinit", "mem-b-pinit", "readonly-b-pinit", "no-memory-prinit", "mem-b-prinit",
              "readout-b-prinit", "readonly-b-prinit", "no-memory-pinit-bv", "no-memory-pinit-la-bv",
              "mem-b-pinit-bv", "mem-b-pinit-la-bv", "readout-b-pinit-bv", "readout-b-pinit-la-bv",
              "readonly-b-pinit-bv", "readonly-b-pinit-la-bv", "no-memory-pinit-la-xf", "mem-b-pinit-la-xf",
              "readout-b-pinit-la-xf", "readonly-b-pinit-la-xf", "readout-b-lab-pinit-la-xf",
              "readonly-b-lab-pinit-la-xf", "readout-b-lab-pinit-la-bv", "readonly-b-lab-pinit-la-bv"],
             ["mem-a", "knn-a", "no-memory-noise20", "mem-b-noise20", "no-memory-noise40", "mem-b-noise40",
              # [ours] the fourth pass's pick on memories c (irrelevant: the label readout refuses it, no caption
              # names a class; the caption readout runs) and d (polluted), and under label noise
              "readout-c-pinit-la-xf", "readout-d-lab-pinit-la-xf", "readout-b-noise20-lab-pinit-la-xf",
              "no-memory-noise20-pinit-la-xf", "readout-b-noise40-lab-pinit-la-xf", "no-memory-noise40-pinit-la-xf"]]
    cub = [_run(d, r, row) for tier in tiers for d, r in SETTINGS if d == "cub100" for row in tier]
    return cub + [_run(d, r, row) for tier in tiers for d, r in SETTINGS if d != "cub100" for row in tier]


def mem_name(run: dict) -> str | None:
    if run["mem"] is None:
        return None
    return f"{run['d']}-{run['mem']}" + (f"-r{run['ratio']}" if run["mem"] == "a" else "")


def cli_commands(run: dict, lt: Path, work: Path, cfg: ClassifyConfig) -> str:
    m = lt / f"{run['d']}-lt-r{run['ratio']}" / "manifest.csv"
    w = work / "runs" / (run["id"].replace("/", "_") + ".npz")
    mem = work / "mem" / (mem_name(run) or f"{run['d']}-b")
    opts = (f" --epochs {cfg.epochs} --width {cfg.width} --lr {cfg.lr:g} -k {cfg.k} --logit-scale {cfg.logit_scale:g}"
            f" --backend {cfg.backend}" + (f" --seed {cfg.seed}" if cfg.seed else ""))
    if run["mem"] is None:
        opts += " --no-memory"
    if run.get("attention") in ("uniform", "none"):
        opts += f" --attention {run['attention']}"
    if run.get("readout"):
        opts += " --readout"
    if run.get("head_init"):
        opts += f" --head-init {run['head_init']}"
    if run.get("noise"):
        opts += f" --label-noise {run['noise']}"
    if run.get("logit_adjust"):
        opts += f" --logit-adjust {run['logit_adjust']:g}"
    if run.get("validation"):
        opts += f" --validation {run['validation']}"
    if run.get("readout_values"):
        opts += f" --readout-values {run['readout_values']}"
    return (f"reco-ref classify train --dataset {m} --split train --memory {mem} --out {w}{opts} && "
            f"reco-ref classify eval --weights {w} --dataset {m} --split test --memory {mem} --json "
            f"{w.with_suffix('.json')}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lt", required=True, help="output folder of scripts/make_lt_splits.py")
    ap.add_argument("--work", required=True, help="folder for memories, weights and results (outside the repo)")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"), help="the shared data folder")
    ap.add_argument("--emb", default="/work/cache/emb", help="precomputed reco-mini image.npy / keys.npy per set")
    ap.add_argument("--only", nargs="*", help="run ids to (re)run, e.g. cub100-r50/mem-b; 'cub100-r50/' = all of a "
                                              "setting")
    ap.add_argument("--epochs", type=int, help="epochs per run (default: cub100 8, flowers102 3 — a similar "
                                                "number of steps: 48–72 vs 93–120; the epoch kept is chosen on "
                                                "validation rows)")
    ap.add_argument("--width", type=int, default=64, help="attention width (default 64)")
    ap.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate (default 2e-3)")
    ap.add_argument("-k", type=int, default=10, help="memory items per query (default 10)")
    ap.add_argument("--backend", default="numpy", choices=("numpy", "numba"))
    ap.add_argument("--seed", type=int, default=0,
                    help="seed of init, batches, hold-out and noise (default 0; another --work per seed)")
    ap.add_argument("--check-encoder", action="store_true", help="re-encode 4 images per set and compare")
    a = ap.parse_args(argv)
    from reco_ref.encoders import load

    lt, work, data, emb = Path(a.lt), Path(a.work), Path(a.data), Path(a.emb)
    real = load("reco-mini")
    lookup = {}
    for d in DATASETS:
        img, keys = np.load(emb / d / "image.npy"), np.load(emb / d / "keys.npy")
        rows = shared_rows(data, d)
        if len(rows) != len(img):
            raise SystemExit(f"{emb / d}: {len(img)} rows but {data / d}/manifest.csv has {len(rows)}")
        lookup.update({r["path"]: (img[i], keys[i]) for i, r in enumerate(rows)})
        if a.check_encoder:
            idx = [0, 1, len(rows) // 2, len(rows) - 1]
            e, k = real.encode_images([rows[i]["path"] for i in idx], with_keys=True)
            print(f"{d}: max |reco-mini − cached| image {np.abs(e - img[idx]).max():.2e}, keys "
                  f"{np.abs(k - keys[idx]).max():.2e}")
    enc = ArrayEncoder(real, lookup)
    mem_labels = build_memories(work, data, lt, real, emb)
    from reco_ref.memory import Memory

    results_path = work / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    (work / "runs").mkdir(parents=True, exist_ok=True)
    for run in run_plan():
        if a.only and not any(run["id"] == p or (p.endswith("/") and run["id"].startswith(p)) for p in a.only):
            continue
        if run["id"] in results and not a.only:
            continue
        cfg = ClassifyConfig(memory=run["mem"] is not None, attention=run.get("attention", "softmax"),
                             epochs=a.epochs or EPOCHS[run["d"]], width=a.width, lr=a.lr, k=a.k, backend=a.backend,
                             seed=a.seed, readout=bool(run.get("readout")), head_init=run.get("head_init", "random"),
                             logit_adjust=run.get("logit_adjust", 0.0), validation=run.get("validation", "top1"),
                             readout_values=run.get("readout_values", "caption"))
        m = lt / f"{run['d']}-lt-r{run['ratio']}" / "manifest.csv"
        w = work / "runs" / (run["id"].replace("/", "_") + ".npz")
        t0 = time.time()
        if run.get("knn"):
            memory = Memory.open(work / "mem" / mem_name(run), encoder=real, verify="size")
            tr, te = read_split(m, "train"), read_split(m, "test")
            _, keys = enc.encode_images(te.files, with_keys=True)
            pred = knn_vote(memory, mem_labels[mem_name(run)], keys, cfg.k)
            counts = np.bincount(tr.labels, minlength=tr.n_classes)
            hit, g = pred == te.labels, shot_groups(counts)[te.labels]
            r = {"top1": float(hit.mean()), "n": len(hit), "classes": tr.n_classes,
                 **{n: float(hit[g == i].mean()) if (g == i).any() else None
                    for i, n in enumerate(("many", "medium", "few"))}}
            cmd = f"python3 scripts/classify_experiments.py --lt {lt} --work {work} --only {run['id']}"
        else:
            mem_dir = work / "mem" / mem_name(run) if run["mem"] else None
            meta = train_from_manifest(m, "train", mem_dir, w, cfg, encoder=enc, label_noise=run.get("noise", 0.0),
                                       progress=False, quiet=True)
            r = eval_from_manifest(w, m, "test", mem_dir, w.with_suffix(".json"), encoder=enc, progress=False,
                                   quiet=True)
            r["best_epoch"], r["val_top1"], r["validation"] = meta["best_epoch"], meta["val_top1"], meta["validation"]
            # every epoch's validation top-1 (epoch 0: the start of a --head-init run), what a variant is chosen on
            r["val_by_epoch"] = {h["epoch"]: h["val_top1"] for h in meta["history"] if "val_top1" in h}
            if "crossfit" in meta:  # [ours] the pooled out-of-fold record of each choice
                r["crossfit"] = meta["crossfit"]
            if "readout_scale_start" in meta:  # [ours] the readout's start scale and what validation saw of each
                r["readout_scale_start"], r["readout_scale_val"] = meta["readout_scale_start"], meta["readout_scale_val"]
            cmd = cli_commands(run, lt, work, cfg)
        r["seconds"] = round(time.time() - t0, 1)
        r["command"] = cmd
        results[run["id"]] = r
        atomic_write_json(results_path, results)
        print(f"{run['id']:40s} top1 {100 * r['top1']:5.1f}  many {r['many'] and 100 * r['many']}  medium "
              f"{r['medium'] and 100 * r['medium']}  few {r['few'] and 100 * r['few']}  ({r['seconds']} s)", flush=True)
    md = []
    for d in DATASETS:
        for ratio in RATIOS:
            s = f"{d}-r{ratio}"
            rows = [(row, results[f"{s}/{row}"]) for row in ROW_ORDER if f"{s}/{row}" in results]
            if rows:
                md.append(f"### {d}-LT, imbalance ratio {ratio}\n\n" + markdown_table(rows))
                write_png(work / f"{s}.png", rows, title=f"{d}-LT r{ratio}: top-1 (%)")
    atomic_write_text(work / "results.md", "\n".join(md))
    print(f"wrote {results_path} and {work / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
