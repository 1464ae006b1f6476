"""Export an OpenCLIP / OpenAI CLIP model to the project's ONNX pair + ``encoder.json``.

Needs the optional extra ``clip-export`` (torch, open_clip_torch, onnx); nothing here is imported at run time
(the room :mod:`reco_ref.export`). The exported folder is loaded at run time by :func:`reco_ref.encoders.load`.
Run it where the weights are::

    reco-ref export-clip --model ViT-B-32 --pretrained openai --out weights/clip-vit-b-32
    reco-ref export-clip --model ViT-B-32 --pretrained /path/to/open_clip_checkpoint.pt --out my-clip

What the graphs hold (choices, documented):

* ``image.onnx``: ``pixels [N,3,S,S] float32 -> image_embeds [N,D]`` = ``encode_image`` (ViT/ResNet tower +
  projection) followed by L2 normalisation.  Preprocessing stays in Python (:mod:`reco_ref.encoders.preprocess`), configured
  from the model's own ``preprocess_cfg`` (shortest-side resize, centre crop, mean/std, interpolation).
* ``text.onnx``: ``input_ids [N,77] int64 -> text_embeds [N,D]`` = ``encode_text`` incl. the EOT pooling
  (``argmax`` of the ids, as CLIP) and the projection, then L2 normalisation.  Pooling is therefore inside the
  graph (config ``pooling: "none"``): one graph = one embedding, nothing to re-implement in Python.  CLIP's
  text transformer uses a causal mask only, so there is no ``attention_mask`` input; the sequence length is
  static (the positional embedding has exactly 77 rows).
* The export checks itself: ONNX Runtime's output on a random batch must match the torch forward to
  ``atol`` (default 1e-4), else :class:`EncoderConfigError`; the measured max |diff| goes into the config's
  ``description``.

Only models with the OpenAI BPE tokenizer (vocab 49408) and the "shortest" resize mode are supported; anything
else is refused with a message (their tokenizers/preprocessing are not in this package).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EncoderConfigError
from ..io import atomic_write_bytes, atomic_write_json, sha256_file
from ..encoders.config import parse_config

CLIP_VOCAB_SIZE = 49408
CLIP_EOT_ID = 49407
CLIP_SOT_ID = 49406
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def _require_torch():
    try:
        import torch
    except ImportError:  # pragma: no cover - exercised only without torch
        raise EncoderConfigError("export-clip needs torch: pip install 'reco_ref[clip-export]'") from None
    return torch


def _towers(model):
    """torch modules wrapping ``encode_image`` / ``encode_text`` with L2 normalisation at the end."""
    torch = _require_torch()

    class ImageTower(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, pixels):  # [N,3,S,S] -> [N,D]
            y = self.m.encode_image(pixels)
            return y / y.norm(dim=-1, keepdim=True)

    class TextTower(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids):  # [N,L] int64 -> [N,D]
            y = self.m.encode_text(input_ids)
            return y / y.norm(dim=-1, keepdim=True)

    return ImageTower(model).eval(), TextTower(model).eval()


def _onnx_export(module, args: tuple, path: Path, input_name: str, output_name: str, dynamic: dict, opset: int) -> None:
    """torch.onnx.export to bytes (TorchScript exporter; no onnxscript needed), then an atomic write."""
    import io

    torch = _require_torch()
    buf = io.BytesIO()
    kwargs: dict[str, Any] = dict(input_names=[input_name], output_names=[output_name], dynamic_axes=dynamic,
                                  opset_version=opset, do_constant_folding=True)
    mha = getattr(torch.backends, "mha", None)
    fastpath = mha.get_fastpath_enabled() if mha is not None else None
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        if mha is not None:
            # nn.MultiheadAttention's inference fast path traces to aten::_native_multi_head_attention, which has
            # no ONNX symbolic; the regular path is the same math in exportable ops
            mha.set_fastpath_enabled(False)
        try:
            try:
                torch.onnx.export(module, args, buf, dynamo=False, **kwargs)
            except TypeError:  # torch < 2.5 has no `dynamo` argument
                torch.onnx.export(module, args, buf, **kwargs)
        finally:
            if mha is not None:
                mha.set_fastpath_enabled(fastpath)
    atomic_write_bytes(path, buf.getvalue())


def _sample_ids(n: int, length: int, rng: np.random.Generator, vocab: int, sot: int, eot: int) -> np.ndarray:
    """Token ids [n,L] shaped like a tokenizer's: start, random words, end (the max id), zero padding."""
    ids = np.zeros((n, length), np.int64)
    for i in range(n):
        k = int(rng.integers(1, length - 1))
        ids[i, 0] = sot
        ids[i, 1 : k + 1] = rng.integers(1, min(sot, vocab - 2), size=k)
        ids[i, k + 1] = eot  # k + 1 <= length - 1
    return ids


