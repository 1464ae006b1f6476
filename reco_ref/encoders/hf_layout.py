"""The common Hugging Face ONNX layout of CLIP, loaded through an ordinary ``encoder.json``.

Optimum / ``transformers`` exports of ``CLIPVisionModelWithProjection`` and ``CLIPTextModelWithProjection`` are
two graphs::

    vision_model.onnx   pixel_values [N,3,S,S] float32          -> image_embeds [N,D] (+ last_hidden_state)
    text_model.onnx     input_ids, attention_mask [N,L] int64   -> text_embeds  [N,D] (+ last_hidden_state)

plus ``preprocessor_config.json`` (size, crop, mean/std, resample) and ``config.json``.  Nothing in the loader is
special to them: the projection and EOT pooling are inside the graphs, so the config says ``pooling: "none"``
and names the graph inputs/outputs.  :func:`hf_clip_config` writes that config from the folder's own files.

Known difference (from our reading of ``transformers``; not verified here, it is not installed): Hugging Face's
``CLIPImageProcessor`` centre-crops with ``(h - C) // 2`` (floor) where torchvision rounds half to even; when the long side minus the crop is odd the crop window differs by one
pixel.  This loader follows torchvision (what OpenAI CLIP and open_clip evaluate with).  The tokenizer is the
OpenAI CLIP BPE (``clip_bpe``), which is the vocabulary of the OpenAI CLIP checkpoints on the Hub.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import EncoderConfigError
from ..io import atomic_write_json, sha256_file
from .config import parse_config

OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]
_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}


def _read_json(path: Path) -> dict:
    """An optional JSON object file: absent -> {}; anything else that is not a JSON object -> one named error
    (a folder, a device, a pipe or a broken link in its place is refused, not read as "absent": the defaults
    would then silently describe another model)."""
    from ..paths import file_problem

    if not path.exists() and not path.is_symlink():
        return {}
    problem = file_problem(path)
    if problem:
        raise EncoderConfigError(f"{path}: {problem}")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EncoderConfigError(f"{path}: not valid JSON ({exc})") from None
    except RecursionError:
        raise EncoderConfigError(f"{path}: not valid JSON (nested too deeply)") from None
    if not isinstance(obj, dict):
        raise EncoderConfigError(f"{path}: expected a JSON object, found {type(obj).__name__}")
    return obj


def _edge(value, key: str, path: Path) -> int:
    """HF sizes are an int or a dict (shortest_edge / height+width)."""
    def whole(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    if whole(value):
        return value
    if isinstance(value, dict):
        if whole(value.get("shortest_edge")):
            return value["shortest_edge"]
        if value.get("height") == value.get("width") and whole(value.get("height")):
            return value["height"]
    raise EncoderConfigError(f"{path}: field '{key}': expected an int, {{'shortest_edge': n}} or a square height/width, found {value!r:.80}")


def _session(onnx_path: Path):
    """A CPU session of a graph, or one named error (a damaged or foreign file is not a bug)."""
    from .graphs import make_session

    return make_session(onnx_path, None, ["CPUExecutionProvider"])


def _output_dim(onnx_path: Path, output: str) -> int | None:
    sess = _session(onnx_path)
    for o in sess.get_outputs():
        if o.name == output:
            d = o.shape[-1]
            return d if isinstance(d, int) else None
    raise EncoderConfigError(f"{onnx_path}: no output named {output!r} (outputs: {[o.name for o in sess.get_outputs()]})")


def _input_names(onnx_path: Path) -> list[str]:
    return [i.name for i in _session(onnx_path).get_inputs()]


def hf_clip_config(folder: str | Path, *, vision: str = "vision_model.onnx", text: str = "text_model.onnx",
                   name: str | None = None) -> dict:
    """Build (and validate) the ``encoder.json`` dict for a Hugging Face ONNX CLIP folder."""
    from ..paths import file_problem

    folder = Path(folder)
    for f in (vision, text):
        problem = file_problem(folder / f)
        if problem:
            raise EncoderConfigError(f"{folder / f}: {'graph file not found' if problem == 'no such file' else problem}")
    pp_path = folder / "preprocessor_config.json"
    pp = _read_json(pp_path)
    model_cfg = _read_json(folder / "config.json")
    crop = _edge(pp.get("crop_size", 224), "crop_size", pp_path)
    shortest = _edge(pp.get("size", crop), "size", pp_path)
    resample = pp.get("resample", 3)
    if isinstance(resample, bool) or not isinstance(resample, int) or resample not in _PIL_RESAMPLE:
        raise EncoderConfigError(f"{pp_path}: field 'resample': expected a PIL filter id in {sorted(_PIL_RESAMPLE)}, found {resample!r:.80}")
    dim = _output_dim(folder / vision, "image_embeds") or model_cfg.get("projection_dim")
    if not isinstance(dim, int):
        raise EncoderConfigError(f"{folder}: embed dim unknown (image_embeds has a symbolic last dim and config.json has no projection_dim)")
    text_inputs = _input_names(folder / text)
    text_cfg = model_cfg.get("text_config", {})
    context = text_cfg.get("max_position_embeddings", 77) if isinstance(text_cfg, dict) else None
    if not isinstance(context, int) or isinstance(context, bool) or context < 1:
        raise EncoderConfigError(f"{folder / 'config.json'}: field 'text_config.max_position_embeddings': expected a "
                                 f"positive integer, found {context!r:.80}")
    for key in ("image_mean", "image_std"):
        if key in pp and not isinstance(pp[key], list):
            raise EncoderConfigError(f"{pp_path}: field '{key}': expected a list of 3 numbers, found {pp[key]!r:.80}")
    cfg = {
        "format_version": 1,
        "name": name or folder.resolve().name,
        "embed_dim": dim,
        "image": {
            "onnx": vision, "input": "pixel_values", "layout": "NCHW", "size": crop, "resize_shortest": shortest,
            "interpolation": _PIL_RESAMPLE[resample],
            "mean": list(pp.get("image_mean", OPENAI_MEAN)), "std": list(pp.get("image_std", OPENAI_STD)),
            "output": "image_embeds", "key_output": None, "normalize": True, "alpha": "drop",
        },
        "text": {
            "onnx": text, "tokenizer": {"kind": "clip_bpe", "file": None}, "context_length": int(context),
            "inputs": {"input_ids": "input_ids",
                       "attention_mask": "attention_mask" if "attention_mask" in text_inputs else None,
                       "token_type_ids": None},
            "output": "text_embeds", "pooling": "none", "normalize": True,
        },
        "sha256": {vision: sha256_file(folder / vision), text: sha256_file(folder / text)},
        "source": "Hugging Face ONNX CLIP layout (reco_ref.encoders.hf_layout)",
    }
    parse_config(cfg, str(folder / "encoder.json"))
    return cfg


def write_hf_clip_config(folder: str | Path, **kwargs) -> dict:
    """:func:`hf_clip_config`, written to ``folder/encoder.json``."""
    cfg = hf_clip_config(folder, **kwargs)
    atomic_write_json(Path(folder) / "encoder.json", cfg)
    return cfg
