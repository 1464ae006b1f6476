"""Safe image decoding: path or PIL image -> 8-bit RGB PIL image, or :class:`ImageDecodeError` naming the file.

What can go wrong with user images, and what happens here:

* unreadable / not an image / unsupported format  -> ImageDecodeError (Pillow's message kept)
* truncated file (``image file is truncated``)    -> ImageDecodeError (the pixels are forced here, inside the
                                                     ``try``, not later in resize where the file name is lost)
* decompression bomb: width*height > ``max_pixels`` -> ImageDecodeError, decided from the header BEFORE any
                                                     pixel is decoded (OpenClipart has 100-230 MP images);
                                                     Pillow's own guard is kept at or above ``max_pixels`` so
                                                     this one decides, and its warning is silenced
* extreme aspect ratio: long side > ``max_aspect`` (50) x short side -> ImageDecodeError from the header: a
                                                     20000x1 PNG of 140 bytes would be resized to 224x4480000
                                                     (3 GB) by the shortest-side resize
* decoded size: width*height*bytes per pixel of the mode the file decodes to (F/I/RGBA/CMYK 4, RGB 3, I;16 and
  LA 2, L/P/1 1) above ``max_bytes`` (default 3 x ``max_pixels``: an 8-bit RGB image at the pixel limit)
                                                  -> ImageDecodeError from the header: a 630 KB float TIFF of 88 MP
                                                     decodes to 353 MB, more than the RGB image the pixel limit means
* EXIF orientation                                  -> applied (``exif_transpose=True``), as a viewer shows it
* modes: 1, L, P, LA, PA, RGBA, CMYK, YCbCr, I;16*, I, F -> 8-bit RGB; alpha is composited on white
  (``alpha="white"``) or dropped (``alpha="drop"`` = Pillow ``convert("RGB")``, what open_clip does)

Memory (peak bounded by the decoded image): the conversions to RGB that need arithmetic (16/32-bit and
float greys, alpha over white) run in strips of rows into one preallocated RGB image, so no full-size float or
RGBA copy is made; the decoded source is released before the EXIF rotation. A caller that resizes to a
known shortest side ``S`` passes ``shortest=S``: a JPEG of more than :data:`DRAFT_ABOVE` pixels is then decoded
by libjpeg at the smallest DCT scale (1/2, 1/4, 1/8) that keeps both sides >= ``S``, and ``finish=`` turns the
full-size image into what the caller keeps (e.g. its crop) while the image's memory is still reserved. Decodes
running at once in several threads share one reservation of :data:`DECODE_POOL_BYTES`, so ``threads`` workers
never hold ``threads`` full-size images. Images up to :data:`DRAFT_ABOVE` pixels are always decoded at full
size: their pixels, hence their embeddings, are those of open_clip's transform bit for bit.

Batch helpers never stop at the first bad file: :func:`decode_many` returns the decoded images with the
indices that worked and ``(index, item, message)`` for the rest.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple, Sequence, Union

import numpy as np
from PIL import Image

from ..errors import ImageDecodeError
from ..io import list_files
from ..paths import file_problem
from .config import PIL_MAX_IMAGE_PIXELS

ImageItem = Union[str, os.PathLike, Image.Image]
MAX_ASPECT = 50  # long side / short side accepted; the resize of anything longer costs O(aspect) memory
LIMIT_HINT = "--max-pixels on the command line, max_pixels= in Python"
BYTES_PER_PIXEL_BUDGET = 3  # default decoded-size budget: 3 bytes x max_pixels, an 8-bit RGB image at the limit
DRAFT_ABOVE = 1 << 24  # pixels (16.8 MP): a larger JPEG is decoded at a reduced DCT scale when its target is known
DECODE_POOL_BYTES = 768 << 20  # decoded bytes (estimated peak) that decodes in several threads may hold at once
STRIP_BYTES = 4 << 20  # float64 working bytes of one strip in the arithmetic conversions
#: bytes per pixel of each mode as decoded (the nominal sample size; Pillow stores 3-4 band modes in 4 bytes)
MODE_BYTES = {"1": 1, "L": 1, "P": 1, "LA": 2, "La": 2, "PA": 2, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2,
              "RGB": 3, "YCbCr": 3, "LAB": 3, "HSV": 3, "RGBA": 4, "RGBa": 4, "RGBX": 4, "CMYK": 4, "I": 4, "F": 4}
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}  # EXIF orientation -> transpose, as ImageOps.exif_transpose

# Our header check (decode_image) is the guard; Pillow's warning between its limit and twice it would
# only add a multi-line message to stderr for an image we refuse (or accept) anyway.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

# Pillow allocates a large image in blocks of 16 MiB by default. glibc serves a freed block's size from its heap
# next time (its mmap threshold adapts up to 32 MiB), and with decode threads each thread's heap then keeps the
# blocks of the last huge image it decoded: 4 float TIFFs of 67 MP peaked at 1.25 GB on 2 threads against 0.76 GB
# on one. Blocks above 32 MiB are always mapped and unmapped, so memory goes back when an image is freed. The
# block size only bounds each allocation (a small image still allocates its own size); a value the user set
# through PILLOW_BLOCK_SIZE is kept.
if "PILLOW_BLOCK_SIZE" not in os.environ and Image.core.get_block_size() < (64 << 20):
    Image.core.set_block_size(64 << 20)


class ImageError(NamedTuple):
    """One image a batch tool could not use: its position in the input, how it was given, and why."""

    index: int
    item: str
    message: str


def describe(item: ImageItem) -> str:
    """A short name for an item in messages: the path, or ``<PIL RGB 640x480>``."""
    if isinstance(item, Image.Image):
        return f"<PIL {item.mode} {item.size[0]}x{item.size[1]}>"
    return os.fspath(item)


def mode_bytes(mode: str) -> int:
    """Bytes per pixel of an image decoded in ``mode`` (unknown modes: 4 per band, the widest sample)."""
    if mode in MODE_BYTES:
        return MODE_BYTES[mode]
    try:
        return 4 * len(Image.getmodebands(mode))
    except (KeyError, ValueError):
        return 4


_pool_lock = threading.Condition()
_pool_used = 0  # estimated peak bytes of the decodes running now, in every thread


@contextlib.contextmanager
def _reserve(nbytes: int):
    """Hold ``nbytes`` of the shared decode reservation while one image is decoded and reduced.

    A decode waits while others hold the reservation and its own bytes would push the total past
    :data:`DECODE_POOL_BYTES`; one that is alone always runs (so an image above the pool, accepted by a raised
    limit, is decoded by itself instead of never). Small images never wait in practice (a 500x375 photo is 0.3% of
    the pool), the few huge ones take turns.
    """
    global _pool_used
    with _pool_lock:
        while _pool_used and _pool_used + nbytes > DECODE_POOL_BYTES:
            _pool_lock.wait()
        _pool_used += nbytes
    try:
        yield
    finally:
        with _pool_lock:
            _pool_used -= nbytes
            _pool_lock.notify_all()


def _strips(img: Image.Image, row_bytes: int):
    """(top, bottom) row ranges of ``img`` whose strips hold about :data:`STRIP_BYTES` at ``row_bytes`` per row."""
    rows = max(1, STRIP_BYTES // max(1, row_bytes))
    for y in range(0, img.height, rows):
        yield y, min(img.height, y + rows)


def _grey_strips_to_rgb(img: Image.Image, to_uint8: Callable[[np.ndarray], np.ndarray], dtype) -> Image.Image:
    """A one-band image -> RGB, ``to_uint8`` applied to each strip of rows as an array of ``dtype`` (never a
    full-size array of it)."""
    w = img.width
    out = Image.new("RGB", img.size)
    for y0, y1 in _strips(img, w * np.dtype(dtype).itemsize):
        a = np.asarray(img.crop((0, y0, w, y1)), dtype=dtype)  # [rows,W]
        out.paste(Image.fromarray(to_uint8(a)).convert("RGB"), (0, y0))
    return out


def _finite_max(img: Image.Image) -> float | None:
    """Largest finite value of a mode-F image (None: none is finite), read strip by strip."""
    top = None
    for y0, y1 in _strips(img, img.width * 4):
        a = np.asarray(img.crop((0, y0, img.width, y1)), dtype=np.float32)
        finite = a[np.isfinite(a)]
        if finite.size:
            m = float(finite.max())
            top = m if top is None else max(top, m)
    return top


def _to_8bit_rgb(img: Image.Image, alpha: str) -> Image.Image:
    """Convert any Pillow mode to ``RGB`` with 8 bits per channel (the input itself when already RGB).

    The arithmetic conversions work strip by strip (:func:`_strips`): every output pixel depends on its own input
    pixel only, so the values are those of the whole-image statement, at one strip's working memory.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # Pillow's convert("L") clips 16/32-bit values at 255 (a white image); scale the range down instead.
        top = 65535 if mode.startswith("I;16") or (img.getextrema()[1] or 0) > 255 else 255
        scale = 255.0 / top  # float32 arithmetic (exact below 2**24, enough for 8 bits out)
        return _grey_strips_to_rgb(img, lambda a: np.clip(np.rint(a * scale), 0, 255).astype(np.uint8), np.float32)
    if mode == "F":
        finite_max = _finite_max(img)
        top = 1.0 if finite_max is not None and finite_max <= 1.0 else 255.0  # float images are [0,1] or [0,255]
        scale = 255.0 / top

        def to_uint8(a: np.ndarray) -> np.ndarray:
            with np.errstate(over="ignore"):  # +-inf -> +-max float -> times scale overflows to +-inf: clipped
                return np.clip(np.rint(np.nan_to_num(a) * scale), 0, 255).astype(np.uint8)

        return _grey_strips_to_rgb(img, to_uint8, np.float64)
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info)
    if has_alpha and alpha == "white":
        out = Image.new("RGB", img.size)
        for y0, y1 in _strips(img, img.width * 4 * 3):  # three RGBA strips live at once
            rgba = img.crop((0, y0, img.width, y1)).convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            out.paste(Image.alpha_composite(white, rgba).convert("RGB"), (0, y0))
        return out
    return img.convert("RGB")  # drops alpha if any; CMYK/YCbCr/L/1/P by Pillow's own conversion


