"""Preprocessing re-stated without torchvision: size rounding, crop rounding and padding, float arithmetic, layout.

The bit-exact comparison with open_clip's own transform is in test_export_clip.py (``-m slow``).
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from reco_ref.encoders.config import parse_config
from reco_ref.encoders.preprocess import (
    center_crop,
    crop_box,
    preprocess_batch,
    resize_shortest,
    resized_size,
    to_normalized_array,
)


@given(st.integers(1, 5000), st.integers(1, 5000), st.integers(1, 1024))
@settings(max_examples=300, deadline=None)
def test_resized_size_is_exact_floor(w, h, s):
    """torchvision truncates ``s * long / short`` computed in float; that equals the exact floor here."""
    nw, nh = resized_size(w, h, s)
    short, long = min(w, h), max(w, h)
    want_long = (Fraction(s) * long / short).__floor__()
    assert (nw, nh) == ((s, want_long) if w <= h else (want_long, s))


@pytest.mark.parametrize(
    "w, h, s, want",
    [(640, 480, 224, (298, 224)), (480, 640, 224, (224, 298)), (224, 224, 224, (224, 224)), (300, 301, 224, (224, 224)),
     (160, 160, 256, (256, 256)), (333, 1001, 224, (224, 673))],
)
def test_resized_size_examples(w, h, s, want):
    assert resized_size(w, h, s) == want


@pytest.mark.parametrize("w, crop, left", [(224, 224, 0), (225, 224, 0), (226, 224, 1), (227, 224, 2), (229, 224, 2), (231, 224, 4)])
def test_crop_rounds_half_to_even(w, crop, left):
    """(w - crop)/2 = 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, 3.5 -> 4 (Python round, as torchvision)."""
    assert crop_box(w, 300, crop)[0] == left


def test_center_crop_matches_numpy(rng):
    a = rng.integers(0, 256, (231, 300, 3), dtype=np.uint8)
    out = np.asarray(center_crop(Image.fromarray(a), 224))
    top, left = int(round(7 / 2)), int(round(76 / 2))
    assert np.array_equal(out, a[top : top + 224, left : left + 224])


def test_center_crop_pads_with_zeros_like_torchvision(rng):
    a = rng.integers(1, 256, (5, 8, 3), dtype=np.uint8)
    out = np.asarray(center_crop(Image.fromarray(a), 10))  # pad l=(10-8)//2=1 r=1, t=(10-5)//2=2 b=3
    want = np.zeros((10, 10, 3), np.uint8)
    want[2:7, 1:9] = a
    assert np.array_equal(out, want)


def test_resize_unchanged_when_already_at_size(rng):
    img = Image.fromarray(rng.integers(0, 256, (224, 300, 3), dtype=np.uint8))
    assert resize_shortest(img, 224) is img


def test_normalisation_is_float32_sub_then_div(rng):
    a = rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    x = to_normalized_array(Image.fromarray(a), mean, std)
    assert x.dtype == np.float32 and x.shape == (6, 7, 3)
    want = (a / 255.0 - np.array(mean)) / np.array(std)  # float64
    np.testing.assert_allclose(x, want, rtol=0, atol=2e-6)


@pytest.mark.oracle
def test_normalisation_bit_identical_to_torch_totensor_normalize(rng):
    """torchvision ToTensor + Normalize are ``byte.float().div(255)`` then ``sub_(mean).div_(std)``."""
    torch = pytest.importorskip("torch", reason="torch (oracle extra) not installed")
    a = rng.integers(0, 256, (33, 17, 3), dtype=np.uint8)
    mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    t = torch.from_numpy(a).permute(2, 0, 1).contiguous().to(torch.float32).div(255)
    t = t.sub_(torch.as_tensor(mean)[:, None, None]).div_(torch.as_tensor(std)[:, None, None])
    ours = to_normalized_array(Image.fromarray(a), mean, std).transpose(2, 0, 1)
    assert np.array_equal(ours, t.numpy())


def _cfg(layout, mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.4)):
    return parse_config({
        "format_version": 1, "name": "p", "embed_dim": 4,
        "image": {"onnx": "i.onnx", "input": "x", "layout": layout, "size": 32, "resize_shortest": 40,
                  "interpolation": "bicubic", "mean": list(mean), "std": list(std), "output": "y"},
        "text": {"onnx": "t.onnx", "tokenizer": {"kind": "clip_bpe", "file": None}, "context_length": 8,
                 "inputs": {"input_ids": "ids"}, "output": "z", "pooling": "none"},
    }).image


def test_layouts_are_transposes(rng):
    ims = [Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)) for _ in range(3)]
    nhwc, nchw = preprocess_batch(ims, _cfg("NHWC")), preprocess_batch(ims, _cfg("NCHW"))
    assert nhwc.shape == (3, 32, 32, 3) and nchw.shape == (3, 3, 32, 32)
    assert nchw.flags["C_CONTIGUOUS"] and np.array_equal(nchw, nhwc.transpose(0, 3, 1, 2))


def test_pipeline_equals_manual_steps(rng):
    a = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    img = Image.fromarray(a)
    cfg = _cfg("NHWC")
    resized = img.resize((56, 40), Image.Resampling.BICUBIC)  # int(40*70/50) = 56
    l, t = int(round((56 - 32) / 2.0)), int(round((40 - 32) / 2.0))
    crop = np.asarray(resized)[t : t + 32, l : l + 32].astype(np.float32) / np.float32(255)
    want = (crop - np.float32([0.5, 0.4, 0.3])) / np.float32([0.2, 0.3, 0.4])
    assert np.array_equal(preprocess_batch([img], cfg)[0], want)


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
@pytest.mark.parametrize("uniform", [False, True], ids=["per-channel", "one-table"])
def test_lut_batch_bit_identical_to_stated_arithmetic(rng, layout, uniform):
    """preprocess_batch's table look-up == stacking preprocess_image (the plain float32 statement), bit for bit,
    with three channel tables and with the one-table shortcut (equal mean and std, as reco-mini's); the crop
    is a view of the resized image's array there, a Pillow crop in preprocess_image."""
    from reco_ref.encoders.preprocess import normalize_lut, preprocess_image, stack_layout

    mean_std = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)) if uniform else ((0.5, 0.4, 0.3), (0.2, 0.3, 0.4))
    cfg = _cfg(layout, *mean_std)
    ims = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(50, 70), (41, 33), (32, 32)]]
    assert np.array_equal(preprocess_batch(ims, cfg), stack_layout([preprocess_image(im, cfg) for im in ims], layout))
    every_byte = Image.fromarray(np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2))
    lut = normalize_lut(cfg.mean, cfg.std)
    from reco_ref.encoders.preprocess import to_normalized_array

    assert np.array_equal(lut.T, to_normalized_array(every_byte, cfg.mean, cfg.std)[0])
