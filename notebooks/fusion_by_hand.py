# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # The fusion layer by hand
#
# RECO refines a frozen embedding `x` with the embeddings `r_1..r_k` its memory neighbours carry from the other
# modality, through one pre-LN transformer layer read out at the query token (spec §2):
#
# ```
# X  = [x + e_q ; r_1 + e_r ; ... ; r_k + e_r]        [B, T, D]     T = k + 1
# A1 = LN_1(X)                                        [B, T, D]
# Q, K, V = A1 W_{q,k,v} + b_{q,k,v}                  [B, h, T, dh] after the head split
# P  = softmax(Q K^T / sqrt(dh) + m)                  [B, h, T, T]  m = -inf on missing neighbours
# O  = concat_heads(P V) W_o + b_o ;  H = X + O       [B, T, D]
# U  = GELU(LN_2(H) W_1 + b_1)                        [B, T, R*D]
# Y  = H + U W_2 + b_2                                [B, T, D]
# out = Y[:, 0] / ||Y[:, 0]||                         [B, D]
# ```
#
# This notebook runs that forward **one named step at a time** with the step functions of
# `reco_ref/fusion/reference.py` (each `*_forward` returns `(out, cache)`, each `*_backward(cache, dout)` returns
# the gradients of its float inputs), then writes the backward **step by step**. Every gradient is checked live,
# in float64:
#
# * against **central finite differences** — each step's backward against its own forward, and at the end every
#   parameter's gradient against the whole layer;
# * against **PyTorch autograd** when torch is installed (it is a test oracle only, never a run-time dependency).
#
# Each check prints one line: `exact` (bit-identical), `close` (`np.allclose`, rtol 1e-6, atol 1e-9 against finite
# differences; rtol 1e-12, atol 1e-14 against autograd and between implementations) and the max absolute
# difference. Finally the fused
# implementation (`reco_ref.fusion.fusion_forward` / `fusion_backward`) is checked against all of it, and the
# attention weights are drawn as heat maps.

# %%
import matplotlib.pyplot as plt
import numpy as np

from reco_ref.fusion import PARAM_NAMES, fusion_backward, fusion_forward
from reco_ref.fusion.reference import (
    attention_backward, attention_forward, gelu_backward, gelu_forward, l2normalize_backward, l2normalize_forward,
    layernorm_backward, layernorm_forward, linear_backward, linear_forward, merge_heads, split_heads,
)

from _show import show_figure  # plt.show() in Jupyter; a PNG in notebooks/figures/ when run as a script with no display

try:
    import torch
except ImportError:  # the oracle is optional: every torch line below says it was skipped
    torch = None
print("PyTorch autograd oracle:", f"torch {torch.__version__}" if torch is not None else "not installed — skipped")

# %% [markdown]
# ## A small problem, in float64
#
# Two queries (`B = 2`), five neighbours each (`k = 5`, so `T = 6` tokens), width `D = 8`, `h = 2` heads of
# `dh = 4`, MLP ratio `R = 4`. The second query's last two neighbours are **missing** (masked): their slots must
# get zero attention and zero gradient. The parameters are random rather than the identity initialisation
# (`W_o = W_2 = 0` at init would silence half of the gradients); `W_q, W_k` are drawn larger so the attention
# is not flat.

# %%
B, k, D, h, R = 2, 5, 8, 2, 4
T, dh = k + 1, D // h
rng = np.random.default_rng(0)
shapes = {"ln1_gamma": (D,), "ln1_beta": (D,), "w_q": (D, D), "b_q": (D,), "w_k": (D, D), "b_k": (D,),
          "w_v": (D, D), "b_v": (D,), "w_o": (D, D), "b_o": (D,), "ln2_gamma": (D,), "ln2_beta": (D,),
          "w_1": (D, R * D), "b_1": (R * D,), "w_2": (R * D, D), "b_2": (D,), "e_query": (D,), "e_neighbor": (D,)}
assert tuple(shapes) == PARAM_NAMES
scale = {"w_q": 1.0, "w_k": 1.0, "ln1_gamma": 0.1, "ln2_gamma": 0.1}
p = {n: rng.normal(0, scale.get(n, 0.3), s) for n, s in shapes.items()}  # float64
p["ln1_gamma"] += 1.0
p["ln2_gamma"] += 1.0

