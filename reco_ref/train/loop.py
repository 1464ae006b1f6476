r"""The RECO training loop: φ_I, φ_T and τ on precomputed embeddings, encoders frozen (docs/reco.md §3).

One step, for a batch of pairs ``(v, t)`` [B,D] of one source with neighbours resolved once
(:mod:`reco_ref.train.pairs`)::

    v̄ = φ_I(v, N_I)    t̄ = φ_T(t, N_T)                         [B,D]  (fusion_forward, backend=...)
    L  = ℓ(v̄, t̄) + ℓ(v̄, t) + ℓ(v, t̄)                          (reco_loss_forward, shared τ)
    dv̄, dt̄, dτ = ∂L                                             (reco_loss_backward)
    ∂φ_I, ∂φ_T = fusion_backward(dv̄), fusion_backward(dt̄)
    AdamW(lr_at(step)) on {image.*, text.*, tau}

Per epoch (and once before the first step, "epoch 0" = the untrained, identity modules = the frozen
encoder), every validation set is scored — RECO loss on its pairs and zero-shot top-1 with image and class
text both refined — and written as JSON lines to ``log.jsonl``. The weights kept (``best.npz``) are those
with the best validation score (``select_on``), never chosen on a test split; ``last.npz`` holds the final
ones. Checkpoints every ``checkpoint_every`` steps and at every epoch end make a ``kill -9``'d run resume
(``resume=True``) to bit-identical weights: the data order is a pure function of ``(seed, epoch)`` and
retrieval is fixed before the first step.

``model="mlp"`` trains the paper's control instead (:mod:`reco_ref.train.mlp`): an MLP of the same
parameter count on the same neighbours with the same loss.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import CheckpointError, RecoError
from ..failpoints import failpoint
from ..fusion import RELEVANCE_NAMES, fusion_backward, fusion_forward, gated_scores, relevance_gate, score_features
from ..io import atomic_save_npz, atomic_write_json, atomic_write_text, load_npz
from ..template_fmt import fill_class, parse_class_template
from .checkpoint import load_checkpoint, save_checkpoint
from .losses import DEFAULT_TAU, reco_loss_backward, reco_loss_forward
from .mlp import mlp_backward, mlp_forward, mlp_hidden_for, mlp_init
from .optim import adamw_init, adamw_step, lr_at
from .pairs import PreparedSource, epoch_batches, labels_of, prepare_source, score_map, search_rows
from .weights import RecoWeights, init_reco_weights, save_reco_weights

__all__ = ["TrainConfig", "ValSet", "TrainResult", "train", "init_weights", "step0_weights", "class_text_embeddings", "save_mlp_weights",
           "load_mlp_weights"]


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


def class_text_embeddings(encoder: Any, class_names: Sequence[str], templates: Sequence[str]) -> np.ndarray:
    r"""``t_c = normalize(mean_j normalize(f_T(template_j(c))))`` — float32 [C, D] (docs/reco.md §4).

    Templates hold ``{}`` or ``{class_name}`` where the class name goes.
    """
    # plain {}/{class_name} fields only: a format spec such as {:>900000000} would allocate without bound
    parsed = [parse_class_template(tpl) for tpl in templates]
    texts = [fill_class(p, c) for c in class_names for p in parsed]
    e = np.asarray(encoder.encode_texts(texts), np.float64).reshape(len(class_names), len(templates), -1)
    e /= np.linalg.norm(e, axis=-1, keepdims=True)
    m = e.mean(1)
    return (m / np.linalg.norm(m, axis=1, keepdims=True)).astype(np.float32)


# ------------------------------------------------------------------------------------------------------------
# the trained model as a flat dict of arrays (what AdamW and the checkpoint see) + forward/backward per modality
# ------------------------------------------------------------------------------------------------------------
def init_weights(cfg: TrainConfig, dim: int, maps: dict | None = None) -> RecoWeights:
    """The untrained RECO weights a run with ``cfg`` starts from (its step 0): init, α, relevance β/γ from
    ``cfg``; ``maps`` = each module's score map ``{"image": (center, width), "text": ...}`` when ``cfg.relevance``."""
    kw = dict(init=cfg.init, alpha=cfg.alpha, k=cfg.k)
    if cfg.relevance:
        kw.update(relevance=True, rel_beta=cfg.rel_beta, rel_gamma=cfg.rel_gamma,
                  rel_source="memory" if cfg.rel_map == "memory" else "fixed")
    return init_reco_weights(dim, heads=cfg.heads, mlp_ratio=cfg.mlp_ratio, seed=cfg.seed, maps=maps, **kw)


