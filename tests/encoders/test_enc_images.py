"""Safe image decoding: modes -> 8-bit RGB, EXIF, truncated/corrupt/oversized files named, batch error collection."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from reco_ref.encoders.images import decode_image, decode_many, list_images
from reco_ref.errors import ImageDecodeError


def _png_header_only(path, width, height):
    """A PNG whose IHDR claims width x height but whose pixel data is garbage: only a header-level check can
    refuse it without decoding."""

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"garbage") + chunk(b"IEND", b""))


def test_rgb_passthrough_and_path(tmp_path, rng):
    a = rng.integers(0, 256, (7, 9, 3), dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / "x.png")
    out = decode_image(tmp_path / "x.png")
    assert out.mode == "RGB" and np.array_equal(np.asarray(out), a)
    assert np.array_equal(np.asarray(decode_image(str(tmp_path / "x.png"))), a)


def test_alpha_white_vs_drop():
    a = np.zeros((2, 2, 4), np.uint8)
    a[..., 0] = 200  # red under a fully transparent alpha
    a[0, 0, 3] = 255  # one opaque pixel
    img = Image.fromarray(a, "RGBA")
    white = np.asarray(decode_image(img, alpha="white"))
    drop = np.asarray(decode_image(img, alpha="drop"))
    assert white[0, 0].tolist() == [200, 0, 0] and white[1, 1].tolist() == [255, 255, 255]
    assert drop[1, 1].tolist() == [200, 0, 0]  # Pillow convert("RGB"): alpha ignored


@pytest.mark.parametrize("mode", ["L", "1", "P", "LA", "CMYK", "YCbCr", "I;16", "I", "F", "RGBA", "PA"])
def test_every_mode_becomes_8bit_rgb(mode, rng):
    base = Image.fromarray(rng.integers(0, 256, (5, 6, 3), dtype=np.uint8), "RGB")
    if mode in ("I;16", "I", "F"):
        img = Image.fromarray((rng.integers(0, 65536, (5, 6))).astype({"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]))
        if mode == "I;16":
            img = img.convert("I;16") if img.mode != "I;16" else img
    elif mode == "PA":
        img = base.convert("P").convert("PA")
    else:
        img = base.convert(mode)
    out = decode_image(img)
    assert out.mode == "RGB" and out.size == (6, 5)
    assert np.asarray(out).dtype == np.uint8


def test_16bit_grey_is_scaled_not_clipped():
    a = np.array([[0, 32768, 65535]], np.uint16)
    img = Image.fromarray(a)
    assert img.mode == "I;16"
    out = np.asarray(decode_image(img))
    assert out[0, :, 0].tolist() == [0, 128, 255]  # convert("L") would give [0, 255, 255]


def test_palette_with_transparency_composited():
    img = Image.new("P", (2, 1))
    img.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    img.putpixel((0, 0), 0)
    img.putpixel((1, 0), 1)
    img.info["transparency"] = 0
    out = np.asarray(decode_image(img, alpha="white"))
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 1].tolist() == [10, 20, 30]


def test_exif_orientation_applied(tmp_path):
    a = np.zeros((4, 8, 3), np.uint8)
    a[:, :4] = 255  # left half white
    img = Image.fromarray(a)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    img.save(tmp_path / "r.jpg", exif=exif.tobytes(), quality=100)
    out = decode_image(tmp_path / "r.jpg")
    assert out.size == (4, 8)  # transposed
    raw = decode_image(tmp_path / "r.jpg", exif_transpose=False)
    assert raw.size == (8, 4)


def test_truncated_jpeg_names_file(tmp_path, rng):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageDecodeError, match="cut.jpg"):
        decode_image(tmp_path / "cut.jpg")


def test_not_an_image_and_missing(tmp_path):
    (tmp_path / "notes.png").write_text("hello")
    with pytest.raises(ImageDecodeError, match="notes.png: cannot decode"):
        decode_image(tmp_path / "notes.png")
    with pytest.raises(ImageDecodeError, match="nope.jpg: no such image file"):
        decode_image(tmp_path / "nope.jpg")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow warns at open; we refuse
def test_size_guard_from_header_before_decoding(tmp_path):
    _png_header_only(tmp_path / "bomb.png", 10000, 10000)  # 100 MP claimed (Pillow only warns), bogus pixel data
    with pytest.raises(ImageDecodeError, match=r"bomb.png: 10000x10000 = 100000000 pixels exceeds the limit of 89478485"):
        decode_image(tmp_path / "bomb.png")
    _png_header_only(tmp_path / "huge.png", 20000, 20000)  # 400 MP: Pillow's own guard fires at open
    with pytest.raises(ImageDecodeError, match="huge.png"):
        decode_image(tmp_path / "huge.png")
    with pytest.raises(ImageDecodeError, match="exceeds the limit of 100"):
        decode_image(Image.new("RGB", (11, 10)), max_pixels=100)
    assert decode_image(Image.new("RGB", (10, 10)), max_pixels=100).size == (10, 10)


def test_one_guard_decides_not_pillows(tmp_path, monkeypatch):
    Image.new("RGB", (40, 40)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow would error above 2x this ...
    assert decode_image(tmp_path / "big.png", max_pixels=10**9).size == (40, 40)  # ... but max_pixels decides
    assert Image.MAX_IMAGE_PIXELS == 10**9
    with pytest.raises(ImageDecodeError, match=r"big.png: 40x40 = 1600 pixels exceeds the limit of 1000.*--max-pixels"):
        decode_image(tmp_path / "big.png", max_pixels=1000)


def test_aspect_ratio_guard_before_resize(tmp_path):
    Image.new("L", (20000, 1)).save(tmp_path / "strip.png")  # ~100 bytes; its resize would take GBs
    assert (tmp_path / "strip.png").stat().st_size < 1000
    with pytest.raises(ImageDecodeError, match=r"strip.png: 20000x1 has an aspect ratio above 50:1"):
        decode_image(tmp_path / "strip.png")
    assert decode_image(Image.new("RGB", (500, 10))).size == (500, 10)  # 50:1 is fine
    from reco_ref.encoders.preprocess import resize_shortest  # the resize itself refuses too
    with pytest.raises(ImageDecodeError, match="aspect ratio too extreme"):
        resize_shortest(Image.new("RGB", (5000, 1)), 224)


def test_decode_many_collects_and_goes_on(tmp_path):
    Image.new("RGB", (3, 3)).save(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"\x89PNG broken")
    Image.new("L", (3, 3)).save(tmp_path / "c.png")
    items = [tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png", tmp_path / "d.png"]
    images, ok, errors = decode_many(items, on_error="skip", start=10)
    assert ok == [10, 12] and len(images) == 2
    assert [e.index for e in errors] == [11, 13]
    assert errors[0].item.endswith("b.png") and "b.png" in errors[0].message
    with pytest.raises(ImageDecodeError, match="b.png"):
        decode_many(items)
    with pytest.raises(ValueError):
        decode_many(items, on_error="ignore")


def test_list_images_recursive_sorted(tmp_path):
    (tmp_path / "s").mkdir()
    for p in ("b.JPG", "a.png", "s/c.webp", "readme.txt"):
        (tmp_path / p).write_bytes(b"")
    assert [p.name for p in list_images(tmp_path)] == ["a.png", "b.JPG", "c.webp"]


def test_wrong_item_type():
    with pytest.raises(TypeError, match="ndarray"):
        decode_image(np.zeros((4, 4, 3), np.uint8))