def export_clip_model(model, out: str | Path, *, image_size: int, context_length: int, resize_shortest: int | None = None,
                      mean=OPENAI_MEAN, std=OPENAI_STD, interpolation: str = "bicubic", name: str = "clip",
                      vocab_size: int = CLIP_VOCAB_SIZE, sot_id: int = CLIP_SOT_ID, eot_id: int = CLIP_EOT_ID,
                      tokenizer: dict | None = None, opset: int = 17, atol: float = 1e-4, source: str = "",
                      seed: int = 0) -> dict:
    """Export any module with ``encode_image(x [N,3,S,S])`` and ``encode_text(ids [N,L])`` (both -> [N,D]).

    Writes ``out/image.onnx``, ``out/text.onnx`` and ``out/encoder.json`` (with sha256 of both graphs), then
    runs both graphs in ONNX Runtime against the torch forward on a random batch.

    Returns
    -------
    dict : the encoder.json written (``description`` holds the measured max |ONNX - torch|).
    """
    torch = _require_torch()
    import onnxruntime as ort

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    image_tower, text_tower = _towers(model)
    rng = np.random.default_rng(seed)
    pixels = rng.standard_normal((2, 3, image_size, image_size)).astype(np.float32)  # [2,3,S,S]
    ids = _sample_ids(3, context_length, rng, vocab_size, sot_id, eot_id)  # [3,L]
    with torch.no_grad():
        ref_img = image_tower(torch.from_numpy(pixels)).numpy()  # [2,D]
        ref_txt = text_tower(torch.from_numpy(ids)).numpy()  # [3,D]
    dim = int(ref_img.shape[1])
    if ref_txt.shape[1] != dim:
        raise EncoderConfigError(f"{name}: image embeddings have dim {dim} but text embeddings {ref_txt.shape[1]}")

    _onnx_export(image_tower, (torch.from_numpy(pixels),), out / "image.onnx", "pixels", "image_embeds",
                 {"pixels": {0: "N"}, "image_embeds": {0: "N"}}, opset)
    _onnx_export(text_tower, (torch.from_numpy(ids),), out / "text.onnx", "input_ids", "text_embeds",
                 {"input_ids": {0: "N"}, "text_embeds": {0: "N"}}, opset)

    # self-check on a batch size the trace did not see (dynamic batch must really be dynamic)
    pixels2 = rng.standard_normal((3, 3, image_size, image_size)).astype(np.float32)
    ids2 = _sample_ids(5, context_length, rng, vocab_size, sot_id, eot_id)
    with torch.no_grad():
        want_img = image_tower(torch.from_numpy(pixels2)).numpy()
        want_txt = text_tower(torch.from_numpy(ids2)).numpy()
    so = ort.SessionOptions()
    so.log_severity_level = 3
    got_img = ort.InferenceSession(str(out / "image.onnx"), so, providers=["CPUExecutionProvider"]).run(None, {"pixels": pixels2})[0]
    got_txt = ort.InferenceSession(str(out / "text.onnx"), so, providers=["CPUExecutionProvider"]).run(None, {"input_ids": ids2})[0]
    err_img = float(np.abs(got_img - want_img).max())
    err_txt = float(np.abs(got_txt - want_txt).max())
    if not (err_img <= atol and err_txt <= atol):
        raise EncoderConfigError(
            f"{out}: exported graphs differ from the torch forward: image max |diff| {err_img:.3g}, "
            f"text {err_txt:.3g} (expected <= {atol})"
        )

    cfg = {
        "format_version": 1,
        "name": name,
        "embed_dim": dim,
        "image": {
            "onnx": "image.onnx", "input": "pixels", "layout": "NCHW", "size": int(image_size),
            "resize_shortest": int(resize_shortest or image_size), "interpolation": interpolation,
            "mean": [float(m) for m in mean], "std": [float(s) for s in std],
            "output": "image_embeds", "key_output": None, "normalize": True,
            "exif_transpose": True, "alpha": "drop",
        },
        "text": {
            "onnx": "text.onnx", "tokenizer": tokenizer or {"kind": "clip_bpe", "file": None},
            "context_length": int(context_length),
            "inputs": {"input_ids": "input_ids", "attention_mask": None, "token_type_ids": None},
            "output": "text_embeds", "pooling": "none", "normalize": True,
        },
        "sha256": {"image.onnx": sha256_file(out / "image.onnx"), "text.onnx": sha256_file(out / "text.onnx")},
        "description": (f"exported by reco_ref.export.clip (opset {opset}); ONNX Runtime vs torch max |diff|: "
                        f"image {err_img:.3g}, text {err_txt:.3g}"),
        "source": source,
    }
    parse_config(cfg, str(out / "encoder.json"))
    atomic_write_json(out / "encoder.json", cfg)
    return cfg


