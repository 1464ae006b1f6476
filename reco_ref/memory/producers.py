"""Producers: what turns a chunk of items into embedding rows for :mod:`.build`.

A producer has ``info`` (encoder name, fingerprint, dim, key_dim: what the plan and the manifest
record), ``digest_extra`` (extra bytes the resume plan must match, e.g. a hash of precomputed arrays)
and ``produce(items, lo, offset) -> chunk dict`` (``item``, ``image [m,D]``, ``text [m,D]``,
optional ``image_keys [m,Dk]``, ``failed_item``, ``failed_error``).  Two exist:

* :class:`EncoderProducer` — encodes images and captions with an encoder pair; undecodable images and
  missing captions become failures of the chunk (logged in ``failures.jsonl``), never dropped.  With
  ``overlap_captions=True`` and an encoder that declares ``concurrent_towers = True`` (its image and text towers
  may run in two threads at once) the captions are encoded on a background thread while the images are (see
  :meth:`EncoderProducer.produce`).
* :class:`ArrayProducer` — serves rows of precomputed arrays, checking finiteness and unit norm.

:func:`load_encoder` turns an encoder *spec* (name, folder, ``"module:factory"``, callable) into an
encoder; Dask workers call it to build their own.
"""

from __future__ import annotations

import contextlib
import hashlib
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import RecoError, ShapeError
from .limits import check_option

DEFAULT_BATCH = 64
NORM_TOL = 1e-3  # precomputed arrays must be L2-normalised to this tolerance (or pass normalize=True)


def load_encoder(spec: Any, threads: int | None = None, max_pixels: int | None = None) -> Any:
    """An encoder from a name/folder (``reco_ref.encoders.load``), a ``"module:factory"`` string, or a callable.

    ``"module:factory"`` (e.g. a test double or a custom encoder) is imported and called with no
    arguments; anything with ``encode_images`` is returned as is.  ``threads`` caps ONNX Runtime's
    intra-op threads of a named encoder (Dask workers pass their share of the cores).  Dask workers call this so each one
    builds its own encoder (its own ONNX session) from a picklable spec.  ``max_pixels`` overrides a named
    encoder's image pixel budget (``--max-pixels``).
    """
    if hasattr(spec, "encode_images"):
        return spec
    if callable(spec):
        return spec()
    if isinstance(spec, str) and ":" in spec and not Path(spec).exists():
        import importlib

        mod, _, attr = spec.partition(":")
        return getattr(importlib.import_module(mod), attr)()
    from ..encoders import load

    kw = {k: v for k, v in (("threads", threads), ("max_pixels", max_pixels)) if v is not None}
    return load(spec, **kw)


