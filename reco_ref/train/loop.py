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

What defines a run (:class:`TrainConfig`, :class:`ValSet`, :class:`TrainResult`) is :mod:`reco_ref.train.recipe`,
re-exported here.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import CheckpointError, RecoError
from ..failpoints import failpoint
from ..fusion import RELEVANCE_NAMES, fusion_backward, fusion_forward, gated_scores, relevance_gate, score_features
from ..io import atomic_save_npz, atomic_write_json, atomic_write_text, load_npz
from ..reco.weights import RecoWeights, init_reco_weights, save_reco_weights
from ..template_fmt import fill_class, parse_class_template
from .checkpoint import load_checkpoint, save_checkpoint
from .losses import DEFAULT_TAU, reco_loss_backward, reco_loss_forward
from .mlp import mlp_backward, mlp_forward, mlp_hidden_for, mlp_init
from .optim import adamw_init, adamw_step, lr_at
from .pairs import PreparedSource, epoch_batches, labels_of, prepare_source, score_map, search_rows
from .recipe import TrainConfig, TrainResult, ValSet

__all__ = ["TrainConfig", "ValSet", "TrainResult", "train", "init_weights", "step0_weights", "class_text_embeddings", "save_mlp_weights",
           "load_mlp_weights"]


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
    prepared, dim = _prepare_sources(sources, cfg)
    vals = _prepare_vals(val, cfg)
    plans, total = _plan_epochs(prepared, cfg)
    config_hash = hashlib.sha256((json.dumps(cfg.to_json(), sort_keys=True) + _digest(prepared, vals)).encode()).hexdigest()
    # score map of each module: statistics of the first source's retrieval memory (computed only when needed)
    model = _Model(cfg, dim, score_map(prepared[0], cfg.rel_map) if cfg.relevance else None)
    opt = adamw_init(model.flat)
    meta = _run_meta(meta, sources, prepared, cfg, dim)
    out.mkdir(parents=True, exist_ok=True)
    run = _Run(cfg, out, ckpt, model, opt, meta, vals, state={})
    run.state = _start_state(run, config_hash, total, resume)
    if not run.state["validated_init"]:
        _end_epoch(run, 0, None)  # the untrained modules are the identity: epoch 0 = the frozen encoder
        run.state["validated_init"] = True
        _save_checkpoint(run)
    _run_epochs(run, prepared, plans, total, progress)
    return _finish(run, config_hash)


# ------------------------------------------------------------------------------------------------------------
# the steps of train()
# ------------------------------------------------------------------------------------------------------------
def _prepare_sources(sources: Sequence[dict | PreparedSource], cfg: TrainConfig) -> tuple[list[PreparedSource], int]:
    """Every training source with its neighbours resolved (plus its irrelevant-memory twin, ``irrelevant_fraction``)
    -> (prepared sources, embedding dim D); one-line errors for no source, mixed dims, heads not dividing D."""
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
    return prepared, dim


def _prepare_vals(val: Sequence[ValSet], cfg: TrainConfig) -> list[_PreparedVal]:
    """The validation sets with their neighbours resolved; at least one must select (the rest may guard)."""
    vals = [_prepare_val(v, cfg) for v in val]
    if vals and all(p.guard for p in vals):
        raise RecoError("val: every validation set is a guard; at least one selection set is needed to choose an "
                        "epoch (guards only constrain the choice)")
    return vals


def _plan_epochs(prepared: Sequence[PreparedSource], cfg: TrainConfig) -> tuple[list[list], int]:
    """Every epoch's batches ``[(source index, rows)]``, a pure function of ``(seed, epoch)``
    -> (plans, total steps)."""
    plans = [epoch_batches(prepared, cfg.batch_size, seed=cfg.seed, epoch=e, unique_captions=cfg.unique_captions)
             [:cfg.steps_per_epoch] for e in range(cfg.epochs)]
    total = sum(len(p) for p in plans)
    if total == 0:
        raise RecoError(f"no training batch: every source has fewer than 2 rows per batch of {cfg.batch_size}")
    return plans, total


def _run_meta(meta: dict | None, sources: Sequence[dict | PreparedSource], prepared: Sequence[PreparedSource],
              cfg: TrainConfig, dim: int) -> dict:
    """The weights' ``meta``: the caller's fields, the encoder of the first memory source, the recipe and sources."""
    meta = dict(meta or {})
    first = next((s["pairs"] for s in sources if isinstance(s, dict)), None)
    if first is not None:
        meta.setdefault("encoder_name", first.manifest["encoder"]["name"])
        meta.setdefault("encoder_fingerprint", first.fingerprint)
    meta.update({"dim": dim, "heads": cfg.heads, "k": cfg.k, "search": cfg.search, "fuse": cfg.fuse,
                 "dup_threshold_image": cfg.dup_threshold_image, "dup_threshold_text": cfg.dup_threshold_text,
                 "seed": cfg.seed, "recipe": cfg.to_json(), "model": cfg.model,
                 "sources": [{"name": s.name, "pairs": len(s), "weight": s.weight} for s in prepared]})
    return meta


@dataclass
class _Run:
    """What the steps of one :func:`train` call share (``state`` is what a checkpoint saves besides the arrays)."""

    cfg: TrainConfig
    out: Path
    ckpt: Path
    model: _Model
    opt: dict
    meta: dict
    vals: list
    state: dict


