"""``reco-ref classify train|eval`` — parsing only; the work is :mod:`reco_ref.classify.commands`."""

from __future__ import annotations

import argparse

from ..checks import float_option, int_option
from ..options import add_backend, add_cache_dir, add_k, add_memory, add_resume, add_scheduler, add_weights
from ..paths import add_overwrite_option, check_output_dir, check_output_files

_count = int_option(1)
_nonneg = float_option(0.0)
#: the registered backends the classifier has no kernels for (its own dispatch: classify/model.py)
_BACKEND_EXCLUDE = {"cuda": "the classifier has no CUDA kernels", "onnx": "the classifier has no ONNX graph"}


def _encoder(a: argparse.Namespace):
    from ..memory.producers import load_encoder

    return load_encoder(a.model)


def _run_train(a: argparse.Namespace) -> int:
    from .commands import check_config, train_from_manifest
    from .train import ClassifyConfig

    if not a.no_memory and not a.memory:
        raise FileNotFoundError("--memory DIR is required (or train the no-memory classifier with --no-memory)")
    cfg = ClassifyConfig(memory=not a.no_memory, k=a.k, values=a.values, attention=a.attention, width=a.width,
                         heads=a.heads, logit_scale=a.logit_scale, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr,
                         weight_decay=a.weight_decay, seed=a.seed, backend=a.backend, readout=a.readout,
                         readout_template=a.readout_template, head_init=a.head_init,
                         logit_adjust=a.logit_adjust, validation=a.validation, readout_scale=a.readout_scale,
                         readout_values=a.readout_values)
    check_config(cfg)
    check_output_files([a.out], overwrite=a.overwrite)
    _check_cache_dir(a.cache_dir)
    from ..memory import scheduler_client

    with scheduler_client(a.scheduler) as client:  # --scheduler: the memory is served by that Dask cluster
        train_from_manifest(a.dataset, a.split, a.memory, a.out, cfg, encoder=_encoder(a), cache_dir=a.cache_dir,
                            val_split=a.val_split, label_noise=a.label_noise, resume=a.resume,
                            progress=not a.no_progress, quiet=a.quiet, client=client)
    return 0


def _check_cache_dir(cache_dir) -> None:
    """``--cache-dir`` is written to (embedding caches): never a file's place, never inside a memory."""
    from ..eval.data import cache_disabled

    if cache_dir is not None and not cache_disabled(cache_dir):
        check_output_dir(cache_dir, (), what="--cache-dir")


def _run_eval(a: argparse.Namespace) -> int:
    from .commands import eval_from_manifest

    stem = str(a.json)[:-5] if str(a.json).endswith(".json") else str(a.json)
    check_output_files([a.json, a.markdown or stem + ".md", a.png or stem + ".png"], overwrite=a.overwrite,
                       what="--json/--markdown/--png")
    _check_cache_dir(a.cache_dir)
    from ..memory import scheduler_client

    with scheduler_client(a.scheduler) as client:  # --scheduler: the memory is served by that Dask cluster
        eval_from_manifest(a.weights, a.dataset, a.split, a.memory, a.json, encoder=_encoder(a),
                           cache_dir=a.cache_dir, backend=a.backend, markdown=a.markdown or stem + ".md",
                           png=a.png or stem + ".png", progress=not a.no_progress, quiet=a.quiet,
                           baselines=not a.no_baselines, client=client)
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True, help="dataset manifest (file,label,class_name,split) or its folder")
    add_memory(p, required=False, help="memory directory (reco-ref build-memory)")
    add_scheduler(p, what="retrieve from it there (same results)")
    p.add_argument("--model", default="reco-mini", help="encoder of the memory (name, folder, or module:factory)")
    add_cache_dir(p, help="embedding cache folder (default $RECO_REF_CACHE, else ~/.cache/reco_ref/embeddings; "
                          "'off' = no cache)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")


