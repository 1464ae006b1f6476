"""What ``reco-ref classify train|eval`` do, as library functions: dataset manifest + memory → weights → JSON.

The dataset's images are embedded by the memory's encoder through :func:`reco_ref.eval.data.embed_split`
(cached under ``cache_dir``); training images found in the memory are detected by
:func:`reco_ref.eval.data.own_rows` and excluded from their own neighbour lists (at evaluation too).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..checks import check_float, check_int, memory_rows
from ..errors import DatasetError, RecoError
from ..eval.data import Split, cache_dir_option, embed_split, own_rows, read_manifest_rows, read_split, \
    user_cache_dir
from ..eval.report import fmt
from ..template_fmt import Pieces, fill_template, parse_template, template_fields
from .crossfit import CROSSFIT_FOLDS, crossfit_leftovers, crossfit_probe, crossfit_state_path, crossfit_train
from .report import write_json, write_markdown, write_png
from .train import ClassifyConfig, evaluate_classifier, holdout_rows, load_classifier, log_prior, memory_row_labels, \
    prompt_head, save_classifier, search_vectors, symmetric_label_noise, train_classifier

__all__ = ["VAL_SPLITS", "SEED_MAX", "check_config", "open_memory", "train_from_manifest", "eval_from_manifest"]

#: a manifest split with one of these names is the validation split (else 10 % of each class's train rows)
VAL_SPLITS = ("valid", "val", "validation")


def _say(quiet: bool) -> Callable[[str], Any]:
    return (lambda m: None) if quiet else (lambda m: print(m, flush=True))


#: the largest seed (numpy's generators take any integer >= 0; the range keeps them plain 32-bit values)
SEED_MAX = 2**32 - 1


def check_readout_template(template: str) -> Pieces:
    """The class prompt parsed by the one template formatter (:mod:`reco_ref.template_fmt`): one or more plain
    ``{}`` fields for the class name, else a :class:`RecoError` naming it (a named field, a conversion or a format
    width such as ``{:>900000000}`` is refused before any prompt is built)."""
    pieces = parse_template(template, ("",), what="readout_template", expected="{} (where the class name goes)")
    if not template_fields(pieces):
        raise RecoError(f"readout_template {template!r:.200}: expected plain '{{}}' fields for the class name")
    return pieces


def check_config(cfg: ClassifyConfig) -> ClassifyConfig:
    """``cfg.check()`` plus the numbers it takes on trust, as one :class:`RecoError` naming the field.

    ``lr`` NaN / inf / < 0 failed in the learning-rate schedule as an unexpected ValueError; a NaN or non-positive
    ``logit_scale`` trained NaN or sign-flipped logits; ``seed`` < 0 failed in numpy; a readout template with a
    named field failed with a KeyError.
    """
    cfg.check()
    check_float("lr", cfg.lr, 0.0, error=RecoError)
    check_float("weight_decay", cfg.weight_decay, 0.0, error=RecoError)
    check_float("logit_scale", cfg.logit_scale, 0.0, lo_open=True, error=RecoError)
    check_int("seed", cfg.seed, 0, SEED_MAX, error=RecoError)
    check_int("warmup_epochs", cfg.warmup_epochs, 0, error=RecoError)
    for name in ("k", "epochs", "batch_size", "width", "heads"):
        check_int(name, getattr(cfg, name), 1, error=RecoError)
    if cfg.readout or cfg.head_init == "prompts":  # both format the class prompts with it
        check_readout_template(cfg.readout_template)
    return cfg


def open_memory(path: str | os.PathLike, encoder: Any, client: Any = None) -> Any:
    """Open the memory the classifier retrieves from (any kind; ``client``: served by that Dask cluster); one of 0
    rows is refused (nothing to retrieve)."""
    from ..memory import open_memory as open_any

    mem = open_any(path, client=client, encoder=encoder, verify="size")
    memory_rows(mem)
    return mem


def _cache(cache_dir) -> Any:
    """``--cache-dir``: None = the user cache (:func:`reco_ref.eval.data.user_cache_dir`), "off" = no cache."""
    return cache_dir_option(cache_dir, user_cache_dir)


def _held_out(labels: np.ndarray, seed: int, validation: str) -> np.ndarray:
    """The training rows held out for validation when the manifest has no validation split: 10 % of each class,
    and with ``validation="balanced"`` one of every class with two rows or more. One rule for the classifier's
    epoch (training) and the logistic probe's λ (evaluation), so both are chosen on the same rows."""
    return holdout_rows(labels, 0.1, seed=seed, tail=validation == "balanced")


