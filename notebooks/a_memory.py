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
# # A memory: build one, search it, look at what comes back
#
# RECO's knowledge lives outside the model, in a **memory** of image-text pairs embedded by a frozen encoder
# pair. This notebook builds one from the sample data shipped in `weights/demo/` (195 public-domain
# OpenClipart drawings, 11 categories) with the default encoder `reco-mini`, and then asks three questions:
#
# 1. What does **uni-modal** search find (a query image → the memory's *images*)?
# 2. What does **cross-modal** search find (a query image → the memory's *captions*)?
# 3. How much recall does the approximate index (HNSW) trade for speed, as a function of its beam width `ef`?
#
# RECO searches *within* a modality and then feeds the query what its neighbours carry from the *other*
# modality (spec §1); the pictures below show why: same-modality neighbours look alike, and their captions are
# what the fusion layer gets to read.
#
# Runs offline in seconds; everything it writes goes to a temporary folder, removed by the last cell.

# %%
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

from reco_ref.encoders import load
from reco_ref.memory import Memory, build_memory, read_pairs_csv
from reco_ref.paths import weights_file

from _show import show_figure  # plt.show() in Jupyter; a PNG in notebooks/figures/ when run as a script with no display

enc = load("reco-mini", threads=2)
print(f"encoder {enc.name}: embedding dim D={enc.dim}, image search key dim Dk={enc.key_dim}")

# %% [markdown]
# ## 1. Build the memory
#
# `weights/demo/pairs.csv` lists each drawing with its caption (cleaned SVG title + keywords) and a `split`:
# 165 `memory` rows and 30 `query` rows (the queries come from reco-mini's held-out 10 %, so its alignment
# training never saw them). `build_memory` encodes the memory rows in atomic chunks, writes the embeddings
# (`image.npy`, `text.npy`, `image_keys.npy`), a SQLite table of captions, one HNSW index per modality and a
# manifest with every file's sha256; `Memory.open` validates all of it.

# %%
pairs = weights_file("demo", "pairs.csv")
items = read_pairs_csv(pairs, split="memory")    # list of {image, caption, ...} dicts, in row order
queries = read_pairs_csv(pairs, split="query")
print(f"{len(items)} memory pairs, {len(queries)} query images")

tmp = tempfile.TemporaryDirectory(prefix="a-memory-", ignore_cleanup_errors=True)  # removed at the end
work = Path(tmp.name)
t = time.perf_counter()
manifest = build_memory(work / "mem", items, enc, progress=False)
mem = Memory.open(work / "mem", encoder=enc)     # checks manifest, sizes, sha256, shapes, encoder fingerprint
print(f"built + opened in {time.perf_counter() - t:.1f} s: {len(mem)} rows; files {sorted(manifest['files'])}")
print(f"image index over {mem.search_dim('image')}-d keys, text index over {mem.search_dim('text')}-d embeddings")

# %% [markdown]
# The memory's labels come from the CSV's `label` / `category` columns; we keep them beside the rows to score neighbours.

# %%
import csv

with open(pairs, newline="", encoding="utf-8") as fh:
    category_of = {int(r["label"]): r["category"] for r in csv.DictReader(fh)}
mem_cat = np.array([category_of[it["label"]] for it in items])   # [M] category names
q_cat = np.array([category_of[q["label"]] for q in queries])     # [Q]
q_img, q_keys = enc.encode_images([q["image"] for q in queries], with_keys=True)  # [Q, D], [Q, Dk]
print("queries:", q_img.shape, q_keys.shape, "categories:", sorted(set(mem_cat)))

# %% [markdown]
# ## 2. Uni-modal vs cross-modal neighbours
#
# * **uni-modal** (image → image): the query's search key against the image index.
# * **cross-modal** (image → text): the query's *embedding* against the text index, i.e. plain CLIP-style
#   image-to-caption retrieval in the joint space.
#
# Both return `rows [Q, k]`, `scores [Q, k]` (cosines) and `valid [Q, k]`.

# %%
k = 10
rows_uni, s_uni, _ = mem.search(q_keys, modality="image", k=k)   # [Q, k]
rows_x, s_x, _ = mem.search(q_img, modality="text", k=k)         # [Q, k]
hit_uni = (mem_cat[rows_uni] == q_cat[:, None]).mean()
hit_x = (mem_cat[rows_x] == q_cat[:, None]).mean()
print(f"neighbours sharing the query's category, k={k}: image→image {hit_uni:.3f}, image→text {hit_x:.3f}, "
      f"chance {1 / len(set(mem_cat)):.3f}")