def register(subparsers) -> None:
    p = subparsers.add_parser("classify", help="memory-attention classifier (CVPR 2023): train | eval",
                              description="Image classifier whose query attends over its retrieved memory items "
                                          "(docs/reco.md §5), trained on a dataset manifest's split.")
    sub = p.add_subparsers(dest="classify_verb", metavar="train|eval", required=True)
    from .train import HEAD_INITS, READOUT_VALUES, VALIDATIONS, ClassifyConfig

    d = ClassifyConfig()
    t = sub.add_parser("train", help="train on a split; write WEIGHTS.npz")
    _common(t)
    t.add_argument("--split", default="train", help="split to train on (default train)")
    t.add_argument("--out", required=True, help="weights file to write (.npz)")
    t.add_argument("--no-memory", action="store_true", help="the same classifier without memory (m = 0)")
    t.add_argument("--val-split", help="validation split for the epoch kept (default: valid/val if present, "
                                       "else 10%% of each class's train rows)")
    add_k(t, type=_count, default=10, help="memory items per query (default 10)")
    t.add_argument("--values", default="text", choices=("text", "image", "both"), help="item values (default text)")
    t.add_argument("--attention", default="softmax", choices=("softmax", "uniform", "none"),
                   help="softmax (default) or uniform average of the items (the attention-removed baseline); 'none' "
                        "(with --readout): no attention module, the memory feeds the readout only")
    t.add_argument("--readout", action="store_true",
                   help="[ours] add the score readout: the items' caption embeddings, weighted by a softmax of their "
                        "search score, read against the class prompts (a soft vote the classifier learns to weigh)")
    t.add_argument("--head-init", default=d.head_init, choices=HEAD_INITS,
                   help="[ours] 'probe': the linear head starts at the logistic probe's solution (fitted on the training "
                        "rows, L2 chosen on the validation rows); 'prompts': at the class prompts' text embeddings "
                        "(--readout-template; a zero-shot cosine classifier); either way epoch 0 is a candidate "
                        "(default random)")
    t.add_argument("--readout-scale", type=_nonneg, default=d.readout_scale, metavar="S",
                   help="[ours] the score readout's scale at the start; 0 (default): chosen on the validation rows "
                        "among 16, 32, 64, 128, 256 (16 without validation rows)")
    t.add_argument("--readout-values", default=d.readout_values, choices=READOUT_VALUES,
                   help="[ours] what the score readout reads of each item: 'caption' (default; its caption embedding "
                        "against the class prompts) or 'label' (its class, one-hot: the readout is then the "
                        "score-weighted vote itself; needs a memory whose label column or captions name the classes)")
    t.add_argument("--logit-adjust", type=float_option(0.0, 10.0), default=d.logit_adjust, metavar="TAU",
                   help="[ours] logit-adjusted loss for a long-tailed training split: train on logits + TAU·log(class "
                        "frequency), predict with the plain logits (1 = the consistent choice for a class-balanced "
                        "test; with --head-init probe the probe's bias is adjusted the same way; default 0, off)")
    t.add_argument("--validation", default=d.validation, choices=VALIDATIONS,
                   help="how the epoch kept is chosen: 'top1' on the validation rows (default), or [ours] 'balanced': "
                        "held-out rows include one of every class with >= 2 rows and the class-mean top-1 decides")
    t.add_argument("--readout-template", default=d.readout_template,
                   help="class prompt of the readout and of --head-init prompts (the memory's caption template; "
                        f"default {d.readout_template!r})")
    t.add_argument("--width", type=_count, default=d.width, help=f"attention width (default {d.width})")
    t.add_argument("--heads", type=_count, default=4, help="attention heads (default 4)")
    t.add_argument("--logit-scale", type=float_option(0.0, lo_open=True), default=32.0,
                   help="fixed logit scale s > 0 (default 32)")
    t.add_argument("--epochs", type=_count, default=d.epochs, help=f"epochs (default {d.epochs})")
    t.add_argument("--batch-size", type=_count, default=128, help="batch size (default 128)")
    t.add_argument("--lr", type=_nonneg, default=d.lr, help=f"AdamW learning rate (default {d.lr:g})")
    t.add_argument("--weight-decay", type=_nonneg, default=1e-4, help="AdamW weight decay (default 1e-4)")
    t.add_argument("--label-noise", type=float_option(0.0, 1.0, hi_open=True), default=0.0,
                   help="symmetric label noise rate in [0, 1) (experiments)")
    t.add_argument("--seed", type=int_option(0, 2**32 - 1), default=0,
                   help="seed of init, batches, hold-out and noise, 0 … 2³²−1")
    add_backend(t, exclude=_BACKEND_EXCLUDE, help="compute backend")
    add_resume(t, help="continue an interrupted run (OUT.ckpt.npz)")
    add_overwrite_option(t, what="an existing OUT")
    t.set_defaults(func=_run_train)
    e = sub.add_parser("eval", help="evaluate WEIGHTS.npz on a split; write the JSON (+ .md, .png)")
    _common(e)
    add_weights(e, dest="weights", required=True, help="classifier weights from `reco-ref classify train`")
    e.add_argument("--split", default="test", help="split to evaluate (default test)")
    e.add_argument("--json", required=True, help="result JSON to write")
    e.add_argument("--markdown", help="Markdown table (default: JSON path with .md)")
    e.add_argument("--png", help="bar chart (default: JSON path with .png)")
    add_backend(e, exclude=_BACKEND_EXCLUDE, default=None, help="compute backend (default: training's)")
    e.add_argument("--no-baselines", action="store_true",
                   help="skip the logistic-regression probe and the k-NN vote reported beside the classifier")
    add_overwrite_option(e, what="the JSON, Markdown and PNG files")
    e.set_defaults(func=_run_eval)
