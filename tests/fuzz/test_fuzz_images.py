"""Fuzz image decoding: degenerate shapes, bit depths, modes, formats, truncation, bombs, broken links.

In-process: every generated image decodes to 8-bit RGB and crops to the encoder input, or raises
ImageDecodeError naming the file.  Through ``reco-ref encode`` (reco-mini, a subprocess capped at
3 GiB of address space): the run succeeds, lists each refused image on one ``skipped:`` line, and
embeds every image that decoded — bombs and 20000x1 strips are refused from their headers.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from fuzz_lib import call, check_cli, peak_below, record, run_cli, tree, assert_unchanged
from image_gen import write_cases

from reco_ref.encoders.images import decode_image
from reco_ref.encoders.preprocess import crop_bytes
from reco_ref.errors import ImageDecodeError

ENCODE_LIMIT = 3 << 30  # reco-mini's ONNX Runtime session maps ~1 GiB of address space by itself


class _Cfg:  # the geometry part of reco-mini's ImageConfig
    resize_shortest, size, interpolation = 224, 224, "bicubic"


def _decode_and_crop(path: Path):
    img = decode_image(path)
    a = crop_bytes(img, _Cfg)
    assert a.shape == (224, 224, 3) and a.dtype == np.uint8
    return a


def _in_process(folder: Path, kinds: dict[str, str]) -> None:
    for name, kind in sorted(kinds.items()):
        with peak_below(64 << 20):
            outcome, msg = call("images: decode + crop (in-process)", _decode_and_crop, folder / name)
        if kind in ("bomb", "aspect", "link"):
            assert outcome == "error" and name in msg, (name, msg)


def test_degenerate_images_in_process(tmp_path):
    _in_process(tmp_path, write_cases(tmp_path, 60, seed=3))


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(8))
def test_degenerate_images_in_process_full(tmp_path, seed):
    _in_process(tmp_path, write_cases(tmp_path, 150, seed=100 + seed))


def _through_encode(tmp_path: Path, n: int, seed: int) -> None:
    folder = tmp_path / "imgs"
    kinds = write_cases(folder, n, seed)
    before = tree(tmp_path)
    out = tmp_path / "emb.npy"
    p = run_cli("encode", "--images", folder, "--out", out, "--no-progress", limit=ENCODE_LIMIT, timeout=600)
    assert check_cli(p, "images: reco-ref encode (reco-mini)") == "ok", p.stderr[-2000:]
    assert_unchanged(before, tree(tmp_path), "encode")
    skipped = {Path(ln.split(": ", 2)[1]).name for ln in p.stderr.splitlines() if ln.startswith("skipped: ")}
    for name, kind in kinds.items():
        if kind in ("bomb", "aspect", "link", "garbage"):
            assert name in skipped, (name, p.stderr[-1500:])
        record("images: per image via encode", "refused" if name in skipped else "embedded")
    emb = np.load(out)
    assert emb.shape == (len(kinds) - len(skipped), 768) and np.isfinite(emb).all()
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-3)


def test_encode_cli_on_degenerate_images(tmp_path):
    _through_encode(tmp_path, 30, seed=5)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(4))
def test_encode_cli_on_degenerate_images_full(tmp_path, seed):
    _through_encode(tmp_path, 120, seed=200 + seed)


def test_encode_cli_arguments(tmp_path):
    """One image file for --images (accepted), --out naming a folder, and a non-UTF-8 list file."""
    from PIL import Image

    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "one.png")
    (tmp_path / "list.txt").write_bytes(b"caf\xe9.png\n")
    p = run_cli("encode", "--images", tmp_path / "one.png", "--out", tmp_path / "one.npy", "--no-progress",
                limit=ENCODE_LIMIT)
    assert check_cli(p, "images: encode arguments") == "ok" and np.load(tmp_path / "one.npy").shape == (1, 768)
    p = run_cli("encode", "--images", tmp_path / "one.png", "--out", tmp_path, "--no-progress", limit=ENCODE_LIMIT)
    assert check_cli(p, "images: encode arguments") == "error" and "is a folder" in p.stderr
    p = run_cli("encode", "--images", tmp_path / "list.txt", "--out", tmp_path / "l.npy", "--no-progress",
                limit=ENCODE_LIMIT)
    assert check_cli(p, "images: encode arguments") == "error"


def test_decode_rejects_non_images_by_type():
    with pytest.raises(TypeError):
        decode_image(123)
    rnd = random.Random(0)
    for _ in range(20):
        with pytest.raises(ImageDecodeError):
            decode_image(Path("/nonexistent") / f"{rnd.random()}.png")
