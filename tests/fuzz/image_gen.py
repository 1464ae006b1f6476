"""Degenerate images for the fuzz suite: shapes, bit depths, modes, formats, truncation, bombs, broken links."""

from __future__ import annotations

import io
import os
import random
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

MODES = ["1", "L", "P", "LA", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "I;16", "I", "F", "RGBX"]
FORMATS = {"png": "PNG", "tif": "TIFF", "gif": "GIF", "bmp": "BMP", "jpg": "JPEG", "webp": "WEBP", "ppm": "PPM"}
SIZES = [(1, 1), (1, 7), (7, 1), (2, 300), (300, 2), (64, 48), (3, 3), (500, 10), (10, 600)]


def png_header_only(path: Path, w: int, h: int, depth: int = 8, color: int = 2) -> None:
    """A PNG whose IHDR claims w x h (a decompression bomb's header) with a few bytes of bogus data."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, depth, color, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
                     + chunk(b"IEND", b""))


def random_image(rnd: random.Random) -> tuple[Image.Image, str]:
    mode = rnd.choice(MODES)
    w, h = rnd.choice(SIZES) if rnd.random() < 0.7 else (rnd.randint(1, 120), rnd.randint(1, 120))
    a = np.random.default_rng(rnd.randrange(2**32)).integers(0, 256, (h, w, 4), dtype=np.uint8)
    img = Image.fromarray(a, "RGBA").convert("RGB")
    try:
        img = img.convert(mode)
    except (ValueError, OSError):
        img = img.convert("L").convert(mode) if mode in ("I;16", "I", "F") else img
    ext = rnd.choice(list(FORMATS))
    return img, ext


def write_cases(folder: Path, n: int, seed: int) -> dict[str, str]:
    """Write ``n`` random images (some truncated / bit-flipped / renamed) plus fixed nasty cases; -> {name: kind}."""
    folder.mkdir(parents=True, exist_ok=True)
    rnd = random.Random(seed)
    kinds = {}
    for i in range(n):
        img, ext = random_image(rnd)
        buf = io.BytesIO()
        try:
            img.save(buf, FORMATS[ext])
        except (OSError, ValueError, KeyError):  # this format cannot hold this mode: PNG can hold most
            ext = "png"
            buf = io.BytesIO()
            try:
                img.save(buf, "PNG")
            except (OSError, ValueError):
                img.convert("RGB").save(buf, "PNG")
        data = buf.getvalue()
        damage = rnd.choice(["none", "none", "none", "truncate", "flip", "garbage"])
        if damage == "truncate":
            data = data[: rnd.randrange(1, len(data))]
        elif damage == "flip":
            b = bytearray(data)
            for _ in range(4):
                b[rnd.randrange(len(b))] ^= 1 << rnd.randrange(8)
            data = bytes(b)
        elif damage == "garbage":
            data = bytes(rnd.randrange(256) for _ in range(rnd.randint(0, 200)))
        name = f"r{i:04d}_{img.mode.replace(';', '')}_{img.size[0]}x{img.size[1]}_{damage}.{ext}"
        (folder / name).write_bytes(data)
        kinds[name] = damage
    png_header_only(folder / "bomb_100kx100k.png", 100_000, 100_000)
    png_header_only(folder / "bomb_16bit.png", 30_000, 30_000, depth=16, color=6)
    Image.new("L", (20000, 1)).save(folder / "strip_20000x1.png")
    Image.new("L", (1, 20000)).save(folder / "strip_1x20000.png")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.png").write_text("not an image")
    os.symlink(folder / "nowhere.png", folder / "broken_link.png")
    kinds.update({"bomb_100kx100k.png": "bomb", "bomb_16bit.png": "bomb", "strip_20000x1.png": "aspect",
                  "strip_1x20000.png": "aspect", "empty.jpg": "garbage", "text.png": "garbage",
                  "broken_link.png": "link"})
    return kinds
