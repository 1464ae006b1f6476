r"""Ship φ_I alone to an edge device: the image module's weights and the class text it is scored against.

``reco-ref query`` on an image ranks classes with (:func:`reco_ref.fusion.gated_scores`)

.. math::

    s_c = (1 - \rho)\,\langle \bar v, \bar t_c \rangle + \rho\,\langle \bar v, t_c \rangle, \qquad
    \bar v = \varphi_I(v, T^M[\mathrm{kNN}]), \quad \bar t_c = \varphi_T(t_c, V^M[\mathrm{kNN}])

where :math:`t_c` is the template class embedding and :math:`\rho` φ_I's relevance gate. Only
:math:`\bar v` and :math:`\rho` depend on the photo; :math:`t_c` and :math:`\bar t_c` depend on the class
list, the templates, the encoder, φ_T, the memory and k. So a build machine computes them once and the
device needs φ_I alone (half of the 56.7 MB weights file) plus a small class-text file:

* :func:`save_image_weights` (``reco-ref export-image-weights``) writes the image module of a RECO weights
  file as its own param set (``image.*``, ``tau``, ``meta_utf8``; no ``text.*``). Its meta gains
  ``image_only``: the source file, its SHA-256 and the digests (:func:`~reco_ref.fusion.onnx_backend.params_digest`)
  of the source's φ_I and φ_T.
* :func:`reco_ref.eval.evaluate.make_class_text` / :func:`save_class_text` (``reco-ref class-text``) write ``frozen`` t_c and
  ``refined`` t̄_c, float32 [C, D], with a JSON header that binds them to what made them: class names,
  templates, k, the encoder's fingerprint, the digests of φ_I and φ_T, and the memory's content digest
  (:func:`memory_digest`).
* :func:`load_fusion_weights` reads either a full RECO weights file or an image-only one;
  :func:`check_class_text` refuses a class-text file made for other weights, another encoder, another
  memory, another k, other class names or other templates (one line naming what differs).

``query(..., class_text=FILE)`` then gives the same top classes and scores as ``query`` with the full weights
(the same arrays: t_c and t̄_c are stored in the float32 they were computed in). Files are ``.npz`` archives
of plain numeric arrays, written atomically and read without unpickling.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ParamsFormatError, RecoError
from ..io import ArraySpec, EntryError, atomic_save_npz, load_npz, sha256_file

__all__ = ["IMAGE_ONLY_KEY", "CLASS_TEXT_FORMAT", "save_image_weights", "is_image_only", "load_image_weights",
           "load_fusion_weights", "weights_digests", "memory_digest", "class_text_arrays",
           "save_class_text", "load_class_text", "check_class_text"]

#: the meta field of an image-only weights file (what it was cut from)
IMAGE_ONLY_KEY = "image_only"
CLASS_TEXT_FORMAT = "reco_ref.class_text"
CLASS_TEXT_VERSION = 1
_HEADER = "__header__"
#: a class-text header holds names and templates: generous, and still bounded before it is read
_HEADER_MAX_BYTES = 16 << 20


# ------------------------------------------------------------------------------------------ φ_I alone
def save_image_weights(weights: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False) -> dict:
    """Write the image module φ_I of RECO weights as a weights file of its own (about half the size).

    Parameters
    ----------
    weights : RECO weights (:func:`reco_ref.reco.weights.save_reco_weights`; the shipped ``fusion.npz``)
    out : the ``.npz`` to write (atomically); refused when it exists unless ``overwrite``, and inside a memory
    overwrite : replace an existing ``out``

    Returns
    -------
    dict
        The ``image_only`` record added to the meta: ``source``, ``source_sha256``, ``phi_image_sha256``,
        ``phi_text_sha256``.
    """
    from ..fusion import save_param_set
    from ..fusion.onnx_backend import params_digest
    from ..paths import check_output_files
    from ..reco.weights import META_KEY, TAU_KEY, load_reco_weights

    check_output_files([out], overwrite=overwrite)
    w = load_reco_weights(weights)
    record = {"source": os.path.basename(os.fspath(weights)), "source_sha256": sha256_file(weights),
              "phi_image_sha256": params_digest(w.image), "phi_text_sha256": params_digest(w.text)}
    meta = dict(w.meta, **{IMAGE_ONLY_KEY: record})
    text = json.dumps(meta, sort_keys=True, allow_nan=False)
    meta_bytes = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.float32)  # as save_reco_weights
    save_param_set(out, {"image": w.image}, extras={TAU_KEY: np.array(float(w.tau), np.float64), META_KEY: meta_bytes})
    return record


def is_image_only(path: str | os.PathLike) -> bool:
    """Whether a weights file holds φ_I and no φ_T, from its zip directory alone (nothing is read or
    unpickled; an unreadable file says False and is refused by the loader with its own message)."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    return any(n.startswith("image.") for n in names) and not any(n.startswith("text.") for n in names)


