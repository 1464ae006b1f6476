"""``reco-ref train`` — argument parsing only; the work is in :func:`reco_ref.train.loop.train` /
:func:`reco_ref.train.commands.train_command`. The recipe/data option groups are reused by ``reco-ref ablate``
(registered by :mod:`reco_ref.eval.cli`, since ablations are evaluation and eval may import train, not back).
"""

from __future__ import annotations

import argparse

from ..checks import float_option, int_option
from ..checks import positive_int as _positive
from ..options import ONNX_NO_BACKWARD, add_backend, add_k, add_memory, add_resume, add_scheduler

# The numbers a recipe can mean: nan, inf and negatives reached the internals (or ended a run at save time).
_nonneg = float_option(0.0)  # --lr, --min-lr, --weight-decay
_positive_float = float_option(0.0, lo_open=True)  # --alpha, --weight
_finite = float_option()  # --rel-beta, --rel-gamma
_fraction = float_option(0.0, 1.0, hi_open=True)  # --irrelevant-fraction
SEED = int_option(0, 2**32 - 1)  # numpy seeds are non-negative; the range of commands.SEED_MAX


def _cosine_or_off(text: str) -> float | None:
    if text.lower() in ("off", "none"):
        return None
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a cosine in (-1, 1] or 'off', got {text!r}") from None
    if not -1.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a cosine in (-1, 1] or 'off', got {text}")
    return v


def add_recipe_args(p: argparse.ArgumentParser) -> None:
    """Training-recipe options shared by ``train`` and ``ablate`` (defaults = :class:`TrainConfig`'s)."""
    from .recipe import TrainConfig

    d = TrainConfig()
    g = p.add_argument_group("recipe")
    add_k(g, default=d.k, help=f"neighbours per query (default {d.k})")
    g.add_argument("--search", choices=("uni", "cross"), default=d.search, help="index searched (default uni)")
    g.add_argument("--fuse", choices=("cross", "uni"), default=d.fuse, help="modality fed to φ (default cross)")
    g.add_argument("--dup-threshold-image", type=_cosine_or_off, default=d.dup_threshold_image,
                   help="drop image-index neighbours with cosine >= this (default 0.98; 'off')")
    g.add_argument("--dup-threshold-text", type=_cosine_or_off, default=d.dup_threshold_text,
                   help="drop text-index neighbours with cosine >= this (default off: identical class captions "
                        "of other rows are the signal)")
    g.add_argument("--allow-repeated-captions", action="store_true",
                   help="let a batch hold a caption more than once (default: each caption at most once)")
    g.add_argument("--exact", action="store_true", help="brute-force retrieval instead of HNSW")
    g.add_argument("--batch-size", type=_positive, default=d.batch_size, help=f"pairs per step (default {d.batch_size})")
    g.add_argument("--epochs", type=_positive, default=d.epochs, help=f"epochs (default {d.epochs})")
    g.add_argument("--steps-per-epoch", type=_positive, default=None,
                   help="cap on batches per epoch, a seeded subset of the shuffled epoch (default: a full pass)")
    g.add_argument("--lr", type=_nonneg, default=d.lr, help=f"peak learning rate (default {d.lr})")
    g.add_argument("--min-lr", type=_nonneg, default=d.min_lr, help="final learning rate of the cosine (default 0)")
    g.add_argument("--warmup-steps", type=int_option(0), default=d.warmup_steps,
                   help=f"linear warm-up (default {d.warmup_steps})")
    g.add_argument("--weight-decay", type=_nonneg, default=d.weight_decay, help="AdamW decay on matrices (default 0.2)")
    g.add_argument("--heads", type=_positive, default=d.heads, help=f"attention heads (default {d.heads})")
    g.add_argument("--seed", type=SEED, default=d.seed, help="init and data-order seed, 0 … 2³²−1 (default 0)")
    add_backend(g, default=d.backend, help="fusion/InfoNCE backend", exclude={"onnx": ONNX_NO_BACKWARD})
    g.add_argument("--checkpoint-every", type=_positive, default=d.checkpoint_every,
                   help=f"steps between checkpoints (default {d.checkpoint_every})")
    g.add_argument("--init", choices=("identity", "copy"), default=d.init,
                   help="fusion init: identity (spec: x̄ = x at step 0) or copy [ours]: x + α·mean of the neighbours")
    g.add_argument("--alpha", type=_positive_float, default=d.alpha,
                   help=f"gain α of the copy init, > 0 (default {d.alpha})")
    g.add_argument("--relevance", action="store_true",
                   help="[ours] the layer reads each neighbour's search score: β·s_j toward neighbour j, γ toward the "
                        "query (score map: z-score against unrelated pairs of the first training memory)")
    g.add_argument("--rel-beta", type=_finite, default=d.rel_beta, help=f"initial β per head (default {d.rel_beta})")
    g.add_argument("--rel-gamma", type=_finite, default=d.rel_gamma,
                   help=f"initial γ per head (default {d.rel_gamma})")
    g.add_argument("--rel-map", choices=("unrelated", "neighbour", "memory"), default=d.rel_map,
                   help="score map of the relevance bias: z-score against unrelated pairs (default) or centred at the "
                        "typical nearest-neighbour cosine of the training memory (both fixed in the weights), or "
                        "'memory': measured on whichever memory is searched, in training and at use time")
    g.add_argument("--train-groups", choices=("all", "relevance"), default=d.train_groups,
                   help="what trains: every array (default) or only β, γ and τ ('relevance')")
    g.add_argument("--hold-threshold", action="store_true",
                   help="[ours] with --train-groups relevance: γ tied to β so each head's gate threshold (γ − ln k)/β "
                        "stays where it starts (only the gate's sharpness trains)")
    g.add_argument("--irrelevant-fraction", type=_fraction, default=d.irrelevant_fraction,
                   help="[ours] share of irrelevant-memory batches: each query's own class excluded from its search "
                        "(needs labelled memories; default 0 = off)")
    g.add_argument("--select-on", choices=("top1", "loss"), default=d.select_on,
                   help="validation score the kept weights are chosen on (default top1)")


