r"""The readable truth: RECO's fusion layer as plain NumPy forward/backward pairs (docs/reco.md §2).

llm.c style, one convention for every step (checked by ``tests/fusion/test_fusion_convention.py``):

* ``out, cache = step_forward(inputs..., params...)`` — ``cache`` is always a plain ``dict`` of what
  the backward needs (keys named after the buffers, shapes in the docstring);
* ``grads = step_backward(cache, dout)`` — the cache first, then the upstream gradient ``dout`` of the
  same shape as ``out``; it returns the gradient of every float input of the forward, in the
  forward's argument order and named ``d<input>`` in the docstring: the array itself when there is
  one input (``du``), a tuple when there are several (``dx, dw, db``).

The whole layer, :func:`fusion_forward` / :func:`fusion_backward`, follows it too, with the
documented difference that its backward also takes ``params`` first (the backend contract of
:mod:`reco_ref.fusion`) and returns a dict named like the 18 parameters. Constants (LayerNorm
epsilon, GELU's) come from :mod:`reco_ref.fusion.constants`, shared with the other backends.
Every function is dtype-preserving: float32 in → float32 out, float64 in → float64 out.
Nothing here validates its inputs — :mod:`reco_ref.fusion` (the front door) does that once.

The layer (pre-LN transformer encoder layer, read out at the query token)::

    X  = [x + e_q ; r_1 + e_r ; ... ; r_k + e_r]       [B, T, D]   T = k + 1
    A1 = LN_1(X)                                       [B, T, D]
    Q, K, V = A1 W_{q,k,v} + b_{q,k,v}                 [B, h, T, dh] after the head split
    S  = Q K^T / sqrt(dh) + m,  P = softmax(S)         [B, h, T, T]  m = -inf on missing neighbours
    O  = concat_heads(P V) W_o + b_o                   [B, T, D]
    H  = X + O
    A2 = LN_2(H)
    U  = GELU(A2 W_1 + b_1)                            [B, T, R*D]   R = mlp_ratio
    Y  = H + U W_2 + b_2                               [B, T, D]
    out = Y[:, 0] / ||Y[:, 0]||                        [B, D]

Row-vector convention throughout: ``x @ W`` with ``W`` of shape ``[in, out]``.
"""

from __future__ import annotations

import math

import numpy as np

from .constants import GELU_INV_SQRT2, GELU_INV_SQRT_2PI, LN_EPS

__all__ = [
    "LN_EPS",
    "layernorm_forward",
    "layernorm_backward",
    "linear_forward",
    "linear_backward",
    "attention_forward",
    "attention_backward",
    "gelu_forward",
    "gelu_backward",
    "l2normalize_forward",
    "l2normalize_backward",
    "relevance_bias_forward",
    "relevance_bias_backward",
    "split_heads",
    "merge_heads",
    "fusion_forward",
    "fusion_backward",
]


# ----------------------------------------------------------------------------------------------
# LayerNorm
# ----------------------------------------------------------------------------------------------


def layernorm_forward(x, gamma, beta, eps=LN_EPS):
    r"""LayerNorm over the last axis.

    .. math::

        \mu = \frac{1}{D}\sum_j x_j, \quad
        s = \sqrt{\frac{1}{D}\sum_j (x_j-\mu)^2 + \epsilon}, \quad
        \hat x = \frac{x-\mu}{s}, \quad
        \mathrm{out} = \gamma \odot \hat x + \beta

    Parameters
    ----------
    x : ndarray, shape [..., D]
    gamma, beta : ndarray, shape [D]
    eps : float

    Returns
    -------
    out : ndarray, shape [..., D]
    cache : dict
        ``xhat [..., D]``, ``rstd [..., 1]``, ``gamma [D]`` for :func:`layernorm_backward`.
    """
    mu = x.mean(axis=-1, keepdims=True)  # [..., 1]
    xc = x - mu  # [..., D]
    var = (xc * xc).mean(axis=-1, keepdims=True)  # [..., 1] biased variance, as torch
    rstd = 1.0 / np.sqrt(var + eps)  # [..., 1]
    xhat = xc * rstd  # [..., D]
    out = xhat * gamma + beta  # [..., D]
    return out, {"xhat": xhat, "rstd": rstd, "gamma": gamma}