x = rng.normal(size=(B, D))          # query embeddings          [B, D]
r = rng.normal(size=(B, k, D))       # neighbour embeddings      [B, k, D]
mask = np.ones((B, k), bool)         # True = a real neighbour   [B, k]
mask[1, -2:] = False
G = rng.normal(size=(B, D))          # the loss is L = sum(G * out), so dL/dout = G


def show(name, a, note):
    print(f"{name:6s} {str(list(a.shape)):15s} {note}")


# %% [markdown]
# ## Forward, one named step at a time

# %%
X = np.empty((B, T, D))                       # [B, T, D] token sequence with type embeddings
X[:, 0] = x + p["e_query"]
X[:, 1:] = r + p["e_neighbor"]
valid = np.concatenate([np.ones((B, 1), bool), mask], axis=1)   # [B, T] the query token is always valid
show("X", X, "[B, T, D]   tokens: query + e_q, neighbours + e_r")

A1, c_ln1 = layernorm_forward(X, p["ln1_gamma"], p["ln1_beta"])          # [B, T, D]
show("A1", A1, "[B, T, D]   LN_1(X)")
A1f = A1.reshape(B * T, D)                                                 # [B*T, D] rows for the matmuls
Q, c_q = linear_forward(A1f, p["w_q"], p["b_q"])                          # [B*T, D]
K, c_k = linear_forward(A1f, p["w_k"], p["b_k"])                          # [B*T, D]
V, c_v = linear_forward(A1f, p["w_v"], p["b_v"])                          # [B*T, D]
Qh, Kh, Vh = (split_heads(a.reshape(B, T, D), h) for a in (Q, K, V))      # [B, h, T, dh] each
show("Qh", Qh, "[B, h, T, dh] queries per head (K, V alike)")
att, c_att = attention_forward(Qh, Kh, Vh, valid)                         # [B, h, T, dh]
P = c_att["p"]                                                            # [B, h, T, T] attention weights
show("P", P, "[B, h, T, T] softmax(Q K^T / sqrt(dh) + m)")
C = merge_heads(att).reshape(B * T, D)                                    # [B*T, D] concat_heads(P V)
O, c_o = linear_forward(C, p["w_o"], p["b_o"])                            # [B*T, D]
H = X + O.reshape(B, T, D)                                                # [B, T, D] first residual
show("H", H, "[B, T, D]   X + attention block")
A2, c_ln2 = layernorm_forward(H, p["ln2_gamma"], p["ln2_beta"])          # [B, T, D]
pre, c_1 = linear_forward(A2.reshape(B * T, D), p["w_1"], p["b_1"])      # [B*T, R*D]
U, c_gelu = gelu_forward(pre)                                             # [B*T, R*D]
show("U", U, "[B*T, R*D] GELU(LN_2(H) W_1 + b_1)")
Z, c_2 = linear_forward(U, p["w_2"], p["b_2"])                            # [B*T, D]
Y = H + Z.reshape(B, T, D)                                                # [B, T, D] second residual
out, c_l2 = l2normalize_forward(Y[:, 0])                                  # [B, D] read-out at the query token
show("out", out, "[B, D]      Y[:, 0] / ||Y[:, 0]||")
L = float((G * out).sum())
print(f"L = {L:.12f};  masked keys get exactly zero weight: {bool((P[1, :, :, -2:] == 0).all())}")

# %% [markdown]
# ## The same forward in PyTorch, keeping every intermediate's gradient
#
# Written independently with torch ops (`F.layer_norm`, `softmax`, exact `F.gelu`), in float64;
# `retain_grad()` keeps the gradient of each named intermediate so the step-by-step backward below can be
# compared tensor by tensor.

