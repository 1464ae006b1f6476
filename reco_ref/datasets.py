"""The one reader of dataset manifests and of the CSV tables the package takes as input.

A *dataset manifest* is the ``../shared/data`` format: a UTF-8 CSV with columns ``file,label,class_name,split``,
files relative to the manifest's folder, labels ``0..C-1`` each naming one class. ::

    from reco_ref.datasets import read_split, read_table
    ds = read_split("../shared/data/flowers102/manifest.csv", "test")   # Split(files, labels [N], class_names)
    cols, rows = read_table("pairs.csv", error=MemoryFormatError)      # rows: [(line, {column: text})]

Every table (a manifest, a pairs CSV of ``build-memory``, the demo's ``pairs.csv``) goes through
:func:`read_table`, so each is refused the same way, in one line naming the file and the line: not UTF-8 (the byte
and its line), not a CSV, a field over :data:`MAX_FIELD`, a row with more or fewer fields than the header. What a
caller's rows must then hold is its own: :func:`read_split` requires the manifest's classes (``DatasetError``);
:mod:`reco_ref.memory.sources` turns rows into memory items (``MemoryFormatError``, labels any 64-bit integer).

A shared helper: imports no room, so the memory (which builds from manifests), training (``--val-classes``),
evaluation and the classifier all read manifests here.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from .errors import DatasetError, RecoError
from .paths import file_problem

__all__ = ["MANIFEST_COLUMNS", "MAX_FIELD", "Split", "read_utf8", "read_table", "read_manifest_rows",
           "class_labels", "read_split", "labels_by_source"]

MANIFEST_COLUMNS = ("file", "label", "class_name", "split")
MAX_FIELD = 1 << 20  # longest accepted CSV field (bytes): a caption is a sentence, a path a line, not a file

#: a table row: (the line where the row ends, {column: field})
Row = tuple[int, dict[str, str]]


@dataclass(frozen=True)
class Split:
    """Rows of one split of a dataset manifest.

    Attributes
    ----------
    manifest : Path — the manifest file
    split : str | None — the split name (None = every row)
    files : list[str] — absolute image paths, in manifest order
    labels : int64 [N]
    class_names : list[str] — every class of the manifest (all splits), indexed by label
    """

    manifest: Path
    split: str | None
    files: list[str]
    labels: np.ndarray
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.files)

    @property
    def n_classes(self) -> int:
        return len(self.class_names)


def read_utf8(path: str | os.PathLike, error: type[RecoError] = DatasetError) -> str:
    """The text of ``path`` (UTF-8, a BOM allowed), or ``error`` naming the file, the offending byte and its line."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise error(f"{path}: is a folder, expected a text file") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise error(f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}); re-save it as UTF-8") \
            from None


def read_table(path: str | os.PathLike, *, error: type[RecoError] = DatasetError) -> tuple[tuple[str, ...], list[Row]]:
    """The header and rows of the CSV file ``path`` (already known to be a regular file).

    Returns
    -------
    columns : tuple of str — the header (empty for an empty file)
    rows : list of (line, dict) — each non-blank row keyed by column, with the line where it ends (a quoted field
        may span lines)

    Raises
    ------
    error  not UTF-8; not a readable CSV, or a field over :data:`MAX_FIELD` bytes (naming the line); a row whose
           field count differs from the header's (csv would pad a short row with None and file extra fields under
           None: an unquoted comma in a caption silently cut it and an extra column silently vanished)
    """
    path = Path(path)
    text = read_utf8(path, error)
    old_limit = csv.field_size_limit()
    reader = csv.reader(text.splitlines(keepends=True))
    try:
        csv.field_size_limit(MAX_FIELD)
        cols = tuple(next(reader, ()))
        raw = [(reader.line_num, r) for r in reader if r]  # blank lines skipped, as csv.DictReader does
    except csv.Error as exc:
        raise error(f"{path}: not a readable CSV (line {reader.line_num}: {exc})") from None
    finally:
        csv.field_size_limit(old_limit)
    for line, r in raw:
        if len(r) != len(cols):
            raise error(f"{path}: line {line}: {len(r)} fields, but the header has {len(cols)} {list(cols)!r:.300}; "
                        'a field holding a comma must be quoted (e.g. "a dog, running")')
    return cols, [(line, dict(zip(cols, r))) for line, r in raw]