def _probe_fit_words(crossfit: bool, vname: str | None) -> str:
    """How the report's probe was fitted, after the training split's name."""
    if crossfit:
        return "; λ chosen by cross-fitting its rows"
    return (("" if vname else " without its 10 % held-out rows")
            + f"; λ chosen on {'split ' + repr(vname) if vname else 'those held-out rows'}")


def _val_split(ds: Split, split: str, val_split: str | None) -> str | None:
    """The validation split: ``val_split`` if given, else a split named valid/val/validation that the manifest has
    (other than ``split``), else None (then 10 % of each class's training rows are held out)."""
    if val_split is not None:
        return val_split
    present = {r["split"] for r in read_manifest_rows(ds.manifest)}
    return next((s for s in VAL_SPLITS if s in present and s != split), None)


def _embed(ds: Split, encoder: Any, cache_dir, progress: bool) -> tuple[np.ndarray, np.ndarray | None]:
    img, keys = embed_split(ds, encoder, cache_dir=cache_dir, progress=progress)
    return np.asarray(img, np.float32), None if keys is None else np.asarray(keys, np.float32)


def train_from_manifest(dataset: str | os.PathLike, split: str, memory_dir: str | os.PathLike | None,
                        out: str | os.PathLike, cfg: ClassifyConfig, *, encoder: Any, cache_dir=None,
                        val_split: str | None = None, label_noise: float = 0.0, resume: bool = False,
                        progress: bool = True, quiet: bool = False, client: Any = None) -> dict:
    """Train on ``split`` of ``dataset`` and write the weights to ``out``; returns the training info.

    Validation (for the epoch kept): ``val_split`` if given, else a split named valid/val/validation when the
    manifest has one, else 10 % of each class's training rows (classes with < 10 rows keep all theirs).
    ``label_noise`` (0 ≤ p < 1) flips that fraction of the training labels symmetrically (experiments only;
    the class counts recorded for the shot groups are the manifest's).
    """
    check_config(cfg)  # before any embedding is computed
    check_float("label_noise", label_noise, 0.0, 1.0, hi_open=True, error=RecoError)
    say = _say(quiet)
    cache_dir = _cache(cache_dir)
    ds = read_split(dataset, split)
    C = ds.n_classes
    say(f"embeddings cache: {cache_dir if cache_dir is not None else 'off'} (--cache-dir off to disable)")
    memory = open_memory(memory_dir, encoder, client) if cfg.memory else None
    img, keys = _embed(ds, encoder, cache_dir, progress)
    search = search_vectors(memory, img, keys) if memory is not None else None
    excl = own_rows(memory, search) if memory is not None else None
    if excl is not None and (excl >= 0).any():
        say(f"{int((excl >= 0).sum())} of {len(ds)} training images are in the memory: each one's own item is "
            "excluded from its neighbours")
    labels = ds.labels.copy()
    if label_noise:
        labels = symmetric_label_noise(labels, label_noise, C, seed=cfg.seed)
        say(f"label noise {label_noise:g}: {int((labels != ds.labels).sum())} of {len(labels)} labels flipped")
    crossfit = cfg.validation == "crossfit"
    val_split = None if crossfit else _val_split(ds, split, val_split)
    if crossfit:  # [ours] every choice on out-of-fold predictions of all the training rows
        val, train_rows = None, np.arange(len(ds))
        val_desc = (f"{CROSSFIT_FOLDS}-fold cross-fitting over the training rows (probe L2, readout scale and epoch "
                    "on the pooled out-of-fold class-mean top-1)")
    elif val_split is not None:
        vds = read_split(dataset, val_split)
        if vds.class_names != ds.class_names:
            raise DatasetError(f"{ds.manifest}: split {val_split!r} names other classes than {split!r}")
        v_img, v_keys = _embed(vds, encoder, cache_dir, progress)
        v_search = search_vectors(memory, v_img, v_keys) if memory is not None else None
        val = (v_img, v_search, vds.labels, own_rows(memory, v_search) if memory is not None else None)
        train_rows = np.arange(len(ds))
        val_desc = f"split {val_split!r} ({len(vds)} rows)"
    else:
        held = _held_out(labels, cfg.seed, cfg.validation)
        train_rows = np.flatnonzero(~held)
        sel = np.flatnonzero(held)
        val = (img[sel], None if search is None else search[sel], labels[sel],
               None if excl is None else excl[sel]) if sel.size else None
        val_desc = f"{sel.size} held-out train rows" + (" (every class with >= 2 rows gives one)"
                                                         if cfg.validation == "balanced" else "")
    if cfg.validation == "balanced":
        val_desc += "; epoch kept by class-mean top-1"
    unused = _val_split(ds, split, None) if crossfit else None
    if unused is not None:
        say(f"--validation crossfit: split {unused!r} is not used (the folds are the training rows')")
    say(f"training on {len(train_rows)} rows of {ds.manifest} split {split!r} ({C} classes), validation: {val_desc}")
    ckpt = Path(str(out) + ".ckpt.npz")
    steps = -(-len(train_rows) // cfg.batch_size)
    if crossfit:
        say(f"plan: {CROSSFIT_FOLDS} fold runs on about {(CROSSFIT_FOLDS - 1) / CROSSFIT_FOLDS:.0%} of the rows, then "
            "one on all of them to the epoch they chose; each:")
    say(f"plan: {cfg.epochs} epochs × {steps} steps of {cfg.batch_size} ({cfg.backend} backend"
        + (f", memory k={cfg.k}" if cfg.memory else ", no memory") + f"); a checkpoint after every epoch at {ckpt} "
        "— interrupt at any time and rerun the same command with --resume")
    class_text = row_labels = None
    caption_readout = cfg.readout and cfg.readout_values == "caption"
    if cfg.readout and cfg.readout_values == "label":  # [ours] the readout reads each item's class
        row_labels, how = memory_row_labels(memory, ds.class_names)
        say(f"label readout: {int((row_labels >= 0).sum())} of {len(row_labels)} memory rows carry a class ({how})")
    if caption_readout or cfg.head_init == "prompts":  # [ours] the class prompts: what the score readout reads the
        # items' captions against, and the zero-shot head's rows — one encoding for both
        pieces = check_readout_template(cfg.readout_template)
        class_text = np.asarray(encoder.encode_texts([fill_template(pieces, {"": c}) for c in ds.class_names]),
                                np.float32)  # [C, Dt]
        uses = " and ".join(u for u, on in (("the score readout", caption_readout),
                                            ("the head's start", cfg.head_init == "prompts")) if on)
        say(f"class prompts \"{cfg.readout_template}\" ({C} × {class_text.shape[1]}) for {uses}")
    head = None
    if cfg.head_init == "prompts":  # [ours] start as the zero-shot cosine classifier over the class prompts
        if class_text.shape[1] != img.shape[1]:
            raise DatasetError(f"--head-init prompts: the encoder's text embeddings have width {class_text.shape[1]}, "
                               f"its image embeddings {img.shape[1]}; the prompts can only start the head of a "
                               "CLIP-style pair (one embedding space)")
        head = prompt_head(class_text, cfg.logit_scale)
        say("head initialised from the class prompts' text embeddings (zero-shot cosine classifier; epoch 0)")
    head_fit = None
    if cfg.head_init == "probe":
        from .baselines import fit_logistic_probe

        def probe_head(probe: dict, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            # the probe's post-hoc logit adjustment: its b estimates log pi_c + ..., remove tau of it
            return probe["W"], probe["b"] - cfg.logit_adjust * log_prior(labels[rows], C)

    if cfg.head_init == "probe" and crossfit:  # the probe of the given rows and L2 (cross-fitting chooses the L2)
        def head_fit(rows: np.ndarray, l2: float) -> tuple[np.ndarray, np.ndarray]:
            return probe_head(fit_logistic_probe(img[rows], labels[rows], C, val=None, l2=(l2,)), rows)

        say("head initialised from the logistic probe (L2 chosen by cross-fitting"
            + (f"; bias less {cfg.logit_adjust:g}·log prior" if cfg.logit_adjust else "") + ")")
    elif cfg.head_init == "probe":  # [ours] start from the logistic probe, fitted on the training rows only
        pv = None if val is None else (val[0], val[2])
        probe = fit_logistic_probe(img[train_rows], labels[train_rows], C, val=pv, refit_with_val=False)
        head = probe_head(probe, train_rows)
        say(f"head initialised from the logistic probe (L2 {probe['l2']:g}, chosen on the validation rows"
            + (f"; bias less {cfg.logit_adjust:g}·log prior" if cfg.logit_adjust else "") + ")")
    try:
        if crossfit:
            from .baselines import PROBE_L2

            params, info = crossfit_train(img, search, labels, C, memory, cfg, out=out, exclude=excl,
                                          class_text=class_text, row_labels=row_labels, head_fit=head_fit,
                                          l2_grid=PROBE_L2 if head_fit is not None else (None,),
                                          fixed_head=head if cfg.head_init == "prompts" else None, resume=resume,
                                          progress=progress, log=say)
        else:
            params, info = train_classifier(
                img[train_rows], None if search is None else search[train_rows], labels[train_rows], C, memory,
                cfg, exclude=None if excl is None else excl[train_rows], val=val, checkpoint=ckpt, resume=resume,
                progress=progress, log=say, class_text=class_text, head=head, row_labels=row_labels)
    except KeyboardInterrupt:
        kept = [str(p) for p in ([ckpt] if ckpt.exists() else []) + crossfit_leftovers(out)]
        print(f"interrupted: {'what had finished is in ' + ', '.join(kept) + '; ' if kept else ''}rerun the same "
              "command with --resume to continue" + ("" if kept else " (no epoch had finished: it starts over)"),
              flush=True)
        raise
    meta = {
        "config": dataclasses.asdict(cfg),
        "dims": {"dim": int(img.shape[1]), "classes": C,
                 "key_dim": None if memory is None else int(memory.key_dim or memory.dim),
                 "value_dim": None if memory is None else int(memory.dim * (2 if cfg.values == "both" else 1)),
                 "readout_dim": (C if row_labels is not None
                                 else None if class_text is None else int(class_text.shape[1]))},
        "class_names": ds.class_names,
        "train_class_counts": np.bincount(ds.labels, minlength=C).tolist(),
        "encoder_fingerprint": str(encoder.fingerprint),
        "dataset": str(ds.manifest), "split": split, "label_noise": label_noise,
        "memory": None if memory is None else str(Path(memory_dir).resolve()),
        "memory_overlap": 0 if excl is None else int((excl >= 0).sum()),
        "validation": val_desc, "val_split": val_split, **info,
    }
    save_classifier(out, params, meta)
    ckpt.unlink(missing_ok=True)  # the run finished: its weights are the record
    crossfit_state_path(out).unlink(missing_ok=True)
    say(f"wrote {out} (best validation epoch {info['best_epoch']}, val top-1 {fmt(info['val_top1'])})")
    return meta


def eval_from_manifest(weights: str | os.PathLike, dataset: str | os.PathLike, split: str,
                       memory_dir: str | os.PathLike | None, json_out: str | os.PathLike, *, encoder: Any,
                       cache_dir=None, backend: str | None = None, markdown: str | os.PathLike | None = None,
                       png: str | os.PathLike | None = None, progress: bool = True, quiet: bool = False,
                       baselines: bool = True, client: Any = None) -> dict:
    """Evaluate ``weights`` on ``split``; write the JSON (and Markdown / PNG reports when asked).

    ``baselines`` (default): also the logistic-regression probe on the same image embeddings, fitted on the
    weights' training split of ``dataset`` (λ chosen on its held-out rows), and the k-NN label vote over the memory
    (``--memory`` also serves the vote for a no-memory classifier) — ``result["baselines"]``, and rows in the
    Markdown and PNG reports (:mod:`reco_ref.classify.baselines`)."""
    say = _say(quiet)
    cache_dir = _cache(cache_dir)
    params, meta = load_classifier(weights)
    if meta["encoder_fingerprint"] != str(encoder.fingerprint):
        raise DatasetError(f"{weights}: trained on embeddings of encoder {meta['encoder_fingerprint'][:16]}…, but "
                           f"the encoder given is {str(encoder.fingerprint)[:16]}…; pass the same --model")
    ds = read_split(dataset, split)
    if ds.n_classes != meta["dims"]["classes"]:
        raise DatasetError(f"{ds.manifest}: {ds.n_classes} classes, but {weights} was trained on "
                           f"{meta['dims']['classes']}")
    with_memory = meta["config"]["memory"]
    if with_memory and memory_dir is None:
        raise DatasetError(f"{weights} is a memory classifier: pass --memory")
    memory = open_memory(memory_dir, encoder, client) if with_memory else None
    if memory is not None and int(memory.key_dim or memory.dim) != meta["dims"]["key_dim"]:
        raise DatasetError(f"memory {memory_dir}: key dim {memory.key_dim or memory.dim}, the weights expect "
                           f"{meta['dims']['key_dim']}")
    img, keys = _embed(ds, encoder, cache_dir, progress)
    search = search_vectors(memory, img, keys) if memory is not None else None
    excl = own_rows(memory, search) if memory is not None else None
    result = evaluate_classifier(params, meta, img, search, ds.labels, memory, exclude=excl, backend=backend)
    result.update({"weights": str(weights), "dataset": str(ds.manifest), "split": split,
                   "memory": None if memory is None else str(Path(memory_dir).resolve())})
    if baselines:
        vote_memory = memory
        if vote_memory is None and memory_dir is not None:
            vote_memory = open_memory(memory_dir, encoder, client)  # a no-memory classifier: the memory serves the vote
        result["baselines"] = _baselines(meta, dataset, ds, img, keys, vote_memory, encoder, cache_dir, progress, say)
    write_json(json_out, result)
    name = Path(weights).stem
    rows = [(name, result)] + [(b, r) for b, r in result.get("baselines", {}).items() if r.get("top1") is not None]
    if markdown:
        write_markdown(markdown, rows, title=f"{ds.manifest.parent.name} {split}")
    if png:
        write_png(png, rows, title=f"{ds.manifest.parent.name} {split}: top-1 (%)")

    def line(r: dict) -> str:
        return f"top-1 {fmt(r['top1'])} (many {fmt(r['many'])}, medium {fmt(r['medium'])}, few {fmt(r['few'])})"

    say(f"{line(result)} on {result['n']} images → {json_out}")
    for b, r in result.get("baselines", {}).items():
        say(f"  {b}: " + (line(r) if r.get("top1") is not None else r.get("not_computed", "not computed")))
    return result


def _baselines(meta: dict, dataset, ds: Split, img: np.ndarray, keys, memory: Any, encoder: Any, cache_dir,
               progress: bool, say) -> dict:
    """The logistic probe (fit on the classifier's own training split, λ chosen on its held-out rows) and the
    k-NN label vote over ``memory`` on the evaluated rows (:mod:`reco_ref.classify.baselines`)."""
    from .baselines import fit_logistic_probe, group_accuracy, knn_vote_predictions, probe_logits

    counts = meta["train_class_counts"]
    C = len(counts)
    out: dict = {}
    try:
        tds = read_split(dataset, meta["split"])
    except DatasetError as e:
        out["logistic_probe"] = {"not_computed": f"training split {meta['split']!r} not readable here: {e}"}
    else:
        t_img, _ = _embed(tds, encoder, cache_dir, progress)
        labels = tds.labels
        if meta.get("label_noise"):  # the labels the classifier was trained on
            labels = symmetric_label_noise(labels, meta["label_noise"], C, seed=meta["config"]["seed"])
        # the validation the classifier had (weights written before "val_split" was recorded: the same rule)
        vname = meta["val_split"] if "val_split" in meta else _val_split(tds, meta["split"], None)
        crossfit = meta["config"].get("validation") == "crossfit"
        if crossfit:  # the classifier's own rule: L2 on the pooled out-of-fold class-mean top-1, fit on every row
            say(f"logistic probe: L2 by cross-fitting {len(labels)} training rows, then fitted on all of them")
            probe = crossfit_probe(t_img, labels, C, seed=meta["config"]["seed"])
        elif vname is not None:
            vds = read_split(dataset, vname)
            fit_x, fit_y, val = t_img, labels, (_embed(vds, encoder, cache_dir, progress)[0], vds.labels)
        else:
            held = _held_out(labels, meta["config"]["seed"], meta["config"].get("validation", "top1"))
            fit_x, fit_y, val = t_img[~held], labels[~held], (t_img[held], labels[held])
        if not crossfit:
            say(f"logistic probe: fitting on {len(fit_y)} training rows, L2 chosen on {len(val[1])} held-out rows")
            # the rows the classifier trained on, no more: the validation rows only choose λ (as its epoch)
            probe = fit_logistic_probe(fit_x, fit_y, C, val=val, refit_with_val=False)
        pred = probe_logits(probe, img).argmax(axis=1)
        out["logistic_probe"] = group_accuracy(pred, ds.labels, counts) | {
            "l2": probe["l2"], "val_top1_by_l2": probe["val_top1"],
            "fit": f"split {meta['split']!r}" + _probe_fit_words(crossfit, vname)}
    if memory is None:
        out["knn_vote"] = {"not_computed": "no memory given"}
    else:
        search = search_vectors(memory, img, keys)
        pred, how = knn_vote_predictions(memory, search, ds.class_names, int(meta["config"]["k"]),
                                         exclude=own_rows(memory, search))
        out["knn_vote"] = ({"not_computed": how} if pred is None else
                           group_accuracy(pred, ds.labels, counts) | {"k": int(meta["config"]["k"]), "labels": how})
    return out