# %%
tg = {}  # name -> torch tensor whose .grad we compare
if torch is not None:
    import torch.nn.functional as F

    tp = {n: torch.tensor(a, requires_grad=True) for n, a in p.items()}
    tx, tr = torch.tensor(x, requires_grad=True), torch.tensor(r, requires_grad=True)
    tX = torch.cat([(tx + tp["e_query"])[:, None], tr + tp["e_neighbor"]], dim=1)
    tA1 = F.layer_norm(tX, (D,), tp["ln1_gamma"], tp["ln1_beta"], eps=1e-5)
    tQ, tK, tV = (tA1.reshape(B * T, D) @ tp["w_" + n] + tp["b_" + n] for n in "qkv")

    def heads(a):
        return a.reshape(B, T, h, dh).transpose(1, 2)

    S = heads(tQ) @ heads(tK).transpose(-1, -2) / dh**0.5
    S = S.masked_fill(~torch.tensor(valid)[:, None, None, :], float("-inf"))
    tP = torch.softmax(S, dim=-1)
    tC = (tP @ heads(tV)).transpose(1, 2).reshape(B * T, D)
    tH = tX + (tC @ tp["w_o"] + tp["b_o"]).reshape(B, T, D)
    tA2 = F.layer_norm(tH, (D,), tp["ln2_gamma"], tp["ln2_beta"], eps=1e-5)
    tpre = tA2.reshape(B * T, D) @ tp["w_1"] + tp["b_1"]
    tU = F.gelu(tpre)
    tY = tH + (tU @ tp["w_2"] + tp["b_2"]).reshape(B, T, D)
    tout = tY[:, 0] / tY[:, 0].norm(dim=-1, keepdim=True)
    tg = dict(X=tX, A1=tA1, Q=tQ, K=tK, V=tV, P=tP, C=tC, H=tH, A2=tA2, pre=tpre, U=tU, Y=tY, out=tout)
    for t in tg.values():
        t.retain_grad()
    (torch.tensor(G) * tout).sum().backward()
    tg.update({"x": tx, "r": tr, **tp})
    print("torch forward: max |out - torch| =", float(np.abs(out - tout.detach().numpy()).max()))


# %% [markdown]
# ## The checking tools
#
# `num_grad(f, a)`: central differences `(f(a + eps e_i) - f(a - eps e_i)) / 2 eps` for every entry of `a`
# (float64, `eps = 1e-6`; the truncation error is `O(eps^2)` and the round-off about `1e-16 / eps`, so agreement
# to ~1e-9 is what "correct" looks like; a wrong formula is off by O(1)). `cmp` prints one line per tensor.

# %%
def num_grad(f, a, eps=1e-6):
    """d f / d a by central differences; f() reads a (mutated in place and restored)."""
    g = np.zeros_like(a)
    flat, gflat = a.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        fp = f()
        flat[i] = old - eps
        fm = f()
        flat[i] = old
        gflat[i] = (fp - fm) / (2 * eps)
    return g


def cmp(name, ours, ref=None, torch_name=None, torch_grad=None, label="fd", tol=(1e-6, 1e-9)):
    """One line: our gradient against a reference (finite differences by default) and against torch autograd."""
    parts = [f"{name:16s} {str(list(ours.shape)):11s}"]
    ok_ref = ok_torch = True
    if ref is not None:
        ok_ref = bool(np.allclose(ours, ref, rtol=tol[0], atol=tol[1]))
        parts.append(f"{label}: exact {str(bool(np.array_equal(ours, ref))):5s} close {str(ok_ref):5s} "
                     f"maxdiff {np.abs(ours - ref).max():.1e}")
    if torch_grad is None and torch_name is not None and torch_name in tg:
        torch_grad = tg[torch_name].grad.numpy()
    if torch_grad is not None:
        torch_grad = torch_grad.reshape(ours.shape)
        ok_torch = bool(np.allclose(ours, torch_grad, rtol=1e-12, atol=1e-14))
        parts.append(f"torch: exact {str(bool(np.array_equal(ours, torch_grad))):5s} close {str(ok_torch):5s} "
                     f"maxdiff {np.abs(ours - torch_grad).max():.1e}")
    elif torch_name is not None:
        parts.append("torch: skipped")
    print(" | ".join(parts))
    results.append((name, ok_ref, ok_torch))


def step_fd(forward, inputs, dout):
    """Finite-difference gradients of sum(dout * forward(*inputs)[0]) with respect to each input array."""
    return [num_grad(lambda: float((dout * forward(*inputs)[0]).sum()), a) for a in inputs]