def load_image_weights(path: str | os.PathLike) -> Any:
    """Load an image-only weights file (:func:`save_image_weights`) as :class:`~reco_ref.reco.weights.RecoWeights`
    with ``text=None``.

    Raises
    ------
    ParamsFormatError
        Not a param set holding exactly the module ``image`` and the extras ``tau``, ``meta_utf8``; a meta
        without its ``image_only`` record; a φ_I whose digest differs from the one recorded when it was cut.
    """
    from ..fusion import load_param_set
    from ..fusion.onnx_backend import params_digest
    from ..reco.weights import META_KEY, TAU_KEY, RecoWeights, decode_meta

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"fusion weights not found: {path}")
    modules, extras = load_param_set(path)
    if sorted(modules) != ["image"]:
        raise ParamsFormatError(f"{path}: modules {sorted(modules)}, expected ['image'] (φ_I alone)")
    if sorted(extras) != sorted((TAU_KEY, META_KEY)):
        raise ParamsFormatError(f"{path}: extras {sorted(extras)}, expected {sorted((TAU_KEY, META_KEY))}")
    if extras[TAU_KEY].shape != ():
        raise ParamsFormatError(f"{path}: entry {TAU_KEY!r} has shape {extras[TAU_KEY].shape}, expected a scalar ()")
    meta = decode_meta(path, extras[META_KEY])
    record = meta.get(IMAGE_ONLY_KEY)
    if not isinstance(record, dict) or not all(isinstance(record.get(f), str) for f in
                                               ("phi_image_sha256", "phi_text_sha256")):
        raise ParamsFormatError(f"{path}: meta field {IMAGE_ONLY_KEY!r} missing or incomplete (expected the record "
                                "written by reco-ref export-image-weights)")
    # the φ_T digest in the record is what binds a class-text file: the record must describe these φ_I arrays
    if params_digest(modules["image"]) != record["phi_image_sha256"]:
        raise ParamsFormatError(f"{path}: φ_I hashes to {params_digest(modules['image'])[:12]}…, its meta records "
                                f"{record['phi_image_sha256'][:12]}…; re-run reco-ref export-image-weights")
    return RecoWeights(image=modules["image"], text=None, tau=float(extras[TAU_KEY]), meta=meta)


def load_fusion_weights(path: str | os.PathLike) -> Any:
    """Full RECO weights (:func:`~reco_ref.reco.weights.load_reco_weights`) or φ_I alone
    (:func:`load_image_weights`, ``text=None``), whichever the file holds."""
    from ..reco.weights import load_reco_weights

    return load_image_weights(path) if is_image_only(path) else load_reco_weights(path)


def weights_digests(w: Any) -> dict:
    """``{"phi_image_sha256", "phi_text_sha256"}`` of RECO weights; for φ_I alone the φ_T digest is the one its
    meta records from the file it was cut from."""
    from ..fusion.onnx_backend import params_digest

    text = (params_digest(w.text) if w.text is not None else w.meta[IMAGE_ONLY_KEY]["phi_text_sha256"])
    return {"phi_image_sha256": params_digest(w.image), "phi_text_sha256": text}