# %%
def show(rows, scores, title, name, n_queries=4, n_nb=5):
    """One row per query: the query image, then its neighbours (memory images) with their captions."""
    fig, axes = plt.subplots(n_queries, n_nb + 1, figsize=(2.1 * (n_nb + 1), 2.5 * n_queries))
    picked = [int(np.flatnonzero(q_cat == c)[0]) for c in sorted(set(q_cat))][:n_queries]  # one per category
    for r, qi in enumerate(picked):
        ax = axes[r, 0]
        ax.imshow(Image.open(queries[qi]["image"]).convert("RGB"))
        ax.set_title(f"query: {q_cat[qi]}", fontsize=8, color="navy")
        for j in range(n_nb):
            row = int(rows[qi, j])
            ax = axes[r, j + 1]
            ax.imshow(Image.open(items[row]["image"]).convert("RGB"))
            ok = mem_cat[row] == q_cat[qi]
            cap = items[row]["caption"][:28]
            ax.set_title(f"{scores[qi, j]:.2f} {cap}", fontsize=7, color="green" if ok else "red")
    for ax in axes.ravel():
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(title + "  (green: same category as the query)", fontsize=10)
    fig.tight_layout()
    show_figure(name)


show(rows_uni, s_uni, "uni-modal: query image → memory images (search keys)", "uni-modal")

# %%
show(rows_x, s_x, "cross-modal: query image → memory captions (joint embedding space)", "cross-modal")

# %% [markdown]
# What the fusion layer would read: for each query, RECO takes the **uni-modal** neighbours' *text*
# embeddings (`retrieve(mem, q, "image", search="uni", fuse="cross")`), so a query image is refined by what the
# memory *says* about the images that look like it.

# %%
from reco_ref.memory import retrieve

neighbours, valid, rows = retrieve(mem, q_keys, "image", search="uni", fuse="cross", k=k)
print("neighbours fed to the image fusion layer:", neighbours.shape, neighbours.dtype, "valid:", valid.all())
assert np.array_equal(rows, rows_uni)                            # the same search as above ...
assert np.allclose(neighbours, mem.embeddings("text", rows_uni))  # ... then the other modality's vectors

# %% [markdown]
# ## 3. HNSW recall against exact search, as a function of `ef`
#
# With 165 rows HNSW is exact at any setting, so we grow a bigger base with the same neighbourhood structure:
# `reco_ref.memory.synth` projects the memory's real image keys to 64-d (uncentred SVD, which preserves inner
# products) and grows 10,000 points around them (each a mix of a real point and one of its real neighbours,
# plus low-rank and isotropic noise). Recall@10 counts a returned row as a hit when it scores at least the
# exact 10th score (ties count); `ef` is the search beam width.

# %%
from reco_ref.memory.index import exact_search, hnsw_build
from reco_ref.memory.synth import expand_array, project

base = project(mem.embeddings("image_keys", np.arange(len(mem))), 64)  # [165, 64] unit rows
vectors = expand_array(base, 10_000, seed=0)                            # [10000, 64]
qs = expand_array(base, 300, seed=1)                                     # [300, 64] held-out draws
t = time.perf_counter()
index = hnsw_build(vectors, M=8, ef_construction=40, num_threads=2)
print(f"HNSW build: {len(vectors)} vectors in {time.perf_counter() - t:.1f} s")
t = time.perf_counter()
true_rows, true_scores = exact_search(vectors, qs, 10)                   # [300, 10] each
t_exact = time.perf_counter() - t

efs = [10, 12, 16, 24, 32, 48, 64, 128]
recall, qps = [], []
for ef in efs:
    index.set_ef(ef)
    t = time.perf_counter()
    got, _ = index.knn_query(qs, k=10, num_threads=2)                    # [300, 10] row ids
    dt = time.perf_counter() - t
    got_scores = np.einsum("qd,qkd->qk", qs, vectors[got.astype(np.int64)])
    recall.append(float((got_scores >= true_scores[:, -1:] - 1e-6).mean()))
    qps.append(len(qs) / dt)
    print(f"ef={ef:4d}  recall@10={recall[-1]:.4f}  {qps[-1]:9.0f} queries/s")
print(f"exact: {len(qs) / t_exact:.0f} queries/s")

fig, ax = plt.subplots(figsize=(5.5, 3.5))
ax.plot(efs, recall, "o-")
ax.set_xscale("log", base=2)
ax.set_xlabel("ef (HNSW beam width)")
ax.set_ylabel("recall@10 vs exact search")
ax.set_title("HNSW (M=8) on 10,000 synthetic 64-d keys")
ax.grid(alpha=0.3)
fig.tight_layout()
show_figure("hnsw-recall-vs-ef")
assert recall[-1] >= recall[0] - 0.01  # a wider beam never loses much: the curve rises towards 1

# %% [markdown]
# Queries per second on this small base are noisy (shared machine); the repository's benchmark
# (`benchmarks/bench_memory.py`, see `docs/memory.md`) measures the same curve at 1,000,000 rows.

# %% [markdown]
# ## Clean up
#
# The memory above was built in a temporary folder; this removes it, so a run leaves nothing behind.

# %%
tmp.cleanup()
print(f"removed {work}")
