r"""Image preprocessing: RGB PIL image -> normalised float32 tensor, reproducing CLIP's eval transform exactly.

OpenAI CLIP / open_clip evaluate with torchvision ``Resize(S) -> CenterCrop(C) -> ToTensor -> Normalize`` on
PIL images.  Each step is re-stated here without torchvision, with its integer rounding:

1. **Resize shortest side** to ``S`` (torchvision ``_compute_resized_output_size``)::

       short, long = min(w, h), max(w, h)
       new_short, new_long = S, int(S * long / short)      # float division, then truncation

   then ``PIL.Image.resize((new_w, new_h), resample)`` (torchvision calls exactly this for PIL input; PIL
   always antialiases; an image already at that size is returned unchanged by both).
2. **Centre crop** to ``C``: pad with zeros first where the image is smaller (left/top get ``(C-w)//2``,
   right/bottom ``(C-w+1)//2``), then::

       top  = int(round((h - C) / 2.0))                      # Python round: half to even
       left = int(round((w - C) / 2.0))

3. **To float**: :math:`x = p / 255` in float32 (one IEEE division per element, as ``ToTensor``).
4. **Normalise**: :math:`x' = (x - \mu) / \sigma` with :math:`\mu, \sigma` as float32, subtraction then division
   (not multiplication by :math:`1/\sigma`, which rounds differently).
5. **Layout**: stack to ``[N,3,C,C]`` (NCHW) or ``[N,C,C,3]`` (NHWC).

With these, the tensors equal open_clip's bit for bit on RGB and greyscale inputs (tests/encoders/
test_export_clip.py).  One documented difference: open_clip resizes in the source mode and converts to RGB
last; here images are converted to RGB first (:mod:`reco_ref.encoders.images`), which differs only for
palette images (Pillow resizes those with NEAREST) and images with alpha (Pillow resizes premultiplied).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

from ..errors import ImageDecodeError
from .config import ImageConfig
from .images import MAX_ASPECT

RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


def resized_size(width: int, height: int, shortest: int) -> tuple[int, int]:
    """(new_w, new_h) with the shortest side at ``shortest`` and torchvision's truncation of the long side."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = shortest, int(shortest * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def resize_shortest(img: Image.Image, shortest: int, interpolation: str = "bicubic") -> Image.Image:
    """Resize so the shortest side is ``shortest`` (aspect kept), as torchvision ``Resize(int)`` on PIL."""
    size = resized_size(img.width, img.height, shortest)
    if size == img.size:
        return img
    if size[0] * size[1] > shortest * shortest * MAX_ASPECT:  # the bound decode_image's aspect guard implies
        raise ImageDecodeError(f"<PIL {img.mode} {img.width}x{img.height}>: would be resized to {size[0]}x{size[1]}, "
                               f"more than {MAX_ASPECT}x the {shortest}x{shortest} input (aspect ratio too extreme)")
    return img.resize(size, RESAMPLE[interpolation])


def crop_box(width: int, height: int, crop: int) -> tuple[int, int]:
    """(left, top) of a centred ``crop``x``crop`` window, torchvision's rounding (half to even)."""
    return int(round((width - crop) / 2.0)), int(round((height - crop) / 2.0))


def center_crop(img: Image.Image, crop: int) -> Image.Image:
    """Centre-crop to ``crop``x``crop``, zero-padding first where the image is smaller (torchvision CenterCrop)."""
    w, h = img.size
    if crop > w or crop > h:
        pad_l = (crop - w) // 2 if crop > w else 0
        pad_t = (crop - h) // 2 if crop > h else 0
        pad_r = (crop - w + 1) // 2 if crop > w else 0
        pad_b = (crop - h + 1) // 2 if crop > h else 0
        canvas = Image.new(img.mode, (w + pad_l + pad_r, h + pad_t + pad_b), 0)
        canvas.paste(img, (pad_l, pad_t))
        img = canvas
        w, h = img.size
        if (w, h) == (crop, crop):
            return img
    left, top = crop_box(w, h, crop)
    return img.crop((left, top, left + crop, top + crop))


