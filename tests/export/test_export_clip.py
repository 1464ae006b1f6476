"""CLIP export: the ONNX pair must reproduce the torch model, and our preprocessing + BPE must reproduce open_clip.

* default run (needs torch only): a tiny module with open_clip's interface (``encode_image`` / ``encode_text``
  with causal attention and EOT argmax pooling) goes through the same export code path and loader.
* ``-m slow`` (needs open_clip_torch, i.e. torchvision too): OpenCLIP ViT-B-32, random init (seeded),
  exported and compared with open_clip's own preprocess, tokenizer and forward.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch", reason="torch (the oracle extra) is not installed")
pytest.importorskip("onnx", reason="onnx is needed by torch.onnx.export")

from reco_ref.encoders import load  # noqa: E402
from reco_ref.export.clip import export_clip_model  # noqa: E402
from reco_ref.encoders.images import decode_image  # noqa: E402
from reco_ref.encoders.preprocess import preprocess_batch  # noqa: E402
from reco_ref.tokenizers import ClipBPE  # noqa: E402

TEXTS = [
    "a photo of a dog.",
    "A Photo Of A CAT!!",
    "",
    "the   quick brown fox\tjumps over\nthe lazy dog",
    "caf\u00e9 na\u00efve r\u00e9sum\u00e9 &amp; co",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8 and emoji \U0001F600\U0001F44D",
    "a very long caption " * 30,  # truncated at 77 with the end token kept
]


def _synthetic_images(rng) -> list[Image.Image]:
    """Odd sizes and aspect ratios (rounding in resize and crop), RGB and greyscale."""
    sizes = [(160, 160), (225, 224), (227, 300), (301, 97), (97, 301), (640, 479), (224, 224), (50, 40), (1001, 333)]
    out = []
    for i, (w, h) in enumerate(sizes):
        a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        a[: h // 2] = (a[: h // 2] // 4) + np.uint8(i * 20)  # some structure, not only noise
        img = Image.fromarray(a, "RGB")
        out.append(img.convert("L") if i % 4 == 3 else img)
    return out


class TinyClip(torch.nn.Module):
    """open_clip's interface in miniature: conv patches -> linear; tokens + causal attention -> EOT -> projection."""

    def __init__(self, size=32, width=16, dim=8, vocab=49408, ctx=77):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, width, 8, stride=8)
        self.proj = torch.nn.Linear(width, dim)
        self.tok = torch.nn.Embedding(vocab, width)
        self.pos = torch.nn.Parameter(torch.randn(ctx, width) * 0.1)
        self.attn = torch.nn.MultiheadAttention(width, 2, batch_first=True)
        self.tproj = torch.nn.Parameter(torch.randn(width, dim))
        self.register_buffer("mask", torch.full((ctx, ctx), float("-inf")).triu(1))

    def encode_image(self, x):  # [N,3,S,S] -> [N,D]
        return self.proj(self.conv(x).mean(dim=(2, 3)))

    def encode_text(self, ids):  # [N,L] -> [N,D]
        x = self.tok(ids) + self.pos
        x = x + self.attn(x, x, x, attn_mask=self.mask, need_weights=False)[0]
        x = x[torch.arange(x.shape[0]), ids.argmax(dim=-1)]
        return x @ self.tproj


def _unit(t):
    return torch.nn.functional.normalize(t, dim=-1).numpy()


def test_tiny_export_roundtrip(tmp_path, rng):
    """Same code path as a real CLIP: export, self-check, load with the loader, compare with torch."""
    torch.manual_seed(0)
    model = TinyClip().eval()
    cfg = export_clip_model(model, tmp_path, image_size=32, context_length=77, resize_shortest=36, name="tiny-clip")
    assert cfg["text"]["pooling"] == "none" and cfg["image"]["layout"] == "NCHW"
    enc = load(tmp_path, threads=1)
    assert enc.dim == 8 and enc.name == "tiny-clip" and enc.key_dim is None

    images = _synthetic_images(rng)
    got = enc.encode_images(images, batch_size=4)  # [N,8]
    pixels = preprocess_batch([decode_image(im, alpha="drop") for im in images], enc.config.image)  # [N,3,32,32]
    with torch.no_grad():
        want = _unit(model.encode_image(torch.from_numpy(pixels)))
    np.testing.assert_allclose(got, want, atol=1e-5)

    ids, _ = ClipBPE().encode_batch(TEXTS, 77)
    with torch.no_grad():
        want_t = _unit(model.encode_text(torch.from_numpy(np.asarray(ids, np.int64))))
    np.testing.assert_allclose(enc.encode_texts(TEXTS, batch_size=3), want_t, atol=1e-5)


def test_export_refuses_a_wrong_graph(tmp_path, monkeypatch):
    """The self-check is real: a graph that differs from torch beyond atol is an error."""
    from reco_ref.errors import EncoderConfigError

    torch.manual_seed(0)
    with pytest.raises(EncoderConfigError, match="differ from the torch forward"):
        export_clip_model(TinyClip().eval(), tmp_path, image_size=32, context_length=77, atol=-1.0)


# ---------------------------------------------------------------------------------------------- slow oracle
@pytest.mark.slow
@pytest.mark.oracle
def test_open_clip_vit_b32_parity(tmp_path, rng):
    """OpenCLIP ViT-B-32 (pretrained=None, seeded): ONNX == open_clip forward <= 1e-4; preprocess and
    tokenizer ids identical."""
    open_clip = pytest.importorskip("open_clip", reason="open_clip_torch (and torchvision) not installed")
    from reco_ref.export.clip import export_open_clip

    cfg = export_open_clip("ViT-B-32", None, tmp_path, seed=0)
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    model.eval()
    tok = open_clip.get_tokenizer("ViT-B-32")
    enc = load(tmp_path)

    images = _synthetic_images(rng)
    shared = Path(os.environ.get("RECO_REF_SHARED_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))
    for sub in ("flowers102", "cub100"):
        files = sorted((shared / sub / "images").rglob("*.jpg"))[:4] if (shared / sub).is_dir() else []
        images += [Image.open(f) for f in files]

    # 1. preprocessing: bit-identical tensors
    ours = preprocess_batch([decode_image(im, alpha="drop") for im in images], enc.config.image)  # [N,3,224,224]
    theirs = torch.stack([preprocess(im) for im in images]).numpy()
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    assert np.array_equal(ours, theirs), f"max |diff| {np.abs(ours - theirs).max()}"

    # 2. tokenizer: identical ids (incl. truncation keeping the end token)
    ids, _ = ClipBPE().encode_batch(TEXTS, 77)
    assert np.array_equal(np.asarray(ids), tok(TEXTS).numpy())

    # 3. forward: ONNX (through the loader, from PIL images and strings) vs open_clip
    with torch.no_grad():
        want_img = model.encode_image(torch.from_numpy(theirs), normalize=True).numpy()
        want_txt = model.encode_text(tok(TEXTS), normalize=True).numpy()
    got_img = enc.encode_images(images, batch_size=8)
    got_txt = enc.encode_texts(TEXTS)
    err_img, err_txt = float(np.abs(got_img - want_img).max()), float(np.abs(got_txt - want_txt).max())
    print(f"\nViT-B-32 export: {len(images)} images max|diff| {err_img:.3g}; {len(TEXTS)} texts max|diff| {err_txt:.3g}; "
          f"preprocess identical on {len(images)} images; {cfg['description']}")
    assert err_img <= 1e-4 and err_txt <= 1e-4