def layernorm_backward(cache, dout):
    r"""Gradients of :func:`layernorm_forward`.

    .. math::

        d\gamma = \sum_{\text{rows}} d\mathrm{out} \odot \hat x, \quad
        d\beta = \sum_{\text{rows}} d\mathrm{out}, \quad
        g = d\mathrm{out} \odot \gamma, \quad
        dx = \frac{1}{s}\left(g - \overline{g} - \hat x \odot \overline{g \odot \hat x}\right)

    where :math:`\overline{\cdot}` is the mean over the last axis and the sums run over every
    leading axis.

    Parameters
    ----------
    cache : dict from :func:`layernorm_forward`
    dout : ndarray, shape [..., D]

    Returns
    -------
    dx : ndarray, shape [..., D]
    dgamma, dbeta : ndarray, shape [D]
    """
    xhat, rstd, gamma = cache["xhat"], cache["rstd"], cache["gamma"]  # [..., D], [..., 1], [D]
    lead = tuple(range(dout.ndim - 1))
    dgamma = (dout * xhat).sum(axis=lead)  # [D]
    dbeta = dout.sum(axis=lead)  # [D]
    g = dout * gamma  # [..., D]
    dx = (g - g.mean(axis=-1, keepdims=True) - xhat * (g * xhat).mean(axis=-1, keepdims=True)) * rstd
    return dx, dgamma, dbeta


# ----------------------------------------------------------------------------------------------
# Linear (row-vector convention)
# ----------------------------------------------------------------------------------------------


def linear_forward(x, w, b):
    r"""Affine map in the row-vector convention.

    .. math::

        \mathrm{out} = x W + b

    Parameters
    ----------
    x : ndarray, shape [N, Din] (any leading axes are allowed)
    w : ndarray, shape [Din, Dout]
    b : ndarray, shape [Dout]

    Returns
    -------
    out : ndarray, shape [N, Dout]
    cache : dict
        ``x [N, Din]`` and ``w [Din, Dout]`` (references, not copies) for :func:`linear_backward`.
    """
    out = x @ w + b  # [N, Dout]
    return out, {"x": x, "w": w}


def linear_backward(cache, dout):
    r"""Gradients of :func:`linear_forward`.

    .. math::

        dx = d\mathrm{out}\, W^\top, \quad dW = x^\top d\mathrm{out}, \quad db = \sum_{\text{rows}} d\mathrm{out}

    Parameters
    ----------
    cache : dict from :func:`linear_forward`
    dout : ndarray, shape [N, Dout] (same leading axes as ``x``)

    Returns
    -------
    dx : ndarray, shape [N, Din]
    dw : ndarray, shape [Din, Dout]
    db : ndarray, shape [Dout]
    """
    x, w = cache["x"], cache["w"]  # [N, Din], [Din, Dout]
    x2 = x.reshape(-1, x.shape[-1])  # [N, Din]
    d2 = dout.reshape(-1, dout.shape[-1])  # [N, Dout]
    dx = dout @ w.T  # [..., Din]
    dw = x2.T @ d2  # [Din, Dout]
    db = d2.sum(axis=0)  # [Dout]
    return dx, dw, db


# ----------------------------------------------------------------------------------------------
# Masked multi-head self-attention (the heads are already split)
# ----------------------------------------------------------------------------------------------