def _start_state(run: _Run, config_hash: str, total: int, resume: bool) -> dict:
    """The loop's state: read from the checkpoint when resuming (which restores the model's arrays and AdamW's in
    place), else fresh, with ``config.json`` written."""
    state = {"config_hash": config_hash, "step": 0, "epoch": 0, "pos": 0, "best": None, "history": [],
             "validated_init": False, "run_loss": 0.0, "run_n": 0}  # run_*: this epoch's mean train loss so far
    if resume and run.ckpt.exists():
        return load_checkpoint(run.ckpt, *_checkpointed(run.model, run.opt), config_hash)
    atomic_write_json(run.out / "config.json", {"config": run.cfg.to_json(), "config_hash": config_hash,
                                                "total_steps": total, "meta": run.meta})
    return state


def _save_checkpoint(run: _Run) -> None:
    save_checkpoint(run.ckpt, *_checkpointed(run.model, run.opt), run.state)


def _save_best(run: _Run, rec: dict) -> None:
    m = dict(run.meta, selected={"epoch": rec["epoch"], "step": rec["step"], "select_on": run.cfg.select_on,
                                 "validation": rec.get("sets", [])})
    _save_weights(run.out / "best.npz", run.model.snapshot(m), run.cfg)


def _end_epoch(run: _Run, epoch_done: int, train_loss: float | None) -> None:
    """Validate, keep the weights when the epoch is the best keepable one so far, rewrite ``log.jsonl``."""
    cfg, state, vals = run.cfg, run.state, run.vals
    rec = _mean_record(epoch_done, state["step"], [_validate(run.model, pv, cfg) for pv in vals], train_loss)
    if any(pv.guard for pv in vals):  # do-no-harm guards: an epoch that lost more than the tolerance is not kept
        rec["guards_ok"] = _guard_ok(rec, state["history"][0] if state["history"] else None,
                                     cfg.guard_tolerance)
    state["history"].append(rec)
    if not vals and epoch_done == cfg.epochs:  # no validation: the final weights are the kept ones
        _save_best(run, rec)
    elif vals and rec.get("guards_ok", True) and _better(rec, state["best"], cfg.select_on):
        state["best"] = rec
        _save_best(run, rec)
    atomic_write_text(run.out / "log.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in state["history"]))


def _train_step(model: _Model, opt: dict, cfg: TrainConfig, src: PreparedSource, idx: np.ndarray, step: int,
                total: int) -> float:
    """One optimiser step on the batch ``idx`` of ``src`` (the module docstring's five lines) -> its loss."""
    v, t, nb_i, m_i, nb_t, m_t = src.batch(idx)
    s_i, s_t = src.batch_scores(idx)
    vb, ci = model.forward("image", v, nb_i, m_i, s_i, src)
    tb, ct = model.forward("text", t, nb_t, m_t, s_t, src)
    loss, lc = reco_loss_forward(vb, tb, v, t, float(model.tau), weights=cfg.loss_weights,
                                 backend=cfg.loss_backend)
    dvb, dtb, dtau = reco_loss_backward(lc)
    grads = model.backward("image", ci, dvb) | model.backward("text", ct, dtb)
    grads["tau"] = np.array(dtau, np.float64)
    lr = lr_at(step, base_lr=cfg.lr, warmup_steps=min(cfg.warmup_steps, total),
               total_steps=total, min_lr=cfg.min_lr)
    adamw_step(model.flat, grads, opt, lr, weight_decay=cfg.weight_decay)
    model.hold()
    return loss


def _run_epochs(run: _Run, prepared: Sequence[PreparedSource], plans: list[list], total: int,
                progress: bool) -> None:
    """The remaining steps of every epoch from ``run.state`` on; checkpoints every ``checkpoint_every`` steps and
    at each epoch end, after its validation."""
    cfg, state = run.cfg, run.state
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
                loss = _train_step(run.model, run.opt, cfg, prepared[si], idx, state["step"], total)
                state["step"] += 1
                state["pos"] += 1
                state["run_loss"] += float(loss)
                state["run_n"] += 1
                pairs_done += len(idx)
                if state["step"] % cfg.checkpoint_every == 0:
                    _save_checkpoint(run)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.3f}", tau=f"{float(run.model.tau):.3f}",
                                    pairs_s=f"{pairs_done / max(1e-9, time.perf_counter() - t0):.0f}")
                failpoint("train.step", state["step"])  # docs/failpoints.md
            state["epoch"] += 1
            state["pos"] = 0
            _end_epoch(run, state["epoch"], state["run_loss"] / state["run_n"] if state["run_n"] else None)
            state["run_loss"], state["run_n"] = 0.0, 0
            _save_checkpoint(run)
    finally:
        if bar is not None:
            bar.close()


def _finish(run: _Run, config_hash: str) -> TrainResult:
    """Write ``last.npz`` and ``result.json``; read back the kept ``best.npz``."""
    cfg, state = run.cfg, run.state
    last = run.model.snapshot(dict(run.meta, selected={"epoch": cfg.epochs, "step": state["step"],
                                                       "select_on": "last"}))
    _save_weights(run.out / "last.npz", last, cfg)
    best = _load_weights(run.out / "best.npz", cfg)
    atomic_write_json(run.out / "result.json", {"steps": state["step"], "best": state["best"],
                                                "history": state["history"], "config_hash": config_hash})
    return TrainResult(last=last, best=best, history=state["history"], best_record=state["best"], out=run.out,
                       steps=state["step"])


def _save_weights(path: Path, w: Any, cfg: TrainConfig) -> None:
    if cfg.model == "reco":
        save_reco_weights(path, w)
    else:
        save_mlp_weights(path, w)


def _load_weights(path: Path, cfg: TrainConfig) -> Any:
    from ..reco.weights import load_reco_weights

    return load_reco_weights(path) if cfg.model == "reco" else load_mlp_weights(path)