# ------------------------------------------------------------------------------------------ class text
def memory_digest(memory: Any) -> str:
    """SHA-256 over the recorded SHA-256 of every file of a memory (each shard's, in order): it changes when any
    row, index or caption changes (an add, a rebuild), not when the folder is copied or moved. Nothing is re-hashed:
    the digests come from the manifest, which opening the memory has checked."""
    h = hashlib.sha256(b"reco_ref memory content v1|")
    for m in getattr(memory, "shards", None) or [memory]:
        files = m.manifest["files"]
        for name in sorted(files):
            h.update(f"{name}:{files[name]['sha256']}|".encode())
        h.update(b"#")
    return h.hexdigest()


def class_text_arrays(encoder: Any, weights: Any, memory: Any, class_names: list[str], templates, *, k: int,
                      backend: str = "numpy") -> tuple[np.ndarray, np.ndarray | None]:
    """``(t_c, t̄_c)`` float32 [C, D]: the template class embeddings and, with full weights, φ_T's refinement of
    them against ``memory`` (``None`` without weights). ``query`` and :func:`reco_ref.eval.evaluate.make_class_text` both call this, so
    the file holds exactly what ``query`` computes."""
    from ..reco.refine import refine
    from .templates import class_embeddings

    cls = class_embeddings(encoder, class_names, templates)  # [C,D]
    if weights is None:
        return cls, None
    if weights.text is None:
        raise RecoError("refined class text needs φ_T, and these weights hold φ_I alone: compute it where the full "
                        "weights are (reco-ref class-text) and pass --class-text FILE")
    cls_bar, _, _ = refine(weights.text, memory, cls, "text", k=k, backend=backend)  # [C,D]
    return cls, cls_bar


def save_class_text(path: str | os.PathLike, header: dict, frozen: np.ndarray, refined: np.ndarray) -> None:
    """Write a class-text file atomically: ``__header__`` (UTF-8 JSON bytes), ``frozen`` and ``refined``
    (float32 [C, D])."""
    blob = np.frombuffer(json.dumps(header, sort_keys=True, ensure_ascii=False).encode("utf-8"), np.uint8)
    atomic_save_npz(path, {_HEADER: blob, "frozen": np.ascontiguousarray(frozen, np.float32),
                           "refined": np.ascontiguousarray(refined, np.float32)})


def _bad(path, what: str) -> ParamsFormatError:
    return ParamsFormatError(f"{path}: {what} (expected a class-text file written by reco-ref class-text)")