def attention_forward(q, k, v, valid, bias=None):
    r"""Scaled dot-product attention with a key mask and an optional additive logit bias.

    .. math::

        S = \frac{Q K^\top}{\sqrt{d_h}} + B + m, \quad
        m_{bj} = \begin{cases}0 & \text{valid}_{bj}\\ -\infty & \text{otherwise}\end{cases}, \quad
        P = \mathrm{softmax}_{\text{last axis}}(S), \quad
        \mathrm{out} = P V

    A masked key gets probability exactly 0 (``exp(-inf) == 0``). In the fusion layer every row has
    a valid key (the query token, position 0, always is). Should a row have no valid key at all, its
    probabilities are all 0 and its output is 0 (not NaN), with zero gradient — the natural "no memory"
    value for the cross-attention of docs/reco.md §5.

    Queries and keys may have different lengths (cross-attention, docs/reco.md §5): ``q`` is ``[B, h, Tq, dh]``,
    ``k`` and ``v`` are ``[B, h, T, dh]``; in self-attention ``Tq == T``.

    Parameters
    ----------
    q : ndarray, shape [B, h, Tq, dh]
    k, v : ndarray, shape [B, h, T, dh]
    valid : ndarray of bool, shape [B, T]
        ``True`` where the key/value token may be attended to.
    bias : ndarray, shape broadcastable to [B, h, Tq, T] (e.g. [B, h, 1, T]), or None
        Added to the logits before the mask (the relevance bias of :func:`relevance_bias_forward`).

    Returns
    -------
    out : ndarray, shape [B, h, Tq, dh]
    cache : dict
        ``q, k, v``, the probabilities ``p [B, h, Tq, T]`` and ``bias_shape`` (``None`` without a bias).
    """
    dh = q.shape[-1]
    scale = 1.0 / math.sqrt(dh)
    s = (q @ k.swapaxes(-1, -2)) * scale  # [B, h, Tq, T]
    if bias is not None:
        s = s + bias  # [B, h, Tq, T]
    s = np.where(valid[:, None, None, :], s, -np.inf).astype(q.dtype, copy=False)
    smax = s.max(axis=-1, keepdims=True)  # [B, h, Tq, 1]; -inf only for a row without valid keys
    smax = np.where(np.isfinite(smax), smax, 0).astype(q.dtype, copy=False)
    e = np.exp(s - smax)  # [B, h, Tq, T] exactly 0 on masked keys
    denom = e.sum(axis=-1, keepdims=True)  # [B, h, Tq, 1] ≥ 1 when a valid key exists, else 0
    p = e / np.where(denom > 0, denom, 1).astype(q.dtype, copy=False)  # [B, h, Tq, T]
    out = p @ v  # [B, h, Tq, dh]
    return out, {"q": q, "k": k, "v": v, "p": p, "bias_shape": None if bias is None else np.shape(bias)}


def attention_backward(cache, dout):
    r"""Gradients of :func:`attention_forward`.

    .. math::

        dP = d\mathrm{out}\, V^\top, \quad dV = P^\top d\mathrm{out}, \quad
        dS = P \odot \left(dP - \textstyle\sum_j (dP \odot P)_{:,j}\right), \quad
        dQ = \frac{dS\, K}{\sqrt{d_h}}, \quad dK = \frac{dS^\top Q}{\sqrt{d_h}}

    Masked entries have :math:`P = 0`, hence :math:`dS = 0` there: a masked key/value receives no
    gradient. With a bias, :math:`dB = dS` summed over the axes the bias was broadcast along.

    Parameters
    ----------
    cache : dict from :func:`attention_forward`
    dout : ndarray, shape [B, h, Tq, dh]

    Returns
    -------
    dq : ndarray, shape [B, h, Tq, dh]
    dk, dv : ndarray, shape [B, h, T, dh]
    dbias : ndarray, the bias's shape — only when the forward was given a bias
    """
    q, k, v, p = cache["q"], cache["k"], cache["v"], cache["p"]
    scale = 1.0 / math.sqrt(q.shape[-1])
    dp = dout @ v.swapaxes(-1, -2)  # [B, h, Tq, T]
    dv = p.swapaxes(-1, -2) @ dout  # [B, h, T, dh]
    ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True))  # [B, h, Tq, T]
    dq = (ds @ k) * scale  # [B, h, Tq, dh]
    dk = (ds.swapaxes(-1, -2) @ q) * scale  # [B, h, T, dh]
    if cache.get("bias_shape") is None:
        return dq, dk, dv
    return dq, dk, dv, _sum_to_shape(ds, cache["bias_shape"])


def _sum_to_shape(g, shape):
    """Sum ``g`` over the axes a broadcast of ``shape`` expanded (the adjoint of broadcasting)."""
    shape = tuple(shape)
    lead = g.ndim - len(shape)
    g = g.sum(axis=tuple(range(lead))) if lead else g
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and g.shape[i] != 1)
    return g.sum(axis=axes, keepdims=True) if axes else g