results = []  # (name, fd ok, torch ok) for the summary at the end

# %% [markdown]
# ## Backward, step by step
#
# Each cell undoes one forward step. The step's backward is checked against finite differences **of that step
# alone** (its forward, with the upstream gradient as the weights of the sum), and the gradient that flows on is
# checked against torch's gradient of the same named intermediate.
#
# **L2 normalisation** `out = y / ||y||`:  `dy = (dout - out (out . dout)) / ||y||`. Only token 0 is read out,
# so the other rows of `dY` are zero.

# %%
dout = G                                                     # [B, D] dL/dout
dY = np.zeros((B, T, D))                                     # [B, T, D]
dY[:, 0] = l2normalize_backward(c_l2, dout)
cmp("dY[:,0]", dY[:, 0], step_fd(l2normalize_forward, [Y[:, 0].copy()], dout)[0],
    torch_grad=tg["Y"].grad.numpy()[:, 0] if tg else None, torch_name="Y")

# %% [markdown]
# **Second linear** `Z = U W_2 + b_2`:  `dU = dZ W_2^T`, `dW_2 = U^T dZ`, `db_2 = sum_rows dZ`; and `dZ = dY`
# (the residual passes the gradient through unchanged).

# %%
dYf = dY.reshape(B * T, D)                                   # [B*T, D] = dZ
dU, dw_2, db_2 = linear_backward(c_2, dYf)                   # [B*T, R*D], [R*D, D], [D]
fd = step_fd(linear_forward, [U.copy(), p["w_2"].copy(), p["b_2"].copy()], dYf)
cmp("dU", dU, fd[0], "U")
cmp("dw_2", dw_2, fd[1], "w_2")
cmp("db_2", db_2, fd[2], "b_2")

# %% [markdown]
# **GELU** (exact, erf form) `u = pre Phi(pre)`:  `dpre = dU (Phi(pre) + pre phi(pre))`.

# %%
dpre = gelu_backward(c_gelu, dU)                             # [B*T, R*D]
cmp("dpre", dpre, step_fd(gelu_forward, [pre.copy()], dU)[0], "pre")

# %% [markdown]
# **First linear of the MLP** `pre = A2 W_1 + b_1`.

# %%
dA2f, dw_1, db_1 = linear_backward(c_1, dpre)                # [B*T, D], [D, R*D], [R*D]
fd = step_fd(linear_forward, [A2.reshape(B * T, D).copy(), p["w_1"].copy(), p["b_1"].copy()], dpre)
cmp("dA2", dA2f, fd[0], "A2")
cmp("dw_1", dw_1, fd[1], "w_1")
cmp("db_1", db_1, fd[2], "b_1")

# %% [markdown]
# **LayerNorm 2** `A2 = gamma xhat + beta`, `xhat = (H - mu) / s`:
# `dH = (1/s) (g - mean(g) - xhat mean(g xhat))` with `g = gamma dA2`; `dgamma = sum xhat dA2`, `dbeta = sum dA2`.
# Then the residual `Y = H + Z` adds `dY` to it.

# %%
dA2 = dA2f.reshape(B, T, D)
dH_ln, dln2_gamma, dln2_beta = layernorm_backward(c_ln2, dA2)   # [B, T, D], [D], [D]
fd = step_fd(layernorm_forward, [H.copy(), p["ln2_gamma"].copy(), p["ln2_beta"].copy()], dA2)
cmp("dH (LN_2)", dH_ln, fd[0])
cmp("dln2_gamma", dln2_gamma, fd[1], "ln2_gamma")
cmp("dln2_beta", dln2_beta, fd[2], "ln2_beta")
dH = dY + dH_ln                                              # [B, T, D] both paths of the residual
cmp("dH", dH, torch_name="H")

# %% [markdown]
# **Output projection** `O = C W_o + b_o`.

# %%
dC, dw_o, db_o = linear_backward(c_o, dH.reshape(B * T, D))  # [B*T, D], [D, D], [D]
fd = step_fd(linear_forward, [C.copy(), p["w_o"].copy(), p["b_o"].copy()], dH.reshape(B * T, D))
cmp("dC", dC, fd[0], "C")
cmp("dw_o", dw_o, fd[1], "w_o")
cmp("db_o", db_o, fd[2], "b_o")

