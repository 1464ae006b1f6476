"""What defines a training run: :class:`TrainConfig` (the recipe, whose hash guards checkpoints), a validation set
(:class:`ValSet`) and what :func:`reco_ref.train.loop.train` returns (:class:`TrainResult`).

N pairs rows, C classes, D embedding width.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import RecoError


@dataclass
class TrainConfig:
    """Everything that defines a run (its hash guards checkpoints). Defaults marked [ours] in docs/training.md.

    Attributes
    ----------
    k : neighbours per query (spec default 10)
    search, fuse : "uni" | "cross" — default uni-modal search, cross-modal fusion (the paper)
    dup_threshold_image : near-duplicate filter of image-index searches (0.98 [ours]; None = off)
    dup_threshold_text : near-duplicate filter of text-index searches (None [ours]: identical class-template
        captions of other rows are the signal; self-exclusion by row id removes the pair's own row)
    unique_captions : each caption at most once per batch [ours]
    exact_search : brute-force retrieval instead of HNSW
    batch_size, epochs, lr, min_lr, warmup_steps, weight_decay : AdamW + warm-up/cosine (docs/reco.md §3)
    loss_weights : the three RECO loss terms (equal [ours])
    heads, mlp_ratio : fusion layer shape (8, 4 [ours])
    model : "reco" (the fusion layer) | "mlp" (the equal-size MLP control)
    seed : init, data order
    backend : "numpy" | "numba" | "cuda" — the fusion layer's backend
    loss_backend : backend of the InfoNCE terms ("numpy" [ours]: at training batch sizes the [B,B] loss is cheap
        and NumPy's was faster than Numba's parallel kernel on a loaded 2-core machine; use "cuda" with a GPU)
    steps_per_epoch : cap on batches per epoch (None = one full pass); the epoch's plan is shuffled, so a cap
        takes a seeded subset of its batches — for short recipes on a slow machine
    checkpoint_every : steps between checkpoints (also one at every epoch end)
    select_on : "top1" (mean zero-shot top-1 over validation sets; ties keep the earlier) | "loss"
    init : "identity" (docs/reco.md §2: x̄ = x at step 0) | "copy" [ours]: starts at x + α·mean(r) (``init_params``)
    alpha : the copy init's gain α
    relevance : the layer reads each neighbour's search score (docs/reco.md §2 "Relevance bias" [ours]); the score map
        ``(s − center)/width`` is set from the first source's retrieval memory (``rel_map``)
    rel_map : "unrelated" [ours, default]: centre and width = mean and std of the cosine between random rows;
        "neighbour": centre = median cosine of a row to its nearest other row, width = the unrelated std (both
        fixed in the weights); "memory" [ours]: the map is measured on whatever memory is searched — each training
        source's own retrieval memory here, the evaluated memory at use time (``FusionConfig.rel_source``,
        :mod:`reco_ref.memory.score_map`)
    rel_beta, rel_gamma : initial β, γ of every head (relevance only)
    train_groups : "all" (every array of φ_I, φ_T, and τ) | "relevance" (only rel_beta, rel_gamma and τ [ours]:
        the layer cannot memorise the training classes' names — docs/training.md "Why training lost transfer")
    guard_tolerance : [ours] how far (top-1) a guard validation set (``ValSet.guard``) may fall below its epoch-0
        value in a keepable epoch
    hold_threshold : [ours] train each head's β and γ with its gate threshold held: γ is tied to β by
        ``γ = β·f* + ln k``, ``f* = (γ₀ − ln k)/β₀`` (the init's threshold, in memory widths), so a step changes how
        sharply a head switches between query and neighbours but not *where* (docs/training.md "Threshold held").
        The gradient of the tied parameter is ``∂L/∂β + f*·∂L/∂γ``; needs ``train_groups="relevance"`` and β₀ > 0
    irrelevant_fraction : [ours] add, beside each source, an irrelevant-memory source of its pairs whose search
        excludes every row of the query's own class, weighted ``fraction / (1 − fraction)`` of the source (needs
        labelled memories); 0 = off
    """

    k: int = 10
    search: str = "uni"
    fuse: str = "cross"
    dup_threshold_image: float | None = 0.98
    dup_threshold_text: float | None = None
    unique_captions: bool = True
    exact_search: bool = False
    batch_size: int = 64
    epochs: int = 5
    lr: float = 5e-4
    min_lr: float = 0.0
    warmup_steps: int = 50
    weight_decay: float = 0.2
    loss_weights: tuple = (1.0, 1.0, 1.0)
    heads: int = 8
    mlp_ratio: int = 4
    model: str = "reco"
    seed: int = 0
    backend: str = "numpy"
    loss_backend: str = "numpy"
    steps_per_epoch: int | None = None
    checkpoint_every: int = 100
    select_on: str = "top1"
    init: str = "identity"
    alpha: float = 1.0
    relevance: bool = False
    rel_beta: float = 1.0
    rel_gamma: float = 0.0
    rel_map: str = "unrelated"
    train_groups: str = "all"
    irrelevant_fraction: float = 0.0
    guard_tolerance: float = 0.01
    hold_threshold: bool = False

    def check(self) -> None:
        """One-line :class:`RecoError` for a bad field."""
        if self.steps_per_epoch is not None and (isinstance(self.steps_per_epoch, bool) or self.steps_per_epoch < 1):
            raise RecoError(f"steps_per_epoch: expected a positive integer or None, got {self.steps_per_epoch!r}")
        for name in ("k", "batch_size", "epochs", "heads", "mlp_ratio", "checkpoint_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise RecoError(f"{name}: expected a positive integer, got {v!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or not 0 <= self.seed < 2**32:
            raise RecoError(f"seed: expected an integer in [0, 2**32 - 1], got {self.seed!r}")
        if self.batch_size < 2:
            raise RecoError(f"batch_size: expected at least 2 (InfoNCE needs negatives), got {self.batch_size}")
        for name, allowed in (("search", ("uni", "cross")), ("fuse", ("cross", "uni")), ("model", ("reco", "mlp")),
                              ("backend", ("numpy", "numba", "cuda")), ("loss_backend", ("numpy", "numba", "cuda")),
                              ("select_on", ("top1", "loss")), ("init", ("identity", "copy")),
                              ("train_groups", ("all", "relevance")),
                              ("rel_map", ("unrelated", "neighbour", "memory"))):
            if getattr(self, name) not in allowed:
                raise RecoError(f"{name}: expected one of {list(allowed)}, got {getattr(self, name)!r}")
        for name in ("lr", "min_lr", "weight_decay"):
            v = float(getattr(self, name))
            if not math.isfinite(v) or v < 0:
                raise RecoError(f"{name}: expected a non-negative finite number, got {v}")
        if not 0 <= float(self.guard_tolerance) < 1:
            raise RecoError(f"guard_tolerance: expected a number in [0, 1), got {self.guard_tolerance!r}")
        for name in ("alpha", "rel_beta", "rel_gamma"):
            if not math.isfinite(float(getattr(self, name))):
                raise RecoError(f"{name}: expected a finite number, got {getattr(self, name)}")
        if self.alpha <= 0:
            raise RecoError(f"alpha: expected > 0, got {self.alpha}")
        if not 0.0 <= float(self.irrelevant_fraction) < 1.0:
            raise RecoError(f"irrelevant_fraction: expected a number in [0, 1), got {self.irrelevant_fraction}")
        if self.train_groups == "relevance" and not self.relevance:
            raise RecoError("train_groups: 'relevance' needs relevance=True (the layer has no relevance arrays)")
        if self.hold_threshold and (self.train_groups != "relevance" or not float(self.rel_beta) > 0):
            raise RecoError("hold_threshold: needs train_groups='relevance' and rel_beta > 0 (the threshold "
                            f"(γ − ln k)/β is undefined at β = {self.rel_beta})")
        if self.model == "mlp" and (self.relevance or self.init != "identity"):
            raise RecoError("model 'mlp': init/relevance apply to the fusion layer only")
        if self.min_lr > self.lr:
            raise RecoError(f"min_lr: {self.min_lr} is above lr {self.lr}")
        if self.warmup_steps < 0:
            raise RecoError(f"warmup_steps: expected >= 0, got {self.warmup_steps}")
        for name in ("dup_threshold_image", "dup_threshold_text"):
            v = getattr(self, name)
            if v is not None and not (-1.0 < float(v) <= 1.0):
                raise RecoError(f"{name}: expected a cosine in (-1, 1] or None, got {v}")

    def to_json(self) -> dict:
        d = asdict(self)
        d["loss_weights"] = [float(x) for x in self.loss_weights]
        return d


@dataclass
class ValSet:
    """A held-out validation set: pairs (a memory of held-out rows), where they retrieve from, and labels.

    Attributes
    ----------
    name : str
    pairs : Memory — held-out image–caption rows (their loss and their images' zero-shot accuracy)
    retrieval : Memory — the memory the queries retrieve from (the training rows; never the test split)
    labels : int64 [N] — class of each pairs row
    class_text : float32 [C, D] — class text embeddings (normalised mean of template embeddings)
    guard : a do-no-harm guard [ours] instead of a selection set: validated every epoch but not averaged into the
        selection score; an epoch whose top-1 on a guard falls more than ``TrainConfig.guard_tolerance`` below
        that guard's epoch-0 value cannot be kept (e.g. queries of another domain against the training memory)
    """

    name: str
    pairs: Any
    retrieval: Any
    labels: np.ndarray
    class_text: np.ndarray
    guard: bool = False


@dataclass
class TrainResult:
    """What :func:`train` returns: final and best weights, and the validation history."""

    last: Any
    best: Any
    history: list = field(default_factory=list)
    best_record: dict | None = None
    out: Path | None = None
    steps: int = 0