# ----------------------------------------------------------------------------------------------
# Relevance bias (docs/reco.md §2 "Relevance bias" [ours])
# ----------------------------------------------------------------------------------------------


def relevance_bias_forward(scores, beta, gamma):
    r"""Per-head attention-logit bias from the neighbours' search scores.

    .. math::

        B_{b,h,0} = \gamma_h, \qquad B_{b,h,j} = \beta_h\, s_{b,j}\ \ (j = 1..k)

    the same for every query row (the bias has a singleton row axis and broadcasts over rows).

    Parameters
    ----------
    scores : ndarray, shape [B, k]
        The score feature of each neighbour, ``(cosine − center)/width`` (masked slots: any finite value).
    beta, gamma : ndarray, shape [h]

    Returns
    -------
    bias : ndarray, shape [B, h, 1, k + 1]
    cache : dict
        ``scores [B, k]`` and ``beta [h]`` for :func:`relevance_bias_backward`.
    """
    B, k = scores.shape
    h = beta.shape[0]
    bias = np.empty((B, h, 1, k + 1), dtype=scores.dtype)  # [B, h, 1, T]
    bias[:, :, 0, 0] = gamma  # toward the query token
    bias[:, :, 0, 1:] = beta[None, :, None] * scores[:, None, :]  # [B, h, k] toward each neighbour
    return bias, {"scores": scores, "beta": beta}


def relevance_bias_backward(cache, dout):
    r"""Gradients of :func:`relevance_bias_forward`.

    .. math::

        d\beta_h = \sum_{b, j \ge 1} dB_{b,h,j}\, s_{b,j}, \quad
        d\gamma_h = \sum_b dB_{b,h,0}, \quad
        ds_{b,j} = \sum_h \beta_h\, dB_{b,h,j}

    (RECO treats the scores as data: their gradient is returned for the checks, never used.)

    Parameters
    ----------
    cache : dict from :func:`relevance_bias_forward`
    dout : ndarray, shape [B, h, 1, k + 1]

    Returns
    -------
    dscores : ndarray, shape [B, k]
    dbeta, dgamma : ndarray, shape [h]
    """
    scores, beta = cache["scores"], cache["beta"]  # [B, k], [h]
    dn = dout[:, :, 0, 1:]  # [B, h, k]
    dbeta = (dn * scores[:, None, :]).sum(axis=(0, 2))  # [h]
    dgamma = dout[:, :, 0, 0].sum(axis=0)  # [h]
    dscores = (dn * beta[None, :, None]).sum(axis=1)  # [B, k]
    return dscores, dbeta, dgamma


def split_heads(x, heads):
    """``[B, T, D]`` → ``[B, h, T, dh]`` (head ``i`` holds columns ``i*dh:(i+1)*dh``)."""
    B, T, D = x.shape
    return x.reshape(B, T, heads, D // heads).transpose(0, 2, 1, 3)


def merge_heads(x):
    """``[B, h, T, dh]`` → ``[B, T, D]``, the inverse of :func:`split_heads` (concat_heads)."""
    B, h, T, dh = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, T, h * dh)


# ----------------------------------------------------------------------------------------------
def erf(x):
    """The error function: SciPy's ``erf`` where SciPy is installed, else ``math.erf`` element by element.

    The edge install (docs/edge.md) has no SciPy; the NumPy GELU then still runs (a query's 11 tokens × 4D values:
    milliseconds), just slower on training-sized arrays. Both are accurate to about one ulp in float64."""
    try:
        from scipy.special import erf as _erf
    except ImportError:
        a = np.asarray(x)
        return np.vectorize(math.erf, otypes=[np.float64])(a).astype(a.dtype if a.dtype.kind == "f" else np.float64)
    return _erf(x)


# GELU (exact, erf form)
# ----------------------------------------------------------------------------------------------

