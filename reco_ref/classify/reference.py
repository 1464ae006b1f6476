r"""The memory-attention classifier (CVPR 2023, docs/reco.md §5) as plain NumPy forward/backward pairs.

llm.c style, built from the fusion layer's primitives (:mod:`reco_ref.fusion.reference`: LayerNorm, linear,
masked multi-head attention, head split/merge) and following their convention (docs/architecture.md, held by
tests/fusion/test_fusion_convention.py): each ``*_forward`` returns ``(out, cache)`` with ``cache`` a dict, each
``*_backward`` takes ``(cache, dout)`` (``dloss`` for a loss) and returns the gradients of the float inputs in the
forward's argument order; the whole module, like the fusion layer, takes ``params`` first and returns a dict.
Nothing here validates its inputs; :mod:`reco_ref.classify.model` (the front door) does that once. Every
function is dtype-preserving (float32 or float64 throughout).

The module, for a batch of ``B`` query images with ``k`` retrieved memory items each::

    Aq = LN_q(q)                         [B, D]        q: the query image embedding
    Q  = Aq W_q + b_q                    [B, Da]       Da: attention width, h heads of dh = Da/h
    Ak = LN_k(K_r)                       [B, k, Dk]    K_r: the items' image search keys
    K  = Ak W_k + b_k                    [B, k, Da]
    Av = LN_v(V_r)                       [B, k, Dv]    V_r: the items' values (text, image or both)
    V  = Av W_v + b_v                    [B, k, Da]
    a  = softmax(Q K^T / sqrt(dh) + M)   [B, h, 1, k]  single query token; mask M = -inf on missing items, else 0
    c  = concat_heads(a V)               [B, Da]
    m  = c W_o + b_o                     [B, D]        the memory's contribution; W_o, b_o zero at init: z = q
    z  = q + m                           [B, D]
    logits = s z W_c + b_c               [B, C]        s: a fixed logit scale (1 = docs/reco.md §5's formula)
    loss = mean_b CE(logits_b, y_b)

Two variants share the code: ``attention="uniform"`` replaces ``a`` by the uniform average over the valid
items (the "attention removed" baseline: no ``W_q, W_k`` and no LN_q/LN_k), and a parameter set without
``w_q`` (made by ``init_params(..., memory=False)``) is the no-memory classifier ``z = q``.

Row-vector convention throughout: ``x @ W`` with ``W`` of shape ``[in, out]``.
"""

from __future__ import annotations

import numpy as np

from ..fusion.reference import (
    attention_backward,
    attention_forward,
    layernorm_backward,
    layernorm_forward,
    linear_backward,
    linear_forward,
    merge_heads,
    split_heads,
)

__all__ = [
    "ATTENTION_MODES",
    "score_readout_forward",
    "score_readout_backward",
    "uniform_attention_forward",
    "uniform_attention_backward",
    "cross_entropy_forward",
    "cross_entropy_backward",
    "classify_forward",
    "classify_backward",
    "add_input_grads",
]

ATTENTION_MODES = ("softmax", "uniform")


# ----------------------------------------------------------------------------------------------
# Uniform average over the valid items (the attention-removed baseline)
# ----------------------------------------------------------------------------------------------


def uniform_attention_forward(v, valid):
    r"""Mean of the valid items' values: attention with equal weights.

    .. math::

        c_b = \frac{1}{n_b}\sum_{j:\ \mathrm{valid}_{bj}} V_{bj}, \quad n_b = \max(1, \#\{j: \mathrm{valid}_{bj}\})

    A row without valid items gives ``c_b = 0`` (the no-memory value, as in the masked softmax).

    Parameters
    ----------
    v : ndarray, shape [B, k, Da]
    valid : ndarray of bool, shape [B, k]

    Returns
    -------
    out : ndarray, shape [B, Da]
    cache : dict — ``"w"`` [B, k, 1], the weights ``valid / n_b``
    """
    w = valid.astype(v.dtype)[:, :, None]  # [B, k, 1]
    w = w / np.maximum(1, w.sum(axis=1, keepdims=True))  # [B, k, 1]
    return (w * v).sum(axis=1), {"w": w}  # [B, Da]


def uniform_attention_backward(cache, dout):
    r"""Gradient of :func:`uniform_attention_forward`: :math:`dV_{bj} = w_{bj}\, dc_b`.

    Parameters
    ----------
    cache : dict from :func:`uniform_attention_forward`
    dout : ndarray, shape [B, Da]

    Returns
    -------
    dv : ndarray, shape [B, k, Da]
    """
    return cache["w"] * dout[:, None, :]  # [B, k, Da]