def decode_image(
    item: ImageItem,
    *,
    max_pixels: int = PIL_MAX_IMAGE_PIXELS,
    exif_transpose: bool = True,
    alpha: str = "white",
    max_aspect: float = MAX_ASPECT,
    max_bytes: int | None = None,
    shortest: int | None = None,
    finish: Callable[[Image.Image], Any] | None = None,
) -> Any:
    """Open (if a path) and decode one image to an 8-bit RGB PIL image.

    Parameters
    ----------
    item : path or PIL.Image.Image
    max_pixels : int
        Largest accepted width*height; checked from the header before decoding.
    exif_transpose : bool
        Rotate/flip by the EXIF orientation tag first.
    alpha : {"white", "drop"}
        How transparency becomes RGB.
    max_aspect : float
        Largest accepted long-side / short-side ratio; checked from the header before decoding.
    max_bytes : int, optional
        Largest accepted decoded size, width*height*:func:`mode_bytes` of the mode the file decodes to; checked
        from the header before decoding. Default ``3 * max_pixels`` (an 8-bit RGB image at the pixel limit), so
        raising ``max_pixels`` raises it too.
    shortest : int, optional
        The shortest side the caller will resize the image to. A JPEG of more than :data:`DRAFT_ABOVE` pixels
        is then decoded at the smallest DCT scale that keeps both sides >= ``shortest``, so the result can be
        smaller than the file's own size. None: full size.
    finish : callable, optional
        Applied to the decoded RGB image while its memory is reserved (see :data:`DECODE_POOL_BYTES`); its
        result is returned instead of the image. Pass the reduction to the encoder's input (the crop) so no
        full-size image outlives the reservation.

    Raises
    ------
    ImageDecodeError
        Naming the file (or the PIL image) and the cause.
    """
    if not isinstance(item, (str, os.PathLike, Image.Image)):
        raise TypeError(f"image item: expected a path or a PIL.Image.Image, got {type(item).__name__}")
    name = describe(item)
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels  # Pillow's guard must not be stricter than ours (one guard decides)
    limits = (max_pixels, BYTES_PER_PIXEL_BUDGET * max_pixels if max_bytes is None else max_bytes, max_aspect,
              max_bytes is None)
    try:
        if isinstance(item, Image.Image):
            return _decode_opened(item, name, limits, exif_transpose, alpha, None, finish, own=False)
        path = Path(item)
        if not path.is_file():  # missing, a broken link, or not a regular file (/dev/zero, a pipe): say which
            problem = file_problem(path)
            raise ImageDecodeError(f"{name}: {'no such image file' if problem in ('', 'no such file') else problem}")
        # Pillow checks its own guard in open(): between MAX_IMAGE_PIXELS and twice that it only warns (our
        # check below then decides), above it raises DecompressionBombError (converted below).  No
        # warnings.catch_warnings() here: it is not thread-safe, and this runs in decode threads.
        with Image.open(path) as img:
            return _decode_opened(img, name, limits, exif_transpose, alpha, shortest, finish, own=True)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(
            f"{name}: refused by the decompression-bomb guard ({exc}); to accept it raise the pixel limit "
            f"({LIMIT_HINT})"
        ) from None
    except (OSError, ValueError, SyntaxError, MemoryError, Image.UnidentifiedImageError, EOFError) as exc:
        # SyntaxError / EOFError are what some Pillow plugins raise on malformed headers
        raise ImageDecodeError(f"{name}: cannot decode image ({type(exc).__name__}: {exc})") from None


