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
# # The memory-attention classifier on a long tail
#
# The CVPR 2023 model (`reco_ref.classify`, `docs/classify.md`): a query embedding `q` attends over the `k`
# items it retrieves from a memory (keys: their images; values: their captions' embeddings), and a linear
# classifier reads `z = q + m`:
#
# ```
# a = softmax((LN(q) W_q)(LN(K_r) W_k)ᵀ / sqrt(dh))      m = concat_heads(a · LN(V_r) W_v) W_o      logits = s · z W_c
# ```
#
# The claim to look at: on a long-tailed training set, a memory helps most on the **few-shot** classes. To run
# in seconds, everything here is **synthetic** and small (30 classes in 32 dimensions): each class has an image
# direction and a caption direction; an image is its class direction plus noise (so one image is ambiguous);
# a caption is its class's caption direction plus a little noise. The training set is long-tailed (60 images of
# the head class down to 1 of the tail); the test set is balanced. Shot groups as in the paper: many > 20,
# medium 5–20, few < 5 training images. The real-data numbers (Flowers-102-LT, CUB-100-LT) are in
# `docs/classify.md` with the commands that measured them.

# %%
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from reco_ref.classify.train import ClassifyConfig, evaluate_classifier, shot_groups, train_classifier
from reco_ref.eval.metrics import knn_vote
from reco_ref.memory import Memory, build_memory_from_arrays

from _show import show_figure  # plt.show() in Jupyter; a PNG in notebooks/figures/ when run as a script with no display

rng = np.random.default_rng(0)
D, C, NOISE = 32, 30, 1.5


def unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


mu_img = unit(rng.normal(size=(C, D)))     # [C, D] class image directions
mu_txt = unit(rng.normal(size=(C, D)))     # [C, D] class caption directions


def images(labels):
    """Unit image embeddings [N, D]: class direction + isotropic noise of norm ~NOISE."""
    return unit(mu_img[labels] + NOISE * rng.normal(size=(len(labels), D)) / np.sqrt(D))


counts = np.maximum(1, np.round(60 * (1 / 60) ** (np.arange(C) / (C - 1)))).astype(int)   # [C] 60 … 1
y_tr = np.repeat(np.arange(C), counts)
x_tr = images(y_tr)                        # long-tailed training set
y_te = np.repeat(np.arange(C), 20)
x_te = images(y_te)                        # balanced test set
groups = shot_groups(counts)
print("training images per class:", counts.tolist())
print("classes many / medium / few:", np.bincount(groups, minlength=3).tolist(), f"({len(y_tr)} training images)")

fig, ax = plt.subplots(figsize=(8, 2.5))
ax.bar(range(C), counts, color=np.array(["tab:blue", "tab:orange", "tab:red"])[groups])
ax.set(title="the long tail (blue many, orange medium, red few)", xlabel="class", ylabel="training images")
show_figure("long-tail")

# %% [markdown]
# ## Two memories
#
# * **memory a** — the long-tailed training set itself, each image captioned. A training or test image never
#   retrieves its own item (self-exclusion by row), so for a tail class it mostly finds *other* classes.
# * **memory b** — an external pool with 20 captioned images of every class (like the paper's web-scale memory:
#   it knows the tail even though the labelled training set does not).

# %%
tmp = tempfile.TemporaryDirectory(prefix="classifier-long-tail-", ignore_cleanup_errors=True)  # removed at the end
work = Path(tmp.name)


def caption_embeddings(labels):
    return unit(mu_txt[labels] + 0.3 * rng.normal(size=(len(labels), D)) / np.sqrt(D))


def make_memory(name, x, y):
    items = [{"caption": f"a picture of class {c}", "label": int(c), "source": f"{name}:{i}", "split": name,
              "tags": None} for i, c in enumerate(y)]
    build_memory_from_arrays(work / name, x, caption_embeddings(y), name="synthetic", fingerprint="synthetic-0",
                             items=items, progress=False)
    return Memory.open(work / name)