def normalize_lut(mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """float32 [3,256]: the normalised value of every byte per channel, :math:`(p/255 - \\mu_c)/\\sigma_c`.

    Computed with the very float32 operations :func:`to_normalized_array` states (divide, subtract, divide), so a
    table look-up gives bit-identical results at a fraction of the cost (one gather instead of 4 passes).
    """
    p = np.arange(256, dtype=np.float32) / np.float32(255.0)  # [256]
    m = np.asarray(mean, dtype=np.float32)[:, None]  # [3,1]
    s = np.asarray(std, dtype=np.float32)[:, None]  # [3,1]
    return (p[None, :] - m) / s  # [3,256]


def to_normalized_array(img: Image.Image, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 RGB image -> float32 [H,W,3], :math:`(p/255 - \\mu)/\\sigma` with float32 arithmetic (the statement)."""
    a = _rgb_bytes(img)  # [H,W,3]
    x = a.astype(np.float32) / np.float32(255.0)  # [H,W,3]
    x -= np.asarray(mean, dtype=np.float32)
    x /= np.asarray(std, dtype=np.float32)
    return x


def _rgb_bytes(img: Image.Image) -> np.ndarray:
    a = np.asarray(img, dtype=np.uint8)  # [H,W,3]
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"expected an RGB image, got array shape {a.shape} (mode {img.mode})")
    return a


def crop_image(img: Image.Image, cfg: ImageConfig) -> Image.Image:
    """Resize shortest side + centre crop: the geometric part, still uint8 RGB [C,C]."""
    return center_crop(resize_shortest(img, cfg.resize_shortest, cfg.interpolation), cfg.size)


def preprocess_image(img: Image.Image, cfg: ImageConfig) -> np.ndarray:
    """One decoded RGB image -> float32 [C,C,3] (HWC; :func:`stack_layout` makes the batch layout)."""
    return to_normalized_array(crop_image(img, cfg), cfg.mean, cfg.std)


def stack_layout(arrays: Sequence[np.ndarray], layout: str) -> np.ndarray:
    """List of [C,C,3] -> float32 [N,C,C,3] (NHWC) or [N,3,C,C] (NCHW), C-contiguous."""
    batch = np.stack(arrays, axis=0)  # [N,H,W,3]
    if layout == "NCHW":
        batch = np.ascontiguousarray(batch.transpose(0, 3, 1, 2))  # [N,3,H,W]
    elif layout != "NHWC":
        raise ValueError(f"layout: expected 'NHWC' or 'NCHW', got {layout!r}")
    return batch


def crop_bytes(img: Image.Image, cfg: ImageConfig) -> np.ndarray:
    """Decoded RGB image -> uint8 [C,C,3] after resize + centre crop (the part worth running in threads:
    Pillow releases the GIL while resizing).

    The crop is a view of the resized image's array (the same pixels as :func:`center_crop`, without Pillow's
    copy of the window); the config guarantees ``resize_shortest >= size``, the padded path is kept for safety.
    """
    resized = resize_shortest(img, cfg.resize_shortest, cfg.interpolation)
    c = cfg.size
    if resized.width < c or resized.height < c:
        return _rgb_bytes(center_crop(resized, c))
    left, top = crop_box(resized.width, resized.height, c)
    return _rgb_bytes(resized)[top : top + c, left : left + c]  # [C,C,3] view


def pixel_shape(cfg: ImageConfig) -> tuple[int, int, int]:
    """One image's shape in the graph input: (C,C,3) for NHWC, (3,C,C) for NCHW."""
    if cfg.layout not in ("NHWC", "NCHW"):
        raise ValueError(f"layout: expected 'NHWC' or 'NCHW', got {cfg.layout!r}")
    c = cfg.size
    return (c, c, 3) if cfg.layout == "NHWC" else (3, c, c)


def normalize_into(crop: np.ndarray, lut: np.ndarray, out: np.ndarray, layout: str) -> None:
    """uint8 crop [C,C,3] -> ``out`` float32 [C,C,3] (NHWC) or [3,C,C] (NCHW), by look-up in ``lut`` [3,256].

    One gather per element (``np.take`` with ``mode="clip"``: a byte is always a valid index, and "clip" writes
    into ``out`` without the buffered copy the default mode makes). When the three channels share one table
    (equal mean and std, e.g. reco-mini's 0.5) a single gather covers the whole crop. Several times faster than
    the three float32 passes divide-subtract-divide or a fancy-indexed ``lut[channels, crop]`` (timings:
    docs/encoders.md); the values are the same bits.
    """
    if layout == "NCHW":
        for ch in range(3):
            np.take(lut[ch], crop[:, :, ch], out=out[ch], mode="clip")  # [C,C] <- lut[ch, crop[y,x,ch]]
    elif layout == "NHWC":
        if (lut[1:] == lut[0]).all():
            np.take(lut[0], crop, out=out, mode="clip")  # [C,C,3] <- lut[0, crop[y,x,ch]]
        else:
            pix, flat = crop.reshape(-1, 3), out.reshape(-1, 3)  # [C*C,3] views
            for ch in range(3):
                np.take(lut[ch], pix[:, ch], out=flat[:, ch], mode="clip")
    else:
        raise ValueError(f"layout: expected 'NHWC' or 'NCHW', got {layout!r}")


def normalize_batch(crops: Sequence[np.ndarray], cfg: ImageConfig) -> np.ndarray:
    """uint8 crops [C,C,3] -> the image graph's input tensor (float32, ``cfg.layout``), via :func:`normalize_lut`
    straight into the batch buffer in its final layout (:func:`normalize_into`)."""
    shape = pixel_shape(cfg)
    lut = normalize_lut(cfg.mean, cfg.std)  # [3,256]
    n, c = len(crops), cfg.size
    out = np.empty((n, *shape), dtype=np.float32)  # [n,C,C,3] or [n,3,C,C]
    for i, a in enumerate(crops):
        if a.shape != (c, c, 3) or a.dtype != np.uint8:
            raise ValueError(f"crop {i}: expected uint8 [{c},{c},3], got {a.dtype} {a.shape}")
        normalize_into(a, lut, out[i], cfg.layout)
    return out


def preprocess_batch(images: Sequence[Image.Image], cfg: ImageConfig) -> np.ndarray:
    """Decoded RGB images -> the image graph's input tensor (float32, ``cfg.layout``).

    Same values as stacking :func:`preprocess_image` (tested bit for bit), computed by table look-up.
    """
    return normalize_batch([crop_bytes(im, cfg) for im in images], cfg)