def _manifest_path(path: str | os.PathLike) -> Path:
    """``path`` or the ``manifest.csv`` of the folder ``path``, checked to be a regular file."""
    path = Path(path)
    if path.is_dir():
        path = path / "manifest.csv"
    if not path.is_file():
        problem = file_problem(path)
        if problem != "no such file":  # a device, a pipe, a broken link: named as such, not "not found"
            raise DatasetError(f"{path}: {problem}; expected a dataset manifest CSV")
        raise FileNotFoundError(f"dataset manifest not found: {path} (expected a CSV with columns "
                                f"{','.join(MANIFEST_COLUMNS)})")
    return path


def _manifest_table(path: str | os.PathLike) -> tuple[Path, list[Row]]:
    path = _manifest_path(path)
    cols, rows = read_table(path)
    missing = [c for c in MANIFEST_COLUMNS if c not in cols]
    if missing:
        raise DatasetError(f"{path}: columns {list(cols)}, missing {missing} (a dataset manifest has "
                           f"{','.join(MANIFEST_COLUMNS)})")
    return path, rows


def read_manifest_rows(path: str | os.PathLike) -> list[dict[str, str]]:
    """All rows of a dataset manifest (a file, or a folder holding ``manifest.csv``) as dicts, after checking the
    file, its encoding, its CSV grammar and its columns (:func:`read_table`). The labels are not checked: see
    :func:`read_split`."""
    return [r for _, r in _manifest_table(path)[1]]


def class_labels(rows: list[Row], path: str | os.PathLike, *, name: str = "class_name",
                 required: Iterable[str] = ()) -> tuple[np.ndarray, list[str]]:
    """The labels of ``rows`` and the class each names, checked: ``labels`` int64 [N], ``class_names`` [C].

    Every label is an integer ``>= 0`` naming one non-empty class (column ``name``) on every row, the labels are
    ``0..C-1`` without gaps, and the columns ``required`` are non-empty. :class:`DatasetError` naming the file and
    the line otherwise.
    """
    names: dict[int, str] = {}
    labels = np.empty(len(rows), np.int64)
    for i, (line, r) in enumerate(rows):
        try:
            label = int(str(r["label"]).strip())
        except (TypeError, ValueError):
            raise DatasetError(f"{path}:{line}: label {r['label']!r:.80} is not an integer") from None
        if label < 0:
            raise DatasetError(f"{path}:{line}: label {label} is negative (labels are 0..C-1)")
        cls = (r[name] or "").strip()
        if not cls:
            raise DatasetError(f"{path}:{line}: empty {name} for label {label}")
        if names.setdefault(label, cls) != cls:
            raise DatasetError(f"{path}:{line}: label {label} names both {names[label]!r} and {cls!r}")
        for col in required:
            if not (r[col] or "").strip():
                raise DatasetError(f"{path}:{line}: empty {col!r}")
        labels[i] = label
    if sorted(names) != list(range(len(names))):
        gaps = sorted(set(range(max(names, default=-1) + 1)) - set(names))
        raise DatasetError(f"{path}: labels must be 0..C-1 without gaps; missing {gaps[:10]} ({len(names)} classes)")
    return labels, [names[c] for c in range(len(names))]


def read_split(path: str | os.PathLike, split: str | None = None) -> Split:
    """Read one split of a dataset manifest (``split=None``: all rows).

    Raises
    ------
    FileNotFoundError  no manifest at ``path`` (a manifest file, or a folder holding ``manifest.csv``)
    DatasetError       what :func:`read_table` refuses, wrong columns, a non-integer label, labels not ``0..C-1``,
                       a label naming two classes, an empty ``file``, or no row in ``split`` (the message lists
                       the splits present)
    """
    path, rows = _manifest_table(path)
    labels, class_names = class_labels(rows, path, required=("file",))
    keep = [i for i, (_, r) in enumerate(rows) if split is None or r["split"] == split]
    if not keep:
        present = sorted({r["split"] for _, r in rows})
        raise DatasetError(f"{path}: no rows with split {split!r} (splits present: {present})")
    base = path.parent.resolve()
    return Split(manifest=path, split=split, files=[str(base / rows[i][1]["file"]) for i in keep],
                 labels=labels[keep], class_names=class_names)


def labels_by_source(manifest: str | os.PathLike) -> dict[str, int]:
    """A dataset manifest's ``file`` (as written: what ``build-memory`` stores as a row's source) → label, every
    split; the labels checked as :func:`read_split` does."""
    path, rows = _manifest_table(manifest)
    labels, _ = class_labels(rows, path, required=("file",))
    return {r["file"]: int(y) for (_, r), y in zip(rows, labels)}