# ----------------------------------------------------------------------------------------------------------
# producers: what turns a chunk of items into embeddings
# ----------------------------------------------------------------------------------------------------------
class EncoderProducer:
    """Encodes a chunk of items with an encoder pair (``reco_ref.encoders.load(...)`` or a duck-typed twin).

    Items whose caption is missing or whose image fails to decode become *failures* of the chunk,
    with the encoder's error message; every other item becomes a row.
    """

    def __init__(self, encoder: Any, batch_size: int = DEFAULT_BATCH, text_batch_size: int = 256, *,
                 overlap_captions: bool = False):
        self.encoder = encoder
        # captions beside images: asked for here, and only for an encoder that declares its towers may run
        # from two threads at once (measured: no gain on 2 busy cores, docs/edge.md, so it is off by default)
        if overlap_captions and getattr(encoder, "concurrent_towers", False) is not True:
            raise RecoError(
                f"overlap_captions: encoder {getattr(encoder, 'name', type(encoder).__name__)!r} does not declare "
                "concurrent_towers = True (its image and text towers are not known to be safe to run from two "
                "threads at once); build without --overlap-captions")
        self.overlap_captions = bool(overlap_captions)
        self.batch_size = check_option("batch_size", batch_size)
        self.text_batch_size = check_option("batch_size", text_batch_size)
        self.info = {"name": str(encoder.name), "fingerprint": str(encoder.fingerprint), "dim": int(encoder.dim),
                     "key_dim": None if getattr(encoder, "key_dim", None) is None else int(encoder.key_dim)}
        self.digest_extra = ""

    def _images(self, paths: list[str]) -> tuple[np.ndarray, np.ndarray | None, list[int], list[tuple[int, str]]]:
        """paths -> emb [m,D], keys [m,Dk] | None, ok positions, [(position, message)] for failures."""
        enc = self.encoder
        if self.info["key_dim"]:
            out = enc.encode_images(paths, batch_size=self.batch_size, on_error="skip", with_keys=True)
            if len(out) == 4:  # (emb, keys, ok, errors)
                emb, keys, ok, errors = out
            else:  # ((emb, keys), ok, errors)
                (emb, keys), ok, errors = out
        else:
            emb, ok, errors = enc.encode_images(paths, batch_size=self.batch_size, on_error="skip")
            keys = None
        errs = []
        for e in errors:  # ImageError(index, item, message) or any (index, ..., message) tuple
            errs.append((int(e[0]), str(e[-1])))
        return np.asarray(emb, np.float32), None if keys is None else np.asarray(keys, np.float32), \
            [int(i) for i in ok], errs

    def produce(self, items: list[dict], lo: int, offset: int) -> dict:
        """Encode ``items`` (positions ``lo..`` of this run, item ids ``lo+offset..``) -> chunk arrays.

        Images first; the captions of the rows whose image decoded are encoded as *one* ``encode_texts``
        call.  That call's output may depend on which captions share it (the int8 text tower takes its
        quantisation scale over the batch; batches are sorted by length and padding trimmed), so the
        caption list handed to it is always exactly the list of surviving rows, whatever the path:

        * serial (the default): images, then ``encode_texts(captions of rows)``.
        * overlapped (``overlap_captions=True``, for an encoder declaring ``concurrent_towers = True``): ``encode_texts(captions of all captioned items)`` starts on
          a background thread while the images encode here.  When every image decoded, that list *is* the
          list of rows (same strings, same order, same batch size): same call, same bytes.  When an image
          failed, the speculative call is waited for and its result (or error) discarded, and
          ``encode_texts(captions of rows)`` is called here, i.e. exactly the serial call (rare path: one
          more caption pass of the chunk).  The text tower is never called from two threads at once.

        The background thread never outlives this call (the executor is shut down, waiting, on every
        exit, a KeyboardInterrupt included) and writes no files, so an interrupted chunk leaves nothing
        half-written.  An error raised in it is re-raised here, noted with the items it concerned.
        """
        first = lo + offset
        D, Dk = self.info["dim"], self.info["key_dim"]
        failed: list[tuple[int, str]] = []
        with_caption = []
        for i, it in enumerate(items):
            cap = it.get("caption")
            if cap is None or not str(cap).strip():  # an empty caption would embed as a real, meaningless text
                failed.append((i, f"{it['source']}: no caption (missing sidecar .txt, or an empty/whitespace "
                                  "caption field)"))
            else:
                with_caption.append(i)
        paths = [items[i]["image"] for i in with_caption]
        overlap = bool(paths) and self.overlap_captions
        with contextlib.ExitStack() as stack:
            speculative = None
            if overlap:
                pool = stack.enter_context(ThreadPoolExecutor(max_workers=1, thread_name_prefix="reco-captions"))
                speculative = pool.submit(self._texts, [items[i]["caption"] for i in with_caption])
            if paths:
                img, keys, ok, errs = self._images(paths)
            else:
                # every caption of the chunk blank: no image to encode, and keys of [0, Dk] (not None)
                img, ok, errs = np.zeros((0, D), np.float32), [], []
                keys = np.zeros((0, Dk), np.float32) if Dk else None
            failed += [(with_caption[p], msg) for p, msg in errs]
            rows = [with_caption[p] for p in ok]  # positions in `items` of the encoded rows, ascending
            if img.shape != (len(rows), D):
                raise ShapeError(f"encoder {self.info['name']}: image embeddings {img.shape}, expected "
                                 f"({len(rows)}, {D})")
            if speculative is not None and rows == with_caption:
                try:
                    txt = speculative.result()
                except Exception as exc:
                    note = (f"(raised on the caption-encoding thread of {self.info['name']}, while encoding the "
                            f"captions of items {first}..{first + len(items) - 1})")
                    if hasattr(exc, "add_note"):
                        exc.add_note(note)
                    else:  # Python 3.10 has no notes: the same attribute, which its tracebacks do not print
                        exc.__notes__ = [*getattr(exc, "__notes__", []), note]
                    raise
            else:  # serial, or an image failed: the captions of exactly the rows, as one call
                if speculative is not None:
                    # the declaration covers image || text, not two text calls at once (a tokenizer may
                    # not be reentrant): let the discarded call finish, its result or error unused
                    wait([speculative])
                txt = self._texts([items[i]["caption"] for i in rows])
        if txt.shape != (len(rows), D):
            raise ShapeError(f"encoder {self.info['name']}: text embeddings {txt.shape}, expected ({len(rows)}, {D})")
        if keys is None and Dk:
            raise ShapeError(f"encoder {self.info['name']}: key_dim {Dk} but no keys returned")
        failed.sort()
        out = {"item": np.asarray(rows, np.int64) + first, "image": img, "text": txt,
               "failed_item": np.asarray([i for i, _ in failed], np.int64) + first,
               "failed_error": np.asarray([m for _, m in failed], dtype=str)}
        if Dk:
            out["image_keys"] = keys
        return out

    def _texts(self, captions: list[str]) -> np.ndarray:
        """captions -> text embeddings float32 [m,D] (one ``encode_texts`` call; [0,D] for none)."""
        if not captions:
            return np.zeros((0, self.info["dim"]), np.float32)
        return np.asarray(self.encoder.encode_texts(captions, batch_size=self.text_batch_size), np.float32)


