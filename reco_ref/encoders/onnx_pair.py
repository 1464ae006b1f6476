r"""An encoder pair on ONNX Runtime: loading, file digests and fingerprint, encoding texts and images, pooling, L2 norm.

The graph half (providers, sessions, the checks against ``encoder.json``, fixed batch sizes) is
:mod:`reco_ref.encoders.graphs`; the scheduling of image decoding onto the cores is
:mod:`reco_ref.encoders.image_schedule`.

Shapes used below: N items in a batch, L tokens, D = ``embed_dim``, Dk = key dim, C = crop size.

Every embedding leaves this module L2-normalised, float32, finite:

.. math:: e_i = \frac{y_i}{\lVert y_i \rVert_2}

A graph that outputs NaN/inf or an all-zero row raises :class:`EncoderConfigError` naming the graph file and
the rows; nothing is silently replaced.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np

from ..errors import EncoderConfigError
from ..io import sha256_file
from .config import EncoderConfig, canonical_json, read_config
from .graphs import (ORT_FLOAT, ORT_INT, check_image_graph, check_text_graph, choose_providers, graph_io,
                     make_session, run_in_batches)
from .image_schedule import ImageScheduling
from .images import ImageError, ImageItem
from .preprocess import normalize_lut


class SkipResult(NamedTuple):
    """``encode_images(..., on_error="skip")``: rows for the images that decoded, which they were, what failed."""

    embeddings: np.ndarray  # float32 [M,D], M = len(ok_index)
    ok_index: np.ndarray  # int64 [M], position in the input of each row
    errors: list[ImageError]  # (index, item, message) for each of the N - M failures


class SkipResultWithKeys(NamedTuple):
    """As :class:`SkipResult`, with the image search keys (``with_keys=True``)."""

    embeddings: np.ndarray  # float32 [M,D]
    keys: np.ndarray  # float32 [M,Dk]
    ok_index: np.ndarray  # int64 [M]
    errors: list[ImageError]


# ------------------------------------------------------------------------------------------- small functions
def l2_normalize(x: np.ndarray, what: str) -> np.ndarray:
    """Rows of float [N,D] -> float32 unit rows; NaN/inf or a zero row is an error naming ``what``."""
    x = np.asarray(x, dtype=np.float32)  # [N,D]
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)[:10].tolist()
        raise EncoderConfigError(f"{what}: the graph produced NaN/inf in {int(bad.sum())} row(s) (batch rows {rows})")
    norms = np.sqrt(np.einsum("nd,nd->n", x.astype(np.float64), x.astype(np.float64)))  # [N]
    if (norms == 0).any():
        rows = np.flatnonzero(norms == 0)[:10].tolist()
        raise EncoderConfigError(f"{what}: the graph produced an all-zero embedding (batch rows {rows}); it cannot be normalised")
    return (x / norms[:, None]).astype(np.float32)


def pool_forward(hidden: np.ndarray, ids: np.ndarray, mask: np.ndarray, pooling: str) -> np.ndarray:
    r"""Token states float [N,L,D] -> one vector per text [N,D].

    * ``mean``: :math:`\sum_t m_t h_t / \max(\sum_t m_t, 1)` (sentence-transformers' mean pooling)
    * ``cls``:  :math:`h_0`
    * ``eot``:  :math:`h_{t^*}`, :math:`t^* = \arg\max_t \mathrm{ids}_t` (CLIP: the end token has the largest id)
    * ``none``: the graph already pooled; ``hidden`` is [N,D] and returned as is
    """
    if pooling == "none":
        return hidden
    if pooling == "mean":
        m = mask.astype(np.float32)[:, :, None]  # [N,L,1]
        total = (hidden * m).sum(axis=1)  # [N,D]
        count = np.maximum(m.sum(axis=1), 1.0)  # [N,1]
        return total / count
    if pooling == "cls":
        return hidden[:, 0, :]
    if pooling == "eot":
        pos = ids.argmax(axis=1)  # [N]
        return hidden[np.arange(hidden.shape[0]), pos, :]
    raise ValueError(f"pooling: unknown {pooling!r}")


def resolve_folder(name_or_dir: str | os.PathLike) -> Path:
    """A directory holding ``encoder.json``, or a shipped name under ``weights/<name>/``."""
    p = Path(name_or_dir)
    if p.is_dir():
        return p
    s = os.fspath(name_or_dir)
    if os.sep in s or (os.altsep and os.altsep in s) or s.startswith("."):
        raise EncoderConfigError(f"{s}: encoder folder not found")
    from ..paths import weights_dir

    folder = weights_dir() / s
    if not folder.is_dir():
        shipped = sorted(q.name for q in weights_dir().iterdir() if (q / "encoder.json").is_file())
        raise EncoderConfigError(
            f"encoder {s!r}: no folder {folder} (shipped encoders: {', '.join(shipped) or 'none'}; "
            "or pass the path of a folder holding encoder.json)"
        )
    return folder


def file_digests(folder: Path, cfg: EncoderConfig) -> dict[str, str]:
    """sha256 of every referenced file; checked against ``cfg.sha256`` where the config lists one."""
    out = {}
    for fname in cfg.files():
        path = folder / fname
        if not path.is_file():
            raise EncoderConfigError(f"{folder / 'encoder.json'}: references {fname!r}, but {path} does not exist")
        out[fname] = sha256_file(path)
        want = cfg.sha256.get(fname)
        if want is not None and want != out[fname]:
            raise EncoderConfigError(
                f"{path}: sha256 mismatch (field 'sha256.{fname}' expects {want}, the file has {out[fname]}); "
                "the file was modified or replaced"
            )
    return out


def fingerprint(cfg: EncoderConfig, digests: dict[str, str]) -> str:
    """hex sha256 over the canonical config JSON and the sha256 of every referenced file (graphs, vocab)."""
    h = hashlib.sha256(canonical_json(cfg).encode("utf-8"))
    for fname in cfg.files():
        h.update(f"\n{fname} {digests[fname]}".encode("utf-8"))
    return h.hexdigest()



def make_tokenizer(folder: Path, cfg: EncoderConfig):
    """The tokenizer named by ``text.tokenizer`` (imported lazily: the tokenizers room is separate)."""
    from ..tokenizers import load_tokenizer

    tk = cfg.text.tokenizer
    return load_tokenizer(tk.kind, None if tk.file is None else folder / tk.file)


def _check_items(items: Any, what: str) -> list:
    from PIL import Image

    if isinstance(items, (str, bytes, os.PathLike, Image.Image)):
        raise TypeError(f"{what}: expected a list of items, got a single {type(items).__name__} (wrap it in a list)")
    return list(items)


# ---------------------------------------------------------------------------------------------- the pair
class EncoderPair(ImageScheduling):
    """Two ONNX graphs + config. Build with :func:`reco_ref.encoders.load`.

    Attributes
    ----------
    name : str
    dim : int                      D, the joint embedding dim
    key_dim : int or None          Dk of the image search key (``image.key_output``), else None
    fingerprint : str              hex sha256 (config + every file's sha256)
    config : EncoderConfig
    folder : Path
    providers : list of str        execution providers in use
    """

    # the image and text towers are separate ONNX Runtime sessions: build_memory(..., overlap_captions=True)
    # may encode captions on one thread while images encode on others
    concurrent_towers = True

    def __init__(self, folder: Path, config: EncoderConfig, *, threads: int | None = None,
                 providers: Sequence[str] | None = None, tokenizer: Any = None, max_pixels: int | None = None):
        self.folder = Path(folder)
        self.config = config
        self.name = config.name
        self.dim = config.embed_dim
        self._digests = file_digests(self.folder, config)
        self.fingerprint = fingerprint(config, self._digests)
        self.providers = choose_providers(providers)
        self.threads = threads
        self._image_path = self.folder / config.image.onnx
        self._text_path = self.folder / config.text.onnx
        self._image = make_session(self._image_path, threads, self.providers)
        self._text = make_session(self._text_path, threads, self.providers)
        self._image_batch, self.key_dim = check_image_graph(self._image, config, self._image_path)
        self._text_batch, self._text_seq = check_text_graph(self._text, config, self._text_path)
        self._image_dtype = ORT_FLOAT[graph_io(self._image)[0][config.image.input].dtype]
        text_ins = graph_io(self._text)[0]
        self._text_dtypes = {n: ORT_INT[text_ins[n].dtype] for n in config.text.inputs.values() if n is not None}
        self.tokenizer = tokenizer if tokenizer is not None else make_tokenizer(self.folder, config)
        self._pool = None  # decode threads, created on first use
        self._image_1t = None  # single-threaded image session for the batch workers, created on first use
        self._lut = normalize_lut(config.image.mean, config.image.std)  # float32 [3,256]
        # padding can be trimmed only where the graph sees the mask and does not fix L
        self._trim_padding = self._text_seq is None and config.text.inputs["attention_mask"] is not None
        if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1):
            raise EncoderConfigError(f"max_pixels: expected a positive integer or None, found {max_pixels!r}")
        # the decode guard does not change any embedding, so overriding it leaves the fingerprint as is
        self.max_pixels = max_pixels or config.image.max_pixels

    def close(self) -> None:
        """Stop the decode threads (the sessions are freed with the object). Also ``with load(...) as enc:``."""
        if self._pool:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._pool = None

    def __enter__(self) -> "EncoderPair":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"EncoderPair(name={self.name!r}, dim={self.dim}, key_dim={self.key_dim}, folder='{self.folder}', "
                f"providers={self.providers}, fingerprint={self.fingerprint[:12]}...)")

    # ------------------------------------------------------------------------------------------ images
    def run_image_graph(self, pixels: np.ndarray, session: Any = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Preprocessed pixels [N,...] -> (embeddings float32 [N,D], keys [N,Dk] or None), L2-normalised.

        ``session``: the ONNX Runtime session to run (default: the pair's image session, ``threads`` intra-op
        threads; the batch workers of :meth:`encode_images` pass the single-threaded one).
        """
        im = self.config.image
        outputs = [im.output] + ([im.key_output] if im.key_output else [])
        feeds = {im.input: pixels.astype(self._image_dtype, copy=False)}
        ys = run_in_batches(session or self._image, feeds, outputs, self._image_batch)
        emb = self._checked(ys[0], self._image_path, im.output)
        keys = None
        if im.key_output:
            keys = l2_normalize(ys[1], f"{self._image_path} output {im.key_output!r}")
            if self.key_dim is None:
                self.key_dim = keys.shape[1]
        return emb, keys

    def encode_images(self, items: Sequence[ImageItem], batch_size: int = 64, on_error: str = "raise",
                      with_keys: bool = False, progress: bool = False, parallel: str = "auto"):
        """Embed images (paths or PIL images).

        ``parallel``: how decoding and the graph share the cores. ``"batches"``: ``threads`` workers, each
        decoding a whole batch and running it on a single-threaded session (:meth:`iter_encoded_batches`);
        ``"overlap"``: decode threads work ahead while the graph runs on ``threads`` intra-op threads
        (:meth:`iter_preprocessed`); ``"auto"`` (default): batches on CPU when there are at least two batches per
        worker, else overlap. All give the same bits (tested).

        Returns
        -------
        on_error="raise": float32 [N,D]; with ``with_keys=True`` the tuple ``(emb [N,D], keys [N,Dk])``.
        on_error="skip":  :class:`SkipResult` ``(embeddings [M,D], ok_index int64 [M], errors)``; with
                          ``with_keys=True`` :class:`SkipResultWithKeys` ``(embeddings, keys, ok_index, errors)``.

        Raises
        ------
        ImageDecodeError  a bad image (on_error="raise"), naming the file
        EncoderConfigError  ``with_keys=True`` on a pair without ``image.key_output``; NaN/zero graph outputs
        """
        items = _check_items(items, "encode_images")
        if with_keys and not self.config.image.key_output:
            raise EncoderConfigError(f"encoder {self.name!r} has no image search key (image.key_output is null in its encoder.json)")
        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        embs, keys, oks, errors = [], [], [], []
        if self._image_mode(len(items), batch_size, parallel) == "batches":
            encoded = self.iter_encoded_batches(items, batch_size, on_error)
        else:  # decoding runs ahead in the decode threads while the graph runs here (iter_preprocessed)
            encoded = self._iter_overlapped(items, batch_size, on_error)
        # closing() cancels the queued work when the graph raises or the caller is interrupted
        with contextlib.closing(encoded):
            batches = encoded
            if progress:
                from tqdm import tqdm

                batches = tqdm(encoded, total=-(-len(items) // batch_size), unit="batch", desc=f"{self.name} images")
            for _s, e, k, ok, errs in batches:
                errors.extend(errs)
                if e is None:
                    continue
                embs.append(e)
                oks.extend(ok)
                if k is not None:
                    keys.append(k)
        emb = np.concatenate(embs) if embs else np.zeros((0, self.dim), np.float32)
        key = None
        if with_keys:
            key = np.concatenate(keys) if keys else np.zeros((0, self.key_dim or 0), np.float32)
        if on_error == "skip":
            ok_index = np.asarray(oks, dtype=np.int64)
            return SkipResultWithKeys(emb, key, ok_index, errors) if with_keys else SkipResult(emb, ok_index, errors)
        return (emb, key) if with_keys else emb

    def encode_image_keys(self, items: Sequence[ImageItem], batch_size: int = 64) -> np.ndarray:
        """The image->image search keys float32 [N,Dk] (L2-normalised); needs ``image.key_output``."""
        return self.encode_images(items, batch_size=batch_size, with_keys=True)[1]

    # ------------------------------------------------------------------------------------------- texts
    def tokenize(self, texts: Sequence[str]) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
        """Texts -> (feeds {graph input name: int [N,L]}, ids int64 [N,L], attention mask int64 [N,L])."""
        tx = self.config.text
        ids, mask = self.tokenizer.encode_batch(list(texts), tx.context_length)
        ids = np.asarray(ids, dtype=np.int64)  # [N,L]
        mask = np.asarray(mask, dtype=np.int64)  # [N,L]
        if ids.ndim != 2 or ids.shape != mask.shape or ids.shape[1] > tx.context_length:
            raise EncoderConfigError(
                f"tokenizer {type(self.tokenizer).__name__}: encode_batch returned ids {ids.shape} / mask {mask.shape}, "
                f"expected two equal [N,L] arrays with L <= context_length {tx.context_length}"
            )
        if self._trim_padding and ids.shape[1] > 1:
            # the graph masks padding itself and its L is dynamic: drop the all-padding tail columns (for short
            # captions padded to 128 this is most of the cost; masked positions cannot change the output, up to
            # the rounding of int8 dynamic quantisation, whose scale is taken over the whole batch tensor)
            used = np.flatnonzero(mask.any(axis=0))
            keep = int(used[-1]) + 1 if used.size else 1
            ids, mask = ids[:, :keep], mask[:, :keep]
        if self._text_seq is not None and ids.shape[1] < self._text_seq:
            pad = self._text_seq - ids.shape[1]  # the graph fixes L: pad with the tokenizer's pad id, mask 0
            ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=int(getattr(self.tokenizer, "pad_id", 0)))
            mask = np.pad(mask, ((0, 0), (0, pad)))
        by_role = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        feeds = {name: by_role[role].astype(self._text_dtypes[name], copy=False)
                 for role, name in tx.inputs.items() if name is not None}
        return feeds, ids, mask

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256, progress: bool = False) -> np.ndarray:
        """Embed texts -> float32 [N,D], L2-normalised."""
        texts = _check_items(texts, "encode_texts")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"encode_texts: item {i} is a {type(t).__name__}, expected str")
        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        tx = self.config.text
        # with trimmed padding, batches of similar length waste least: encode in order of length, then restore
        order = np.argsort([len(t) for t in texts], kind="stable") if self._trim_padding else np.arange(len(texts))
        out = []
        starts = range(0, len(texts), batch_size)
        if progress:
            from tqdm import tqdm

            starts = tqdm(starts, unit="batch", desc=f"{self.name} texts")
        for s in starts:
            feeds, ids, mask = self.tokenize([texts[i] for i in order[s : s + batch_size]])
            (h,) = run_in_batches(self._text, feeds, [tx.output], self._text_batch)  # [n,D] or [n,L,D]
            pooled = pool_forward(h.astype(np.float32, copy=False), ids, mask, tx.pooling)  # [n,D]
            out.append(self._checked(pooled, self._text_path, tx.output))
        if not out:
            return np.zeros((0, self.dim), np.float32)
        emb = np.empty((len(texts), self.dim), np.float32)
        emb[order] = np.concatenate(out)
        return emb

    def _checked(self, y: np.ndarray, path: Path, output: str) -> np.ndarray:
        if y.ndim != 2 or y.shape[1] != self.dim:
            raise EncoderConfigError(f"{path}: output {output!r} has shape {y.shape}, expected [N,{self.dim}] (embed_dim)")
        return l2_normalize(y, f"{path} output {output!r}")


def load(name_or_dir: str | os.PathLike = "reco-mini", *, threads: int | None = None,
         providers: Sequence[str] | None = None, tokenizer: Any = None, max_pixels: int | None = None) -> EncoderPair:
    """Load an encoder pair by shipped name (``weights/<name>/``) or folder path; validate everything.

    Parameters
    ----------
    name_or_dir : str or path
        ``"reco-mini"`` (default) or a folder holding ``encoder.json``.
    threads : int, optional
        ONNX Runtime intra-op threads per graph and image-decoding threads (None: all cores).
    providers : list of str, optional
        Execution providers; default CUDA first when available, CPU always.
    tokenizer : object, optional
        Replace the configured tokenizer (anything with ``encode_batch(texts, L) -> (ids, mask)``).
    max_pixels : int, optional
        Override ``image.max_pixels`` (the decompression-bomb guard) for this session.

    Raises
    ------
    EncoderConfigError
        Config field, file or graph input/output that does not match, naming file/field/expected/found.
    """
    folder = resolve_folder(name_or_dir)
    cfg = read_config(folder)
    return EncoderPair(folder, cfg, threads=threads, providers=providers, tokenizer=tokenizer, max_pixels=max_pixels)