def step0_weights(w: RecoWeights, cfg: TrainConfig) -> RecoWeights:
    """The untrained start of weights ``w`` trained with ``cfg``: the same init draw and score map, β/γ and τ at
    their initial values (for relevance-only training this is exactly the step-0 state)."""
    maps = None
    if cfg.relevance:
        maps = {m: (getattr(w, m).config.rel_center, getattr(w, m).config.rel_width) for m in ("image", "text")}
    w0 = init_weights(cfg, w.dim, maps)
    w0.meta = dict(w.meta, selected={"epoch": 0, "step": 0})
    return w0


class _Model:
    def __init__(self, cfg: TrainConfig, dim: int, maps: dict | None = None):
        self.cfg = cfg
        if cfg.model == "reco":
            w = init_weights(cfg, dim, maps)
            self.modules = {"image": w.image, "text": w.text}
        else:
            hidden = mlp_hidden_for(dim, cfg.heads, cfg.mlp_ratio)
            self.modules = {"image": mlp_init(dim, hidden, seed=cfg.seed), "text": mlp_init(dim, hidden, seed=cfg.seed + 1)}
        self.tau = np.array(DEFAULT_TAU, np.float64)  # 0-d, updated in place
        self.flat = {f"{m}.{n}": a for m, p in self.modules.items() for n, a in p.items()}
        self.flat["tau"] = self.tau

    def forward(self, modality: str, q, nb, mask, scores=None, src: PreparedSource | None = None):
        """φ of ``modality`` on one batch; ``src`` = the source the batch comes from (its retrieval memory's score
        map is what a ``rel_map="memory"`` module reads the scores against)."""
        phi = self.modules[modality]
        if self.cfg.model == "reco":
            smap = None
            if self.cfg.relevance and self.cfg.rel_map == "memory":
                smap = score_map(src, "memory")[modality]
            return fusion_forward(phi, q, nb, mask, backend=self.cfg.backend,
                                  scores=scores if self.cfg.relevance else None, score_map=smap)
        return mlp_forward(phi, q, nb, mask)

    def backward(self, modality: str, cache, dout) -> dict:
        phi = self.modules[modality]
        if self.cfg.model == "reco":
            g = fusion_backward(phi, cache, dout)
            if self.cfg.train_groups == "relevance":  # the rest stays at its init (frozen: no gradient given)
                g = {n: a for n, a in g.items() if n in RELEVANCE_NAMES}
            if self.cfg.hold_threshold:  # γ(β) = β·f* + ln k: chain rule onto β, γ follows in hold()
                g = {"rel_beta": g["rel_beta"] + self.threshold() * g["rel_gamma"],
                     "rel_gamma": np.zeros_like(g["rel_gamma"])}
        else:
            g = mlp_backward(phi, cache, dout)
        return {f"{modality}.{n}": a for n, a in g.items()}

    def threshold(self) -> float:
        """f* = (γ₀ − ln k)/β₀: the init's gate threshold in memory widths (every head starts at the same β₀, γ₀)."""
        return (float(self.cfg.rel_gamma) - math.log(self.cfg.k)) / float(self.cfg.rel_beta)

    def hold(self) -> None:
        """Put γ back on its tie after an optimizer step (``hold_threshold``): ``γ = β·f* + ln k`` in place."""
        if self.cfg.hold_threshold:
            for phi in self.modules.values():
                phi["rel_gamma"][...] = phi["rel_beta"] * self.threshold() + math.log(self.cfg.k)

    def snapshot(self, meta: dict) -> Any:
        if self.cfg.model == "reco":
            return RecoWeights(self.modules["image"].copy(), self.modules["text"].copy(), float(self.tau),
                               json.loads(json.dumps(meta)))
        return {"image": {k: v.copy() for k, v in self.modules["image"].items()},
                "text": {k: v.copy() for k, v in self.modules["text"].items()}, "tau": float(self.tau), "meta": meta}