def _reduce_on_decode(img: Image.Image, shortest: int) -> None:
    """Ask libjpeg for a smaller image whose both sides stay >= ``shortest`` (its DCT scaling: 1/2, 1/4, 1/8).

    Only JPEGs above :data:`DRAFT_ABOVE` pixels: smaller ones keep open_clip's full-size pixels. Other formats
    are decoded at full size (JPEG 2000's resolution levels are not used: Pillow rounds their sizes half up where
    OpenJPEG rounds up, and the decode then fails on about half of all sizes).
    """
    w, h = img.size
    if img.format in ("JPEG", "MPO") and w * h > DRAFT_ABOVE and min(w, h) >= 2 * shortest:
        img.draft(None, (shortest, shortest))  # libjpeg picks the smallest scale with both sides >= shortest


def _decoded_bytes_per_pixel(img: Image.Image) -> tuple[int, str]:
    """(bytes per pixel the decode of ``img`` needs, why) -- the mode's sample size, or the decoder's own when
    larger (OpenJPEG decodes every sample to 4 bytes before Pillow copies them: a 3 KB JPEG 2000 of 88 MP peaked
    at 1.7 GB)."""
    bpp = mode_bytes(img.mode)
    if img.format == "JPEG2000":
        return max(bpp, 4 * len(img.getbands())), "; JPEG 2000 decodes 4 bytes per sample"
    return bpp, ""


