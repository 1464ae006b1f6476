r"""An encoder pair on ONNX Runtime: sessions, graph checks against the config, batching, pooling, L2 norm.

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

from ..errors import EncoderConfigError, ImageDecodeError
from ..io import sha256_file
from .config import EncoderConfig, canonical_json, read_config
from .images import ImageError, ImageItem, decode_image, describe
from .preprocess import crop_bytes, normalize_batch, normalize_into, normalize_lut, pixel_shape

_ORT_FLOAT = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}
_ORT_INT = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}


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


def choose_providers(providers: Sequence[str] | None) -> list[str]:
    """CUDA first when onnxruntime-gpu offers it, CPU always (last, as the fallback)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if providers is None:
        chosen = ["CUDAExecutionProvider"] if "CUDAExecutionProvider" in available else []
    else:
        if isinstance(providers, str):
            providers = [providers]
        missing = [p for p in providers if p not in available]
        if missing:
            raise EncoderConfigError(
                f"providers: {', '.join(missing)} not available in this onnxruntime (available: {', '.join(available)})"
            )
        chosen = [p for p in providers if p != "CPUExecutionProvider"]
    return chosen + ["CPUExecutionProvider"]


def make_session(path: Path, threads: int | None, providers: list[str]):
    """An InferenceSession with ``threads`` intra-op threads (None: ONNX Runtime's default, all cores)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise EncoderConfigError(f"threads: expected a positive integer or None, found {threads!r}")
        opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1  # encoder graphs are chains; parallelism is inside the ops
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
        raise EncoderConfigError(f"{path}: ONNX Runtime cannot load the graph ({type(exc).__name__}: {exc})") from None


class _IO(NamedTuple):
    dtype: str  # e.g. 'tensor(float)'
    shape: list  # ints for static dims, str/None for symbolic


def graph_io(session) -> tuple[dict[str, _IO], dict[str, _IO]]:
    ins = {a.name: _IO(a.type, list(a.shape)) for a in session.get_inputs()}
    outs = {a.name: _IO(a.type, list(a.shape)) for a in session.get_outputs()}
    return ins, outs


def _static(d: Any) -> int | None:
    return d if isinstance(d, int) and d > 0 else None


def _expect(cond: bool, path: Path, field: str, expected: str, found: Any) -> None:
    if not cond:
        raise EncoderConfigError(f"{path}: '{field}': expected {expected}, found {found}")


def check_image_graph(session, cfg: EncoderConfig, path: Path) -> tuple[int | None, int | None]:
    """Validate the image graph against ``cfg.image``; returns (static batch size or None, key dim or None)."""
    im = cfg.image
    ins, outs = graph_io(session)
    _expect(im.input in ins, path, "image.input", f"a graph input named {im.input!r}", f"inputs {sorted(ins)}")
    extra = sorted(set(ins) - {im.input})
    _expect(not extra, path, "image.input", "the only required graph input", f"further required inputs {extra}")
    spec = ins[im.input]
    _expect(spec.dtype in _ORT_FLOAT, path, "image.input", "a float input", spec.dtype)
    _expect(len(spec.shape) == 4, path, "image.input", f"rank 4 ({im.layout})", f"shape {spec.shape}")
    want = [None, 3, im.size, im.size] if im.layout == "NCHW" else [None, im.size, im.size, 3]
    for axis in (1, 2, 3):
        got = _static(spec.shape[axis])
        _expect(got is None or got == want[axis], path, "image.input",
                f"shape [N,{','.join(str(w) for w in want[1:])}] for layout {im.layout} and size {im.size}",
                f"shape {spec.shape}")
    for field, name in (("image.output", im.output), ("image.key_output", im.key_output)):
        if name is None:
            continue
        _expect(name in outs, path, field, f"a graph output named {name!r}", f"outputs {sorted(outs)}")
        o = outs[name]
        _expect(o.dtype in _ORT_FLOAT, path, field, "a float output", o.dtype)
        _expect(len(o.shape) == 2, path, field, "rank 2 [N,D]", f"shape {o.shape}")
    d = _static(outs[im.output].shape[1])
    _expect(d is None or d == cfg.embed_dim, path, "embed_dim", f"image output last dim == embed_dim {cfg.embed_dim}", d)
    key_dim = _static(outs[im.key_output].shape[1]) if im.key_output else None
    return _static(spec.shape[0]), key_dim


def check_text_graph(session, cfg: EncoderConfig, path: Path) -> tuple[int | None, int | None]:
    """Validate the text graph against ``cfg.text``; returns (static batch, static sequence length)."""
    tx = cfg.text
    ins, outs = graph_io(session)
    named = {role: name for role, name in tx.inputs.items() if name is not None}
    for role, name in named.items():
        _expect(name in ins, path, f"text.inputs.{role}", f"a graph input named {name!r}", f"inputs {sorted(ins)}")
    extra = sorted(set(ins) - set(named.values()))
    _expect(not extra, path, "text.inputs", "every required graph input named in the config", f"unnamed inputs {extra}")
    batch = seq = None
    for role, name in named.items():
        spec = ins[name]
        _expect(spec.dtype in _ORT_INT, path, f"text.inputs.{role}", "an int64 or int32 input", spec.dtype)
        _expect(len(spec.shape) == 2, path, f"text.inputs.{role}", "rank 2 [N,L]", f"shape {spec.shape}")
        batch = batch or _static(spec.shape[0])
        seq = seq or _static(spec.shape[1])
    _expect(seq is None or seq == tx.context_length, path, "text.context_length",
            f"the graph's static sequence length {seq}", tx.context_length)
    _expect(tx.output in outs, path, "text.output", f"a graph output named {tx.output!r}", f"outputs {sorted(outs)}")
    o = outs[tx.output]
    _expect(o.dtype in _ORT_FLOAT, path, "text.output", "a float output", o.dtype)
    rank = 2 if tx.pooling == "none" else 3
    _expect(len(o.shape) == rank, path, "text.output",
            f"rank {rank} ({'[N,D]' if rank == 2 else '[N,L,D]'} for pooling {tx.pooling!r})", f"shape {o.shape}")
    d = _static(o.shape[-1])
    _expect(d is None or d == cfg.embed_dim, path, "embed_dim", f"text output last dim == embed_dim {cfg.embed_dim}", d)
    return batch, seq


def run_in_batches(session, feeds: dict[str, np.ndarray], outputs: list[str], static_batch: int | None) -> list[np.ndarray]:
    """Run once, or in exact chunks of ``static_batch`` (zero-padding the last) when the graph fixes N."""
    n = next(iter(feeds.values())).shape[0]
    if static_batch is None or static_batch == n:
        return session.run(outputs, feeds)
    parts: list[list[np.ndarray]] = [[] for _ in outputs]
    for s in range(0, n, static_batch):
        chunk = {k: v[s : s + static_batch] for k, v in feeds.items()}
        m = next(iter(chunk.values())).shape[0]
        if m < static_batch:
            chunk = {k: np.concatenate([v, np.zeros((static_batch - m,) + v.shape[1:], v.dtype)]) for k, v in chunk.items()}
        for j, y in enumerate(session.run(outputs, chunk)):
            parts[j].append(y[:m])
    return [np.concatenate(p) for p in parts]


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
def _check_on_error(on_error: str) -> None:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error: expected 'raise' or 'skip', got {on_error!r}")


class EncoderPair:
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
        self._image_dtype = _ORT_FLOAT[graph_io(self._image)[0][config.image.input].dtype]
        text_ins = graph_io(self._text)[0]
        self._text_dtypes = {n: _ORT_INT[text_ins[n].dtype] for n in config.text.inputs.values() if n is not None}
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
    def _prepare_one(self, item: ImageItem) -> np.ndarray:
        """Decode + resize + crop one image -> uint8 [C,C,3] (runs in the decode threads)."""
        im = self.config.image
        # reduced right after decoding, inside the decode's memory reservation (a huge JPEG decoded at a DCT scale)
        return decode_image(item, max_pixels=self.max_pixels, exif_transpose=im.exif_transpose, alpha=im.alpha,
                            shortest=im.resize_shortest, finish=lambda rgb: crop_bytes(rgb, im))

    def preprocess(self, items: Sequence[ImageItem], on_error: str = "raise", start: int = 0):
        """Decode + preprocess: (pixels float32 [M,...] in the graph layout or None, ok_index list, errors list).

        Decoding and resizing run in ``threads`` worker threads (Pillow releases the GIL there); results keep
        the input order, and with ``on_error="raise"`` the first bad item in input order is raised.
        """
        _check_on_error(on_error)
        pool = self._decode_pool() if len(items) > 1 else None
        futures = [pool.submit(self._prepare_one, it) for it in items] if pool else None
        return self._collect(items, futures, on_error, start)

    def _collect(self, items: Sequence[ImageItem], futures: list | None, on_error: str, start: int,
                 out: np.ndarray | None = None):
        """Wait for one batch in input order -> (pixels [M,...] or None, ok_index, errors).

        ``futures[i]`` prepares ``items[i]`` (None: prepare here, serially): it returns the uint8 crop, or, when
        the batch buffer ``out`` [len(items),...] is given, writes the normalised pixels into ``out[i]`` itself.
        With ``on_error="raise"`` the first bad item in input order is raised and the other futures cancelled.
        """
        crops, ok, errors = [], [], []
        for i, item in enumerate(items):
            try:
                crop = futures[i].result() if futures else self._prepare_one(item)
                if out is None:
                    crops.append(crop)
                ok.append(start + i)
            except ImageDecodeError as exc:
                if on_error == "raise":
                    for f in futures or ():
                        f.cancel()
                    raise
                errors.append(ImageError(start + i, describe(item), str(exc)))
        if out is None:
            pixels = normalize_batch(crops, self.config.image) if crops else None
        elif not ok:
            pixels = None
        else:  # rows of the failed items are dropped (a copy only when something failed)
            pixels = out if len(ok) == len(items) else out[np.asarray(ok) - start]
        return pixels, ok, errors

    def _prepare_into(self, item: ImageItem, out: np.ndarray, i: int) -> None:
        r"""Decode + resize + crop + normalise one image into row ``i`` of the batch buffer (decode threads).

        .. math:: x = (p / 255 - \mu_c) / \sigma_c

        by table look-up (:func:`~reco_ref.encoders.preprocess.normalize_into`), written in place: the same bits
        as :func:`~reco_ref.encoders.preprocess.to_normalized_array`'s float32 statement (tested), at a
        quarter of its cost, which matters on a small machine where every decode cycle is taken from the graph.
        """
        im = self.config.image
        a = self._prepare_one(item)  # uint8 [C,C,3]
        if a.shape != (im.size, im.size, 3):
            raise ValueError(f"crop: expected uint8 [{im.size},{im.size},3], got {a.dtype} {a.shape}")
        normalize_into(a, self._lut, out[i], im.layout)

    def iter_preprocessed(self, items: Sequence[ImageItem], batch_size: int = 64, on_error: str = "raise",
                          prefetch: int = 2):
        """Yield ``(start, pixels [M,...] or None, ok_index, errors)`` batch by batch, decoding ahead.

        While the caller runs the graph on one batch, the decode threads already prepare the next
        ``prefetch`` batches, each image decoded, cropped and normalised straight into its row of the batch
        buffer (ONNX Runtime releases the GIL while it runs, Pillow while it decodes and
        resizes), so decoding overlaps inference instead of alternating with it. At most
        ``(prefetch + 1) * batch_size`` decoded crops are held (bounded memory). Batches come out in input
        order; ``on_error="raise"`` raises the first bad item in input order and cancels the work queued
        behind it; closing the generator early cancels it too.
        """
        _check_on_error(on_error)
        pool = self._decode_pool() if len(items) > 1 else None
        if pool is None:  # one thread: nothing to overlap with
            for s in range(0, len(items), batch_size):
                yield (s, *self.preprocess(items[s : s + batch_size], on_error=on_error, start=s))
            return
        from collections import deque

        starts = iter(range(0, len(items), batch_size))
        pending: deque = deque()  # (start, futures) of the batches queued ahead, in input order
        shape = pixel_shape(self.config.image)

        def enqueue() -> None:
            s = next(starts, None)
            if s is not None:
                chunk = items[s : s + batch_size]
                out = np.empty((len(chunk), *shape), np.float32)  # [m,...] filled by the decode threads
                pending.append((s, [pool.submit(self._prepare_into, it, out, i) for i, it in enumerate(chunk)], out))

        try:
            for _ in range(max(1, int(prefetch))):  # the first batch + those queued behind it
                enqueue()
            while pending:
                s, futures, out = pending.popleft()
                batch = self._collect(items[s : s + batch_size], futures, on_error, s, out)
                enqueue()  # the decode threads work on this one while the caller runs the graph on `batch`
                yield (s, *batch)
        finally:
            for _, futures, _ in pending:
                for f in futures:
                    f.cancel()

    def _decode_pool(self):
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            n = self._workers()
            self._pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="reco-decode") if n > 1 else False
        return self._pool or None

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

    # ---------------------------------------------------------------- batch-parallel image encoding (CPU)
    def _workers(self) -> int:
        return int(self.threads or os.cpu_count() or 1)

    def _single_thread_image_session(self):
        """The image graph in a second session with ONE intra-op thread, created on first use.

        Why a second session: with ``w`` cores, ``w`` workers each running a whole batch on one thread keep
        every core busy without the per-operator barrier of intra-op threading, and a core taken for decoding
        delays one batch instead of stalling all threads at the next barrier (which is what made decoding
        *beside* a 2-thread session cost more than its own CPU time). ONNX Runtime sessions may be run from
        several threads at once, so one session serves all workers; the price is one more copy of the image
        graph's weights in RAM (20 MB for reco-mini). Its outputs are the same bits as the pair's session
        (MLAS computes each output element in one thread; tested).
        """
        if self._image_1t is None:
            self._image_1t = make_session(self._image_path, 1, self.providers)
        return self._image_1t

    def _prepare_batch(self, chunk: Sequence[ImageItem], start: int, on_error: str) -> tuple:
        """Decode + preprocess ``chunk`` serially in the calling (worker) thread -> (pixels [M,...] or None,
        ok_index, errors); rows are written compactly, so nothing is copied when an image fails."""
        out = np.empty((len(chunk), *pixel_shape(self.config.image)), np.float32)  # [m,...]; rows 0..len(ok)-1 used
        ok, errors = [], []
        for i, item in enumerate(chunk):
            try:
                self._prepare_into(item, out, len(ok))
                ok.append(start + i)
            except ImageDecodeError as exc:
                if on_error == "raise":
                    raise
                errors.append(ImageError(start + i, describe(item), str(exc)))
        return (out[: len(ok)] if ok else None), ok, errors

    def _encode_batch(self, chunk: Sequence[ImageItem], start: int, on_error: str, session: Any) -> tuple:
        """One worker's job: a whole batch, decode to embeddings -> (start, emb|None, keys|None, ok, errors)."""
        pixels, ok, errors = self._prepare_batch(chunk, start, on_error)
        if pixels is None:
            return start, None, None, ok, errors
        emb, keys = self.run_image_graph(pixels, session)
        return start, emb, keys, ok, errors

    def iter_encoded_batches(self, items: Sequence[ImageItem], batch_size: int = 64, on_error: str = "raise"):
        """Yield ``(start, emb [M,D] or None, keys [M,Dk] or None, ok_index, errors)`` per batch, in input order,
        encoded by ``threads`` workers in parallel, each decoding and running a whole batch on one thread.

        At most ``workers + 1`` batches are queued or running (bounded memory: their pixel buffers and
        results). The last ``n_batches mod workers`` batches, which would leave cores idle on one thread,
        run on the pair's multi-threaded session instead. ``on_error="raise"`` raises the first bad item in
        input order (batches are consumed in order, items within a batch decoded in order) and cancels the
        batches queued behind it; closing the generator early cancels them too.
        """
        _check_on_error(on_error)
        from collections import deque

        pool, single = self._decode_pool(), self._single_thread_image_session()
        workers = self._workers()
        starts = list(range(0, len(items), batch_size))
        tail = len(starts) - len(starts) % workers  # batches from here on would run with cores idle
        pending: deque = deque()

        def enqueue(j: int) -> None:
            if j < len(starts):
                s = starts[j]
                session = single if j < tail else self._image
                pending.append(pool.submit(self._encode_batch, items[s : s + batch_size], s, on_error, session))

        try:
            for j in range(workers + 1):
                enqueue(j)
            nxt = workers + 1
            while pending:
                res = pending.popleft().result()
                enqueue(nxt)
                nxt += 1
                yield res
        finally:
            for f in pending:
                f.cancel()

    def _image_mode(self, n_items: int, batch_size: int, parallel: str) -> str:
        """'batches' (workers, one batch each) or 'overlap' (decode threads beside the multi-threaded session)."""
        if parallel not in ("auto", "batches", "overlap"):
            raise ValueError(f"parallel: expected 'auto', 'batches' or 'overlap', got {parallel!r}")
        workers, n_batches = self._workers(), -(-n_items // batch_size)
        cpu_only = self.providers == ["CPUExecutionProvider"]
        if parallel == "overlap" or workers < 2 or n_batches < 2:
            return "overlap"
        if parallel == "batches":
            return "batches"
        # auto: only where every core gets whole batches for most of the run (a GPU session is never split)
        return "batches" if cpu_only and n_batches >= 2 * workers else "overlap"

    def _iter_overlapped(self, items: Sequence[ImageItem], batch_size: int, on_error: str):
        """As :meth:`iter_encoded_batches`, from :meth:`iter_preprocessed` + the graph on the calling thread."""
        with contextlib.closing(self.iter_preprocessed(items, batch_size, on_error)) as prepared:
            for s, pixels, ok, errs in prepared:
                if pixels is None:
                    yield s, None, None, ok, errs
                else:
                    yield (s, *self.run_image_graph(pixels), ok, errs)

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
