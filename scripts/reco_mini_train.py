r"""reco-mini build, part 3: the joint space, its alignment training, and the evaluation metrics.

Both towers stay frozen. With ``f`` the 1024-d MobileNet feature, ``ℓ`` its 1001 ImageNet logits and ``t``
the 384-d MiniLM sentence embedding (mean-pooled, unit length):

.. math::

    c &= \mathrm{norm}\Big(\textstyle\sum_{k \in \mathrm{top}_K(p)} \tfrac{p_k}{\sum_{k'} p_{k'}} E_k\Big),
        \quad p = \mathrm{softmax}(\ell_{1:1000} / T)                          && \text{ConSE, in text space}\\
    g &= \mathrm{norm}\big(W_i\, z + b_i\big), \quad z = (\sqrt f - \mu) / \sigma   && \text{learned image map}\\
    h &= \mathrm{norm}\big(W_t\, t + b_t\big)                                       && \text{learned text map}\\
    e_{img} &= [\alpha c;\ \beta g], \qquad e_{txt} = [\alpha t;\ \beta h], \qquad \alpha^2 + \beta^2 = 1

so ``e_img · e_txt = α² (c·t) + β² (g·h)``: the ConSE score (coarse ImageNet knowledge, no training) plus a
contrastively learned score (trained here on OpenClipart). ``E`` [1000,384] holds the MiniLM embeddings of
the ImageNet class names. The maps ``W_i, b_i, W_t, b_t`` and the temperature are trained with the
project's symmetric InfoNCE (:mod:`reco_ref.train.losses`) and AdamW (:mod:`reco_ref.train.optim`) on the
concatenated embeddings ``[a c; b g]`` vs ``[a t; b h]`` with ``a² = train_alpha2`` (0 by default: the
learned block on its own measured better than training on the mixed score), then shipped with
``a² = alpha2``. Separately, ``key = norm(sqrt f)`` is the image->image search key.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from reco_ref.train.losses import DEFAULT_TAU, infonce_backward, infonce_forward
from reco_ref.train.optim import adamw_init, adamw_step, lr_at


def l2n(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


@dataclass
class Hyper:
    dim_learned: int = 384  # width of the learned block; D = 384 + dim_learned (8 heads divide it)
    alpha2: float = 0.5  # α², the ConSE block's share of the shipped score
    train_alpha2: float = 0.0  # α² during training (0: the learned block is trained on its own; measured best)
    conse_topk: int = 10  # ConSE keeps the K most probable ImageNet classes (Norouzi et al. use T=10)
    conse_temp: float = 1.0  # softmax temperature on the logits
    epochs: int = 40
    batch: int = 1024
    lr: float = 1e-3
    weight_decay: float = 0.2
    warmup_frac: float = 0.1
    seed: int = 0
    text_map: bool = True  # False: LiT-style, the text side of the learned block is MiniLM's t itself


# ------------------------------------------------------------------------------------------------ ConSE
def conse_forward(logits: np.ndarray, E: np.ndarray, topk: int, temp: float) -> np.ndarray:
    """``logits`` [N,1001] (index 0 background) -> unit ConSE embeddings [N,384]."""
    z = logits[:, 1:].astype(np.float64) / temp  # [N,1000]
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    kth = -np.sort(-p, axis=1)[:, topk - 1 : topk]  # [N,1] K-th largest probability
    p = np.where(p >= kth, p, 0.0)
    # renormalising p is a positive per-row scale: the L2 normalisation below absorbs it
    return l2n(p @ E.astype(np.float64)).astype(np.float32)


# ---------------------------------------------------------------------------------------------- maps
def init_params(d_in_img: int, d_in_txt: int, d: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "W_i": (rng.standard_normal((d_in_img, d)) / math.sqrt(d_in_img)).astype(np.float32),  # [1024,d]
        "b_i": np.zeros(d, np.float32),
        "W_t": (rng.standard_normal((d_in_txt, d)) / math.sqrt(d_in_txt)).astype(np.float32),  # [384,d]
        "b_t": np.zeros(d, np.float32),
        "tau": np.array(DEFAULT_TAU, np.float32),
    }


def norm_linear_forward(x: np.ndarray, W: np.ndarray, b: np.ndarray):
    """``y = norm(x W + b)``; x [B,Din], W [Din,d] -> y [B,d] and the cache."""
    u = x @ W + b  # [B,d]
    n = np.maximum(np.linalg.norm(u, axis=1, keepdims=True), 1e-12)  # [B,1]
    y = u / n
    return y, (x, y, n)


def norm_linear_backward(dy: np.ndarray, cache):
    """Gradients of :func:`norm_linear_forward`: ``du = (dy - y (y·dy)) / ||u||``."""
    x, y, n = cache
    du = (dy - y * (y * dy).sum(axis=1, keepdims=True)) / n  # [B,d]
    return x.T @ du, du.sum(axis=0)  # dW [Din,d], db [d]


def joint(c: np.ndarray, g: np.ndarray, alpha2: float) -> np.ndarray:
    """``[α c; β g]`` (unit rows when c and g are)."""
    return np.concatenate([math.sqrt(alpha2) * c, math.sqrt(1.0 - alpha2) * g], axis=1).astype(np.float32)


def train_maps(z: np.ndarray, c: np.ndarray, t: np.ndarray, hp: Hyper, log=print) -> tuple[dict, list[float]]:
    """Train ``W_i, b_i, W_t, b_t, tau`` with symmetric InfoNCE on ``[αc; βg]`` vs ``[αt; βh]``.

    z [N,1024] standardised image inputs, c [N,384] ConSE embeddings, t [N,384] caption embeddings.
    Deterministic for a given seed (fixed permutation per epoch; float32 NumPy).
    """
    n = z.shape[0]
    params = init_params(z.shape[1], t.shape[1], hp.dim_learned, hp.seed)
    state = adamw_init(params)
    rng = np.random.default_rng(hp.seed + 1)
    steps_per_epoch = max(1, n // hp.batch)  # the ragged last batch is dropped (fixed batch size for InfoNCE)
    total = steps_per_epoch * hp.epochs
    warm = int(hp.warmup_frac * total)
    beta = math.sqrt(1.0 - hp.train_alpha2)
    a_sc = math.sqrt(hp.train_alpha2)
    losses = []
    step = 0
    for ep in range(hp.epochs):
        perm = rng.permutation(n)
        ep_loss = 0.0
        for s in range(steps_per_epoch):
            idx = perm[s * hp.batch : (s + 1) * hp.batch]
            g, cache_i = norm_linear_forward(z[idx], params["W_i"], params["b_i"])  # [B,d]
            if hp.text_map:
                h, cache_t = norm_linear_forward(t[idx], params["W_t"], params["b_t"])  # [B,d]
            else:
                h = t[idx]  # [B,384] frozen text space (d must be 384)
            e_i = np.concatenate([a_sc * c[idx], beta * g], axis=1)  # [B,384+d]
            e_t = np.concatenate([a_sc * t[idx], beta * h], axis=1)  # [B,384+d]
            loss, cache = infonce_forward(e_i, e_t, float(params["tau"]))
            de_i, de_t, dtau = infonce_backward(cache)
            dW_i, db_i = norm_linear_backward(beta * de_i[:, c.shape[1]:], cache_i)
            grads = {"W_i": dW_i, "b_i": db_i, "tau": np.array(dtau, np.float32)}
            if hp.text_map:
                grads["W_t"], grads["b_t"] = norm_linear_backward(beta * de_t[:, t.shape[1]:], cache_t)
            lr = lr_at(step, base_lr=hp.lr, warmup_steps=warm, total_steps=total)
            adamw_step(params, grads, state, lr, weight_decay=hp.weight_decay)
            ep_loss += loss
            step += 1
        losses.append(ep_loss / steps_per_epoch)
        if ep % 10 == 0 or ep == hp.epochs - 1:
            log(f"  epoch {ep:3d} loss {losses[-1]:.4f} scale {math.exp(float(params['tau'])):.1f}")
    return params, losses


# ------------------------------------------------------------------------------------------ metrics
def recall_at(sim: np.ndarray, ks=(1, 5)) -> dict[str, float]:
    """Row i's match is column i; recall@k = share of rows whose match ranks in the top k."""
    diag = np.diagonal(sim)[:, None]
    rank = (sim > diag).sum(axis=1)  # [N] how many beat the match
    return {f"R@{k}": float((rank < k).mean()) for k in ks}


def zero_shot_top1(img: np.ndarray, labels: np.ndarray, class_text: np.ndarray) -> float:
    """``class_text`` [C,D] unit (template-averaged, re-normalised) -> top-1 accuracy."""
    return float(((img @ class_text.T).argmax(axis=1) == labels).mean())


def nn1_top1(query: np.ndarray, q_labels: np.ndarray, gallery: np.ndarray, g_labels: np.ndarray) -> float:
    return float((g_labels[(query @ gallery.T).argmax(axis=1)] == q_labels).mean())


def hyper_dict(hp: Hyper) -> dict:
    return asdict(hp)
