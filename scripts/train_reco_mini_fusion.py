#!/usr/bin/env python3
"""Rebuild the shipped RECO fusion weights for reco-mini (weights/reco-mini-fusion/) and the leave-one-dataset-out runs.

Inputs (pinned by sha256, checked before anything runs; never copied into the repository):

* ``../shared/data/{flowers102,cub100}/manifest.csv`` — the dataset manifests (labels, class names, splits);
* ``$CACHE/{flowers102,cub100}/{image,keys}.npy`` — reco-mini image embeddings [N,768] and image search keys
  [N,1024], rows in manifest order (``--cache``, default ``/work/cache/emb``; ``reco-ref build-memory`` on the
  manifests computes the same arrays from the images).

Caption embeddings ("a photo of a {class_name}.") are computed here with reco-mini's text encoder. Memories are
built into ``--work`` (default a temp folder) from those arrays. Runs (``--runs``, default all three):

* ``ship``          — trained on Flowers-102 train + CUB-100 train (a seeded 90 %; the other 10 % validates),
                      validated on Flowers-102 ``valid`` + the CUB hold-out → ``weights/reco-mini-fusion/``;
* ``lodo-flowers``  — for Flowers-102 numbers: trained on CUB-100 only (90 %, 10 % validates): never saw a
                      flower image or a flower class name;
* ``lodo-cub``      — for CUB-100 numbers: trained on Flowers-102 train only, validated on Flowers ``valid``.

Every run is evaluated (frozen / RECO / k-NN vote / surrogate, mode both, k=10) on the test split of each dataset
against that dataset's *train* memory. ``metrics.json`` in the output folder holds every number with the command.

    nice -n 10 python3 scripts/train_reco_mini_fusion.py --backend numba
    python3 scripts/train_reco_mini_fusion.py --work WORK --eval-weights RUN/best.npz   # any weights, same numbers
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from reco_ref.checks import positive_int  # noqa: E402
from reco_ref.io import atomic_save_npy, atomic_write_json, atomic_write_text, sha256_file  # noqa: E402
from reco_ref.options import add_index_threads  # noqa: E402

PINNED = {
    "flowers102/manifest.csv": "18f30189f38301609235cc33edc7d1a6ea0291e6799635e4dae73ef21c38f9e7",
    "cub100/manifest.csv": "1d69a9ef9cc54afe3000c039d4af5453a03536fad94dacaa55b2577eebe9ad67",
    "cache/cub100/image.npy": "3ed65ecbe9ca5b4bce214609d9e9bdd8c9000a0e2323d6395f3cdb927e4549d7",
    "cache/cub100/keys.npy": "d92ce83ac5be56375df37968954acdad63af03aef63d06d9795ae599c59b26b0",
    "cache/flowers102/image.npy": "1ef48345b9a41be0019dd1474e800becc4272b8f7c24e63f0629beb8247985a8",
    "cache/flowers102/keys.npy": "7e4c7bf2af944c36387bf13484611515f37454c00b986286af59dcace6eafe42",
}
CAPTION = "a photo of a {}."
DATASETS = ("flowers102", "cub100")
HOLDOUT_FRACTION = 0.10  # of CUB-100 train, for validation (CUB has no validation split)
HOLDOUT_SEED = 0
# hnswlib threads of every memory this script builds (--index-threads; None: all cores, as before). One thread
# builds the same graph every time; several do not (the order of insertion races)
INDEX_THREADS: int | None = None


def check_inputs(data: Path, cache: Path) -> dict:
    found = {}
    for key, want in PINNED.items():
        path = cache / key.split("/", 1)[1] if key.startswith("cache/") else data / key
        if not path.is_file():
            sys.exit(f"train_reco_mini_fusion: error: input missing: {path}")
        got = sha256_file(path)
        if got != want:
            sys.exit(f"train_reco_mini_fusion: error: {path}: sha256 {got}, pinned {want} (inputs changed; the "
                     "shipped weights would not be reproduced)")
        found[key] = {"path": str(path), "sha256": got}
    return found


class Dataset:
    """One dataset: manifest rows, labels, splits, class names and the cached embeddings (manifest order)."""

    def __init__(self, name: str, data: Path, cache: Path, encoder):
        self.name = name
        self.encoder = encoder
        self.manifest = data / name / "manifest.csv"
        with open(self.manifest, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        self.files = [r["file"] for r in rows]
        self.labels = np.array([int(r["label"]) for r in rows], np.int64)
        self.split = np.array([r["split"] for r in rows])
        names = {}
        for r in rows:
            names.setdefault(int(r["label"]), r["class_name"])
        self.class_names = [names[i] for i in range(len(names))]
        self.image = np.load(cache / name / "image.npy")
        self.keys = np.load(cache / name / "keys.npy")
        caps = [CAPTION.format(c) for c in self.class_names]
        self.class_caption_emb = np.asarray(encoder.encode_texts(caps), np.float32)  # [C,D], one per class
        self.text = self.class_caption_emb[self.labels]  # [N,D]: each row's caption embedding
        self.captions = [CAPTION.format(self.class_names[c]) for c in self.labels]  # [N] caption strings

    def mix_captions(self, templates: tuple[str, ...], seed: int = 0) -> None:
        """Give each row a caption drawn (seeded, per row) from ``templates`` instead of the single CAPTION.

        With one template the training text side sees only C distinct captions and φ_T fits maps specific to
        them; several templates per class give C×J distinct captions, including the ones the zero-shot class
        text is built from at evaluation (the dataset's own template set)."""
        from reco_ref.eval.templates import check_templates

        templates = check_templates(templates)
        pick = np.random.default_rng(seed).integers(0, len(templates), size=len(self.labels))  # [N]
        texts = [t.replace("{class_name}", "{}").format(c) for c in self.class_names for t in templates]
        emb = np.asarray(self.encoder.encode_texts(texts), np.float32).reshape(len(self.class_names), len(templates), -1)
        self.text_mixed = emb[self.labels, pick]  # [N,D]
        self.captions_mixed = [texts[c * len(templates) + j] for c, j in zip(self.labels, pick)]

    def rows(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split == split)

    def items(self, idx: np.ndarray, mixed: bool = False) -> list[dict]:
        caps = self.captions_mixed if mixed else self.captions
        return [{"image": str(self.manifest.parent / self.files[i]), "caption": caps[i], "source": self.files[i], "label": int(self.labels[i]), "split": str(self.split[i]),
            "tags": self.name} for i in idx]


def holdout_split(ds: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """A seeded 10 % of ``ds``'s train rows held out for validation: ``(train_rows, holdout_rows)``."""
    train = ds.rows("train")
    rng = np.random.default_rng(HOLDOUT_SEED)
    pick = rng.permutation(len(train))[: int(round(HOLDOUT_FRACTION * len(train)))]
    mask = np.zeros(len(train), bool)
    mask[pick] = True
    return train[~mask], train[mask]


def class_holdout_split(ds: Dataset, fraction: float, seed: int = HOLDOUT_SEED) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Class-disjoint hold-out of ``ds``'s train rows: a seeded ``fraction`` of the *classes* with all their rows.

    Returns ``(train_rows, holdout_rows, holdout_classes)``. Zero-shot accuracy on the held-out classes, each
    retrieving from a memory of the held-out rows only (own row excluded), measures what leave-one-dataset-out
    needs — transfer to classes the weights never saw — without touching the evaluated dataset. Held-out *rows*
    of the training classes cannot see a loss of transfer (docs/training.md)."""
    train = ds.rows("train")
    classes = np.unique(ds.labels[train])
    n = int(round(fraction * len(classes)))
    if not 0 < n < len(classes):
        sys.exit(f"train_reco_mini_fusion: error: --holdout-fraction {fraction}: holds out {n} of {len(classes)} "
                 "classes; expected at least one held out and one kept")
    held = np.sort(np.random.default_rng(seed).permutation(classes)[:n])
    mask = np.isin(ds.labels[train], held)
    return train[~mask], train[mask], held


def memory(work: Path, name: str, ds: Dataset, idx: np.ndarray, encoder, mixed: bool = False):
    from reco_ref.memory import Memory, build_memory_from_arrays

    out = work / name
    if not (out / "manifest.json").is_file():
        text = ds.text_mixed if mixed else ds.text
        build_memory_from_arrays(out, ds.image[idx], text[idx], keys=ds.keys[idx], items=ds.items(idx, mixed),
                                 name=encoder.name, fingerprint=encoder.fingerprint, progress=False,
                                 num_threads=INDEX_THREADS)
    return Memory.open(out, encoder=encoder, verify="size")


def evaluate(weights, ds: Dataset, mem, encoder, k: int, backend: str) -> dict:
    from reco_ref.eval.templates import class_embeddings, resolve_templates
    from reco_ref.eval.zeroshot import evaluate_zero_shot

    tname, templates = resolve_templates(None, ds.manifest)
    cls = class_embeddings(encoder, ds.class_names, templates)
    te = ds.rows("test")
    res = evaluate_zero_shot(mem, ds.image[te], ds.labels[te], cls, ds.class_names, keys=ds.keys[te],
                             weights=weights, mode="both", k=k, backend=backend)
    res["templates"] = tname
    return res


def validation_eval(weights, mem, image, keys, labels, cls, names, k: int, backend: str) -> dict:
    """Validation-only comparison on a class-disjoint hold-out (its own memory, own rows excluded): top-1 of frozen,
    surrogate, k-NN vote and RECO per enhancement mode — what a recipe and a mode are chosen on."""
    from reco_ref.eval.data import own_rows
    from reco_ref.eval.zeroshot import evaluate_zero_shot

    r = evaluate_zero_shot(mem, image, labels, cls, names, keys=keys, weights=weights, mode="both", k=k,
                           backend=backend, exclude=own_rows(mem, keys))
    out = {m: (r[m] or {}).get("top1") for m in ("frozen", "surrogate", "knn_vote")}
    for method in ("reco", "surrogate"):
        if method in r["by_mode"]:
            out[f"{method}_by_mode"] = {m: v["top1"] for m, v in r["by_mode"][method].items()}
    return out


def drawings(generic_dir: str, encoder, work: Path) -> dict:
    """The held-out OpenClipart drawings as a labelled validation set (``build_generic_memory.py --heldout``:
    reco-mini never trained on them; they are not the demo's clip-art): classes = their top-level OpenClipart folder
    (``animals``, ``food``, ``signs and symbols``...; folders with at least 5 drawings), generic templates. Returns
    ``{"memory" (a memory of the kept drawings, built once in ``work``), "image", "keys", "labels", "class_text",
    "names"}``."""
    from collections import Counter

    from reco_ref.eval.templates import class_embeddings, resolve_templates
    from reco_ref.memory import Memory, build_memory_from_arrays

    g = Memory.open(generic_dir, verify="size")
    meta = g.metadata(np.arange(len(g)))
    folder = [m["source"].split("/openclipart/png/")[-1].split("/")[0] for m in meta]
    count = Counter(folder)
    names = sorted(f for f, c in count.items() if c >= 5 and "." not in f)
    keep = np.array([f in names for f in folder])
    labels = np.array([names.index(f) for f, kk in zip(folder, keep) if kk], np.int64)
    readable = [f.replace("_", " ") for f in names]
    cls = class_embeddings(encoder, readable, resolve_templates("generic")[1])
    img = np.asarray(g.image)[keep]
    keys = None if g.image_keys is None else np.asarray(g.image_keys)[keep]
    out = work / "mem-drawings-heldout-labelled"
    if not (out / "manifest.json").is_file():
        items = [dict(m, label=int(lab)) for m, lab in zip([m for m, kk in zip(meta, keep) if kk], labels)]
        build_memory_from_arrays(out, img, np.asarray(g.text)[keep], keys=keys,
                                 items=[{"image": it["source"], "caption": it["caption"], "source": it["source"],
                                         "label": it["label"], "split": "heldout", "tags": "openclipart"} for it in items],
                                 name=g.manifest["encoder"]["name"], fingerprint=g.fingerprint, progress=False,
                                 num_threads=INDEX_THREADS)
    return {"memory": Memory.open(out, verify="size"), "image": img, "keys": keys, "labels": labels,
            "class_text": cls, "names": readable}


def harm_generic(weights, train_mem, generic_dir: str, encoder, k: int, backend: str, work: Path) -> dict:
    """Do-no-harm on *validation* drawings (:func:`drawings`) retrieving from a photo memory (the run's training
    memory): top-1 of the frozen encoder, the surrogate and RECO per mode. RECO should not fall below frozen on a
    memory of another domain. Chosen before any number was seen; never the demo's clip-art (evaluation data)."""
    from reco_ref.eval.zeroshot import evaluate_zero_shot

    dr = drawings(generic_dir, encoder, work)
    r = evaluate_zero_shot(train_mem, dr["image"], dr["labels"], dr["class_text"], dr["names"], keys=dr["keys"],
                           weights=weights, mode="both", k=k, backend=backend)
    out = {"n": int(len(dr["labels"])), "classes": dr["names"], "frozen": r["frozen"]["top1"],
           "surrogate": r["surrogate"]["top1"]}
    for method in ("reco", "surrogate"):
        if method in r.get("by_mode", {}):
            out[f"{method}_by_mode"] = {m: v["top1"] for m, v in r["by_mode"][method].items()}
    return out


def guard_sets(sources: list, generic_dir: str, encoder, work: Path, run: str) -> list:
    """[ours] Do-no-harm guards for epoch selection (``ValSet(guard=True)``): the held-out drawings retrieving from
    each training source's photo memory and, for a run with several, from their union. An epoch whose top-1 on a
    guard falls more than ``--guard-tolerance`` below its epoch-0 value is not kept."""
    from reco_ref.memory import Memory, build_memory_from_arrays
    from reco_ref.train.loop import ValSet

    dr = drawings(generic_dir, encoder, work)
    mems, out = [], []
    for src in sources:
        m = src.get("retrieval") or src["pairs"]
        if any(m is x for x in mems):
            continue
        mems.append(m)
        out.append(ValSet(f"guard-drawings-vs-{src.get('name', len(out))}", dr["memory"], m, dr["labels"],
                          dr["class_text"], guard=True))
    if len(mems) > 1:
        root = work / f"mem-union-{run}"
        if not (root / "manifest.json").is_file():
            keys = [m.image_keys for m in mems]
            build_memory_from_arrays(root, np.concatenate([np.asarray(m.image) for m in mems]),
                                     np.concatenate([np.asarray(m.text) for m in mems]),
                                     keys=None if any(k is None for k in keys) else np.concatenate(
                                         [np.asarray(k) for k in keys]),
                                     name=mems[0].manifest["encoder"]["name"], fingerprint=mems[0].fingerprint,
                                     progress=False, num_threads=INDEX_THREADS)
        out.append(ValSet("guard-drawings-vs-union", dr["memory"], Memory.open(root, verify="size"), dr["labels"],
                          dr["class_text"], guard=True))
    return out


def demo_images(work: Path, encoder) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """The 195 shipped clip-art images (weights/demo): embeddings, keys, labels, class names (encoded once, cached)."""
    from reco_ref.io import load_npz

    pairs = ROOT / "weights" / "demo" / "pairs.csv"
    with open(pairs, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    names = {}
    for r in rows:
        names.setdefault(int(r["label"]), r["category"])
    path = work / "demo-images.npz"
    if not path.is_file():
        img, keys = encoder.encode_images([str(pairs.parent / r["image"]) for r in rows], with_keys=True)
        from reco_ref.io import atomic_save_npz

        atomic_save_npz(path, {"image": img, "keys": keys})
    z = load_npz(path)
    return z["image"], z["keys"], np.array([int(r["label"]) for r in rows]), [names[i] for i in range(len(names))]


def union_memory(work: Path, ds: dict, encoder):
    """The memory of Flowers-102 train + CUB-100 train (two photo domains joined), built once in ``work``."""
    from reco_ref.memory import Memory, build_memory_from_arrays

    out = work / "mem-flowers-cub-train"
    if not (out / "manifest.json").is_file():
        idx = {n: d.rows("train") for n, d in ds.items()}
        build_memory_from_arrays(out, np.concatenate([d.image[idx[n]] for n, d in ds.items()]),
                                 np.concatenate([d.text[idx[n]] for n, d in ds.items()]),
                                 keys=np.concatenate([d.keys[idx[n]] for n, d in ds.items()]),
                                 items=[it for n, d in ds.items() for it in d.items(idx[n])], name=encoder.name,
                                 fingerprint=encoder.fingerprint, progress=False, num_threads=INDEX_THREADS)
    return Memory.open(out, encoder=encoder, verify="size")


def do_no_harm(weights, work: Path, ds: dict, encoder, k: int, backend: str) -> dict:
    """Clip-art queries (weights/demo, 11 everyday classes, generic templates) against a memory that lacks their
    classes: Flowers-102 train + CUB-100 train. RECO should stay within 1 point of the frozen encoder."""
    from reco_ref.eval.templates import class_embeddings, resolve_templates
    from reco_ref.eval.zeroshot import evaluate_zero_shot

    mem = union_memory(work, ds, encoder)
    img, keys, labels, names = demo_images(work, encoder)
    _, templates = resolve_templates("generic")
    cls = class_embeddings(encoder, names, templates)
    r = evaluate_zero_shot(mem, img, labels, cls, names, keys=keys, weights=weights, mode="both", k=k,
                           backend=backend)
    return {m: r[m] for m in ("frozen", "reco", "surrogate", "n", "classes", "k", "mode")} | {
        "by_mode": {m: {x: v["top1"] for x, v in r["by_mode"][m].items()} for m in r["by_mode"]},
        "memory": "flowers102 train + cub100 train", "queries": "weights/demo (195 clip-art images, 11 classes)",
        "templates": "generic"}


def evaluate_run(run: str, best, saw: str, ds: dict, eval_mem: dict, work: Path, enc, k: int, backend: str) -> dict:
    """Every number of one run: each dataset's test split against its train memory, and the do-no-harm check."""
    entry = {"trained_on": saw, "eval": {}}
    for dname, d in ds.items():
        r = evaluate(best, d, eval_mem[dname], enc, k, backend)
        entry["eval"][dname] = {m: r[m] for m in ("frozen", "reco", "surrogate", "knn_vote", "n", "classes", "k",
                                                 "mode", "templates")}
        entry["eval"][dname]["by_mode"] = {m: {x: v["top1"] for x, v in r["by_mode"][m].items()} for m in r["by_mode"]}
        print(f"[{run}] {dname}: frozen {r['frozen']['top1']:.4f}  surrogate {r['surrogate']['top1']:.4f}  "
              f"knn {r['knn_vote']['top1']:.4f}  RECO {r['reco']['top1']:.4f}", flush=True)
    h = do_no_harm(best, work, ds, enc, k, backend)
    entry["do_no_harm"] = h
    print(f"[{run}] do-no-harm (clip-art vs flowers+birds memory): frozen {h['frozen']['top1']:.4f}  "
          f"surrogate {h['surrogate']['top1']:.4f}  RECO {h['reco']['top1']:.4f}", flush=True)
    return entry


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"), help="folder holding the dataset manifests")
    ap.add_argument("--cache", default="/work/cache/emb", help="folder of the cached reco-mini embeddings")
    ap.add_argument("--work", help="memories and run folders (default: a new temp folder)")
    ap.add_argument("--out", default=str(ROOT / "weights" / "reco-mini-fusion"), help="where the shipped run goes")
    ap.add_argument("--runs", default="lodo-flowers,lodo-cub,ship",
                    help="comma list of runs: lodo-flowers, lodo-cub, ship, distractor")
    ap.add_argument("--backend", default="numba", choices=("numpy", "numba", "cuda"))
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--steps-per-epoch", type=int, default=None, help="cap on batches per epoch (default: full pass)")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--warmup-steps", type=int, default=50)
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weight-decay", type=float, default=0.2)
    ap.add_argument("--holdout", choices=("rows", "classes"), default="rows",
                    help="validation: a seeded 10 %% of CUB train rows + Flowers valid ('rows'), or whole classes of "
                         "each training dataset's train split with their own memory ('classes': measures transfer)")
    ap.add_argument("--holdout-fraction", type=float, default=0.2, help="share of classes held out (--holdout classes)")
    ap.add_argument("--captions", choices=("single", "mixed"), default="single",
                    help="training captions: 'a photo of a {class}.' ('single') or one per row drawn from the "
                         "single + generic + the dataset's own template sets ('mixed'); eval memories stay single")
    ap.add_argument("--generic", help="memory of generic image-caption pairs (e.g. OpenClipart) added as a training "
                                      "source retrieving from itself")
    ap.add_argument("--generic-cross", action="store_true",
                    help="with --generic: also the generic pairs retrieving from the training memory and the training "
                         "pairs retrieving from the generic memory (cross-domain irrelevant-memory episodes)")
    ap.add_argument("--generic-weight", type=float, default=None, help="batch share of --generic (default: its rows)")
    ap.add_argument("--tag", default="", help="suffix of the run folders (several recipes in one --work)")
    ap.add_argument("--validate-only", action="store_true",
                    help="train and report validation only (no test split is touched): for choosing a recipe")
    ap.add_argument("--harm-val", action="store_true",
                    help="with --holdout classes: a second validation set per dataset, the held-out classes against "
                         "the kept classes' memory (no relevant neighbour: a do-no-harm check on validation data)")
    ap.add_argument("--eval-val", help="with --holdout classes: compare these weights ('none': frozen only) on the "
                                       "class-disjoint validation sets by mode, print JSON, train nothing")
    ap.add_argument("--init", choices=("identity", "copy"), default="identity", help="fusion init (copy: starts at "
                    "x + alpha*mean of the neighbours)")
    ap.add_argument("--alpha", type=float, default=1.0, help="gain of the copy init")
    ap.add_argument("--relevance", action="store_true", help="the layer reads each neighbour's search score "
                    "(relevance bias beta*s_j, query logit gamma; score map from unrelated pairs of the training memory)")
    ap.add_argument("--rel-beta", type=float, default=1.0)
    ap.add_argument("--rel-gamma", type=float, default=0.0)
    ap.add_argument("--rel-map", choices=("unrelated", "neighbour", "memory"), default="unrelated")
    ap.add_argument("--train-groups", choices=("all", "relevance"), default="all",
                    help="what trains: every array, or only rel_beta/rel_gamma and tau")
    ap.add_argument("--hold-threshold", action="store_true",
                    help="[ours] with --train-groups relevance: gamma tied to beta so each head's gate threshold "
                         "(gamma - ln k)/beta stays at its init")
    ap.add_argument("--irrelevant-fraction", type=float, default=0.0,
                    help="share of irrelevant-memory batches (each query's own class excluded from its search)")
    ap.add_argument("--eval-step0", action="store_true",
                    help="also evaluate each run's untrained start on the test splits and the do-no-harm check")
    ap.add_argument("--harm-guard", action="store_true",
                    help="with --harm-generic: the drawings against each training memory (and their union) become "
                         "do-no-harm guards of epoch selection [ours]")
    ap.add_argument("--guard-tolerance", type=float, default=0.01,
                    help="top-1 a guard may lose against its epoch 0 in a keepable epoch (default 0.01)")
    ap.add_argument("--harm-union", action="store_true",
                    help="with --harm-generic: also check the drawings against Flowers-102 train + CUB-100 train joined "
                         "(kept weights and their step 0)")
    ap.add_argument("--harm-generic", help="memory of held-out generic drawings (build_generic_memory.py --heldout): "
                    "a do-no-harm validation (retrieval R@1, frozen vs RECO) against each run's training memory")
    ap.add_argument("--save-lodo", action="store_true", help="also write the lodo runs' kept weights to --out "
                    "(lodo-flowers.npz, lodo-cub.npz) so `reco-ref eval --fusion` reproduces their rows")
    ap.add_argument("--resume", action="store_true", help="continue interrupted runs from their checkpoints")
    ap.add_argument("--prepare-only", action="store_true", help="build the memories and eval arrays, train nothing")
    ap.add_argument("--eval-only", action="store_true", help="re-evaluate the runs' kept weights (no training)")
    add_index_threads(ap, type=positive_int)  # -> a.threads
    ap.add_argument("--eval-weights", help="evaluate this RecoWeights file (e.g. a `reco-ref train` run's best.npz) on "
                                           "both test splits and the do-no-harm check, print JSON, train nothing")
    a = ap.parse_args(argv)
    global INDEX_THREADS
    INDEX_THREADS = a.threads
    if (a.harm_guard or a.harm_union) and not a.harm_generic:
        ap.error("--harm-guard and --harm-union need --harm-generic DIR (the held-out drawings)")

    from reco_ref.encoders import load
    from reco_ref.eval.templates import class_embeddings, resolve_templates
    from reco_ref.train.loop import TrainConfig, ValSet, train
    from reco_ref.reco.weights import save_reco_weights

    command = "python3 scripts/train_reco_mini_fusion.py " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:]))
    inputs = check_inputs(Path(a.data), Path(a.cache))
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="reco-train-"))
    work.mkdir(parents=True, exist_ok=True)
    enc = load("reco-mini")
    ds = {n: Dataset(n, Path(a.data), Path(a.cache), enc) for n in DATASETS}
    fl, cub = ds["flowers102"], ds["cub100"]
    mixed = a.captions == "mixed"
    if mixed:
        for d in ds.values():
            own = resolve_templates(None, d.manifest)[1]
            d.mix_captions(tuple(dict.fromkeys(("a photo of a {}.",) + resolve_templates("generic")[1] + own)),
                           seed=a.seed)
    cub_tr, cub_ho = holdout_split(cub)
    mems = {
        "flowers-train": memory(work, "mem-flowers-train", fl, fl.rows("train"), enc),
        "flowers-valid": memory(work, "mem-flowers-valid", fl, fl.rows("valid"), enc),
        "cub-train": memory(work, "mem-cub-train", cub, cub.rows("train"), enc),
        "cub-train90": memory(work, "mem-cub-train90", cub, cub_tr, enc),
        "cub-holdout10": memory(work, "mem-cub-holdout10", cub, cub_ho, enc),
        # for `reco-ref ablate`'s "1 % memory at training" arm: a seeded 1 % of Flowers-102 train
        "flowers-train-1pct": memory(work, "mem-flowers-train-1pct", fl, np.sort(np.random.default_rng(0).permutation(
            fl.rows("train"))[: len(fl.rows("train")) // 100]), enc),
    }
    for d in ds.values():  # test-split arrays for `reco-ref ablate --eval-embeddings/--eval-keys`
        te = d.rows("test")
        for kind, arr in (("image", d.image[te]), ("keys", d.keys[te])):
            path = work / f"eval-{d.name}-test-{kind}.npy"
            if not path.is_file():
                atomic_save_npy(path, arr)

    def val_set(name, pairs_key, retr_key, d: Dataset, idx):
        _, templates = resolve_templates(None, d.manifest)
        return ValSet(name, mems[pairs_key], mems[retr_key], d.labels[idx],
                      class_embeddings(enc, d.class_names, templates))

    v_fl = val_set("flowers102-valid", "flowers-valid", "flowers-train", fl, fl.rows("valid"))
    v_cub = val_set("cub100-holdout10", "cub-holdout10", "cub-train90", cub, cub_ho)
    runs = {
        "lodo-flowers": ([{"pairs": mems["cub-train90"], "name": "cub100-train90"}], [v_cub],
                         "CUB-100 train (seeded 90 %); no Flowers-102 image or class name"),
        "lodo-cub": ([{"pairs": mems["flowers-train"], "name": "flowers102-train"}], [v_fl],
                     "Flowers-102 train; no CUB-100 image or class name"),
        "ship": ([{"pairs": mems["flowers-train"], "name": "flowers102-train"},
                  {"pairs": mems["cub-train90"], "name": "cub100-train90"}], [v_fl, v_cub],
                 "Flowers-102 train + CUB-100 train (seeded 90 %)"),
        # an attempt at do-no-harm: the same pairs also retrieving from the *other* dataset's memory (irrelevant
        # neighbours), ~23 % of the batches; not shipped (it did not help: docs/training.md)
        "distractor": ([{"pairs": mems["flowers-train"], "name": "flowers102-train", "weight": 6552},
                        {"pairs": mems["cub-train90"], "name": "cub100-train90", "weight": 2613},
                        {"pairs": mems["flowers-train"], "retrieval": mems["cub-train90"],
                         "name": "flowers102-train-vs-cub-memory", "weight": 2000},
                        {"pairs": mems["cub-train90"], "retrieval": mems["flowers-train"],
                         "name": "cub100-train90-vs-flowers-memory", "weight": 800}], [v_fl, v_cub],
                       "Flowers-102 train + CUB-100 train (seeded 90 %), each also against the other's memory"),
    }
    val_eval = {}  # class-disjoint validation sets: name -> (memory, image, keys, labels, class text, class names)
    if a.holdout == "classes" or mixed or a.generic:
        cap = "-mixed" if mixed else ""
        hold = {n: class_holdout_split(d, a.holdout_fraction) for n, d in ds.items()}
        cm = {}
        for n, d in ds.items():
            tr, ho, held = hold[n]
            if a.holdout == "classes":
                pct = int(round(100 * a.holdout_fraction))
                cm[n] = (memory(work, f"mem-{n}-train-kept{100 - pct}c{cap}", d, tr, enc, mixed),
                         memory(work, f"mem-{n}-train-held{pct}c{cap}", d, ho, enc, mixed))
                _, templates = resolve_templates(None, d.manifest)
                remap = np.full(len(d.class_names), -1, np.int64)
                remap[held] = np.arange(len(held))
                # held-out rows retrieve from their own memory (the pair's own row excluded by self-match), and are
                # classified among the held-out classes only: nothing of the kept classes takes part
                held_names = [d.class_names[c] for c in held]
                cm[n] += (ValSet(f"{n}-held{pct}c", cm[n][1], cm[n][1], remap[d.labels[ho]],
                                 class_embeddings(enc, held_names, templates)),)
                val_eval[f"{n}-held{pct}c"] = (cm[n][1], d.image[ho], d.keys[ho], remap[d.labels[ho]],
                                               cm[n][2].class_text, held_names)
                if a.harm_val:
                    # do-no-harm on validation data: the same held-out images and classes, retrieving from the kept
                    # classes' memory, which holds none of them — RECO should not fall below the frozen encoder
                    cm[n] += (ValSet(f"{n}-held{pct}c-vs-kept", cm[n][1], cm[n][0], remap[d.labels[ho]],
                                     cm[n][2].class_text),)
                    val_eval[f"{n}-held{pct}c-vs-kept"] = (cm[n][0], d.image[ho], d.keys[ho], remap[d.labels[ho]],
                                                           cm[n][2].class_text, held_names)
            else:  # row hold-out as before, with mixed captions
                tri = cub_tr if n == "cub100" else d.rows("train")
                cm[n] = (memory(work, f"mem-{n}-train{'90' if n == 'cub100' else ''}{cap}", d, tri, enc, mixed),)
                if n == "cub100":
                    m_ho = memory(work, f"mem-cub100-holdout10{cap}", d, cub_ho, enc, mixed)
                    cm[n] += (m_ho, ValSet("cub100-holdout10", m_ho, cm[n][0], d.labels[cub_ho],
                                           class_embeddings(enc, d.class_names, resolve_templates(None, d.manifest)[1])))
                else:
                    cm[n] += (mems["flowers-valid"], v_fl)
        gen = []
        if a.generic:
            from reco_ref.memory import Memory

            gen = [{"pairs": Memory.open(a.generic, encoder=enc, verify="size"), "name": Path(a.generic).name,
                    "weight": a.generic_weight, "irrelevant": False}]
        what = f"{a.holdout} hold-out, {a.captions} captions" + (f", + {Path(a.generic).name}" if a.generic else "")
        def cross(mem, name):  # [ours] cross-domain irrelevant episodes: generic pairs ↔ the photo memory
            if not (gen and a.generic_cross):
                return []
            g = gen[0]["pairs"]
            return [{"pairs": g, "retrieval": mem, "name": f"{gen[0]['name']}->{name}", "irrelevant": False,
                     "weight": a.generic_weight},
                    {"pairs": mem, "retrieval": g, "name": f"{name}->{gen[0]['name']}", "irrelevant": False,
                     "weight": a.generic_weight}]

        runs = {
            "lodo-flowers": ([{"pairs": cm["cub100"][0], "name": "cub100-train-kept"}] + gen
                             + cross(cm["cub100"][0], "cub100"), list(cm["cub100"][2:]),
                             f"CUB-100 train ({what}); no Flowers-102 image or class name"),
            "lodo-cub": ([{"pairs": cm["flowers102"][0], "name": "flowers102-train-kept"}] + gen
                         + cross(cm["flowers102"][0], "flowers102"),
                         list(cm["flowers102"][2:]), f"Flowers-102 train ({what}); no CUB-100 image or class name"),
            "ship": ([{"pairs": cm["flowers102"][0], "name": "flowers102-train-kept"},
                      {"pairs": cm["cub100"][0], "name": "cub100-train-kept"}] + gen
                     + cross(cm["flowers102"][0], "flowers102") + cross(cm["cub100"][0], "cub100"),
                     list(cm["flowers102"][2:]) + list(cm["cub100"][2:]), f"Flowers-102 train + CUB-100 train ({what})"),
        }
    if a.eval_val:  # validation-only comparison of given weights (or the frozen encoder: 'none'), no test split
        from reco_ref.reco.weights import load_reco_weights

        w = None if a.eval_val == "none" else load_reco_weights(a.eval_val)
        # only the sets these weights were validated on: a set of another dataset may be the one they are
        # evaluated on leave-one-dataset-out, and nothing may be chosen on it
        seen = None if w is None else {r["set"] for r in w.meta.get("selected", {}).get("validation", [])}
        res = {v: validation_eval(w, *val_eval[v], a.k, a.backend) for v in val_eval if seen is None or v in seen}
        print(json.dumps({"weights": a.eval_val, "validation": res, "command": command}))
        return 0
    if a.prepare_only:
        print(f"prepared {work}")
        return 0
    eval_mem = {"flowers102": mems["flowers-train"], "cub100": mems["cub-train"]}
    if a.eval_weights:
        from reco_ref.reco.weights import load_reco_weights

        w = load_reco_weights(a.eval_weights)
        entry = evaluate_run(Path(a.eval_weights).parent.name, w, str(w.meta.get("trained_on")), ds, eval_mem, work,
                             enc, a.k, a.backend)
        entry["weights"], entry["command"] = str(a.eval_weights), command
        print(json.dumps(entry))
        return 0
    cfg = TrainConfig(k=a.k, batch_size=a.batch_size, epochs=a.epochs, lr=a.lr, warmup_steps=a.warmup_steps,
                      seed=a.seed, backend=a.backend, checkpoint_every=25, steps_per_epoch=a.steps_per_epoch,
                      weight_decay=a.weight_decay, init=a.init, alpha=a.alpha, relevance=a.relevance,
                      rel_beta=a.rel_beta, rel_gamma=a.rel_gamma, train_groups=a.train_groups, rel_map=a.rel_map,
                      irrelevant_fraction=a.irrelevant_fraction, exact_search=True, guard_tolerance=a.guard_tolerance,
                      hold_threshold=a.hold_threshold)
    # the memories' build threads join the recipe only when set: records made before the option read as before
    recipe = cfg.to_json() | ({"index_threads": a.threads} if a.threads is not None else {})
    report = {"command": command, "inputs": inputs, "recipe": recipe, "runs": {}}
    from reco_ref.reco.weights import load_reco_weights

    previous = work / "metrics.json"
    if previous.is_file():  # keep the numbers of runs not repeated now
        report["runs"] = json.loads(previous.read_text()).get("runs", {})
    for run in [r for r in a.runs.split(",") if r]:
        sources, vals, saw = runs[run]
        if a.harm_guard:
            vals = list(vals) + guard_sets(sources, a.harm_generic, enc, work, run + a.tag)
        out = work / f"run-{run}{a.tag}"
        if a.eval_only:
            best, info = load_reco_weights(out / "best.npz"), report["runs"].get(run + a.tag, {})
        else:
            t0 = time.perf_counter()
            seen = {"lodo-flowers": ["cub100"], "lodo-cub": ["flowers102"]}.get(run, list(DATASETS))
            meta = {"encoder_name": enc.name, "encoder_fingerprint": enc.fingerprint, "trained_on": saw,
                    # which datasets' train splits these weights saw: `reco-ref eval` marks those rows in-domain
                    "saw_datasets": [{"name": n, "manifest_sha256": inputs[f"{n}/manifest.csv"]["sha256"]}
                                     for n in seen],
                    "command": command, "inputs": inputs, "caption_template": CAPTION.replace("{}", "{class_name}"),
                    "captions": a.captions, "generic_pairs": a.generic,
                    "holdout": ({"dataset": "cub100", "fraction": HOLDOUT_FRACTION, "seed": HOLDOUT_SEED}
                                if a.holdout == "rows" else {"classes_of_each_training_dataset": a.holdout_fraction,
                                                             "seed": HOLDOUT_SEED})}
            res = train(sources, out, cfg, val=vals, meta=meta,
                        resume=a.resume and (out / "checkpoint.npz").exists())
            best = res.best
            info = {"train_seconds": round(time.perf_counter() - t0, 1), "steps": res.steps,
                    "selected": res.best_record, "history": res.history}
        entry = {k: info[k] for k in ("train_seconds", "steps", "selected", "history") if k in info}
        if a.harm_generic:
            entry["harm_generic"] = harm_generic(best, sources[0]["pairs"], a.harm_generic, enc, a.k, a.backend,
                                                 work)
            print(f"[{run}{a.tag}] do-no-harm validation (held-out drawings vs the training memory, zero-shot): "
                  + json.dumps(entry["harm_generic"]), flush=True)
            if a.harm_union:
                # the same drawings against two photo domains joined (Flowers-102 train + CUB-100 train: train
                # splits only), kept weights and their untrained start
                from reco_ref.train.loop import step0_weights

                um = union_memory(work, ds, enc)
                for key, w in (("harm_union", best), ("harm_union_step0", step0_weights(best, cfg))):
                    entry[key] = harm_generic(w, um, a.harm_generic, enc, a.k, a.backend, work)
                    print(f"[{run}{a.tag}] {key} (held-out drawings vs Flowers-102 + CUB-100 train): "
                          + json.dumps({x: entry[key][x] for x in ("frozen", "reco_by_mode")}), flush=True)
        if a.validate_only:  # choosing a recipe: validation numbers only, no test split touched
            for rec in entry.get("history", []):
                print(f"[{run}{a.tag}] epoch {rec['epoch']} step {rec['step']}: " + "  ".join(
                    f"{r['set']} top1 {r['top1']:.4f} loss {r['loss']:.3f}" for r in rec["sets"]), flush=True)
            entry["val_eval"] = {}
            for vname, (vm, vimg, vkeys, vlab, vcls, vnames) in val_eval.items():
                if any(r["set"] == vname for r in entry.get("history", [{}])[0].get("sets", [])):
                    entry["val_eval"][vname] = validation_eval(best, vm, vimg, vkeys, vlab, vcls, vnames, a.k,
                                                               a.backend)
                    print(f"[{run}{a.tag}] kept weights on {vname}: " + json.dumps(entry["val_eval"][vname]),
                          flush=True)
            report["runs"][run + a.tag] = entry
            atomic_write_json(work / f"validation{a.tag}.json", report)
            continue
        entry.update(evaluate_run(run, best, saw, ds, eval_mem, work, enc, a.k, a.backend))
        if a.eval_step0 and cfg.model == "reco":
            # the same numbers for the run's untrained start (same init draw, β/γ at their initial values)
            from reco_ref.train.loop import step0_weights

            entry["step0"] = evaluate_run(f"{run} step 0", step0_weights(best, cfg), saw, ds, eval_mem, work, enc,
                                          a.k, a.backend)
        report["runs"][run + a.tag] = entry
        atomic_write_json(work / "metrics.json", report)
        if run.startswith("lodo") and a.save_lodo:
            best.meta["metrics"] = {d: {m: entry["eval"][d][m]["top1"] for m in ("frozen", "reco", "surrogate",
                                                                                  "knn_vote")} for d in ds}
            best.meta["metrics"]["do_no_harm_clipart"] = {m: entry["do_no_harm"][m]["top1"]
                                                          for m in ("frozen", "reco", "surrogate")}
            Path(a.out).mkdir(parents=True, exist_ok=True)
            save_reco_weights(Path(a.out) / f"{run}.npz", best)
        if run == "ship":
            best.meta["metrics"] = {d: {m: entry["eval"][d][m]["top1"] for m in ("frozen", "reco", "surrogate",
                                                                                  "knn_vote")} for d in ds}
            best.meta["metrics"]["do_no_harm_clipart"] = {m: entry["do_no_harm"][m]["top1"]
                                                          for m in ("frozen", "reco", "surrogate")}
            Path(a.out).mkdir(parents=True, exist_ok=True)
            save_reco_weights(Path(a.out) / "fusion.npz", best)
            atomic_write_text(Path(a.out) / "log.jsonl", (out / "log.jsonl").read_text())
    if "ship" in a.runs and not a.validate_only:
        atomic_write_json(Path(a.out) / "metrics.json", report)
    print(f"metrics: {work / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