# ----------------------------------------------------------------------------------------------
# Softmax cross-entropy
# ----------------------------------------------------------------------------------------------


def cross_entropy_forward(logits, labels):
    r"""Mean softmax cross-entropy.

    .. math::

        \ell = \frac{1}{B}\sum_b \Big(\log\sum_c e^{s_{bc}} - s_{b y_b}\Big)

    Parameters
    ----------
    logits : ndarray, shape [B, C]
    labels : ndarray of int, shape [B]

    Returns
    -------
    loss : float
    cache : dict — ``"probs"`` [B, C], ``"labels"`` [B]
    """
    smax = logits.max(axis=1, keepdims=True)  # [B, 1]
    e = np.exp(logits - smax)  # [B, C]
    z = e.sum(axis=1, keepdims=True)  # [B, 1]
    logp_y = (logits - smax)[np.arange(len(labels)), labels] - np.log(z[:, 0])  # [B]
    return float(-logp_y.mean()), {"probs": e / z, "labels": labels}


def cross_entropy_backward(cache, dloss=1.0):
    r"""Gradient of :func:`cross_entropy_forward`.

    .. math::

        \frac{\partial \ell}{\partial s_{bc}} = \frac{1}{B}\big(\mathrm{softmax}(s_b)_c - [c = y_b]\big)

    Parameters
    ----------
    cache : dict from :func:`cross_entropy_forward`
    dloss : float — upstream gradient of the loss

    Returns
    -------
    dlogits : ndarray, shape [B, C]
    """
    probs, labels = cache["probs"], cache["labels"]
    d = probs.copy()  # [B, C]
    d[np.arange(len(labels)), labels] -= 1
    return d * (dloss / len(labels))


# ----------------------------------------------------------------------------------------------
# The whole module
# ----------------------------------------------------------------------------------------------


def classify_forward(params, query, keys=None, values=None, valid=None, *, heads=1, attention="softmax",
                     logit_scale=1.0):
    r"""Forward pass: query attends over its retrieved items, then the linear classifier (docs/reco.md §5).

    .. math::

        a = \mathrm{softmax}\!\Big(\frac{(\mathrm{LN}_q(q) W_q + b_q)
                                         (\mathrm{LN}_k(K_r) W_k + b_k)^\top}{\sqrt{d_h}}\Big),\quad
        z = q + \big(a\,(\mathrm{LN}_v(V_r) W_v + b_v)\big) W_o + b_o,\quad
        \mathrm{logits} = s\, z W_c + b_c

    The fixed scale :math:`s` (``logit_scale``; 1 in docs/reco.md §5) matters for training only: the query embeddings
    are unit vectors, so with :math:`s = 1` a linear classifier on them needs a learning rate ~:math:`\sqrt D`
    times larger than the LayerNorm-ed memory path to move its logits as fast (CLIP's logit scale, fixed).

    Parameters
    ----------
    params : mapping of str to ndarray
        ``w_c [D, C], b_c [C]``; with memory also ``lnq_*/lnk_*/lnv_*`` gamma/beta, ``w_q [D, Da], b_q [Da],
        w_k [Dk, Da], b_k [Da], w_v [Dv, Da], b_v [Da], w_o [Da, D], b_o [D]`` (``Da`` the attention width).
    query : ndarray, shape [B, D]
    keys : ndarray, shape [B, k, Dk], or None (no memory)
    values : ndarray, shape [B, k, Dv], or None
    valid : ndarray of bool, shape [B, k], or None (all valid)
    heads : int — must divide the attention width Da
    attention : "softmax" | "uniform"
    logit_scale : float — :math:`s`

    Returns
    -------
    logits : ndarray, shape [B, C]
    cache : dict for :func:`classify_backward`
    """
    p = params
    cache = {"memory": "w_v" in p and keys is not None, "attention": attention, "heads": int(heads),
             "scale": logit_scale}
    z = query  # [B, D]
    if cache["memory"]:
        B, k, _ = keys.shape
        cache["keys_shape"] = keys.shape
        Da = p["w_v"].shape[1]  # attention width
        if valid is None:
            valid = np.ones((B, k), dtype=bool)
        Av, cache["lnv"] = layernorm_forward(values, p["lnv_gamma"], p["lnv_beta"])  # [B, k, Dv]
        V, cache["v"] = linear_forward(Av, p["w_v"], p["b_v"])  # [B, k, Da]
        if attention == "uniform":
            c, cache["att"] = uniform_attention_forward(V, valid)  # [B, Da]
        else:
            Aq, cache["lnq"] = layernorm_forward(query, p["lnq_gamma"], p["lnq_beta"])  # [B, D]
            Q, cache["q"] = linear_forward(Aq, p["w_q"], p["b_q"])  # [B, Da]
            Ak, cache["lnk"] = layernorm_forward(keys, p["lnk_gamma"], p["lnk_beta"])  # [B, k, Dk]
            K, cache["k"] = linear_forward(Ak, p["w_k"], p["b_k"])  # [B, k, Da]
            att, cache["att"] = attention_forward(
                split_heads(Q.reshape(B, 1, Da), heads), split_heads(K, heads), split_heads(V, heads), valid
            )  # [B, h, 1, dh]
            c = merge_heads(att).reshape(B, Da)  # [B, Da] concat_heads(a V)
        m, cache["o"] = linear_forward(c, p["w_o"], p["b_o"])  # [B, D] the memory's contribution
        z = query + m  # [B, D] residual: zero W_o, b_o ⇒ z = q
    logits, cache["c"] = linear_forward(z * z.dtype.type(logit_scale), p["w_c"], p["b_c"])  # [B, C]
    return logits, cache


