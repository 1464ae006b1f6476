r"""Training pairs, their neighbours and their batches: everything the loop needs, prepared once.

The encoders are frozen, so nothing retrieval depends on changes during training: every training row's
``k`` neighbours (image query → image index, text query → text index by default) are searched **once**,
before the first step, and each step only gathers the rows it needs. The loop is then bit-reproducible and
retrieval costs one search per row per run instead of one per row per epoch.

Pairs are memory rows. A memory built with ``reco-ref build-memory --pairs MANIFEST --split train
--caption-template "a photo of a {class_name}."`` holds per row the image embedding ``v`` [D], the image
search key [Dk] (when the encoder has keys) and the caption's text embedding ``t`` [D]: the pairs and the
retrieval memory are the same rows, and a pair's own row is excluded from its neighbours **by row id**.

With a separate retrieval memory (e.g. training with 1 % of the memory), a pair's own row there is found
by an exact ``k=1`` self-match of its image search vector (cosine ≥ 0.9999, the same image through the same
encoder) — :func:`reco_ref.reco.refine.own_rows`.

Choices [ours], each an option of :class:`SourceOptions` / the training config:

* ``dup_threshold_image = 0.98`` — image-index searches also drop rows whose cosine to the query is ≥ 0.98
  (near-duplicate images: copies of the query would teach the module to copy the answer).
* ``dup_threshold_text = None`` — text-index searches keep identical captions. With class-template captions
  ("a photo of a fire lily.") every other row of the query's class has *exactly* the query's caption; those
  rows are the retrieval signal (other images of the named class), not a leak of the query's own pair,
  which self-exclusion by row id already removes. A 0.98 filter here would drop every same-class row.
* ``unique_captions = True`` — a batch holds each caption (identical text embedding) at most once:
  InfoNCE treats every other row of the batch as a negative, and two rows with the same caption would be
  pushed apart from a text that describes them both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..errors import RecoError, SearchError
from ..memory import search_index
from ..memory.exact import ExactIndex
from ..reco.refine import own_rows

__all__ = ["search_rows", "fed_modality", "caption_groups", "PreparedSource",
           "unrelated_score_stats", "nearest_score_median", "score_map",
           "prepare_source", "epoch_batches", "labels_of"]

_CHUNK = 2048  # queries per search call: bounds the search's temporary arrays


def fed_modality(query_modality: str, fuse: str) -> str:
    """Which memory modality φ is fed: the other one for ``fuse="cross"`` (the paper), the query's for ``"uni"``."""
    if fuse not in ("uni", "cross"):
        raise SearchError(f"fuse: expected 'uni' or 'cross', got {fuse!r}")
    other = {"image": "text", "text": "image"}[query_modality]
    return other if fuse == "cross" else query_modality


def search_rows(memory: Any, queries: np.ndarray, query_modality: str, *, search_queries: np.ndarray | None = None,
                k: int = 10, search: str = "uni", exclude: np.ndarray | None = None, dup_threshold: Any = None,
                exact: bool = False, with_scores: bool = False) -> tuple[np.ndarray, ...]:
    """Neighbour rows ``(rows int64 [N,k'], valid bool [N,k'])`` of every query, ``k' = min(k, len(memory))``,
    plus their search scores ``float32 [N,k']`` (cosines, 0 where invalid) when ``with_scores``.

    ``search="uni"``: image queries search the image index with ``search_queries`` (keys) when given;
    text queries the text index. ``"cross"``: image embeddings search the text index; text embeddings search
    the image *embeddings* (exactly, when the image index holds keys of another width).
    """
    if query_modality not in ("image", "text"):
        raise SearchError(f"query_modality: expected 'image' or 'text', got {query_modality!r}")
    if search not in ("uni", "cross"):
        raise SearchError(f"search: expected 'uni' or 'cross', got {search!r}")
    n = len(queries)
    k = min(k, len(memory))  # searches return min(k, len(memory)) columns: a memory cannot give more
    rows = np.full((n, k), -1, np.int64)
    valid = np.zeros((n, k), bool)
    scores = np.zeros((n, k), np.float32)
    keyed = getattr(memory, "key_dim", None) is not None
    for lo in range(0, n, _CHUNK):
        hi = min(n, lo + _CHUNK)
        ex = None if exclude is None else exclude[lo:hi]
        q = np.asarray(queries[lo:hi])
        if query_modality == "image" and search == "uni":
            sq = q if search_queries is None else np.asarray(search_queries[lo:hi])
            r, sc, v = memory.search(sq, modality="image", k=k, exact=exact, exclude=ex, dup_threshold=dup_threshold)
        elif query_modality == "text" and search == "cross" and keyed:
            r, sc, v = search_index(ExactIndex(np.asarray(memory.image)), q, k, exclude=ex, dup_threshold=dup_threshold,
                                    what=f"exact image-embedding index of {memory.root}")
        else:
            searched = query_modality if search == "uni" else {"image": "text", "text": "image"}[query_modality]
            r, sc, v = memory.search(q, modality=searched, k=k, exact=exact, exclude=ex, dup_threshold=dup_threshold)
        rows[lo:hi], valid[lo:hi] = r, v
        scores[lo:hi] = np.where(v, sc, 0)
    return (rows, valid, scores) if with_scores else (rows, valid)


