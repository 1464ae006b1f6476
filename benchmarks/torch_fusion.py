"""The fusion layer written with PyTorch ops + autograd — the benchmarks' comparison point only
(PyTorch is never a runtime dependency of reco_ref).

Two variants, both the same math as :mod:`reco_ref.fusion.reference` (checked in
``bench_fusion.py`` before timing):

* ``torch_full``: the layer as one would write it as an ``nn.TransformerEncoderLayer``-style block:
  every token through attention, LN_2 and the MLP, then the read-out at token 0.
* ``torch_row0``: the same dead-work elimination as the Numba backends — K, V (and LN_1) for all
  tokens, Q / attention row / W_o / LN_2 / MLP for the query token only.  This is the fair
  like-for-like comparison for the hand-written kernels.
"""

from __future__ import annotations

import math

import numpy as np


def to_torch_params(params, device="cpu"):
    import torch

    return {n: torch.tensor(np.asarray(a), device=device, requires_grad=True) for n, a in params.items()}


def _qkv_heads(x, heads):
    B, T, D = x.shape
    return x.view(B, T, heads, D // heads).transpose(1, 2)  # [B,h,T,dh]


def torch_forward(tp, q, r, valid, heads: int, row0: bool):
    """out [B,D] from torch tensors (tp: dict of leaf tensors; valid [B,T] bool tensor)."""
    import torch
    import torch.nn.functional as F

    B, D = q.shape
    dh = D // heads
    X = torch.cat([(q + tp["e_query"])[:, None], r + tp["e_neighbor"]], dim=1)           # [B,T,D]
    A1 = F.layer_norm(X, (D,), tp["ln1_gamma"], tp["ln1_beta"], 1e-5)
    K = _qkv_heads(A1 @ tp["w_k"] + tp["b_k"], heads)                                  # [B,h,T,dh]
    V = _qkv_heads(A1 @ tp["w_v"] + tp["b_v"], heads)
    Xq = X[:, :1] if row0 else X                                                       # [B,Tq,D]
    Q = _qkv_heads((A1[:, :1] if row0 else A1) @ tp["w_q"] + tp["b_q"], heads)         # [B,h,Tq,dh]
    S = (Q @ K.transpose(-1, -2)) / math.sqrt(dh)                                      # [B,h,Tq,T]
    S = S.masked_fill(~valid[:, None, None, :], float("-inf"))
    P = torch.softmax(S, dim=-1)
    C = (P @ V).transpose(1, 2).reshape(B, Xq.shape[1], D)                             # [B,Tq,D]
    H = Xq + (C @ tp["w_o"] + tp["b_o"])
    A2 = F.layer_norm(H, (D,), tp["ln2_gamma"], tp["ln2_beta"], 1e-5)
    Y = H + F.gelu(A2 @ tp["w_1"] + tp["b_1"], approximate="none") @ tp["w_2"] + tp["b_2"]
    y0 = Y[:, 0]
    return y0 / torch.linalg.vector_norm(y0, dim=-1, keepdim=True)


def torch_step(tp, q, r, valid, dout, heads: int, row0: bool):
    """Forward + backward (parameter gradients only, inputs are frozen)."""
    for t in tp.values():
        t.grad = None
    out = torch_forward(tp, q, r, valid, heads, row0)
    out.backward(dout)
    return out