def load_class_text(path: str | os.PathLike) -> dict:
    """Read and check a class-text file: ``{"header": dict, "frozen": [C,D], "refined": [C,D], "path": str}``.

    The header is read first and bounds what the arrays may be (C from its class names, D from its encoder), so
    their ``.npy`` headers are checked before any data is read; nothing is unpickled.

    Raises
    ------
    FileNotFoundError / ParamsFormatError
        Missing file; not this format; a header field or an array that is not what it should be (named).
    """
    path = Path(path)
    try:
        raw = load_npz(path, only=[_HEADER], expect={_HEADER: ArraySpec((None,), np.uint8, max_bytes=_HEADER_MAX_BYTES),
                                                     "frozen": ArraySpec(kind="f"), "refined": ArraySpec(kind="f")})
    except EntryError as exc:
        raise _bad(path, f"entry {exc.entry!r} {exc.reason}") from None
    except FileNotFoundError:
        raise
    except RecoError as exc:
        raise ParamsFormatError(f"{exc} (expected a class-text file written by reco-ref class-text)") from None
    if _HEADER not in raw:
        raise _bad(path, f"entry {_HEADER!r} missing")
    try:
        h = json.loads(raw[_HEADER].tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad(path, f"entry {_HEADER!r} is not UTF-8 JSON ({exc})") from None
    if not isinstance(h, dict) or h.get("format") != CLASS_TEXT_FORMAT:
        raise _bad(path, f"header field 'format' is {h.get('format') if isinstance(h, dict) else h!r:.60}")
    if h.get("format_version") != CLASS_TEXT_VERSION:
        raise _bad(path, f"header field 'format_version' is {h.get('format_version')!r}, expected {CLASS_TEXT_VERSION}")
    names = h.get("class_names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise _bad(path, "header field 'class_names' is not a non-empty list of strings")
    enc, fus, mem = h.get("encoder"), h.get("fusion"), h.get("memory")
    ok = (isinstance(enc, dict) and isinstance(enc.get("fingerprint"), str) and isinstance(enc.get("dim"), int)
          and isinstance(fus, dict)
          and all(isinstance(fus.get(f), str) for f in ("phi_image_sha256", "phi_text_sha256"))
          and isinstance(mem, dict) and isinstance(mem.get("content_sha256"), str)
          and isinstance(h.get("k"), int) and not isinstance(h.get("k"), bool) and h["k"] >= 1
          and isinstance(h.get("templates"), str) and isinstance(h.get("template_list"), list))
    if not ok:
        raise _bad(path, "header lacks one of encoder.fingerprint/dim, fusion.phi_image_sha256/phi_text_sha256, "
                         "memory.content_sha256, k, templates, template_list")
    spec = ArraySpec((len(names), enc["dim"]), np.float32)
    try:
        arrays = load_npz(path, expect={_HEADER: ArraySpec((None,), np.uint8, max_bytes=_HEADER_MAX_BYTES),
                                        "frozen": spec, "refined": spec})
    except EntryError as exc:
        raise _bad(path, f"entry {exc.entry!r} {exc.reason}") from None
    for name in ("frozen", "refined"):
        if name not in arrays:
            raise _bad(path, f"entry {name!r} missing")
        if not np.isfinite(arrays[name]).all():
            raise _bad(path, f"entry {name!r} holds NaN/inf")
    return {"header": h, "frozen": arrays["frozen"], "refined": arrays["refined"], "path": str(path)}


def check_class_text(ct: dict, *, encoder: Any = None, weights: Any = None, memory: Any = None, k: int | None = None,
                     class_names: list[str] | None = None, templates: tuple[str, ...] | None = None) -> None:
    """Refuse a class-text file that does not belong with this query (one-line :class:`RecoError`).

    Each argument given is compared with what the file was made for: the encoder's fingerprint, the weights'
    φ_I and φ_T digests (:func:`weights_digests`), the memory's content (:func:`memory_digest`), the k used
    (after capping), the class names (same list, same order) and the template list.
    """
    h, where = ct["header"], f"--class-text {ct['path']}"
    remake = "; re-run reco-ref class-text with these"
    if encoder is not None and encoder.fingerprint != h["encoder"]["fingerprint"]:
        raise RecoError(f"{where}: made with encoder {h['encoder'].get('name', '?')} (fingerprint "
                        f"{h['encoder']['fingerprint'][:12]}…), this query uses {encoder.name} "
                        f"({encoder.fingerprint[:12]}…){remake}")
    if weights is not None:
        got = weights_digests(weights)
        for side, key in (("φ_I", "phi_image_sha256"), ("φ_T", "phi_text_sha256")):
            if got[key] != h["fusion"][key]:
                raise RecoError(f"{where}: made for other fusion weights ({side} {h['fusion'][key][:12]}…, from "
                                f"{h['fusion'].get('source', '?')}), the weights given have {side} {got[key][:12]}…"
                                f"{remake}")
    if memory is not None and memory_digest(memory) != h["memory"]["content_sha256"]:
        raise RecoError(f"{where}: made against another memory ({h['memory'].get('name', '?')}, "
                        f"{h['memory'].get('rows', '?')} rows), not {Path(str(memory.root)).name} ({len(memory)} rows) "
                        f"as it is now{remake}")
    if k is not None and int(k) != h["k"]:
        raise RecoError(f"{where}: made with k = {h['k']}, this query uses k = {int(k)} (omit -k to use the file's)")
    if class_names is not None and list(class_names) != h["class_names"]:
        diff = next((i for i, (a, b) in enumerate(zip(class_names, h["class_names"])) if a != b),
                    min(len(class_names), len(h["class_names"])))
        raise RecoError(f"{where}: holds {len(h['class_names'])} class names, the query gives {len(class_names)}; "
                        f"they differ at position {diff} (omit --classes/--class-names to use the file's)")
    if templates is not None and list(templates) != h["template_list"]:
        raise RecoError(f"{where}: made with templates {h['templates']!r} ({len(h['template_list'])}), this query "
                        f"asks for {len(templates)} other templates (omit --templates to use the file's)")