# %% [markdown]
# **Attention** `P = softmax(S)`, `out = P V`:  `dV = P^T dout`, `dP = dout V^T`,
# `dS = P (dP - rowsum(P dP))`, `dQ = dS K / sqrt(dh)`, `dK = dS^T Q / sqrt(dh)`. Masked keys have `P = 0`, so
# their `dS`, `dK`, `dV` are exactly zero.

# %%
dCh = split_heads(dC.reshape(B, T, D), h)                    # [B, h, T, dh]
dQh, dKh, dVh = attention_backward(c_att, dCh)               # [B, h, T, dh] each
fd = step_fd(lambda q_, k_, v_: attention_forward(q_, k_, v_, valid), [Qh.copy(), Kh.copy(), Vh.copy()], dCh)
dQ, dK, dV = (merge_heads(a).reshape(B * T, D) for a in (dQh, dKh, dVh))   # [B*T, D] each
cmp("dQ", dQ, merge_heads(fd[0]).reshape(B * T, D), "Q")
cmp("dK", dK, merge_heads(fd[1]).reshape(B * T, D), "K")
cmp("dV", dV, merge_heads(fd[2]).reshape(B * T, D), "V")
print("masked slots: dK, dV exactly zero:", bool((dKh[1, :, -2:] == 0).all() and (dVh[1, :, -2:] == 0).all()))

# %% [markdown]
# **Q, K, V projections**: three linears read the same `A1`, so their input gradients add up.

# %%
dA1f = np.zeros((B * T, D))                                  # [B*T, D]
grads_qkv = {}
for n, d, c in (("q", dQ, c_q), ("k", dK, c_k), ("v", dV, c_v)):
    dA, dw, db = linear_backward(c, d)
    fd = step_fd(linear_forward, [A1f.copy(), p["w_" + n].copy(), p["b_" + n].copy()], d)
    cmp(f"dA1 via {n}", dA, fd[0])
    cmp("dw_" + n, dw, fd[1], "w_" + n)
    cmp("db_" + n, db, fd[2], "b_" + n)
    dA1f += dA
    grads_qkv["w_" + n], grads_qkv["b_" + n] = dw, db
cmp("dA1", dA1f, torch_name="A1")
print(f"db_k is zero (softmax is invariant to a shift of every key): max |db_k| = {np.abs(grads_qkv['b_k']).max():.1e}")

# %% [markdown]
# **LayerNorm 1**, the first residual (`H = X + O`), and the type embeddings (`e_q` is added to token 0 of every
# row, `e_r` to every neighbour token, masked ones included: their gradient there is exactly zero anyway).

# %%
dA1 = dA1f.reshape(B, T, D)
dX_ln, dln1_gamma, dln1_beta = layernorm_backward(c_ln1, dA1)
fd = step_fd(layernorm_forward, [X.copy(), p["ln1_gamma"].copy(), p["ln1_beta"].copy()], dA1)
cmp("dX (LN_1)", dX_ln, fd[0])
cmp("dln1_gamma", dln1_gamma, fd[1], "ln1_gamma")
cmp("dln1_beta", dln1_beta, fd[2], "ln1_beta")
dX = dH + dX_ln                                              # [B, T, D]
cmp("dX", dX, torch_name="X")
de_query = dX[:, 0].sum(axis=0)                              # [D]
de_neighbor = dX[:, 1:].sum(axis=(0, 1))                     # [D]
cmp("de_query", de_query, torch_name="e_query")
cmp("de_neighbor", de_neighbor, torch_name="e_neighbor")
cmp("dx (query)", dX[:, 0], torch_name="x")
cmp("dr", dX[:, 1:], torch_name="r")
print("masked neighbours get exactly zero gradient:", bool((dX[1, -2:] == 0).all()))