def unrelated_score_stats(vectors: np.ndarray, *, pairs: int = 20000, seed: int = 0) -> tuple[float, float]:
    r"""``(mean, std)`` of the cosine between random pairs of distinct rows of ``vectors`` [n, d] (float64).

    The relevance bias reads a neighbour's search score as a z-score against unrelated rows of the training
    memory, ``(s − mean)/std`` [ours]: "how much closer than two arbitrary rows of this memory". Rows are
    L2-normalised here; the draw is a pure function of ``seed``."""
    x = np.asarray(vectors)
    n = x.shape[0]
    if n < 2:
        raise RecoError(f"unrelated_score_stats: need at least 2 rows, got {n}")
    rng = np.random.default_rng([int(seed), 0x5C0E])
    i = rng.integers(0, n, int(pairs))
    j = (i + rng.integers(1, n, int(pairs))) % n  # j != i
    a = np.asarray(x[i], np.float64)
    b = np.asarray(x[j], np.float64)
    c = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    std = float(c.std())
    return float(c.mean()), std if std > 0 else 1.0


def nearest_score_median(vectors: np.ndarray, *, queries: int = 2000, seed: int = 0) -> float:
    """Median over sampled rows of ``vectors`` [n, d] of the cosine to their nearest *other* row (float).

    The ``rel_map="neighbour"`` score map [ours] centres the relevance feature here: "as close as a typical
    nearest neighbour inside the training memory" is 0, unrelated rows sit far below."""
    x = np.asarray(vectors)
    n = x.shape[0]
    if n < 2:
        raise RecoError(f"nearest_score_median: need at least 2 rows, got {n}")
    rng = np.random.default_rng([int(seed), 0x4E4E])
    q = np.sort(rng.choice(n, size=min(int(queries), n), replace=False))
    u = np.asarray(x, np.float64)
    u = u / np.linalg.norm(u, axis=1, keepdims=True)
    best = np.full(q.size, -np.inf)
    for lo in range(0, n, 4096):  # bounded temporaries: [Q, 4096] at a time
        s = u[q] @ u[lo:lo + 4096].T
        own = (q[:, None] == np.arange(lo, min(n, lo + 4096))[None, :])
        s[own] = -np.inf
        best = np.maximum(best, s.max(axis=1))
    return float(np.median(best))


