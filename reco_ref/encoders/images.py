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
* EXIF orientation                                  -> applied (``exif_transpose=True``), as a viewer shows it
* modes: 1, L, P, LA, PA, RGBA, CMYK, YCbCr, I;16*, I, F -> 8-bit RGB; alpha is composited on white
  (``alpha="white"``) or dropped (``alpha="drop"`` = Pillow ``convert("RGB")``, what open_clip does)

Batch helpers never stop at the first bad file: :func:`decode_many` returns the decoded images with the
indices that worked and ``(index, item, message)`` for the rest.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence, Union

import numpy as np
from PIL import Image, ImageOps

from ..errors import ImageDecodeError
from ..io import list_files
from .config import PIL_MAX_IMAGE_PIXELS

ImageItem = Union[str, os.PathLike, Image.Image]
MAX_ASPECT = 50  # long side / short side accepted; the resize of anything longer costs O(aspect) memory
LIMIT_HINT = "--max-pixels on the command line, max_pixels= in Python"

# Our header check (decode_image) is the guard; Pillow's warning between its limit and twice it would
# only add a multi-line message to stderr for an image we refuse (or accept) anyway.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


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


def _to_8bit_rgb(img: Image.Image, alpha: str) -> Image.Image:
    """Convert any Pillow mode to ``RGB`` with 8 bits per channel."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # Pillow's convert("L") clips 16/32-bit values at 255 (a white image); scale the range down instead.
        a = np.asarray(img, dtype=np.float32)  # [H,W]; 4 B/pixel (exact below 2**24, enough for 8 bits out)
        top = 65535 if mode.startswith("I;16") or a.max(initial=0) > 255 else 255
        a8 = np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(a8, mode="L").convert("RGB")
    if mode == "F":
        a = np.asarray(img, dtype=np.float64)
        finite = a[np.isfinite(a)]
        top = 1.0 if finite.size and finite.max() <= 1.0 else 255.0  # float images are [0,1] or [0,255]
        a8 = np.clip(np.rint(np.nan_to_num(a) * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(a8, mode="L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info)
    if has_alpha and alpha == "white":
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")  # drops alpha if any; CMYK/YCbCr/L/1/P by Pillow's own conversion


def decode_image(
    item: ImageItem,
    *,
    max_pixels: int = PIL_MAX_IMAGE_PIXELS,
    exif_transpose: bool = True,
    alpha: str = "white",
    max_aspect: float = MAX_ASPECT,
) -> Image.Image:
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
    try:
        if isinstance(item, Image.Image):
            return _decode_opened(item, name, max_pixels, exif_transpose, alpha, max_aspect)
        path = Path(item)
        if not path.is_file():
            if path.is_symlink():
                raise ImageDecodeError(f"{name}: broken symbolic link (its target is missing, or links form a loop)")
            raise ImageDecodeError(f"{name}: no such image file")
        # Pillow checks its own guard in open(): between MAX_IMAGE_PIXELS and twice that it only warns (our
        # check below then decides), above it raises DecompressionBombError (converted below).  No
        # warnings.catch_warnings() here: it is not thread-safe, and this runs in decode threads.
        with Image.open(path) as img:
            return _decode_opened(img, name, max_pixels, exif_transpose, alpha, max_aspect)
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


def _decode_opened(img: Image.Image, name: str, max_pixels: int, exif_transpose: bool, alpha: str,
                   max_aspect: float = MAX_ASPECT) -> Image.Image:
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
    img.load()  # force the decode here: a truncated file fails now, with its name
    if exif_transpose:
        img = ImageOps.exif_transpose(img)
    rgb = _to_8bit_rgb(img, alpha)
    rgb.load()
    return rgb


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