grads = {"ln1_gamma": dln1_gamma, "ln1_beta": dln1_beta, **grads_qkv, "w_o": dw_o, "b_o": db_o,
         "ln2_gamma": dln2_gamma, "ln2_beta": dln2_beta, "w_1": dw_1, "b_1": db_1, "w_2": dw_2, "b_2": db_2,
         "e_query": de_query, "e_neighbor": de_neighbor}
grads = {n: grads[n] for n in PARAM_NAMES}


# %% [markdown]
# ## Every parameter against the whole layer
#
# The step checks above test each backward locally. Now the assembled gradients against finite differences of
# the **whole** layer's loss `L(params) = sum(G * out)`, one parameter tensor at a time.

# %%
def layer_loss():
    o, _ = fusion_forward(p, x, r, mask, heads=h)
    return float((G * o).sum())


for n in PARAM_NAMES:
    cmp(n, grads[n], num_grad(layer_loss, p[n]), n)

# %% [markdown]
# ## The fused implementation, checked again
#
# `reco_ref.fusion.fusion_forward` / `fusion_backward` is the front door: it validates shapes, dtypes and the
# mask once, then runs a backend — `numpy` (the reference, one function for the whole layer), `numba` (fused CPU
# kernels that skip dead work: only token 0's query row of the attention is needed) or `cuda`. Both CPU backends
# must agree with the step-by-step gradients above.

# %%
for backend in ("numpy", "numba"):
    o_f, cache_f = fusion_forward(p, x, r, mask, heads=h, backend=backend)
    g_f = fusion_backward(p, cache_f, G, return_input_grads=True)
    print(f"--- backend {backend}: max |out - step-by-step out| = {np.abs(o_f - out).max():.1e}")
    for n in PARAM_NAMES:
        cmp(f"{backend}:{n}", g_f[n], grads[n], label="by hand", tol=(1e-12, 1e-14))
    cmp(f"{backend}:query", g_f["query"], dX[:, 0], label="by hand", tol=(1e-12, 1e-14))
    cmp(f"{backend}:retrieved", g_f["retrieved"], dX[:, 1:], label="by hand", tol=(1e-12, 1e-14))

bad = [name for name, ok_fd, ok_t in results if not (ok_fd and ok_t)]
print(f"\n{len(results)} checks, {len(results) - len(bad)} close; not close: {bad or 'none'}")
assert not bad

# %% [markdown]
# ## Attention weights as heat maps
#
# `P[b, head]` is a `T x T` matrix: row `i` is how token `i` spreads its attention over the tokens (rows sum to
# 1). Only row 0 — the query token — reaches the output; the other rows only matter through the gradient of the
# keys and values they share. The second example's two missing neighbours are columns of exact zeros.

# %%
labels = ["q"] + [f"r{i}" for i in range(1, k + 1)]
fig, axes = plt.subplots(B, h, figsize=(3.8 * h, 3.4 * B))
for b in range(B):
    for j in range(h):
        ax = axes[b, j]
        im = ax.imshow(P[b, j], vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(T), labels), ax.set_yticks(range(T), labels)
        ax.set_title(f"example {b}, head {j}" + (" (r4, r5 masked)" if b == 1 else ""), fontsize=8)
        ax.set_xlabel("key token", fontsize=8), ax.set_ylabel("query token", fontsize=8)
fig.colorbar(im, ax=axes, shrink=0.8, label="attention weight")
show_figure("attention-heat-maps")

fig, ax = plt.subplots(figsize=(6, 2.6))
width = 0.8 / (B * h)
for b in range(B):
    for j in range(h):
        ax.bar(np.arange(T) + (b * h + j) * width, P[b, j, 0], width, label=f"example {b}, head {j}")
ax.set_xticks(np.arange(T) + 0.4 - width / 2, labels)
ax.set_ylabel("weight")
ax.set_title("row 0: what the query token reads from itself and its neighbours", fontsize=9)
ax.legend(fontsize=7)
fig.tight_layout()
show_figure("query-row")

# %% [markdown]
# At the identity initialisation of the real layer (`init_params`: `W_o, b_o, W_2, b_2, e_q = 0`) the output is
# exactly `normalize(x)` whatever the attention does; training is what makes these weights matter. The
# "Training RECO" notebook (`notebooks/training_reco.py`) draws them before and after.