def add_data_args(p: argparse.ArgumentParser) -> None:
    """Training sources and validation sets (shared by ``train`` and ``ablate``)."""
    g = p.add_argument_group("data")
    add_memory(g, action="append",
               help="training pairs = this memory's rows (repeat for several sources; built with build-memory "
                    "--pairs MANIFEST --split train --caption-template ...)")
    g.add_argument("--retrieval", action="append", metavar="DIR",
                   help="memory the matching --memory retrieves from ('same' = itself, the default; repeat in order)")
    g.add_argument("--weight", action="append", type=_positive_float, metavar="W",
                   help="share of batches of the matching --memory, a number > 0 (default: its number of rows)")
    g.add_argument("--val-memory", action="append", metavar="DIR",
                   help="held-out validation pairs (never a test split); labels from its metadata")
    g.add_argument("--val-retrieval", action="append", metavar="DIR",
                   help="memory the matching --val-memory retrieves from (the training rows)")
    g.add_argument("--val-classes", action="append", metavar="MANIFEST",
                   help="dataset manifest naming the classes of the matching --val-memory's labels")
    g.add_argument("--template", action="append", metavar="T",
                   help='class prompt template(s) for validation zero-shot (default "a photo of a {}.")')
    g.add_argument("--model", default="reco-mini", help="encoder for the class prompts (default reco-mini)")


def _run_train(a: argparse.Namespace) -> int:
    from ..paths import check_output_dir
    from .commands import train_command

    check_output_dir(a.out, ("config.json", "best.npz", "last.npz", "log.jsonl"), overwrite=a.overwrite,
                     resume_from="checkpoint.npz")
    train_command(a)
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "train", help="train RECO's fusion modules (φ_I, φ_T, τ) on a memory's pairs; resumable (--resume)",
        description="Train φ_I, φ_T and τ on the image–caption pairs of one or more memories (encoders frozen), "
                    "retrieving each pair's neighbours from a memory with its own row excluded. Writes OUT/best.npz "
                    "(best on validation), OUT/last.npz, OUT/log.jsonl, OUT/checkpoint.npz.")
    add_data_args(p)
    add_scheduler(p, what="retrieve from them there (every --memory, --retrieval, --val-*; same weights)")
    add_recipe_args(p)
    # --model names the encoder in every verb; the trained layer is --layer (--control: its old spelling)
    p.add_argument("--layer", "--control", dest="control", choices=("reco", "mlp"), default="reco",
                   help="which layer is trained: the fusion layer (default) or the equal-size MLP control "
                        "(--control is its alias)")
    p.add_argument("--out", required=True, help="output folder")
    add_resume(p, help="continue from OUT/checkpoint.npz (bit-identical)")
    p.add_argument("--overwrite", action="store_true", help="replace the files of a finished run in OUT")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_train)