def classify_backward(params, cache, dlogits, *, return_input_grads=False):
    r"""Backward pass of :func:`classify_forward`.

    .. math::

        dW_c = s\, z^\top d\mathrm{logits},\ db_c = \textstyle\sum_b d\mathrm{logits},\
        dz = s\, d\mathrm{logits}\, W_c^\top

        dW_o = c^\top dz,\ db_o = \textstyle\sum_b dz,\ dc = dz\, W_o^\top,\
        dQ, dK, dV = \mathrm{attention}'(dc)

        dW_{q,k,v} = A_{q,k,v}^\top d\{Q,K,V\},\ db_{q,k,v} = \textstyle\sum d\{Q,K,V\},\
        dA_{q,k,v} = d\{Q,K,V\}\, W_{q,k,v}^\top,\ d\{q,K_r,V_r\} = \mathrm{LN}'_{q,k,v}(dA_{q,k,v})

        dq = dz + d_{\mathrm{LN}_q}q

    ``db_k`` is exactly 0: with one query token, :math:`Q b_k` adds the same constant to every score
    and softmax is invariant to that shift. The per-step formulas are in the primitives' docstrings.

    Parameters
    ----------
    params : the parameters given to :func:`classify_forward`
    cache : dict from :func:`classify_forward`
    dlogits : ndarray, shape [B, C]
    return_input_grads : bool
        Also return ``"query" [B, D]``, and with memory ``"keys" [B, k, Dk]`` and ``"values" [B, k, Dv]``
        (frozen embeddings in training; their gradients serve the checks). Masked items get zero gradient.

    Returns
    -------
    grads : dict of str to ndarray, one entry per parameter used (same shapes and dtype)
    """
    p = params
    grads = {}
    dzs, grads["w_c"], grads["b_c"] = linear_backward(cache["c"], dlogits)  # [B, D] gradient of s·z
    dz = dzs * dzs.dtype.type(cache["scale"])  # [B, D]
    dq = dz  # [B, D] residual path
    dkeys = dvalues = None  # input gradients, set on the memory path
    if cache["memory"]:
        heads = cache["heads"]
        dc, grads["w_o"], grads["b_o"] = linear_backward(cache["o"], dz)  # [B, Da]
        if cache["attention"] == "uniform":
            dV = uniform_attention_backward(cache["att"], dc)  # [B, k, Da]
        else:
            B, Da = dc.shape
            dQh, dKh, dVh = attention_backward(cache["att"], split_heads(dc.reshape(B, 1, Da), heads))
            dQ = merge_heads(dQh).reshape(B, Da)  # [B, Da]
            dK, dV = merge_heads(dKh), merge_heads(dVh)  # [B, k, Da]
            dAq, grads["w_q"], grads["b_q"] = linear_backward(cache["q"], dQ)  # [B, D]
            dq_ln, grads["lnq_gamma"], grads["lnq_beta"] = layernorm_backward(cache["lnq"], dAq)
            dq = dz + dq_ln  # [B, D] both paths
            dAk, grads["w_k"], grads["b_k"] = linear_backward(cache["k"], dK)  # [B, k, Dk]
            dkeys, grads["lnk_gamma"], grads["lnk_beta"] = layernorm_backward(cache["lnk"], dAk)
        dAv, grads["w_v"], grads["b_v"] = linear_backward(cache["v"], dV)  # [B, k, Dv]
        dvalues, grads["lnv_gamma"], grads["lnv_beta"] = layernorm_backward(cache["lnv"], dAv)
    if return_input_grads:
        add_input_grads(grads, cache, dq, dkeys, dvalues)
    return grads