def gelu_forward(u):
    r"""Exact GELU (the erf form, torch's default ``approximate='none'``).

    .. math::

        \mathrm{GELU}(u) = u\,\Phi(u) = \tfrac12\, u \left(1 + \mathrm{erf}(u/\sqrt2)\right)

    Parameters
    ----------
    u : ndarray, any shape

    Returns
    -------
    out : ndarray, same shape and dtype as ``u``
    cache : dict
        ``u`` (a reference) for :func:`gelu_backward`.
    """
    out = 0.5 * u * (1.0 + erf(u * GELU_INV_SQRT2))  # same shape as u
    return out, {"u": u}


def gelu_backward(cache, dout):
    r"""Gradient of :func:`gelu_forward`.

    .. math::

        du = d\mathrm{out} \odot \left(\Phi(u) + u\,\varphi(u)\right), \quad
        \varphi(u) = \frac{e^{-u^2/2}}{\sqrt{2\pi}}

    Parameters
    ----------
    cache : dict from :func:`gelu_forward`
    dout : ndarray, same shape as ``u``

    Returns
    -------
    du : ndarray, same shape
    """
    u = cache["u"]
    cdf = 0.5 * (1.0 + erf(u * GELU_INV_SQRT2))
    pdf = np.exp(-0.5 * u * u) * GELU_INV_SQRT_2PI
    return dout * (cdf + u * pdf)


# ----------------------------------------------------------------------------------------------
# L2 normalisation
# ----------------------------------------------------------------------------------------------


def l2normalize_forward(z):
    r"""Row-wise L2 normalisation.

    .. math::

        y = \frac{z}{\lVert z \rVert_2}

    Parameters
    ----------
    z : ndarray, shape [B, D]
        Rows must be non-zero (a zero row gives NaN; the front door reports it).

    Returns
    -------
    y : ndarray, shape [B, D]
    cache : dict
        ``y [B, D]`` and ``norm [B, 1]`` for :func:`l2normalize_backward`.
    """
    norm = np.sqrt((z * z).sum(axis=-1, keepdims=True))  # [B, 1]
    y = z / norm
    return y, {"y": y, "norm": norm}


def l2normalize_backward(cache, dout):
    r"""Gradient of :func:`l2normalize_forward`.

    .. math::

        dz = \frac{d\mathrm{out} - y\,(y^\top d\mathrm{out})}{\lVert z \rVert_2}

    Parameters
    ----------
    cache : dict from :func:`l2normalize_forward`
    dout : ndarray, shape [B, D]

    Returns
    -------
    dz : ndarray, shape [B, D]
    """
    y, norm = cache["y"], cache["norm"]  # [B, D], [B, 1]
    return (dout - y * (y * dout).sum(axis=-1, keepdims=True)) / norm


# ----------------------------------------------------------------------------------------------
# The whole layer
# ----------------------------------------------------------------------------------------------