def _checkpointed(model: _Model, opt: dict) -> tuple[dict, dict]:
    """The parameters and AdamW state a checkpoint must hold to resume: those that train. With
    ``train_groups="relevance"`` every other array stays at its seeded init (no gradient, no decay), which the
    resumed run rebuilds from the same config, so the checkpoint keeps β, γ, τ and their moments (kilobytes)
    instead of every array of both modules and two moments each (3 × 57 MB for reco-mini). Built at each save:
    AdamW replaces ``opt["step"]`` by a new array every step."""
    if model.cfg.model != "reco" or model.cfg.train_groups != "relevance":
        return model.flat, opt
    names = [n for n in model.flat if n == "tau" or n.split(".", 1)[1] in RELEVANCE_NAMES]
    params = {n: model.flat[n] for n in names}
    state = {k: v for k, v in opt.items() if k == "step" or k.split(".", 1)[1] in names}
    return params, state


def save_mlp_weights(path: str | os.PathLike, w: dict) -> None:
    """Write the MLP control's weights (``{"image": {...}, "text": {...}, "tau", "meta"}``) as one atomic ``.npz``."""
    arrays = {f"{m}.{n}": a for m in ("image", "text") for n, a in w[m].items()}
    arrays["tau"] = np.array(w["tau"], np.float64)
    arrays["__meta__"] = np.frombuffer(json.dumps(w["meta"], sort_keys=True).encode("utf-8"), np.uint8)
    atomic_save_npz(path, arrays)