def score_map(src: "PreparedSource", rel_map: str = "unrelated") -> dict[str, tuple[float, float]]:
    """Each module's relevance score map ``{"image": (center, width), "text": (center, width)}`` from the spaces
    ``src``'s queries search (docs/reco.md §2 "Relevance bias" [ours]).

    ``"unrelated"``: centre and width = mean and std of the cosine between random rows
    (:func:`unrelated_score_stats`); ``"neighbour"``: centre = the median nearest-other-row cosine
    (:func:`nearest_score_median`), width = the same unrelated std; ``"memory"``: the retrieval memory's own map
    (:func:`reco_ref.memory.score_map.memory_score_map` for the source's search kind: stored in the memory's manifest,
    cached on the opened memory) — the same map a ``rel_source="memory"`` module gets at use time."""
    if src.space_i is None or src.space_t is None:
        raise RecoError(f"{src.name}: this source was prepared without its search spaces")
    if rel_map not in ("unrelated", "neighbour", "memory"):
        raise RecoError(f"rel_map: expected 'unrelated', 'neighbour' or 'memory', got {rel_map!r}")
    if rel_map == "memory":  # the retrieval memory's own map (stored in its manifest; cached on the object)
        from ..memory.score_map import memory_score_map

        if src.retrieval is None:
            raise RecoError(f"{src.name}: this source was prepared without its retrieval memory")
        search = "cross" if src.cross else "uni"
        return {m: memory_score_map(src.retrieval, m, search) for m in ("image", "text")}
    out = {}
    for modality, space in (("image", src.space_i), ("text", src.space_t)):
        mean, std = unrelated_score_stats(space)
        out[modality] = (nearest_score_median(space), std) if rel_map == "neighbour" else (mean, std)
    return out


def caption_groups(text: np.ndarray) -> np.ndarray:
    """Group id per row, equal iff the rows' text embeddings are bit-identical (the same caption) — int64 [n]."""
    t = np.ascontiguousarray(text)
    view = t.view(np.dtype((np.void, t.dtype.itemsize * t.shape[1]))).reshape(-1)
    _, inverse = np.unique(view, return_inverse=True)
    return inverse.reshape(-1).astype(np.int64)


def labels_of(memory: Any) -> np.ndarray:
    """Labels of every memory row from its metadata (int64 [n]; a row without a label is an error)."""
    meta = memory.metadata(np.arange(len(memory)))
    missing = [i for i, m in enumerate(meta) if m is None or m.get("label") is None]
    if missing:
        raise RecoError(f"{memory.root}: rows {missing[:5]} have no label in metadata.sqlite; build the memory from "
                        "a dataset manifest (file,label,class_name,split) or pass labels explicitly")
    return np.array([int(m["label"]) for m in meta], np.int64)