def fusion_forward(params, query, retrieved, mask=None, *, heads, scores=None):
    r"""Forward pass of the fusion layer φ (docs/reco.md §2), output read at the query token.

    .. math::

        X = [x + e_q;\ r_1 + e_r;\ \dots;\ r_k + e_r], \quad
        H = X + \mathrm{MHSA}(\mathrm{LN}_1(X)), \quad
        Y = H + \mathrm{GELU}(\mathrm{LN}_2(H) W_1 + b_1) W_2 + b_2, \quad
        \bar x = \frac{Y_{:,0}}{\lVert Y_{:,0} \rVert}

    Parameters
    ----------
    params : mapping of str to ndarray
        The 18 arrays named in :data:`reco_ref.fusion.params.PARAM_NAMES`, all of one float dtype.
    query : ndarray, shape [B, D]
    retrieved : ndarray, shape [B, k, D]   (k may be 0)
    mask : ndarray of bool, shape [B, k], or None
        ``True`` marks a valid neighbour; ``None`` means all valid.
    heads : int
        Number of attention heads; must divide D (checked by the front door).
    scores : ndarray, shape [B, k], or None
        The neighbours' score features (docs/reco.md §2 "Relevance bias"); required when ``params`` holds
        ``rel_beta, rel_gamma`` [h], ignored otherwise. The front door maps raw cosines to features.

    Returns
    -------
    out : ndarray, shape [B, D]
        The L2-normalised refined embedding.
    cache : dict
        Everything :func:`fusion_backward` needs; ``cache["heads"]`` records ``heads``.
    """
    p = params
    B, D = query.shape
    k = retrieved.shape[1]
    T = k + 1
    dtype = query.dtype

    # Token sequence with type embeddings.
    X = np.empty((B, T, D), dtype=dtype)  # [B, T, D]
    X[:, 0] = query + p["e_query"]
    X[:, 1:] = retrieved + p["e_neighbor"]
    valid = np.ones((B, T), dtype=bool)  # [B, T] the query token is always valid
    if mask is not None:
        valid[:, 1:] = mask

    # The cache is one dict: the shapes, plus each step's own cache under the step's name.
    cache = {"heads": int(heads), "B": B, "T": T, "D": D, "valid": valid}
    bias = None
    if "rel_beta" in p:  # relevance bias [ours]: beta_h * s_j toward neighbour j, gamma_h toward the query
        bias, cache["rel"] = relevance_bias_forward(scores, p["rel_beta"], p["rel_gamma"])  # [B, h, 1, T]

    # Attention block (pre-LN).
    A1, cache["ln1"] = layernorm_forward(X, p["ln1_gamma"], p["ln1_beta"])  # [B, T, D]
    A1f = A1.reshape(B * T, D)  # [B*T, D]
    Q, cache["lin_q"] = linear_forward(A1f, p["w_q"], p["b_q"])  # [B*T, D]
    K, cache["lin_k"] = linear_forward(A1f, p["w_k"], p["b_k"])  # [B*T, D]
    V, cache["lin_v"] = linear_forward(A1f, p["w_v"], p["b_v"])  # [B*T, D]
    att, cache["att"] = attention_forward(
        split_heads(Q.reshape(B, T, D), heads),
        split_heads(K.reshape(B, T, D), heads),
        split_heads(V.reshape(B, T, D), heads),
        valid,
        bias,
    )  # [B, h, T, dh]
    C = merge_heads(att).reshape(B * T, D)  # [B*T, D] concat_heads(P V)
    O, cache["lin_o"] = linear_forward(C, p["w_o"], p["b_o"])  # [B*T, D]
    H = X + O.reshape(B, T, D)  # [B, T, D]

    # MLP block (pre-LN).
    A2, cache["ln2"] = layernorm_forward(H, p["ln2_gamma"], p["ln2_beta"])  # [B, T, D]
    pre, cache["lin_1"] = linear_forward(A2.reshape(B * T, D), p["w_1"], p["b_1"])  # [B*T, R*D]
    U, cache["gelu"] = gelu_forward(pre)  # [B*T, R*D]
    Z, cache["lin_2"] = linear_forward(U, p["w_2"], p["b_2"])  # [B*T, D]
    Y = H + Z.reshape(B, T, D)  # [B, T, D]

    # Read-out at the query token, then normalise.
    out, cache["l2"] = l2normalize_forward(Y[:, 0])  # [B, D]
    return out, cache