def open_clip_settings(model, tokenizer=None) -> dict:
    """Preprocessing and text settings of an open_clip model, refusing what this package cannot reproduce."""
    pp = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    size = pp.get("size", getattr(model.visual, "image_size", 224))
    if isinstance(size, (tuple, list)):
        if len(set(size)) != 1:
            raise EncoderConfigError(f"open_clip model: non-square image size {size} is not supported")
        size = size[0]
    mode = pp.get("resize_mode", "shortest")
    if mode != "shortest":
        raise EncoderConfigError(f"open_clip model: resize_mode {mode!r} is not supported (only 'shortest')")
    interpolation = pp.get("interpolation", "bicubic")
    if interpolation not in ("bicubic", "bilinear"):
        raise EncoderConfigError(f"open_clip model: interpolation {interpolation!r} is not supported")
    vocab = int(getattr(model, "vocab_size", CLIP_VOCAB_SIZE))
    if vocab != CLIP_VOCAB_SIZE or (tokenizer is not None and type(tokenizer).__name__ != "SimpleTokenizer"):
        raise EncoderConfigError(
            f"open_clip model: tokenizer {type(tokenizer).__name__ if tokenizer is not None else '?'} with vocab {vocab} "
            f"is not the OpenAI CLIP BPE (vocab {CLIP_VOCAB_SIZE}); only CLIP-BPE models can be exported"
        )
    pool = getattr(model, "text_pool_type", "argmax")
    if pool != "argmax":
        raise EncoderConfigError(f"open_clip model: text pool type {pool!r} is not supported (only CLIP's 'argmax')")
    return {
        "image_size": int(size), "resize_shortest": int(size), "interpolation": interpolation,
        "mean": tuple(pp.get("mean", OPENAI_MEAN)), "std": tuple(pp.get("std", OPENAI_STD)),
        "context_length": int(getattr(model, "context_length", 77)),
    }


def export_open_clip(model_name: str, pretrained: str | None, out: str | Path, *, name: str | None = None,
                     opset: int = 17, seed: int = 0, atol: float = 1e-4) -> dict:
    """``open_clip.create_model(model_name, pretrained=pretrained)`` -> ``out/`` (see module docstring)."""
    torch = _require_torch()
    try:
        import open_clip
    except ImportError:
        raise EncoderConfigError("export-clip needs open_clip_torch: pip install 'reco_ref[clip-export]'") from None
    model_cfg = open_clip.get_model_config(model_name) or {}
    hf_tok = (model_cfg.get("text_cfg") or {}).get("hf_tokenizer_name")
    if hf_tok:  # refuse before anything is fetched: such models do not use the OpenAI BPE
        raise EncoderConfigError(f"open_clip model {model_name!r} uses the Hugging Face tokenizer {hf_tok!r}; only CLIP-BPE models can be exported")
    torch.manual_seed(seed)
    model = open_clip.create_model(model_name, pretrained=pretrained)
    model.eval()
    settings = open_clip_settings(model, open_clip.get_tokenizer(model_name))
    tag = pretrained if pretrained is None or not Path(str(pretrained)).exists() else Path(pretrained).name
    default_name = f"{model_name.lower()}-{tag or f'random{seed}'}"
    source = f"open_clip {getattr(open_clip, '__version__', '?')}: create_model({model_name!r}, pretrained={pretrained!r})"
    return export_clip_model(model, out, name=name or default_name, opset=opset, atol=atol, source=source, seed=seed, **settings)