def load_mlp_weights(path: str | os.PathLike) -> dict:
    """Read what :func:`save_mlp_weights` wrote (pickle-free)."""
    raw = load_npz(path)
    try:
        meta = json.loads(raw.pop("__meta__").tobytes().decode("utf-8"))
        tau = float(raw.pop("tau"))
    except (KeyError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RecoError(f"{path}: not an MLP-control weights file ({exc})") from exc
    out = {"image": {}, "text": {}, "tau": tau, "meta": meta}
    for key, a in raw.items():
        m, _, n = key.partition(".")
        if m not in ("image", "text"):
            raise RecoError(f"{path}: unexpected entry {key!r}")
        out[m][n] = a
    return out


# ------------------------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------------------------
@dataclass
class _PreparedVal:
    name: str
    src: PreparedSource
    labels: np.ndarray
    class_text: np.ndarray
    cls_nb: np.ndarray  # [C,k,D] neighbours fed to the class texts
    cls_valid: np.ndarray  # [C,k]
    cls_scores: np.ndarray  # [C,k] search cosines of those neighbours
    guard: bool = False


def _prepare_val(vs: ValSet, cfg: TrainConfig) -> _PreparedVal:
    src = prepare_source(vs.pairs, vs.retrieval, name=vs.name, k=cfg.k, search=cfg.search, fuse=cfg.fuse,
                         dup_threshold_image=cfg.dup_threshold_image, dup_threshold_text=cfg.dup_threshold_text,
                         exact=cfg.exact_search)
    labels = np.asarray(vs.labels, np.int64)
    if labels.shape != (len(src),):
        raise RecoError(f"validation set {vs.name!r}: {labels.shape[0]} labels for {len(src)} pairs")
    ct = np.ascontiguousarray(vs.class_text, np.float32)
    if ct.ndim != 2 or ct.shape[1] != src.v.shape[1] or labels.max() >= ct.shape[0]:
        raise RecoError(f"validation set {vs.name!r}: class_text shape {ct.shape}, expected [C>{labels.max()}, "
                        f"{src.v.shape[1]}]")
    rows, valid, scores = search_rows(vs.retrieval, ct, "text", k=cfg.k, search=cfg.search,
                                      dup_threshold=cfg.dup_threshold_text if cfg.search == "uni" else cfg.dup_threshold_image,
                                      exact=cfg.exact_search, with_scores=True)
    nb = src.nb_text[np.where(valid, rows, 0)] * valid[..., None]
    return _PreparedVal(vs.name, src, labels, ct, nb.astype(np.float32), valid, scores, bool(vs.guard))


def _validate(model: _Model, pv: _PreparedVal, cfg: TrainConfig) -> dict:
    """RECO loss over the held-out pairs (unique-caption batches, fixed order) and zero-shot top-1 (both refined)."""
    src = pv.src
    plan = epoch_batches([src], cfg.batch_size, seed=cfg.seed, epoch=2**31,  # a stream no training epoch uses
                         unique_captions=cfg.unique_captions)
    tot, n = 0.0, 0
    for _, idx in plan:
        v, t, nb_i, m_i, nb_t, m_t = src.batch(idx)
        s_i, s_t = src.batch_scores(idx)
        vb, _ = model.forward("image", v, nb_i, m_i, s_i, src)
        tb, _ = model.forward("text", t, nb_t, m_t, s_t, src)
        loss, _ = reco_loss_forward(vb, tb, v, t, float(model.tau), weights=cfg.loss_weights, backend=cfg.loss_backend)
        tot += loss * len(idx)
        n += len(idx)
    refined = np.empty_like(src.v)
    gate = np.zeros(len(src))  # the image module's relevance gate per query (0 without the bias)
    for lo in range(0, len(src), 1024):
        idx = np.arange(lo, min(len(src), lo + 1024))
        v, _, nb_i, m_i, _, _ = src.batch(idx)
        s_i = src.batch_scores(idx)[0]
        refined[idx], _ = model.forward("image", v, nb_i, m_i, s_i, src)
        if cfg.model == "reco" and cfg.relevance:
            phi = model.modules["image"]
            smap = score_map(src, "memory")["image"] if cfg.rel_map == "memory" else None
            gate[idx] = relevance_gate(phi, score_features(phi, s_i, m_i, score_map=smap), m_i)
    cls, _ = model.forward("text", pv.class_text, pv.cls_nb, pv.cls_valid, pv.cls_scores, src)
    # the class scores evaluation uses (fusion.gated_scores): refined class text, blended per query with
    # the frozen class text by the image module's gate
    pred = np.argmax(gated_scores(refined, cls, pv.class_text, gate), axis=1)
    out = {"set": pv.name, "loss": tot / max(1, n), "top1": float(np.mean(pred == pv.labels)), "n": int(len(src))}
    return out | {"guard": True} if pv.guard else out


# ------------------------------------------------------------------------------------------------------------
# the loop
# ------------------------------------------------------------------------------------------------------------
def _digest(sources: Sequence[PreparedSource], vals: Sequence[_PreparedVal]) -> str:
    h = hashlib.sha256()
    for s in list(sources) + [p.src for p in vals]:
        for a in (s.v, s.t, s.rows_i, s.valid_i, s.rows_t, s.valid_t, s.nb_image, s.nb_text):
            h.update(np.ascontiguousarray(a).tobytes())
        h.update(repr(s.weight).encode())
    for p in vals:
        h.update(p.labels.tobytes())
        h.update(p.class_text.tobytes())
        h.update(b"guard" if p.guard else b"select")
    return h.hexdigest()


def _better(rec: dict, best: dict | None, select_on: str) -> bool:
    if best is None:
        return True
    if select_on == "top1":
        return rec["top1"] > best["top1"]
    return rec["loss"] < best["loss"]


def _mean_record(epoch: int, step: int, per_set: list[dict], train_loss: float | None) -> dict:
    """One validation record; ``loss``/``top1`` average the selection sets only (guards are constraints)."""
    rec = {"epoch": epoch, "step": step, "train_loss": train_loss, "sets": per_set}
    sel = [r for r in per_set if not r.get("guard")]
    if sel:
        rec["loss"] = float(np.mean([r["loss"] for r in sel]))
        rec["top1"] = float(np.mean([r["top1"] for r in sel]))
    return rec


def _guard_ok(rec: dict, first: dict | None, tolerance: float) -> bool:
    """Every guard set of ``rec`` within ``tolerance`` (top-1) of its value in ``first`` (the epoch-0 record)."""
    if first is None:
        return True
    start = {r["set"]: r["top1"] for r in first["sets"] if r.get("guard")}
    return all(r["top1"] >= start[r["set"]] - tolerance - 1e-12 for r in rec["sets"] if r.get("guard"))


def _labelled(*memories) -> bool:
    """Every given memory (None skipped) has a label on every row (what irrelevant-memory episodes need)."""
    try:
        for m in memories:
            if m is not None:
                labels_of(m)
    except RecoError:
        return False
    return True


def train(sources: Sequence[dict | PreparedSource], out: str | os.PathLike, config: TrainConfig | None = None, *,
          val: Sequence[ValSet] = (), meta: dict | None = None, resume: bool = False, progress: bool = True
          ) -> TrainResult:
    """Train RECO (or the MLP control) and write ``best.npz``, ``last.npz``, ``log.jsonl``, ``checkpoint.npz``.

    Parameters
    ----------
    sources : each a dict ``{"pairs": Memory, "retrieval": Memory | None, "name": str, "weight": float | None,
        "irrelevant": bool}`` (prepared here with the config's retrieval settings; ``"irrelevant": False`` keeps an
        unlabelled source out of ``irrelevant_fraction``) or a :class:`PreparedSource`
    out : output folder
    config : :class:`TrainConfig` (defaults if None)
    val : validation sets (held-out rows of the training data; never a test split)
    meta : extra JSON-able fields for the weights' ``meta`` (encoder name / fingerprint, trained_on, command...)
    resume : continue from ``out/checkpoint.npz`` (bit-identical to an uninterrupted run); without it an
        existing checkpoint is an error
    progress : tqdm bar with loss, τ and pairs/s

    Returns
    -------
    TrainResult
    """
    cfg = config or TrainConfig()
    cfg.check()
    out = Path(out)
    ckpt = out / "checkpoint.npz"
    if ckpt.exists() and not resume:
        raise CheckpointError(f"{ckpt} exists: pass resume=True (--resume) to continue that run, or choose another "
                              "output folder")
    if not sources:
        raise RecoError("sources: expected at least one training source (a memory of image–caption pairs)")
    prepared = []
    for i, s in enumerate(sources):
        if isinstance(s, PreparedSource):
            prepared.append(s)
            continue
        kw = dict(k=cfg.k, search=cfg.search, fuse=cfg.fuse, dup_threshold_image=cfg.dup_threshold_image,
                  dup_threshold_text=cfg.dup_threshold_text, exact=cfg.exact_search)
        name = s.get("name") or f"source{i}"
        prepared.append(prepare_source(s["pairs"], s.get("retrieval"), name=name, weight=s.get("weight"), **kw))
        if cfg.irrelevant_fraction > 0 and s.get("irrelevant", _labelled(s["pairs"], s.get("retrieval"))):
            # [ours] the same pairs retrieving as from a memory that lacks their class (labelled memories only)
            f = float(cfg.irrelevant_fraction)
            prepared.append(prepare_source(s["pairs"], s.get("retrieval"), name=name + ":irrelevant",
                                           weight=prepared[-1].weight * f / (1 - f), irrelevant=True, **kw))
    dims = {s.v.shape[1] for s in prepared}
    if len(dims) != 1:
        raise RecoError(f"sources: embedding dims differ {sorted(dims)}; all sources must come from one encoder")
    dim = dims.pop()
    if cfg.model == "reco" and dim % cfg.heads:
        raise RecoError(f"heads: {cfg.heads} does not divide the sources' embedding dim {dim}; choose a divisor of {dim}")
    vals = [_prepare_val(v, cfg) for v in val]
    if vals and all(p.guard for p in vals):
        raise RecoError("val: every validation set is a guard; at least one selection set is needed to choose an "
                        "epoch (guards only constrain the choice)")
    plans = [epoch_batches(prepared, cfg.batch_size, seed=cfg.seed, epoch=e, unique_captions=cfg.unique_captions)
             [:cfg.steps_per_epoch] for e in range(cfg.epochs)]
    total = sum(len(p) for p in plans)
    if total == 0:
        raise RecoError(f"no training batch: every source has fewer than 2 rows per batch of {cfg.batch_size}")
    config_hash = hashlib.sha256((json.dumps(cfg.to_json(), sort_keys=True) + _digest(prepared, vals)).encode()).hexdigest()
    # score map of each module: statistics of the first source's retrieval memory (computed only when needed)
    model = _Model(cfg, dim, score_map(prepared[0], cfg.rel_map) if cfg.relevance else None)
    opt = adamw_init(model.flat)
    meta = dict(meta or {})
    first = next((s["pairs"] for s in sources if isinstance(s, dict)), None)
    if first is not None:
        meta.setdefault("encoder_name", first.manifest["encoder"]["name"])
        meta.setdefault("encoder_fingerprint", first.fingerprint)
    meta.update({"dim": dim, "heads": cfg.heads, "k": cfg.k, "search": cfg.search, "fuse": cfg.fuse,
                 "dup_threshold_image": cfg.dup_threshold_image, "dup_threshold_text": cfg.dup_threshold_text,
                 "seed": cfg.seed, "recipe": cfg.to_json(), "model": cfg.model,
                 "sources": [{"name": s.name, "pairs": len(s), "weight": s.weight} for s in prepared]})
    out.mkdir(parents=True, exist_ok=True)
    state = {"config_hash": config_hash, "step": 0, "epoch": 0, "pos": 0, "best": None, "history": [],
             "validated_init": False, "run_loss": 0.0, "run_n": 0}  # run_*: this epoch's mean train loss so far
    if resume and ckpt.exists():
        state = load_checkpoint(ckpt, *_checkpointed(model, opt), config_hash)
    else:
        atomic_write_json(out / "config.json", {"config": cfg.to_json(), "config_hash": config_hash,
                                                "total_steps": total, "meta": meta})

    def save_best(rec: dict) -> None:
        m = dict(meta, selected={"epoch": rec["epoch"], "step": rec["step"], "select_on": cfg.select_on,
                                 "validation": rec.get("sets", [])})
        _save_weights(out / "best.npz", model.snapshot(m), cfg)

    def end_epoch(epoch_done: int, train_loss: float | None) -> None:
        rec = _mean_record(epoch_done, state["step"], [_validate(model, pv, cfg) for pv in vals], train_loss)
        if any(pv.guard for pv in vals):  # do-no-harm guards: an epoch that lost more than the tolerance is not kept
            rec["guards_ok"] = _guard_ok(rec, state["history"][0] if state["history"] else None,
                                         cfg.guard_tolerance)
        state["history"].append(rec)
        if not vals and epoch_done == cfg.epochs:  # no validation: the final weights are the kept ones
            save_best(rec)
        elif vals and rec.get("guards_ok", True) and _better(rec, state["best"], cfg.select_on):
            state["best"] = rec
            save_best(rec)
        atomic_write_text(out / "log.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in state["history"]))

    if not state["validated_init"]:
        end_epoch(0, None)  # the untrained modules are the identity: epoch 0 = the frozen encoder
        state["validated_init"] = True
        save_checkpoint(ckpt, *_checkpointed(model, opt), state)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=state["step"], desc=f"train {cfg.model}", unit="step", dynamic_ncols=True)
    t0, pairs_done = time.perf_counter(), 0
    try:
        while state["epoch"] < cfg.epochs:
            plan = plans[state["epoch"]]
            while state["pos"] < len(plan):
                si, idx = plan[state["pos"]]
                v, t, nb_i, m_i, nb_t, m_t = prepared[si].batch(idx)
                s_i, s_t = prepared[si].batch_scores(idx)
                vb, ci = model.forward("image", v, nb_i, m_i, s_i, prepared[si])
                tb, ct = model.forward("text", t, nb_t, m_t, s_t, prepared[si])
                loss, lc = reco_loss_forward(vb, tb, v, t, float(model.tau), weights=cfg.loss_weights,
                                             backend=cfg.loss_backend)
                dvb, dtb, dtau = reco_loss_backward(lc)
                grads = model.backward("image", ci, dvb) | model.backward("text", ct, dtb)
                grads["tau"] = np.array(dtau, np.float64)
                lr = lr_at(state["step"], base_lr=cfg.lr, warmup_steps=min(cfg.warmup_steps, total),
                           total_steps=total, min_lr=cfg.min_lr)
                adamw_step(model.flat, grads, opt, lr, weight_decay=cfg.weight_decay)
                model.hold()
                state["step"] += 1
                state["pos"] += 1
                state["run_loss"] += float(loss)
                state["run_n"] += 1
                pairs_done += len(idx)
                if state["step"] % cfg.checkpoint_every == 0:
                    save_checkpoint(ckpt, *_checkpointed(model, opt), state)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.3f}", tau=f"{float(model.tau):.3f}",
                                    pairs_s=f"{pairs_done / max(1e-9, time.perf_counter() - t0):.0f}")
                failpoint("train.step", state["step"])  # docs/failpoints.md
            state["epoch"] += 1
            state["pos"] = 0
            end_epoch(state["epoch"], state["run_loss"] / state["run_n"] if state["run_n"] else None)
            state["run_loss"], state["run_n"] = 0.0, 0
            save_checkpoint(ckpt, *_checkpointed(model, opt), state)
    finally:
        if bar is not None:
            bar.close()
    last = model.snapshot(dict(meta, selected={"epoch": cfg.epochs, "step": state["step"], "select_on": "last"}))
    _save_weights(out / "last.npz", last, cfg)
    best = _load_weights(out / "best.npz", cfg)
    atomic_write_json(out / "result.json", {"steps": state["step"], "best": state["best"],
                                            "history": state["history"], "config_hash": config_hash})
    return TrainResult(last=last, best=best, history=state["history"], best_record=state["best"], out=out,
                       steps=state["step"])


def _save_weights(path: Path, w: Any, cfg: TrainConfig) -> None:
    if cfg.model == "reco":
        save_reco_weights(path, w)
    else:
        save_mlp_weights(path, w)


def _load_weights(path: Path, cfg: TrainConfig) -> Any:
    from .weights import load_reco_weights

    return load_reco_weights(path) if cfg.model == "reco" else load_mlp_weights(path)