def fusion_backward(params, cache, dout, *, return_input_grads=False):
    r"""Backward pass of :func:`fusion_forward` (docs/reco.md §2, "Backward").

    .. math::

        dY_{:,0} = \frac{d\bar x - \bar x(\bar x^\top d\bar x)}{\lVert Y_{:,0}\rVert},\ dY_{:,1:} = 0

        dW_2 = U^\top dY,\ db_2 = \textstyle\sum dY,\ dU = dY W_2^\top,\
        d\mathrm{pre} = dU \odot \mathrm{GELU}'(\mathrm{pre}),\
        dW_1 = A_2^\top d\mathrm{pre},\ db_1 = \textstyle\sum d\mathrm{pre},\ dA_2 = d\mathrm{pre}\, W_1^\top

        dH = dY + \mathrm{LN}_2'(dA_2),\
        dW_o = C^\top dH,\ db_o = \textstyle\sum dH,\ dC = dH W_o^\top

        dQ, dK, dV = \mathrm{attention}'(dC),\
        dW_{q,k,v} = A_1^\top d\{Q,K,V\},\ db_{q,k,v} = \textstyle\sum d\{Q,K,V\},\
        dA_1 = \textstyle\sum_{q,k,v} d\cdot\, W_\cdot^\top

        dX = dH + \mathrm{LN}_1'(dA_1),\ de_q = \textstyle\sum_b dX_{b,0},\ de_r = \textstyle\sum_{b,i\ge1} dX_{b,i}

    Sums run over batch and tokens. The per-step formulas are in the docstrings of the step
    functions.

    Parameters
    ----------
    params : mapping of str to ndarray
        The same parameters given to :func:`fusion_forward`. Part of the backend contract (the
        fast backends read the weights from it); here the step caches already hold them.
    cache : dict from :func:`fusion_forward`
    dout : ndarray, shape [B, D]
        Gradient of the loss with respect to ``out``.
    return_input_grads : bool
        Also return ``"query" [B, D]`` and ``"retrieved" [B, k, D]`` (the inputs are frozen
        embeddings in RECO training; their gradients serve checks and other modules). Masked
        neighbour slots get exactly zero gradient.

    Returns
    -------
    grads : dict of str to ndarray
        One entry per parameter, same shapes and dtype as ``params`` (plus the two input entries
        when asked).
    """
    B, T, D, heads = cache["B"], cache["T"], cache["D"], cache["heads"]
    dtype = dout.dtype

    # Normalisation: only token 0 is read out, the other rows of Y get zero gradient.
    dY = np.zeros((B, T, D), dtype=dtype)  # [B, T, D]
    dY[:, 0] = l2normalize_backward(cache["l2"], dout)
    dYf = dY.reshape(B * T, D)  # [B*T, D]

    # MLP block.
    dU, dw_2, db_2 = linear_backward(cache["lin_2"], dYf)  # [B*T, R*D]
    dpre = gelu_backward(cache["gelu"], dU)  # [B*T, R*D]
    dA2, dw_1, db_1 = linear_backward(cache["lin_1"], dpre)  # [B*T, D]
    dH_ln, dln2_gamma, dln2_beta = layernorm_backward(cache["ln2"], dA2.reshape(B, T, D))
    dH = dY + dH_ln  # [B, T, D] residual: both paths

    # Attention block.
    dC, dw_o, db_o = linear_backward(cache["lin_o"], dH.reshape(B * T, D))  # [B*T, D]
    dQh, dKh, dVh, *dbias = attention_backward(cache["att"], split_heads(dC.reshape(B, T, D), heads))
    dA1 = np.zeros((B * T, D), dtype=dtype)  # [B*T, D] sums the three projections
    proj = {}
    for name, dh_ in (("q", dQh), ("k", dKh), ("v", dVh)):
        d = merge_heads(dh_).reshape(B * T, D)  # [B*T, D]
        dA, dw, db = linear_backward(cache["lin_" + name], d)
        dA1 += dA
        proj["w_" + name], proj["b_" + name] = dw, db
    dX_ln, dln1_gamma, dln1_beta = layernorm_backward(cache["ln1"], dA1.reshape(B, T, D))
    dX = dH + dX_ln  # [B, T, D]

    grads = {
        "ln1_gamma": dln1_gamma,
        "ln1_beta": dln1_beta,
        "w_q": proj["w_q"],
        "b_q": proj["b_q"],
        "w_k": proj["w_k"],
        "b_k": proj["b_k"],
        "w_v": proj["w_v"],
        "b_v": proj["b_v"],
        "w_o": dw_o,
        "b_o": db_o,
        "ln2_gamma": dln2_gamma,
        "ln2_beta": dln2_beta,
        "w_1": dw_1,
        "b_1": db_1,
        "w_2": dw_2,
        "b_2": db_2,
        "e_query": dX[:, 0].sum(axis=0),  # [D]
        "e_neighbor": dX[:, 1:].sum(axis=(0, 1)),  # [D] zero when k == 0
    }
    if "rel" in cache:  # relevance bias: dbeta = sum dS * s over neighbour columns, dgamma = sum dS[:, :, :, 0]
        _, grads["rel_beta"], grads["rel_gamma"] = relevance_bias_backward(cache["rel"], dbias[0])
    if return_input_grads:
        grads["query"] = dX[:, 0].copy()  # [B, D]
        grads["retrieved"] = dX[:, 1:].copy()  # [B, k, D]
    return grads