def _decode_opened(img: Image.Image, name: str, limits: tuple[int, int, float, bool], exif_transpose: bool, alpha: str,
                   shortest: int | None, finish: Callable[[Image.Image], Any] | None, *, own: bool) -> Any:
    max_pixels, max_bytes, max_aspect, default_budget = limits
    w, h = img.size
    if w * h > max_pixels:
        raise ImageDecodeError(
            f"{name}: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels} "
            f"(decompression-bomb guard; to accept it raise the limit: {LIMIT_HINT})"
        )
    if w < 1 or h < 1:
        raise ImageDecodeError(f"{name}: empty image ({w}x{h})")
    if max(w, h) > max_aspect * min(w, h):
        raise ImageDecodeError(
            f"{name}: {w}x{h} has an aspect ratio above {max_aspect:g}:1 (refused: the shortest-side resize would "
            "grow its long side without bound, and the centre crop would keep a sliver of it); crop it first")
    if own and shortest:
        _reduce_on_decode(img, int(shortest))
    dw, dh = img.size  # after a reduced decode was set up: what will be decoded
    bpp, how = _decoded_bytes_per_pixel(img)
    nbytes = dw * dh * bpp
    if nbytes > max_bytes:
        why = (f"{BYTES_PER_PIXEL_BUDGET} bytes per pixel x the pixel limit {max_pixels}, an 8-bit RGB image at the "
               f"limit); to accept it raise the limit: {LIMIT_HINT}") if default_budget else "max_bytes=)"
        raise ImageDecodeError(f"{name}: {dw}x{dh} in mode {img.mode} needs {nbytes} bytes decoded ({bpp} per pixel"
                               f"{how}), more than the decoded-size budget of {max_bytes} bytes ({why}")
    # Estimated peak: two full-size images of 4 B/pixel (what Pillow stores for 2-4 bands, I and F): the source
    # (or the RGB made from it, the source released) and the RGB made from it (or its rotated copy).
    with _reserve(8 * dw * dh):
        img.load()  # force the decode here: a truncated file fails now, with its name
        method = _TRANSPOSE.get(img.getexif().get(0x0112, 1)) if exif_transpose else None  # 0x0112: Orientation
        rgb = _to_8bit_rgb(img, alpha)
        if own and rgb is not img:
            img.close()  # release the decoded source before the rotation makes its copy
        if method is not None:
            rgb = rgb.transpose(method)
        rgb.load()
        return finish(rgb) if finish is not None else rgb


def decode_many(
    items: Sequence[ImageItem], *, on_error: str = "raise", start: int = 0, **kwargs
) -> tuple[list[Image.Image], list[int], list[ImageError]]:
    """Decode a batch; with ``on_error="skip"`` bad items are collected instead of raised.

    Returns
    -------
    images : list of PIL.Image.Image
        The decoded images, in input order.
    ok_index : list of int
        For each decoded image its position in ``items`` (plus ``start``).
    errors : list of ImageError
        ``(index + start, item, message)`` for every item that failed.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error: expected 'raise' or 'skip', got {on_error!r}")
    images, ok, errors = [], [], []
    for i, item in enumerate(items):
        try:
            images.append(decode_image(item, **kwargs))
            ok.append(start + i)
        except ImageDecodeError as exc:
            if on_error == "raise":
                raise
            errors.append(ImageError(start + i, describe(item), str(exc)))
    return images, ok, errors


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")


def list_images(folder: str | os.PathLike, suffixes: Iterable[str] = IMAGE_SUFFIXES) -> list[Path]:
    """Every file under ``folder`` (recursively) with an image suffix, sorted by path (a stable order).

    Broken links are listed (the decoder reports them); a folder-link loop is an error naming the link.
    """
    return list_files(folder, suffixes)