def add_input_grads(grads, cache, dq, dkeys, dvalues):
    """Put the input gradients ``query [B, D]``, ``keys [B, k, Dk]``, ``values [B, k, Dv]`` into ``grads``
    (both backends). Uniform attention never reads the keys: their gradient is exactly zero."""
    grads["query"] = dq.copy()
    if cache["memory"]:
        grads["values"] = dvalues
        grads["keys"] = dkeys if cache["attention"] != "uniform" else np.zeros(cache["keys_shape"], dvalues.dtype)


# ----------------------------------------------------------------------------------------------
# The score readout [ours]: a soft vote of the neighbours' captions against the class prompts
# ----------------------------------------------------------------------------------------------


def score_readout_forward(scores, valid, values_text, class_text, beta, log_sv):
    r"""The neighbours' caption embeddings read against the class prompts, weighted by their search score [ours].

    .. math::

        a_{bj} = \frac{e^{\beta s_{bj}}}{\sum_{l\ \text{valid}} e^{\beta s_{bl}}}\ (0 \text{ if invalid}),\quad
        r_b = \sum_j a_{bj} v_{bj},\quad
        \mathrm{out}_{bc} = e^{\log s_v}\, r_b \cdot t_c

    ``scores`` [B, k] are the items' search cosines, ``values_text`` [B, k, Dt] their caption embeddings,
    ``class_text`` [C, Dt] the class prompts' text embeddings (fixed), ``beta`` and ``log_sv`` scalars (trained).
    With captions that name the class, ``out`` is a soft k-NN vote the classifier can weigh against its own
    logits: few-shot classes get the memory's evidence from step 0. A row with no valid item contributes 0.

    Returns
    -------
    out : ndarray, shape [B, C]
    cache : dict for :func:`score_readout_backward`
    """
    dt = values_text.dtype
    valid = np.ones(scores.shape, bool) if valid is None else valid
    z = np.where(valid, dt.type(beta) * scores.astype(dt), -np.inf)  # [B, k]
    top = z.max(axis=1, keepdims=True)  # [B, 1]
    top = np.where(np.isfinite(top), top, 0)
    e = np.where(valid, np.exp(z - top), 0).astype(dt)  # [B, k]
    den = e.sum(axis=1, keepdims=True)  # [B, 1]
    a = np.divide(e, den, out=np.zeros_like(e), where=den > 0)  # [B, k]
    r = np.einsum("bk,bkd->bd", a, values_text)  # [B, Dt]
    R = r @ class_text.T  # [B, C]
    sv = dt.type(np.exp(log_sv))
    return sv * R, {"a": a, "v": values_text, "t": class_text, "R": R, "sv": sv, "beta": dt.type(beta),
                    "s": np.where(valid, scores, 0).astype(dt)}


def score_readout_backward(cache, dout):
    r"""Backward of :func:`score_readout_forward`.

    .. math::

        d\log s_v = s_v \textstyle\sum_{bc} d\mathrm{out}_{bc} R_{bc},\quad dr = s_v\, d\mathrm{out}\, T,\quad
        da_{bj} = v_{bj} \cdot dr_b,\quad dz_{bj} = a_{bj}\big(da_{bj} - \textstyle\sum_l a_{bl} da_{bl}\big)

        d\beta = \textstyle\sum_{bj} dz_{bj} s_{bj},\quad ds_{bj} = \beta\, dz_{bj},\quad dv_{bj} = a_{bj}\, dr_b

    Returns
    -------
    dscores : ndarray, shape [B, k] (0 on invalid items)
    dvalues_text : ndarray, shape [B, k, Dt]
    dbeta, dlog_sv : scalars
        In the forward's argument order; ``valid`` (bool) and ``class_text`` (the fixed class prompts) get none.
    """
    a, v, t, R, sv, beta, s = (cache[x] for x in ("a", "v", "t", "R", "sv", "beta", "s"))
    d_log_sv = sv * (dout * R).sum()
    dr = sv * (dout @ t)  # [B, Dt]
    da = np.einsum("bkd,bd->bk", v, dr)  # [B, k]
    dz = a * (da - (a * da).sum(axis=1, keepdims=True))  # [B, k]; 0 where invalid (a = 0)
    return beta * dz, a[..., None] * dr[:, None, :], (dz * s).sum(), d_log_sv