mem_a = make_memory("a", x_tr, y_tr)
y_b = np.repeat(np.arange(C), 20)
mem_b = make_memory("b", images(y_b), y_b)
print(f"memory a: {len(mem_a)} items (long-tailed), memory b: {len(mem_b)} items (20 per class)")

# %% [markdown]
# ## Train and evaluate: no memory, attention over a, attention over b, uniform average over b
#
# Same classifier, same recipe (60 epochs, AdamW, seed 0), no validation split (the last epoch is kept); only the
# memory path differs. The no-memory classifier is the same model with `m = 0`.

# %%
own_a = np.arange(len(y_tr))               # training image i is item i of memory a: exclude it
runs = {}
for name, mem, kw, exclude in (("no memory", None, {"memory": False}, None),
                               ("attention, memory a", mem_a, {}, own_a),
                               ("attention, memory b", mem_b, {}, None),
                               ("uniform average, memory b", mem_b, {"attention": "uniform"}, None)):
    cfg = ClassifyConfig(width=32, heads=2, epochs=60, batch_size=64, lr=3e-3, **kw)
    params, info = train_classifier(x_tr, x_tr, y_tr, C, mem, cfg, exclude=exclude, progress=False)
    meta = {"config": cfg.__dict__, "train_class_counts": counts.tolist()}
    runs[name] = evaluate_classifier(params, meta, x_te, x_te, y_te, mem)
    runs[name]["loss"] = [h.get("loss") for h in info["history"]]

# the k-NN vote over memory b: no training at all, the labels of the 10 nearest items
rows, scores, valid = mem_b.search(x_te, modality="image", k=10)
pred = knn_vote(y_b[rows], scores, valid, C)
hit = pred == y_te
runs["k-NN vote, memory b"] = {"top1": float(hit.mean()),
                               **{g: float(hit[groups[y_te] == i].mean()) for i, g in enumerate(("many", "medium", "few"))}}
print(f"{'run':28s} overall   many  medium   few")
for name, r in runs.items():
    print(f"{name:28s} {r['top1']:7.3f} {r['many']:6.3f} {r['medium']:7.3f} {r['few']:6.3f}")

# %%
cols = ("top1", "many", "medium", "few")
fig, ax = plt.subplots(figsize=(10, 3.6))
x = np.arange(len(cols))
w = 0.8 / len(runs)
for j, (name, r) in enumerate(runs.items()):
    vals = [r[c] for c in cols]
    ax.bar(x + (j - (len(runs) - 1) / 2) * w, vals, w, label=name)
    for xi, v in zip(x, vals):
        ax.text(xi + (j - (len(runs) - 1) / 2) * w, v + 0.01, f"{v:.2f}", ha="center", fontsize=6)
ax.set_xticks(x, ["overall", "many (> 20)", "medium (5–20)", "few (< 5)"])
ax.set(ylim=(0, 1.1), ylabel="top-1 (balanced test)", title="with and without memory, by shot group")
ax.legend(fontsize=7, ncol=3)
show_figure("by-shot-group")

# %% [markdown]
# What to read off (seed 0; the printed table above is the measurement): memory **b** lifts the few-shot group
# most (0.25 → 0.38 in the run this notebook was written with), because b holds images of those classes that
# the labelled set lacks, while the many-shot group loses a little. Memory **a**, the training set itself, does
# not help here at all: with its own item excluded, a tail image mostly retrieves other classes' captions, and
# every group drops (on the real data, `docs/classify.md`, memory a gives small gains instead). The uniform
# average reads memory b as well as attention does, and the plain k-NN vote over the same memory beats every
# trained reader — the same ordering `docs/classify.md` measured on CUB-100-LT. A baseline that needs no
# training is the bar a learned reader of the memory has to clear.

# %%
gain_few = runs["attention, memory b"]["few"] - runs["no memory"]["few"]
gain_many = runs["attention, memory b"]["many"] - runs["no memory"]["many"]
print(f"memory b vs no memory: few-shot {gain_few:+.3f}, many-shot {gain_many:+.3f}")

# %% [markdown]
# ## Clean up
#
# The memories above were built in a temporary folder; this removes it, so a run leaves nothing behind.

# %%
tmp.cleanup()
print(f"removed {work}")
