"""Encoders: a frozen image/text encoder pair on ONNX Runtime.

Public API::

    from reco_ref.encoders import load
    enc = load("reco-mini")                     # or a folder holding encoder.json
    img = enc.encode_images(["a.jpg", pil_image])   # float32 [N, enc.dim], unit rows
    txt = enc.encode_texts(["a photo of a dog"])    # float32 [N, enc.dim], unit rows
    emb, ok_index, errors = enc.encode_images(paths, on_error="skip")

Modules: ``config`` (encoder.json schema + validation), ``images`` (safe decoding), ``preprocess`` (CLIP-exact
resize/crop/normalise), ``onnx_pair`` (the pair: load, encode texts and images, pooling, L2 norm), ``graphs``
(providers, sessions, graph checks against the config, fixed batch sizes), ``image_schedule`` (how image decoding
and the image graph share the cores), ``hf_layout`` (configs for
Hugging Face ONNX CLIP exports), ``stream`` (chunked, resumable encoding to .npy), ``cli`` (``reco-ref encode`` /
``reco-ref hf-clip-config``). Only what runs at run time lives here: exporting a CLIP model to an ONNX pair is
:mod:`reco_ref.export.clip` (needs torch), converting a TF GraphDef is ``scripts/tools/graphdef_to_onnx.py``.
"""

from .config import EncoderConfig, ImageConfig, TextConfig, parse_config, read_config
from .images import ImageError, decode_image, decode_many
from .onnx_pair import EncoderPair, SkipResult, SkipResultWithKeys, load
from .preprocess import preprocess_batch, preprocess_image

__all__ = [
    "load",
    "EncoderPair",
    "EncoderConfig",
    "ImageConfig",
    "TextConfig",
    "SkipResult",
    "SkipResultWithKeys",
    "ImageError",
    "parse_config",
    "read_config",
    "decode_image",
    "decode_many",
    "preprocess_image",
    "preprocess_batch",
]
