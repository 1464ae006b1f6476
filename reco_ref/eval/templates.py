r"""Prompt templates for zero-shot classification and the class embeddings they give (docs/reco.md §4).

.. math::

    t_c = \mathrm{normalize}\Big(\frac{1}{J} \sum_{j=1}^{J} \mathrm{normalize}\big(f_T(\mathrm{template}_j(c))\big)\Big)
    \qquad t_c : [D]

as LAION's clip_benchmark builds its zero-shot classifier (normalise each prompt's embedding, average, normalise
again). ::

    from reco_ref.eval.templates import resolve_templates, class_embeddings
    name, templates = resolve_templates(None, "../shared/data/flowers102/manifest.csv")   # ("flowers", (...))
    t = class_embeddings(encoder, class_names, templates)                                  # [C, D] unit rows

Template sets (``{}`` is replaced by the class name; a template holds it exactly once, as a plain field: see
:mod:`reco_ref.template_fmt`):

* ``flowers`` — the one template CLIP's authors published for Oxford Flowers-102;
* ``birds`` — the one template CLIP's authors published for Birdsnap (a bird-species set, used here for CUB);
* ``generic`` — the seven ImageNet templates CLIP's authors published as their selected ensemble;
* ``single`` — ``"a photo of a {}."``, the caption template this project's dataset memories are built with.

The set is chosen *before* looking at any result (never tuned on a test split): by the dataset folder's name
(``flower`` → ``flowers``; ``cub`` or ``bird`` → ``birds``), otherwise ``generic``; ``--templates`` overrides
it with a set name or a text file holding one template per line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import RecoError
from ..template_fmt import CLASS_FIELDS, check_templates, fill_class, parse_class_template  # noqa: F401 (re-exported)

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "flowers": ("a photo of a {}, a type of flower.",),
    "birds": ("a photo of a {}, a type of bird.",),
    "generic": (
        "itap of a {}.",
        "a bad photo of the {}.",
        "a origami {}.",
        "a photo of the large {}.",
        "a {} in a video game.",
        "art of the {}.",
        "a photo of the small {}.",
    ),
    "single": ("a photo of a {}.",),
}

#: substring of a dataset folder's lower-cased name → template set (first match wins)
DATASET_HINTS: tuple[tuple[str, str], ...] = (("flower", "flowers"), ("cub", "birds"), ("bird", "birds"))


def dataset_template_set(manifest: str | os.PathLike | None) -> str:
    """The template set named for a dataset manifest (by its folder's name), else ``"generic"``."""
    if manifest is None:
        return "generic"
    p = Path(manifest)
    folder = (p if p.is_dir() else p.parent).resolve().name.lower()
    for hint, name in DATASET_HINTS:
        if hint in folder:
            return name
    return "generic"


def read_template_file(path: str | os.PathLike) -> tuple[str, ...]:
    """One template per non-empty line of a UTF-8 text file (lines starting with ``#`` are comments)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise RecoError(f"{path}: template file is not UTF-8 text") from None
    return check_templates([s.strip() for s in lines if s.strip() and not s.lstrip().startswith("#")], str(path))


def resolve_templates(spec: str | None, manifest: str | os.PathLike | None = None) -> tuple[str, tuple[str, ...]]:
    """``(name, templates)`` for ``spec``: None/``"auto"`` (by dataset), a set name, or a template file path.

    Raises
    ------
    RecoError  an unknown name that is not a file either; a bad template file
    """
    if spec is None or spec == "auto":
        name = dataset_template_set(manifest)
        return name, TEMPLATE_SETS[name]
    if spec in TEMPLATE_SETS:
        return spec, TEMPLATE_SETS[spec]
    if Path(spec).is_file():
        return str(spec), read_template_file(spec)
    raise RecoError(f"templates: {spec!r} is neither a template set ({', '.join(sorted(TEMPLATE_SETS))}, auto) "
                    "nor a file of templates (one per line, each with '{}')")


def class_embeddings(encoder: Any, class_names: list[str], templates: tuple[str, ...] | list[str], *,
                     batch_size: int = 256) -> np.ndarray:
    r"""Zero-shot class embeddings: normalised mean of the normalised template embeddings.

    Parameters
    ----------
    encoder : anything with ``encode_texts(list[str], batch_size=) -> [n, D]``
    class_names : C names
    templates : J templates, each with one ``{}``

    Returns
    -------
    float32 [C, D], unit rows
    """
    pieces = [parse_class_template(t) for t in check_templates(templates)]
    if not class_names:
        raise RecoError("class_names: expected at least one class")
    C, J = len(class_names), len(pieces)
    texts = [fill_class(p, c) for c in class_names for p in pieces]  # C*J prompts, class-major
    emb = np.asarray(encoder.encode_texts(texts, batch_size=batch_size), np.float64)  # [C*J, D]
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    mean = emb.reshape(C, J, -1).mean(axis=1)  # [C, D]
    return (mean / np.linalg.norm(mean, axis=1, keepdims=True)).astype(np.float32)