class ArrayProducer:
    """Serves chunks of precomputed embedding arrays (``image [n,D]``, ``text [n,D]``, optional keys)."""

    def __init__(self, image: np.ndarray, text: np.ndarray, *, keys: np.ndarray | None = None, name: str,
                 fingerprint: str, normalize: bool = False):
        if image.ndim != 2 or text.shape != image.shape:
            raise ShapeError(f"embedding arrays: image {image.shape} and text {text.shape} must both be [n, D]")
        if keys is not None and (keys.ndim != 2 or keys.shape[0] != image.shape[0]):
            raise ShapeError(f"embedding arrays: image_keys {keys.shape} must be [n={image.shape[0]}, Dk]")
        for nm, a in (("image", image), ("text", text), ("image_keys", keys)):
            if a is not None and a.dtype not in (np.float16, np.float32, np.float64):
                raise ShapeError(f"embedding array {nm}: dtype {a.dtype}, expected float16/32/64")
        self.image, self.text, self.keys = image, text, keys
        self.normalize = bool(normalize)
        self.info = {"name": str(name), "fingerprint": str(fingerprint), "dim": int(image.shape[1]),
                     "key_dim": None if keys is None else int(keys.shape[1])}
        # the plan must pin the array contents, streamed so RAM stays bounded; the same pass checks every row
        # (finite; unit-norm unless normalize), so a bad row is refused before the build writes anything (it
        # used to surface at its chunk, after the output folder and its .build/ state had been created)
        h = hashlib.sha256()
        for nm, a in (("image", image), ("text", text)) + ((("image_keys", keys),) if keys is not None else ()):
            for lo in range(0, a.shape[0], 65536):
                chunk = np.ascontiguousarray(a[lo:lo + 65536])
                h.update(chunk.tobytes())
                self._prep(nm, chunk, lo)
        self.digest_extra = h.hexdigest()

    def _prep(self, name: str, a: np.ndarray, first: int) -> np.ndarray:
        a = np.asarray(a, np.float32)
        finite = np.isfinite(a).all(axis=1) if a.size else np.ones(len(a), bool)
        if not finite.all():
            j = int(np.argmin(finite))
            raise ShapeError(f"embedding array {name}: row {first + j} holds NaN/inf "
                             f"({int((~finite).sum())} such row(s) among rows {first}..{first + len(a) - 1})")
        norms = np.linalg.norm(a, axis=1)
        if self.normalize:
            if (norms == 0).any():
                raise ShapeError(f"embedding array {name}: zero row near {first}; cannot L2-normalise")
            return a / norms[:, None]
        bad = np.abs(norms - 1) > NORM_TOL
        if bad.any():
            j = int(np.argmax(bad))
            raise ShapeError(f"embedding array {name}: row {first + j} has L2 norm {norms[j]:.4f}, expected 1 "
                             f"(tolerance {NORM_TOL}); pass normalize=True / --normalize to L2-normalise")
        return a

    def produce(self, items: list[dict], lo: int, offset: int) -> dict:
        first, hi = lo, lo + len(items)
        out = {"item": np.arange(first + offset, hi + offset, dtype=np.int64),
               "image": self._prep("image", self.image[first:hi], first),
               "text": self._prep("text", self.text[first:hi], first),
               "failed_item": np.zeros(0, np.int64), "failed_error": np.zeros(0, dtype="<U1")}
        if self.keys is not None:
            out["image_keys"] = self._prep("image_keys", self.keys[first:hi], first)
        return out