@dataclass
class PreparedSource:
    """One source's pairs with neighbours resolved (all arrays in RAM).

    Attributes
    ----------
    name : str
    v, t : float32 [n, D] — pair image / caption embeddings
    groups : int64 [n] — caption identity (for unique-caption batches)
    nb_image : float32 [M, D] — the retrieval memory's array fed to image queries (text for fuse=cross)
    nb_text : float32 [M, D] — the array fed to text queries
    rows_i, valid_i : int64 / bool [n, k] — neighbours of the image queries
    rows_t, valid_t : int64 / bool [n, k] — neighbours of the text queries
    own : int64 [n] — each pair's own row in the retrieval memory (-1 none)
    weight : float — share of batches (relative)
    scores_i, scores_t : float32 [n, k] — the search scores of those neighbours (what the relevance bias reads)
    space_i, space_t : [M, d] — the retrieval memory's arrays that the image / text queries search (references,
        not copies); :func:`score_map` reads its statistics from them when a run needs one
    cross : the queries search the other modality (``search="cross"``)
    retrieval : the memory searched (what a memory-relative score map is read from)
    """

    name: str
    v: np.ndarray
    t: np.ndarray
    groups: np.ndarray
    nb_image: np.ndarray
    nb_text: np.ndarray
    rows_i: np.ndarray
    valid_i: np.ndarray
    rows_t: np.ndarray
    valid_t: np.ndarray
    own: np.ndarray
    weight: float
    scores_i: np.ndarray | None = None
    scores_t: np.ndarray | None = None
    space_i: np.ndarray | None = None
    space_t: np.ndarray | None = None
    cross: bool = False
    retrieval: Any = None

    def __len__(self) -> int:
        return len(self.v)

    def batch(self, idx: np.ndarray):
        """``(v [B,D], t [B,D], nb_i [B,k,D], mask_i [B,k], nb_t [B,k,D], mask_t [B,k])`` of pair rows ``idx``."""
        ri, vi = self.rows_i[idx], self.valid_i[idx]
        rt, vt = self.rows_t[idx], self.valid_t[idx]
        nb_i = self.nb_image[np.where(vi, ri, 0)] * vi[..., None]  # zeros in masked slots
        nb_t = self.nb_text[np.where(vt, rt, 0)] * vt[..., None]
        return self.v[idx], self.t[idx], nb_i.astype(np.float32), vi, nb_t.astype(np.float32), vt

    def batch_scores(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(scores_i [B,k], scores_t [B,k])`` of pair rows ``idx`` (the neighbours' search cosines)."""
        if self.scores_i is None or self.scores_t is None:
            raise RecoError(f"{self.name}: this source was prepared without search scores")
        return self.scores_i[idx], self.scores_t[idx]


def prepare_source(pairs: Any, retrieval: Any = None, *, name: str | None = None, k: int = 10, search: str = "uni",
                   fuse: str = "cross", dup_threshold_image: Any = 0.98, dup_threshold_text: Any = None,
                   exact: bool = False, weight: float | None = None, rows: np.ndarray | None = None,
                   irrelevant: bool = False) -> PreparedSource:
    """Resolve a source's pairs and their neighbours once (see the module docstring).

    Parameters
    ----------
    pairs : Memory — its rows (or ``rows`` of them) are the training pairs
    retrieval : Memory, optional — searched for neighbours (default ``pairs``: own row excluded by id)
    k, search, fuse : retrieval settings (docs/reco.md §1)
    dup_threshold_image / dup_threshold_text : near-duplicate filter of image- / text-index searches
    exact : brute-force search instead of HNSW
    weight : share of batches (default: the number of pairs)
    irrelevant : [ours] an *irrelevant-memory* source: every row of the query's own class (memory labels) is
        excluded from its search too, so the neighbours are what a memory lacking that class returns (the best
        wrong rows, with their true scores) — teaching the relevance bias when to fall back to the query
    """
    if weight is not None and not (math.isfinite(float(weight)) and float(weight) > 0):
        raise RecoError(f"weight: a source's share of batches must be a finite number > 0, got {weight!r}")
    retrieval = pairs if retrieval is None else retrieval
    if retrieval.dim != pairs.dim:
        raise RecoError(f"{retrieval.root}: embedding dim {retrieval.dim} differs from the pairs memory "
                        f"{pairs.root} ({pairs.dim})")
    if retrieval.fingerprint != pairs.fingerprint:
        raise RecoError(f"{retrieval.root}: encoder fingerprint differs from the pairs memory {pairs.root}; "
                        "retrieval and pairs must come from one encoder")
    idx = np.arange(len(pairs)) if rows is None else np.asarray(rows, np.int64)
    v = np.ascontiguousarray(pairs.image[idx], np.float32)
    t = np.ascontiguousarray(pairs.text[idx], np.float32)
    keys = None if pairs.image_keys is None else np.ascontiguousarray(pairs.image_keys[idx], np.float32)
    if retrieval is pairs:
        own = idx.copy()
    else:
        own = own_rows(retrieval, keys if (keys is not None and retrieval.key_dim) else v)
    exclude = own
    if irrelevant:
        mem_labels = labels_of(retrieval)
        pair_labels = labels_of(pairs)[idx]
        by_class = {c: np.flatnonzero(mem_labels == c) for c in np.unique(pair_labels)}
        exclude = [np.unique(np.concatenate([by_class[c], [o] if o >= 0 else []])).astype(np.int64)
                   for c, o in zip(pair_labels, own)]
    search_img = "image" if search == "uni" else "text"  # index an image query searches
    search_txt = "text" if search == "uni" else "image"
    rows_i, valid_i, scores_i = search_rows(
        retrieval, v, "image", search_queries=keys, k=k, search=search, exclude=exclude,
        dup_threshold=dup_threshold_image if search_img == "image" else dup_threshold_text, exact=exact, with_scores=True)
    rows_t, valid_t, scores_t = search_rows(
        retrieval, t, "text", k=k, search=search, exclude=exclude,
        dup_threshold=dup_threshold_text if search_txt == "text" else dup_threshold_image, exact=exact, with_scores=True)
    keyed = getattr(retrieval, "key_dim", None) is not None
    image_space = retrieval.image_keys if keyed else retrieval.image  # what the image index holds
    space_i = image_space if search == "uni" else retrieval.text
    space_t = retrieval.text if search == "uni" else retrieval.image
    fed_i, fed_t = fed_modality("image", fuse), fed_modality("text", fuse)
    arrays = {m: np.ascontiguousarray(getattr(retrieval, m), np.float32) for m in {fed_i, fed_t}}
    return PreparedSource(name=name or str(pairs.root), v=v, t=t, groups=caption_groups(t), nb_image=arrays[fed_i],
                          nb_text=arrays[fed_t], rows_i=rows_i, valid_i=valid_i, rows_t=rows_t, valid_t=valid_t,
                          own=own, weight=float(len(idx) if weight is None else weight), scores_i=scores_i,
                          scores_t=scores_t, space_i=space_i, space_t=space_t, cross=search == "cross",
                          retrieval=retrieval)


def _source_batches(groups: np.ndarray, batch_size: int, unique: bool, rng: np.random.Generator) -> list[np.ndarray]:
    """One epoch of batches over rows ``0..n-1`` (``n // batch_size`` batches at most; the remainder is dropped).

    ``unique``: each batch draws distinct caption groups with probability proportional to the rows each group
    still has, then one (shuffled) row of each — groups drain evenly, so batches stay full until the epoch's
    last few; a batch is never smaller than 2 rows.
    """
    n = len(groups)
    n_batches = n // batch_size
    if not unique:
        perm = rng.permutation(n)
        return [np.sort(perm[b * batch_size:(b + 1) * batch_size]) for b in range(n_batches)]
    order = rng.permutation(n)
    g_sorted = groups[order]
    pos = np.argsort(g_sorted, kind="stable")  # rows of each group, in shuffled order
    G = int(groups.max()) + 1 if n else 0
    counts = np.bincount(groups, minlength=G)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    taken = np.zeros(G, np.int64)
    out = []
    for _ in range(n_batches):
        left = counts - taken
        live = np.flatnonzero(left > 0)
        if live.size < 2:
            break
        m = min(batch_size, live.size)
        pick = rng.choice(live, size=m, replace=False, p=left[live] / left[live].sum())
        rows = order[pos[starts[pick] + taken[pick]]]
        taken[pick] += 1
        out.append(np.sort(rows))
    return out


def epoch_batches(sources: Sequence[PreparedSource], batch_size: int, *, seed: int, epoch: int,
                  unique_captions: bool = True) -> list[tuple[int, np.ndarray]]:
    """The epoch's batches ``[(source index, pair rows int64 [B]), ...]``: a pure function of (seed, epoch).

    Each batch comes from one source; a source contributes batches in proportion to its ``weight``
    (``weight / sum`` of the epoch's batches; a source whose share exceeds one pass over its rows gets
    further shuffled passes, one whose share is smaller uses the first batches of its pass), and the sources are interleaved by a seeded shuffle.
    """
    rng = np.random.default_rng([int(seed), int(epoch), 0x7EC0])
    per_source = [_source_batches(s.groups, min(batch_size, len(s)), unique_captions, rng) for s in sources]
    total = sum(len(b) for b in per_source)
    weights = np.array([s.weight for s in sources], float)
    want = np.floor(total * weights / weights.sum() + 0.5).astype(int) if total else np.zeros(len(sources), int)
    plan: list[tuple[int, np.ndarray]] = []
    for si, batches in enumerate(per_source):
        if not batches:
            continue
        extra = batches
        while extra and len(batches) < want[si]:  # a source asked for more than one pass: another shuffled pass
            extra = _source_batches(sources[si].groups, min(batch_size, len(sources[si])), unique_captions, rng)
            batches = batches + extra
        plan.extend((si, b) for b in batches[:max(1, want[si])])
    order = rng.permutation(len(plan))
    return [plan[i] for i in order]
