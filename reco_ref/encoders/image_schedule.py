"""How image decoding and the image graph share the cores (the scheduling half of :class:`EncoderPair`).

Two schedules, the same bits (tested):

* **overlap** (:meth:`ImageScheduling.iter_preprocessed`): decode threads work ahead, writing each image
  straight into its row of the next batch buffers, while the graph runs on ``threads`` intra-op threads;
* **batches** (:meth:`ImageScheduling.iter_encoded_batches`): ``threads`` workers, each decoding a whole batch
  and running it on a single-threaded session.

Shapes: a batch of M decoded images is float32 ``[M,...]`` in the graph layout (``[M,3,C,C]`` or ``[M,C,C,3]``,
C = crop size); D = ``embed_dim``, Dk = key dim.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Sequence

import numpy as np

from ..errors import ImageDecodeError
from .graphs import make_session
from .images import ImageError, ImageItem, decode_image, describe
from .preprocess import crop_bytes, normalize_batch, normalize_into, pixel_shape


def check_on_error(on_error: str) -> None:
    """``on_error`` is "raise" (the first bad image in input order is raised) or "skip" (it is listed)."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error: expected 'raise' or 'skip', got {on_error!r}")


class ImageScheduling:
    """Decode + preprocess images and schedule them onto the image graph; a base class of :class:`EncoderPair`.

    The host sets ``config``, ``threads``, ``providers``, ``max_pixels``, ``_lut`` (float32 [3,256]),
    ``_image`` / ``_image_path`` (the image session and its file), ``_pool = None`` and ``_image_1t = None``
    (created on first use), and defines ``run_image_graph(pixels, session=None) -> (emb [M,D], keys [M,Dk] or None)``.
    """

    # ------------------------------------------------------- decode threads ahead of the graph ("overlap")
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
        check_on_error(on_error)
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
        check_on_error(on_error)
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
        check_on_error(on_error)
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
