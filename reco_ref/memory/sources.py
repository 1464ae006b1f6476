"""Where the (image, caption) pairs of a memory come from: CSV, JSONL, dataset manifests, caption folders.

Every reader returns a list of *items*, one dict per input pair, in a stable order::

    {"image": absolute path (str), "caption": str | None, "source": path as written in the input,
     "label": int | None, "split": str | None, "tags": str | None}

``caption=None`` marks a pair whose caption is missing (e.g. an image without its sidecar ``.txt``);
the build reports it in ``failures.jsonl`` instead of dropping it.  The order is the row order of the
memory (minus failures), and :func:`items_digest` hashes it so a resumed build can prove it is
continuing the same input.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

# the one CSV and manifest reader (a shared helper: eval, train and classify read manifests through it too)
from ..datasets import MANIFEST_COLUMNS, read_table, read_utf8
from ..errors import MemoryFormatError
from ..io import list_files, require_file
from ..template_fmt import Pieces, fill_template, parse_template

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")


def _image_path(base: Path, image: Any, where: str, allow_outside: bool) -> Path:
    """``image`` (as written in a pairs file at ``base``) -> absolute path, refusing ones outside ``base``.

    Policy: a pairs file may only name images inside its own folder (relative paths that stay below it
    after ``..`` is folded lexically).  Absolute paths and ``../`` escapes are refused unless
    ``allow_outside=True`` (``--allow-outside-paths``): a pairs file from elsewhere must not make the
    tool read, and copy captions beside, arbitrary files of the machine it runs on.
    """
    if not isinstance(image, str) or not image.strip() or "\0" in image:
        raise MemoryFormatError(f"{where}: field 'image' must be a non-empty path string, found {image!r}")
    rel = Path(image)
    full = Path(os.path.normpath(base / rel))
    if not allow_outside and (rel.is_absolute() or not (full == base or base in full.parents)):
        raise MemoryFormatError(
            f"{where}: image path {image!r} lies outside the pairs file's folder {base}; pairs may only name "
            "images below their own folder (pass --allow-outside-paths / allow_outside=True to accept it)")
    return full


LABEL_MIN, LABEL_MAX = -2**63, 2**63 - 1  # SQLite's INTEGER: a label outside overflows at the commit


def _label(value: Any, where: str) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise MemoryFormatError(f"{where}: field 'label' must be an integer, found {value!r:.80}")
    try:
        label = int(value)
    except ValueError:
        raise MemoryFormatError(f"{where}: field 'label' must be an integer, found {value!r:.80}") from None
    check_label(label, where)
    return label


def check_label(label: Any, where: str) -> None:
    """Refuse an integer label outside [-2**63, 2**63 - 1] (the metadata database stores 64-bit integers)."""
    if isinstance(label, int) and not isinstance(label, bool) and not LABEL_MIN <= label <= LABEL_MAX:
        shown = str(label) if len(str(label)) <= 40 else f"{str(label)[:20]}…({len(str(label))} digits)"
        raise MemoryFormatError(f"{where}: label {shown} is outside the integer range [-2**63, 2**63 - 1] "
                                "that the metadata database stores")


def check_item_labels(items: list[dict]) -> None:
    """The labels of items handed to a build by a Python caller (the readers check their own with :func:`_label`);
    run before anything is written, so a bad label leaves no half build behind."""
    for i, it in enumerate(items):
        label = it.get("label") if isinstance(it, dict) else None
        check_label(label, f"item {i} ({str(it.get('source'))!r:.200})" if isinstance(it, dict) else f"item {i}")


def _text(value: Any, field: str, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise MemoryFormatError(f"{where}: field {field!r} must be a string, found {type(value).__name__} {value!r:.40}")
    return value


def _caption(value: Any, where: str) -> str | None:
    """A caption, or None when it is missing, empty or whitespace (the build reports those as failures)."""
    text = _text(value, "caption", where)
    return text if text is not None and text.strip() else None


def _item(image: Path, caption: str | None, source: str, label=None, split=None, tags=None) -> dict:
    return {"image": str(image), "caption": caption, "source": source, "label": label, "split": split or None,
            "tags": tags or None}


def _read_utf8(path: Path) -> str:
    """The text of ``path`` (UTF-8, a BOM allowed), or an error naming the file and the offending byte."""
    return read_utf8(path, MemoryFormatError)


def check_template(template: str, columns: Iterable[str], where: str) -> Pieces:
    """Parse a caption template whose fields must be plain column names of the file (:mod:`reco_ref.template_fmt`):
    a malformed one, a positional ``{}``, a format spec (``{class_name:>900000000}`` built 3.7 GB per row), a
    conversion, attribute or index access, or a column the file does not have is refused, naming the field."""
    cols = list(columns)
    return parse_template(template, cols, what="caption template", error=MemoryFormatError,
                          expected=f"a column of {where} ({', '.join(cols)})")


def require_pairs_file(path: Path) -> None:
    """A pairs file must be a regular file: missing -> "pairs file not found"; a link to ``/dev/zero``, a pipe
    or a device -> "not a regular file" (:func:`reco_ref.io.require_file`)."""
    if not path.exists() and not path.is_symlink():
        raise FileNotFoundError(f"pairs file not found: {path}")
    require_file(path)


def read_pairs_csv(path: str | Path, *, split: str | None = None, caption_template: str | None = None,
                   allow_outside: bool = False) -> list[dict]:
    """Read a pairs CSV (``image,caption`` [+ label, split, tags]) or a dataset manifest: :func:`iter_pairs_csv`
    collected."""
    return list(iter_pairs_csv(path, split=split, caption_template=caption_template, allow_outside=allow_outside))


def iter_pairs_csv(path: str | Path, *, split: str | None = None, caption_template: str | None = None,
                   allow_outside: bool = False) -> Iterator[dict]:
    """The items of a pairs CSV (``image,caption`` [+ label, split, tags]) or a dataset manifest.

    A dataset manifest (columns ``file,label,class_name,split``, as ``../shared/data/*/manifest.csv``)
    gets its captions from ``caption_template`` (e.g. ``"a photo of a {class_name}."``; default that
    one), and ``split`` keeps only rows of that split.  Image paths are relative to the CSV's folder and
    must stay inside it unless ``allow_outside=True``.  The file must be UTF-8 (a BOM is fine); labels
    must be integers; empty or whitespace captions become ``None`` (reported as failures by the build).
    """
    path = Path(path)
    require_pairs_file(path)
    base = path.parent.resolve()
    cols, rows = read_table(path, error=MemoryFormatError)  # UTF-8, CSV grammar, field size and count: one line each

    def where(line: int) -> str:
        return f"{path}: row {line}"

    if "image" in cols and "caption" in cols:
        for line, r in rows:
            if split is not None and r.get("split") != split:
                continue
            yield _item(_image_path(base, r["image"], where(line), allow_outside),
                        _caption(r["caption"], where(line)), r["image"], _label(r.get("label"), where(line)),
                        r.get("split"), r.get("tags"))
        return
    if all(c in cols for c in MANIFEST_COLUMNS):
        template = caption_template or "a photo of a {class_name}."
        pieces = check_template(template, cols, str(path))
        found = False
        for line, r in rows:
            if split is not None and r["split"] != split:
                continue
            caption = fill_template(pieces, r)  # plain fields only: the caption is the template's text plus the row's
            found = True
            yield _item(_image_path(base, r["file"], where(line), allow_outside), _caption(caption, where(line)),
                        r["file"], _label(r["label"], where(line)), r["split"])
        if split is not None and not found:
            splits = sorted({str(r["split"]) for _, r in rows})
            raise MemoryFormatError(f"{path}: no rows with split {split!r} (splits present: {splits})")
        return
    raise MemoryFormatError(
        f"{path}: columns {list(cols)} are neither a pairs CSV (image,caption) "
        f"nor a dataset manifest ({','.join(MANIFEST_COLUMNS)})"
    )


def read_pairs_jsonl(path: str | Path, *, split: str | None = None, allow_outside: bool = False) -> list[dict]:
    """Read JSON lines ``{"image": ..., "caption": ..., ["label", "split", "tags"]}`` (paths relative to the file)."""
    return list(iter_pairs_jsonl(path, split=split, allow_outside=allow_outside))


def iter_pairs_jsonl(path: str | Path, *, split: str | None = None, allow_outside: bool = False) -> Iterator[dict]:
    """The items of a JSON-lines pairs file, one at a time (:func:`read_pairs_jsonl`)."""
    path = Path(path)
    require_pairs_file(path)
    base = path.parent.resolve()
    for lineno, line in enumerate(_read_utf8(path).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            r = json.loads(line)
        except (ValueError, RecursionError) as exc:
            raise MemoryFormatError(f"{where}: not valid JSON ({type(exc).__name__}: {exc})") from None
        if not isinstance(r, dict) or "image" not in r:
            raise MemoryFormatError(f"{where}: expected a JSON object with 'image', found {type(r).__name__}")
        sp = _text(r.get("split"), "split", where)
        if split is not None and sp != split:
            continue
        tags = r.get("tags")
        if isinstance(tags, list) and all(isinstance(t, (str, int)) for t in tags):
            tags = ",".join(map(str, tags))
        tags = _text(tags, "tags", where)
        yield _item(_image_path(base, r["image"], where, allow_outside), _caption(r.get("caption"), where),
                    r["image"], _label(r.get("label"), where), sp, tags)


def read_caption_folder(folder: str | Path, suffixes: Iterable[str] = IMAGE_SUFFIXES) -> list[dict]:
    """Every image under ``folder`` (sorted) with the caption from its sidecar ``<stem>.txt``.

    Images without a sidecar, or with an empty one, get ``caption=None`` (reported as failures by the
    build, never dropped); a sidecar that is not UTF-8 is an error naming it; a symbolic-link loop is an
    error naming the link (:func:`reco_ref.io.list_files`).
    """
    return list(iter_caption_folder(folder, suffixes))


def iter_caption_folder(folder: str | Path, suffixes: Iterable[str] = IMAGE_SUFFIXES) -> Iterator[dict]:
    """The items of a caption folder, one at a time (:func:`read_caption_folder`)."""
    root = Path(folder).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a directory")
    for p in list_files(root, suffixes):
        side = p.with_suffix(".txt")
        caption = _caption(_read_utf8(side).strip(), str(side)) if side.is_file() else None
        yield _item(p, caption, str(p.relative_to(root)))


def iter_pairs(path: str | Path, *, split: str | None = None, caption_template: str | None = None,
               allow_outside: bool = False) -> Iterator[dict]:
    """The items of ``path``, one at a time, in row order; what :func:`read_pairs` collects.

    Dispatch on what ``path`` is: folder (sidecar captions), ``.jsonl``, else CSV/manifest.
    """
    path = Path(path)
    if path.is_dir():
        return iter_caption_folder(path)
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        return iter_pairs_jsonl(path, split=split, allow_outside=allow_outside)
    return iter_pairs_csv(path, split=split, caption_template=caption_template, allow_outside=allow_outside)


def read_pairs(path: str | Path, *, split: str | None = None, caption_template: str | None = None,
               allow_outside: bool = False) -> list[dict]:
    """Dispatch on what ``path`` is: folder (sidecar captions), ``.jsonl``, else CSV/manifest."""
    return list(iter_pairs(path, split=split, caption_template=caption_template, allow_outside=allow_outside))


def read_pairs_range(path: str | Path, lo: int, hi: int, **kwargs: Any) -> list[dict]:
    """Items ``lo..hi-1`` of ``path`` (``kwargs`` as :func:`read_pairs`): what one task of a sharded build reads.

    Only the range is kept; the items before it are read and checked on the way (the shared CSV reader,
    :func:`reco_ref.datasets.read_table`, parses the whole file: this bounds the items held, not the text).
    """
    return list(itertools.islice(iter_pairs(path, **kwargs), int(lo), int(hi)))


def scan_pairs(path: str | Path, *, head: int = 1000, **kwargs: Any) -> tuple[int, bool, list[dict]]:
    """One pass over ``path`` holding no more than ``head`` items: ``(number of items, whether any caption can be
    embedded, the first head items)``: what a sharded build's client needs (ranges, the caption check, the
    estimate) without the item list."""
    n, any_caption, first = 0, False, []
    for it in iter_pairs(path, **kwargs):
        if n < head:
            first.append(it)
        any_caption = any_caption or (isinstance(it.get("caption"), str) and bool(it["caption"].strip()))
        n += 1
    return n, any_caption, first


def items_digest(items: list[dict]) -> str:
    """sha256 over the canonical JSON of the items (what a resumed build must match)."""
    h = hashlib.sha256()
    for it in items:
        h.update(json.dumps(it, sort_keys=True).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()
