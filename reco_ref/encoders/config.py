"""``encoder.json`` (format_version 1): the schema, its validation, and its canonical form.

An encoder pair is a folder::

    encoder.json        this config
    image.onnx          image tower   pixels [N,3,S,S] or [N,S,S,3] float32 -> [N,D] (+ optional key [N,Dk])
    text.onnx           text tower    ids/mask [N,L] int -> [N,D] (pooling "none") or [N,L,D] (pooled here)
    tokenizer.json      (WordPiece only; CLIP BPE uses the shipped vocab)

Every key is checked for presence, type and range; an unknown key is an error too (a typo such as
``"resize_shortest "`` would otherwise be silently ignored and change every embedding).  Optional keys this
module added to the contract (all with defaults, so configs written to the contract stay valid):

* ``image.key_output`` (null)        - second image output used as image->image search key
* ``image.max_pixels`` (89_478_485)  - decompression-bomb guard, as Pillow's ``Image.MAX_IMAGE_PIXELS``
* ``image.exif_transpose`` (true)    - apply the EXIF orientation before resizing
* ``image.alpha`` ("white")          - transparent pixels: composite on white, or "drop" the alpha channel
                                        (Pillow ``convert("RGB")``, what open_clip does)
* ``sha256`` ({})                    - file name -> hex digest, verified at load
* ``description`` / ``source`` (free text, ignored)
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import EncoderConfigError

FORMAT_VERSION = 1
CONFIG_NAME = "encoder.json"
PIL_MAX_IMAGE_PIXELS = 89_478_485  # Pillow's default guard: int(1024 * 1024 * 1024 // 4 // 3)

LAYOUTS = ("NHWC", "NCHW")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos")
POOLINGS = ("none", "mean", "eot", "cls")
TOKENIZER_KINDS = ("clip_bpe", "wordpiece")
ALPHA_MODES = ("white", "drop")
TEXT_INPUT_ROLES = ("input_ids", "attention_mask", "token_type_ids")


@dataclass(frozen=True)
class ImageConfig:
    onnx: str
    input: str
    layout: str
    size: int
    resize_shortest: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    output: str
    key_output: str | None = None
    normalize: bool = True
    max_pixels: int = PIL_MAX_IMAGE_PIXELS
    exif_transpose: bool = True
    alpha: str = "white"


@dataclass(frozen=True)
class TokenizerConfig:
    kind: str
    file: str | None


@dataclass(frozen=True)
class TextConfig:
    onnx: str
    tokenizer: TokenizerConfig
    context_length: int
    inputs: dict[str, str | None]  # role -> graph input name (None = the graph has no such input)
    output: str
    pooling: str
    normalize: bool = True


@dataclass(frozen=True)
class EncoderConfig:
    format_version: int
    name: str
    embed_dim: int
    image: ImageConfig
    text: TextConfig
    sha256: dict[str, str] = field(default_factory=dict)
    description: str = ""
    source: str = ""

    def files(self) -> list[str]:
        """Every file the config references, relative to its folder, in a fixed order."""
        out = [self.image.onnx, self.text.onnx]
        if self.text.tokenizer.file is not None:
            out.append(self.text.tokenizer.file)
        return out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["image"]["mean"] = list(self.image.mean)
        d["image"]["std"] = list(self.image.std)
        return d


def canonical_json(cfg: EncoderConfig) -> str:
    """The config as sorted, compact JSON (what the fingerprint hashes), without the ``sha256`` table.

    The file digests enter the fingerprint directly, so two configs differing only in whether they list
    them get the same fingerprint.
    """
    d = cfg.to_dict()
    d.pop("sha256")
    return json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


# --------------------------------------------------------------------------------------------- validation
class _Reader:
    """Typed access to one JSON object with messages naming ``file``, the dotted field, expected and found."""

    def __init__(self, obj: Any, where: str, source: str):
        self.where, self.source = where, source
        if not isinstance(obj, dict):
            self.fail("", "a JSON object", obj)
        self.obj = obj
        self.used: set[str] = set()

    def fail(self, key: str, expected: str, found: Any) -> None:
        name = f"{self.where}.{key}" if key and self.where else (key or self.where or "<top level>")
        shown = json.dumps(found) if isinstance(found, (str, int, float, bool, type(None), list)) else type(found).__name__
        if len(shown) > 80:
            shown = shown[:77] + "..."
        raise EncoderConfigError(f"{self.source}: field '{name}': expected {expected}, found {shown}")

    def get(self, key: str, default: Any = ..., *, allow_none: bool = False) -> Any:
        self.used.add(key)
        if key not in self.obj:
            if default is ...:
                raise EncoderConfigError(
                    f"{self.source}: field '{self.where + '.' if self.where else ''}{key}' is missing"
                )
            return default
        value = self.obj[key]
        if value is None and not allow_none and default is not None:
            self.fail(key, "a value (null is not allowed here)", value)
        return value

    def string(self, key: str, default: Any = ..., *, allow_none: bool = False, choices=None) -> str | None:
        v = self.get(key, default, allow_none=allow_none)
        if v is None and (allow_none or default is None):
            return None
        if not isinstance(v, str) or not v:
            self.fail(key, "a non-empty string", v)
        if choices is not None and v not in choices:
            self.fail(key, "one of " + ", ".join(repr(c) for c in choices), v)
        return v

    def integer(self, key: str, default: Any = ..., *, lo: int = 1, hi: int = 1 << 31) -> int:
        v = self.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int):
            self.fail(key, "an integer", v)
        if not lo <= v <= hi:
            self.fail(key, f"an integer in [{lo}, {hi}]", v)
        return v

    def boolean(self, key: str, default: Any = ...) -> bool:
        v = self.get(key, default)
        if not isinstance(v, bool):
            self.fail(key, "true or false", v)
        return v

    def triple(self, key: str, *, positive: bool) -> tuple[float, float, float]:
        v = self.get(key)
        ok = (
            isinstance(v, list)
            and len(v) == 3
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)
        )
        if not ok:
            self.fail(key, "a list of 3 finite numbers (R, G, B)", v)
        if positive and not all(x > 0 for x in v):
            self.fail(key, "3 numbers > 0", v)
        return (float(v[0]), float(v[1]), float(v[2]))

    def child(self, key: str) -> "_Reader":
        return _Reader(self.get(key), f"{self.where}.{key}" if self.where else key, self.source)

    def no_unknown_keys(self) -> None:
        extra = sorted(set(self.obj) - self.used)
        if extra:
            raise EncoderConfigError(
                f"{self.source}: unknown field(s) {', '.join(repr(self.where + '.' + k if self.where else k) for k in extra)}"
                f" (expected only {', '.join(sorted(self.used))})"
            )


def _relative_file(r: _Reader, key: str, *, allow_none: bool = False) -> str | None:
    v = r.string(key, None if allow_none else ..., allow_none=allow_none)
    if v is None:
        return None
    p = Path(v)
    if p.is_absolute() or ".." in p.parts:
        r.fail(key, "a file name relative to the encoder folder (no absolute path, no '..')", v)
    return v


def parse_config(obj: Any, source: str = CONFIG_NAME) -> EncoderConfig:
    """Validate a decoded ``encoder.json`` object and return the typed config.

    Raises
    ------
    EncoderConfigError
        Naming ``source``, the dotted field, what was expected and what was found.
    """
    top = _Reader(obj, "", source)
    version = top.get("format_version")
    if version != FORMAT_VERSION:
        top.fail("format_version", f"{FORMAT_VERSION} (the only version this reco_ref reads)", version)
    name = top.string("name")
    embed_dim = top.integer("embed_dim", lo=1, hi=1 << 20)

    im = top.child("image")
    size = im.integer("size", lo=8, hi=8192)
    image = ImageConfig(
        onnx=_relative_file(im, "onnx"),
        input=im.string("input"),
        layout=im.string("layout", choices=LAYOUTS),
        size=size,
        resize_shortest=im.integer("resize_shortest", lo=8, hi=16384),
        interpolation=im.string("interpolation", choices=INTERPOLATIONS),
        mean=im.triple("mean", positive=False),
        std=im.triple("std", positive=True),
        output=im.string("output"),
        key_output=im.string("key_output", None, allow_none=True),
        normalize=im.boolean("normalize", True),
        max_pixels=im.integer("max_pixels", PIL_MAX_IMAGE_PIXELS, lo=64, hi=1 << 40),
        exif_transpose=im.boolean("exif_transpose", True),
        alpha=im.string("alpha", "white", choices=ALPHA_MODES),
    )
    if image.resize_shortest < image.size:
        im.fail("resize_shortest", f">= size ({image.size}); a smaller value would crop outside the image", image.resize_shortest)
    if image.key_output is not None and image.key_output == image.output:
        im.fail("key_output", f"a graph output other than image.output ({image.output!r})", image.key_output)
    im.no_unknown_keys()

    tx = top.child("text")
    tk = tx.child("tokenizer")
    tokenizer = TokenizerConfig(kind=tk.string("kind", choices=TOKENIZER_KINDS), file=_relative_file(tk, "file", allow_none=True))
    if tokenizer.kind == "wordpiece" and tokenizer.file is None:
        tk.fail("file", "the tokenizer.json file name (WordPiece needs its vocabulary)", None)
    tk.no_unknown_keys()

    ins = tx.child("inputs")
    inputs: dict[str, str | None] = {}
    for role in TEXT_INPUT_ROLES:
        inputs[role] = ins.string(role, None, allow_none=True)
    ins.no_unknown_keys()
    if inputs["input_ids"] is None:
        ins.fail("input_ids", "the graph input name of the token ids (every text graph needs them)", None)
    named = [v for v in inputs.values() if v is not None]
    if len(set(named)) != len(named):
        ins.fail("", "distinct graph input names per role", obj["text"]["inputs"])

    text = TextConfig(
        onnx=_relative_file(tx, "onnx"),
        tokenizer=tokenizer,
        context_length=tx.integer("context_length", lo=2, hi=1 << 16),
        inputs=inputs,
        output=tx.string("output"),
        pooling=tx.string("pooling", choices=POOLINGS),
        normalize=tx.boolean("normalize", True),
    )
    tx.no_unknown_keys()

    sha = top.get("sha256", {})
    if not isinstance(sha, dict):
        top.fail("sha256", "an object mapping file name -> hex sha256", sha)
    for fname, digest in sha.items():
        if fname not in image_text_files(image, text):
            top.fail(f"sha256.{fname}", "a file the config references (" + ", ".join(image_text_files(image, text)) + ")", fname)
        if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
            top.fail(f"sha256.{fname}", "64 lowercase hex digits", digest)
    description = top.get("description", "")
    source_txt = top.get("source", "")
    for key, val in (("description", description), ("source", source_txt)):
        if not isinstance(val, str):
            top.fail(key, "a string", val)
    top.no_unknown_keys()
    return EncoderConfig(
        format_version=version, name=name, embed_dim=embed_dim, image=image, text=text, sha256=dict(sha),
        description=description, source=source_txt,
    )


def image_text_files(image: ImageConfig, text: TextConfig) -> list[str]:
    files = [image.onnx, text.onnx]
    if text.tokenizer.file is not None:
        files.append(text.tokenizer.file)
    return files


def read_config(folder: str | Path) -> EncoderConfig:
    """Read and validate ``<folder>/encoder.json``."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise EncoderConfigError(f"{path}: encoder config not found (an encoder folder holds {CONFIG_NAME} beside its ONNX graphs)")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EncoderConfigError(f"{path}: not valid JSON ({exc})") from None
    return parse_config(obj, str(path))
