"""Training and evaluation of the memory-attention classifier on precomputed embeddings, memory searched in the loop.

::

    cfg = ClassifyConfig(k=10, values="text")
    params, info = train_classifier(img, keys, labels, C, memory, cfg, exclude=own_rows(memory, keys),
                                    val=(v_img, v_keys, v_labels), checkpoint="run.ckpt.npz")
    save_classifier("w.npz", params, make_meta(cfg, info, ...))
    result = evaluate_classifier(*load_classifier("w.npz"), t_img, t_keys, t_labels, memory)

Every mini-batch searches the memory for its queries' ``k`` nearest image keys (the query's own item excluded
when the training images are in the memory), gathers the items' keys and values, and takes one AdamW step.
The number of epochs kept is chosen on validation rows (never on the test split): the parameters of the best
validation epoch are returned.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..backends import blas_threads
from ..errors import CheckpointError, ParamsFormatError, ShapeError
from ..io import ArraySpec, atomic_save_npz, load_npz
from ..train.checkpoint import load_checkpoint, save_checkpoint
from ..train.optim import adamw_init, adamw_step, lr_at
from .items import _dims, label_values, memory_row_labels, retrieve_items, search_vectors
from .model import ATTENTION_MODES, BACKENDS, READOUT_SV0, VALUE_MODES, classify_backward, classify_forward, \
    cross_entropy_backward, cross_entropy_forward, init_params, param_shapes, predict_logits

__all__ = ["ClassifyConfig", "SHOT_GROUPS", "HEAD_INITS", "retrieve_items", "search_vectors", "train_classifier",
           "prompt_head", "evaluate_classifier", "shot_groups", "save_classifier", "load_classifier", "holdout_rows",
           "symmetric_label_noise", "FORMAT", "VALIDATIONS", "log_prior", "balanced_top1", "READOUT_VALUES",
           "memory_row_labels", "label_values"]

FORMAT = "reco_ref.classify/1"
#: ImageNet-LT convention on the training split's class counts: many > 20, medium 5..20, few < 5
SHOT_GROUPS = ("many", "medium", "few")
#: how the linear head W_c, b_c starts: random (the paper's), at the logistic probe [ours], or at the class prompts'
#: text embeddings [ours] (a zero-shot cosine classifier at step 0)
HEAD_INITS = ("random", "probe", "prompts")
#: the score readout's start scales tried on the validation rows (``ClassifyConfig.readout_scale = 0``)
READOUT_SCALES = (16.0, 32.0, 64.0, 128.0, 256.0)
#: what the score readout reads of each item [ours]: its caption embedding against the class prompts (a soft vote
#: blurred by how close the prompts are), or its label (an exact soft vote; needs a memory whose rows name classes)
READOUT_VALUES = ("caption", "label")
#: how the epoch kept is chosen (``ClassifyConfig.validation``)
VALIDATIONS = ("top1", "balanced", "crossfit")


@dataclass
class ClassifyConfig:
    """Hyperparameters of one run (stored in the weights; a checkpoint only resumes the same config)."""

    memory: bool = True
    k: int = 10
    values: str = "text"
    attention: str = "softmax"
    width: int = 64  # width 64, 8 epochs, lr 2e-3: validation top-1 as 128 / 30 / 1e-3 at a third of the time
    heads: int = 4
    logit_scale: float = 32.0  # chosen on CUB-100-LT r10 held-out train rows among 1, 8, 16, 32 (docs/classify.md)
    epochs: int = 8
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_epochs: int = 1
    seed: int = 0
    backend: str = "numpy"
    readout: bool = False  # [ours] the score readout: a soft vote of the items' captions against the class prompts
    readout_template: str = "a photo of a {}."  # class prompt of the readout and of head_init "prompts"
    # "probe" [ours]: W_c, b_c start at the logistic probe's solution; "prompts" [ours]: at the class prompts' text
    # embeddings (zero-shot). Either way epoch 0, the start, is a candidate for the epoch kept
    head_init: str = "random"
    # [ours] logit-adjusted loss (Menon et al., ICLR 2021): train on logits + tau·log(pi) (pi: the training split's
    # class frequencies), predict with the plain logits — for a class-balanced test, tau = 1 is the consistent choice
    logit_adjust: float = 0.0
    # how the epoch kept is chosen: "top1" on the validation rows (the paper's), or [ours] "balanced": held-out rows
    # that cover the tail (at least one of every class with >= 2 rows) and the class-mean top-1 on them, or [ours]
    # "crossfit": every choice (the probe's L2, the readout's scale, the epoch) on out-of-fold predictions of all the
    # training rows (reco_ref.classify.crossfit), then one run on all of them
    validation: str = "top1"
    # [ours] the score readout's scale s_v at the start: > 0 fixed; 0 = chosen on the validation rows among
    # READOUT_SCALES (the readout is added to the head's logits, so its useful scale depends on the head's)
    readout_scale: float = 0.0
    # [ours] what the score readout reads of each item: "caption" (its caption embedding read against the class
    # prompts) or "label" (its class, one-hot: r·T_c^T becomes the score-weighted vote itself)
    readout_values: str = "caption"

    def check(self) -> "ClassifyConfig":
        if self.values not in VALUE_MODES:
            raise ShapeError(f"values: expected one of {VALUE_MODES}, got {self.values!r}")
        if self.backend not in BACKENDS:
            raise ShapeError(f"backend: expected one of {BACKENDS}, got {self.backend!r}")
        for name in ("k", "epochs", "batch_size", "width", "heads"):
            if int(getattr(self, name)) < 1:
                raise ShapeError(f"{name}: expected a positive integer, got {getattr(self, name)}")
        if self.attention not in ATTENTION_MODES + ("none",):
            raise ShapeError(f"attention: expected one of {ATTENTION_MODES + ('none',)}, got {self.attention!r}")
        if self.readout and not self.memory:
            raise ShapeError("readout: the score readout reads memory items; it needs a memory (not --no-memory)")
        if self.readout and self.values == "image":
            raise ShapeError("readout: the score readout reads the items' captions; use values 'text' or 'both'")
        if self.attention == "none" and not self.readout:
            raise ShapeError("attention 'none' (no attention module) only goes with the score readout (--readout)")
        if self.head_init not in HEAD_INITS:
            raise ShapeError(f"head_init: expected one of {HEAD_INITS}, got {self.head_init!r}")
        if not (np.isfinite(self.logit_adjust) and 0 <= self.logit_adjust <= 10):
            raise ShapeError(f"logit_adjust: expected a finite tau in [0, 10], got {self.logit_adjust!r}")
        if not (np.isfinite(self.readout_scale) and self.readout_scale >= 0):
            raise ShapeError(f"readout_scale: expected 0 (choose on validation) or a positive scale, "
                             f"got {self.readout_scale!r}")
        if self.readout_values not in READOUT_VALUES:
            raise ShapeError(f"readout_values: expected one of {READOUT_VALUES}, got {self.readout_values!r}")
        if self.readout_values != "caption" and not self.readout:
            raise ShapeError("readout_values: only the score readout (--readout) reads the items' labels")
        if self.validation not in VALIDATIONS:
            raise ShapeError(f"validation: expected one of {VALIDATIONS}, got {self.validation!r}")
        if (self.readout or self.head_init == "prompts") and "{}" not in self.readout_template:
            raise ShapeError(f"readout_template: expected a '{{}}' for the class name, got {self.readout_template!r}")
        return self

    def fingerprint(self) -> str:
        d = dataclasses.asdict(self)
        d.pop("backend")  # numpy and numba runs are the same run (equal up to rounding)
        # added later: a run without them keeps the fingerprint it had
        for name, off in (("logit_adjust", 0.0), ("validation", "top1"), ("readout_values", "caption")):
            if d[name] == off:
                d.pop(name)
        if not d["readout"]:  # the readout's start scale means nothing without the readout
            d.pop("readout_scale")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Labels: held-out rows and synthetic noise
# ----------------------------------------------------------------------------------------------


def holdout_rows(labels: np.ndarray, frac: float = 0.1, seed: int = 0, tail: bool = False) -> np.ndarray:
    """Bool mask of held-out rows: ``floor(frac·n_c)`` of each class (seeded), so classes with < 1/frac rows
    (the few-shot tail) lose nothing. ``tail=True``: at least one row of every class that has two or more, so the
    validation rows see the tail (a class with one row keeps it: it would otherwise not be trained at all)."""
    held = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n = int(np.floor(frac * len(idx)))
        if tail and len(idx) >= 2:
            n = max(n, 1)
        if n:
            held[idx[np.random.default_rng([seed, int(c)]).permutation(len(idx))[:n]]] = True
    return held


def log_prior(labels: np.ndarray, classes: int) -> np.ndarray:
    r"""Log class frequencies of the training labels, :math:`\log \pi_c = \log (n_c / N)`, float64 ``[C]``.

    A class with no training row counts as one (a finite prior: its logit adjustment stays finite)."""
    counts = np.maximum(np.bincount(np.asarray(labels, np.int64), minlength=classes)[:classes], 1).astype(np.float64)
    return np.log(counts / counts.sum())


def balanced_top1(pred: np.ndarray, labels: np.ndarray) -> float:
    """Class-mean top-1: the top-1 of each class present in ``labels``, averaged over those classes (what a
    class-balanced test measures, read on long-tailed validation rows)."""
    labels = np.asarray(labels)
    hit = np.asarray(pred) == labels
    return float(np.mean([hit[labels == c].mean() for c in np.unique(labels)])) if len(labels) else float("nan")


def symmetric_label_noise(labels: np.ndarray, rate: float, classes: int, seed: int = 0) -> np.ndarray:
    """Each label replaced, with probability ``rate``, by one of the *other* classes drawn uniformly (seeded)."""
    if not 0 <= rate < 1:
        raise ShapeError(f"label noise rate: expected 0 <= rate < 1, got {rate}")
    rng = np.random.default_rng([seed, 0x401])
    flip = rng.random(len(labels)) < rate
    other = (labels + rng.integers(1, classes, len(labels))) % classes  # uniform over the C-1 other classes
    return np.where(flip, other, labels).astype(np.int64)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


def prompt_head(class_text: np.ndarray, logit_scale: float) -> tuple[np.ndarray, np.ndarray]:
    r"""The linear head of a zero-shot cosine classifier over the class prompts' text embeddings [ours].

    .. math::

        W = s\,\hat T^\top,\quad b = 0,\qquad \hat t_c = t_c / \lVert t_c \rVert

    in the units of ``train_classifier``'s ``head`` (logits ``= q W + b``). The query embeddings are unit vectors and
    the module starts at ``z = q`` (``W_o = 0``), so at step 0 the logits are :math:`s \cos(q, t_c)`: every class,
    few-shot ones included, starts from its prompt instead of a random row that 2–4 images barely move. Needs the
    text embeddings in the image embeddings' space (a CLIP-style pair: same width ``D``).

    Parameters
    ----------
    class_text : ndarray, shape [C, D] — the class prompts' text embeddings (the score readout's ``ro_class_text``)
    logit_scale : float — the classifier's fixed scale :math:`s`

    Returns
    -------
    W : ndarray [D, C], b : ndarray [C] (float64)
    """
    T = np.asarray(class_text, np.float64)
    if T.ndim != 2:
        raise ShapeError(f"class_text: expected [C, D], got shape {T.shape}")
    norms = np.linalg.norm(T, axis=1, keepdims=True)
    if not (np.isfinite(norms).all() and (norms > 0).all()):
        raise ShapeError("class_text: a class prompt's text embedding is zero or not finite")
    return float(logit_scale) * (T / norms).T, np.zeros(T.shape[0])


def _items(memory, search, cfg, exclude, row_labels, classes, dtype=np.float32):
    """Keys, values, valid, scores of the ``k`` nearest items, and what the readout reads when it is not the
    captions (the label readout's one-hot labels; None otherwise)."""
    K, V, valid, sc, rows = retrieve_items(memory, search, cfg.k, cfg.values, exclude, dtype, with_scores=True,
                                           with_rows=True)
    ro_v = None
    if cfg.readout and cfg.readout_values == "label":
        if row_labels is None:
            raise ShapeError("readout values 'label': give the memory rows' labels (memory_row_labels)")
        ro_v = label_values(row_labels, rows, valid, classes, dtype)
    return K, V, valid, sc, ro_v


def _logits_many(param_sets: list[dict], cfg, memory, image, search, exclude, batch_size=1024, row_labels=None
                 ) -> list[np.ndarray]:
    """Logits ``[N, C]`` of each parameter set on the same rows, in batches (bounded memory); each batch's ``k``
    items are retrieved once for all the sets (a grid of start scales or heads reads the same neighbours)."""
    dt = param_sets[0]["w_c"].dtype
    C = param_sets[0]["b_c"].shape[0]
    outs: list[list] = [[] for _ in param_sets]
    for lo in range(0, len(image), batch_size):
        s = slice(lo, lo + batch_size)
        q = image[s].astype(dt, copy=False)
        if cfg.memory and memory is not None:
            K, V, valid, sc, ro_v = _items(memory, search[s], cfg, None if exclude is None else exclude[s],
                                           row_labels, C, dt)
            for params, out in zip(param_sets, outs):
                out.append(predict_logits(params, q, K, V, valid, heads=cfg.heads, attention=cfg.attention,
                                          logit_scale=cfg.logit_scale, backend=cfg.backend, scores=sc,
                                          readout_values=ro_v))
        else:
            for params, out in zip(param_sets, outs):
                out.append(predict_logits(params, q, logit_scale=cfg.logit_scale, backend=cfg.backend))
    return [np.concatenate(out) if out else np.zeros((0, C), dt) for out in outs]


def _logits(params, cfg, memory, image, search, exclude, batch_size=1024, row_labels=None) -> np.ndarray:
    return _logits_many([params], cfg, memory, image, search, exclude, batch_size, row_labels)[0]


def with_readout_scale(params: dict, scale: float) -> dict:
    """``params`` with the score readout's scale set to ``scale`` (a new ``ro_log_sv``; the other arrays shared)."""
    return params | {"ro_log_sv": np.full_like(params["ro_log_sv"], np.log(scale))}


def start_params(cfg: ClassifyConfig, dim: int, classes: int, dims: tuple, *, class_text: np.ndarray | None = None,
                 head: tuple | None = None) -> dict:
    """The start of a run: :func:`init_params` of ``cfg`` (``W_o = 0``; the readout reading ``class_text``), with
    ``head = (W [D, C], b [C])`` in logit units as ``W_c, b_c`` when given (``s·q W_c + b_c = q W + b``)."""
    Dk, Dv = dims
    params = init_params(dim, classes, key_dim=Dk, value_dim=Dv, width=cfg.width, heads=cfg.heads,
                         memory=cfg.memory, attention=cfg.attention, seed=cfg.seed,
                         class_text=class_text if cfg.readout else None)
    if head is not None:  # [ours] start from a given linear head (the probe, the prompts)
        W, b = head
        if np.shape(W) != params["w_c"].shape or np.shape(b) != params["b_c"].shape:
            raise ShapeError(f"head: shapes {np.shape(W)}, {np.shape(b)}, expected {params['w_c'].shape}, "
                             f"{params['b_c'].shape}")
        params["w_c"] = (np.asarray(W, np.float64) / cfg.logit_scale).astype(params["w_c"].dtype)
        params["b_c"] = np.asarray(b, params["b_c"].dtype)
    return params


def _ckpt_params(params: dict, best: dict) -> dict:
    """What a checkpoint holds besides the AdamW state: the current parameters and the kept epoch's (``best.<n>``).
    The arrays are the caller's own, so :func:`load_checkpoint` restores both dicts in place."""
    return params | {f"best.{n}": a for n, a in best.items()}


def train_classifier(image: np.ndarray, search: np.ndarray | None, labels: np.ndarray, classes: int,
                     memory: Any, cfg: ClassifyConfig, *, exclude: np.ndarray | None = None,
                     val: tuple | None = None, checkpoint: str | os.PathLike | None = None, resume: bool = False,
                     progress: bool = True, log: Callable[[str], Any] | None = None,
                     class_text: np.ndarray | None = None, head: tuple | None = None,
                     row_labels: np.ndarray | None = None, stop_after: int | None = None,
                     keep_val_pred: bool = False) -> tuple[dict, dict]:
    """Train on ``image [N,D]`` (queries), ``search [N,Dk]`` (their memory search vectors), ``labels [N]``.

    Parameters
    ----------
    memory : an opened memory, or None (requires ``cfg.memory=False``)
    exclude : int64 [N] — memory row of each training image itself (self-exclusion), -1 for none
    val : ``(image, search, labels, exclude)`` validation rows; the epoch with the best top-1 there is kept.
        None: the last epoch is kept.
    checkpoint : path of an atomic per-epoch checkpoint, in the training loop's format
        (:mod:`reco_ref.train.checkpoint`: the parameters, ``best.<name>`` the kept epoch's, the AdamW state, and
        the epoch, best epoch and history as JSON under the config fingerprint); with ``resume=True`` an existing
        one of the same configuration is continued (another configuration's raises :class:`CheckpointError`). A
        checkpoint of the older inline format (an ``info`` entry, before the formats were merged) is refused with
        a one-line :class:`CheckpointError` naming the file: delete it to start over.
    class_text : [C, Dt] — the class prompts' text embeddings (needed by the caption readout, ``cfg.readout``;
        the label readout reads against the identity instead)
    row_labels : int64 [len(memory)] — each memory row's class (:func:`memory_row_labels`; the label readout's)
    stop_after : stop after this many epochs of the ``cfg.epochs`` schedule (the learning-rate schedule is the full
        run's; cross-fitting's final run stops at the epoch it chose; 0: the start itself)
    keep_val_pred : each history entry also holds the validation rows' predicted classes (``val_pred``; what
        cross-fitting pools over its folds), and the loss summed over them (``val_loss_sum``)
    head : ``(W [D, C], b [C])`` — a linear head in logit units (logits ``= q W + b`` at ``z = q``) to start
        ``W_c, b_c`` from instead of the random init (:func:`prompt_head`, the logistic probe); with ``val`` the
        start is validated as epoch 0 and kept unless an epoch beats it.

    Returns
    -------
    params : dict — the kept parameters (float32)
    info : dict — ``epochs_run``, ``best_epoch``, ``val_top1``, ``history`` (per-epoch loss and val top-1)
    """
    cfg.check()
    if cfg.memory and memory is None:
        raise ShapeError("a memory classifier needs a memory (or train with memory=False / --no-memory)")
    N, D = image.shape
    if cfg.readout and cfg.readout_values == "label":  # [ours] r·T_cᵀ with T_c = I: the score-weighted vote itself
        if row_labels is None:
            raise ShapeError("readout values 'label': the label readout needs the memory rows' labels (row_labels)")
        class_text = np.eye(classes, dtype=np.float32)
    if cfg.readout and class_text is None:
        raise ShapeError("readout: the score readout needs the class prompts' text embeddings (class_text [C, Dt])")
    params = start_params(cfg, D, classes, _dims(memory, cfg.values) if cfg.memory else (None, None),
                          class_text=class_text, head=head)
    # [ours] logit adjustment: the loss reads logits + tau·log(pi); d(loss)/d(logits) keeps its form
    # softmax(logits + tau·log pi) − onehot, so the module's backward is unchanged
    adjust = (cfg.logit_adjust * log_prior(labels, classes)).astype(params["b_c"].dtype) if cfg.logit_adjust else None
    state = adamw_init(params)
    best = {n: a.copy() for n, a in params.items()}
    readout_choice = {}
    start, best_epoch, best_acc, best_loss, history = 0, -1, -1.0, np.inf, []
    steps_per_epoch = -(-N // cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    ckpt = Path(checkpoint) if checkpoint else None
    if ckpt is not None and ckpt.exists():
        if not resume:
            raise CheckpointError(f"{ckpt}: a checkpoint exists; pass resume (--resume) to continue it, or remove it")
        # train/checkpoint.py: the run identity (config fingerprint) first, then each array's header against the
        # array it restores before its data; a checkpoint of the older inline format is refused in one line
        info = load_checkpoint(ckpt, _ckpt_params(params, best), state, cfg.fingerprint())
        start, best_epoch, best_acc, history = info["epoch"], info["best_epoch"], info["best_acc"], info["history"]
        readout_choice = info.get("readout_choice", {})
        best_loss = min((h["val_loss"] for h in history if h["epoch"] == best_epoch and "val_loss" in h),
                        default=np.inf)
        if log:
            log(f"resuming {ckpt} after epoch {start}")
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a runtime dependency
        tqdm = None
    bar = tqdm(total=total, initial=start * steps_per_epoch, desc="classify train", unit="step",
               disable=not progress or tqdm is None) if tqdm else None
    def validate() -> tuple[float, float]:  # (top-1, loss) of the current params on the validation rows
        return score(_logits(params, cfg, memory, *val[:2], val[3], row_labels=row_labels))

    def score(v_logits: np.ndarray) -> tuple[float, float]:  # (top-1, loss) of validation logits
        v_lab = val[2]
        pred = v_logits.argmax(1)
        acc = balanced_top1(pred, v_lab) if cfg.validation != "top1" else float((pred == v_lab).mean())
        v_loss = cross_entropy_forward(v_logits.astype(np.float64), v_lab)[0]
        if keep_val_pred:
            kept_pred[0] = pred.astype(np.int64).tolist()
        return acc, v_loss

    kept_pred = [None]  # the last validation's predictions (keep_val_pred)

    def with_pred(entry: dict, v_loss: float) -> dict:
        if keep_val_pred and kept_pred[0] is not None:
            entry.update(val_pred=kept_pred[0], val_loss_sum=float(v_loss) * len(kept_pred[0]))
        return entry

    at_start = None  # (top-1, loss) of the start on the validation rows, once measured
    if cfg.readout and start == 0:  # [ours] the readout's start scale: fixed, or the validation rows' pick
        scale, by_scale = (cfg.readout_scale or READOUT_SV0), {}
        if not cfg.readout_scale and val is not None:
            with blas_threads(1):  # one retrieval of the validation rows' items for every scale of the grid
                grid = _logits_many([with_readout_scale(params, sv) for sv in READOUT_SCALES], cfg, memory,
                                    *val[:2], val[3], row_labels=row_labels)
            by_scale = {sv: score(lg) for sv, lg in zip(READOUT_SCALES, grid)}
            scale = max(READOUT_SCALES, key=lambda sv: (by_scale[sv][0], -by_scale[sv][1]))
            if log:
                log("readout scale at the start: " + ", ".join(f"{sv:g} → {a:.3f}" for sv, (a, _) in by_scale.items())
                    + f" (validation); kept {scale:g}")
        params["ro_log_sv"][:] = np.log(scale)
        at_start = by_scale.get(scale)  # the kept scale's validation is the start's: not measured again below
        best = {n: a.copy() for n, a in params.items()}
        readout_choice = {"readout_scale_start": scale,
                          "readout_scale_val": {f"{sv:g}": [a, l] for sv, (a, l) in by_scale.items()}}
    if head is not None and val is not None and start == 0:  # the start is a candidate: never end below it
        if at_start is None:
            with blas_threads(1):
                at_start = validate()
        best_acc, best_loss = at_start
        best_epoch = 0
        if keep_val_pred:  # the grid's last validation was another scale's: the start's predictions again
            with blas_threads(1):
                validate()
        history.append(with_pred({"epoch": 0, "val_top1": best_acc, "val_loss": best_loss}, best_loss))
    # small GEMMs: one BLAS thread (threadpoolctl, when installed) — an order of magnitude faster than 2 OpenBLAS
    # threads while another process holds a core (figures: docs/classify.md)
    with blas_threads(1):
        for epoch in range(start, cfg.epochs if stop_after is None else min(cfg.epochs, stop_after)):
            t_epoch = time.perf_counter()
            order = np.random.default_rng([cfg.seed, epoch]).permutation(N)
            losses = []
            for s_i, lo in enumerate(range(0, N, cfg.batch_size)):
                idx = np.sort(order[lo:lo + cfg.batch_size])
                q = image[idx].astype(np.float32, copy=False)
                if cfg.memory:
                    K, V, valid, sc, ro_v = _items(memory, search[idx], cfg,
                                                   None if exclude is None else exclude[idx], row_labels, classes)
                    logits, cache = classify_forward(params, q, K, V, valid, heads=cfg.heads, attention=cfg.attention,
                                                     logit_scale=cfg.logit_scale, backend=cfg.backend, scores=sc,
                                                     readout_values=ro_v)
                else:
                    logits, cache = classify_forward(params, q, logit_scale=cfg.logit_scale, backend=cfg.backend)
                loss, ce = cross_entropy_forward(logits if adjust is None else logits + adjust, labels[idx])
                grads = classify_backward(params, cache, cross_entropy_backward(ce))
                step = epoch * steps_per_epoch + s_i
                lr = lr_at(step, base_lr=cfg.lr, warmup_steps=min(total, cfg.warmup_epochs * steps_per_epoch),
                           total_steps=total)
                adamw_step(params, grads, state, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay)
                losses.append(loss)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(epoch=epoch + 1, loss=f"{loss:.3f}")
            entry = {"epoch": epoch + 1, "loss": float(np.mean(losses))}
            if val is not None:
                acc, v_loss = validate()
                entry["val_top1"], entry["val_loss"] = acc, v_loss
                with_pred(entry, v_loss)
                # ties in top-1 are common on small validation sets: the lower validation loss breaks them
                if (acc, -v_loss) > (best_acc, -best_loss):
                    best_acc, best_loss, best_epoch = acc, v_loss, epoch + 1
                    best = {n: a.copy() for n, a in params.items()}
            else:
                best_epoch, best = epoch + 1, {n: a.copy() for n, a in params.items()}
            history.append(entry)
            if log and epoch == start:  # the first epoch's time tells how long the rest will take
                took = time.perf_counter() - t_epoch
                log(f"epoch {epoch + 1}/{cfg.epochs}: {took:.1f} s"
                    + (f"; about {took * (cfg.epochs - epoch - 1):.0f} s to go" if epoch + 1 < cfg.epochs else ""))
            if ckpt is not None:
                save_checkpoint(ckpt, _ckpt_params(params, best), state,
                                {"config_hash": cfg.fingerprint(), "epoch": epoch + 1, "best_epoch": best_epoch,
                                 "best_acc": best_acc, "history": history, "readout_choice": readout_choice})
    if bar is not None:
        bar.close()
    return best, {"epochs_run": len([h for h in history if h.get("epoch", 0) > 0]), "best_epoch": best_epoch,
                  "val_top1": best_acc if val is not None else None, "history": history, **readout_choice}


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------


def shot_groups(train_counts: np.ndarray) -> np.ndarray:
    """Group of each class from its training image count: 0 many (> 20), 1 medium (5–20), 2 few (< 5)."""
    c = np.asarray(train_counts)
    return np.where(c > 20, 0, np.where(c >= 5, 1, 2))


def evaluate_classifier(params: dict, meta: dict, image: np.ndarray, search: np.ndarray | None, labels: np.ndarray,
                        memory: Any, *, exclude: np.ndarray | None = None, backend: str | None = None) -> dict:
    """Top-1 overall and per shot group (groups from ``meta["train_class_counts"]``) → the issue-10 JSON dict."""
    cfg = ClassifyConfig(**meta["config"])
    if backend:
        cfg.backend = backend
    row_labels = None
    if cfg.memory and memory is not None and cfg.readout and cfg.readout_values == "label":
        row_labels = memory_row_labels(memory, meta["class_names"])[0]
    logits = _logits(params, cfg, memory, image, search, exclude, row_labels=row_labels)
    pred = logits.argmax(1)
    hit = pred == labels
    groups = shot_groups(meta["train_class_counts"])[labels]
    C = len(meta["train_class_counts"])
    per_class = [float(hit[labels == c].mean()) for c in range(C) if (labels == c).any()]
    out = {"top1": float(hit.mean()) if len(hit) else None, "n": int(len(labels)), "classes": int(C)}
    for g, name in enumerate(SHOT_GROUPS):
        sel = groups == g
        out[name] = float(hit[sel].mean()) if sel.any() else None
        out[f"n_{name}"] = int(sel.sum())
        out[f"classes_{name}"] = int((shot_groups(meta["train_class_counts"]) == g).sum())
    out["mean_per_class"] = float(np.mean(per_class)) if per_class else None
    out["memory_overlap"] = int((exclude >= 0).sum()) if exclude is not None else 0
    out["config"] = meta["config"]
    return out


# ----------------------------------------------------------------------------------------------
# Weights file
# ----------------------------------------------------------------------------------------------


_JSON_ENTRY = ArraySpec((None,), np.uint8, max_bytes=64 << 20)  # the weights file's JSON meta: KBs in practice


def save_classifier(path: str | os.PathLike, params: dict, meta: dict) -> None:
    """One ``.npz``: ``param.<name>`` arrays + ``meta`` (JSON as uint8 bytes; no pickle), written atomically."""
    arrays = {f"param.{n}": np.asarray(a) for n, a in params.items()}
    arrays["meta"] = np.frombuffer(json.dumps(dict(meta, format=FORMAT)).encode(), np.uint8)
    atomic_save_npz(path, arrays)


def load_classifier(path: str | os.PathLike) -> tuple[dict, dict]:
    """``(params, meta)`` of a file from :func:`save_classifier`, checked against the configuration it records."""
    z = load_npz(path, only=["meta"], expect={"meta": _JSON_ENTRY})  # the meta says which arrays to expect
    try:
        meta = json.loads(bytes(z["meta"]).decode())
    except (KeyError, ValueError):
        raise ParamsFormatError(f"{path}: no readable 'meta' entry (not a reco-ref classify weights file)") from None
    if meta.get("format") != FORMAT:
        raise ParamsFormatError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    try:
        cfg = ClassifyConfig(**meta["config"]).check()
        dims = meta["dims"]
        expect = param_shapes(dims["dim"], dims["classes"], key_dim=dims.get("key_dim"),
                              value_dim=dims.get("value_dim"), width=cfg.width, memory=cfg.memory,
                              attention=cfg.attention, readout_dim=dims.get("readout_dim") if cfg.readout else None)
        if len(meta["train_class_counts"]) != dims["classes"]:
            raise ParamsFormatError(f"{path}: train_class_counts has {len(meta['train_class_counts'])} entries, "
                                    f"expected classes={dims['classes']}")
    except (KeyError, TypeError) as exc:
        raise ParamsFormatError(f"{path}: meta lacks a valid entry ({exc})") from None
    # each array's header is checked against its expected shape before any data is read
    z = load_npz(path, expect={"meta": _JSON_ENTRY, **{f"param.{n}": ArraySpec(tuple(shape), kind="f")
                                                       for n, shape in expect.items()}})
    params = {}
    for n, shape in expect.items():
        a = z.get(f"param.{n}")
        if a is None or a.shape != tuple(shape) or a.dtype.kind != "f":
            raise ParamsFormatError(f"{path}: param.{n}: expected float {tuple(shape)}, found "
                                    f"{None if a is None else (a.dtype, a.shape)}")
        if not np.isfinite(a).all():
            raise ParamsFormatError(f"{path}: param.{n} holds NaN/inf")
        params[n] = a.astype(np.float32)
    return params, meta
