"""reco_ref/datasets.py: the one reader of dataset manifests and CSV tables (issue 22 item 2).

Every room that reads a manifest (memory's build from a manifest, train's ``--val-classes``, eval, the classifier,
the demo's pairs files) goes through it, so a file is refused the same way, in one line naming the file and the
line, whichever verb reads it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from reco_ref.datasets import labels_by_source, read_manifest_rows, read_split, read_table
from reco_ref.errors import DatasetError, MemoryFormatError

PKG = Path(__file__).resolve().parents[1] / "reco_ref"
HEADER = "file,label,class_name,split\n"


def _write(tmp_path: Path, text: str, name: str = "manifest.csv", encoding: str = "utf-8") -> Path:
    p = tmp_path / name
    p.write_bytes(text.encode(encoding))
    return p


def test_only_datasets_reads_csv():
    """A second CSV reader in the package is a second parser: every table goes through reco_ref.datasets."""
    readers = []
    for path in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and not node.level else []
            if "csv" in names:
                readers.append(str(path.relative_to(PKG)))
    assert readers == ["datasets.py"], f"modules reading CSV themselves (use reco_ref.datasets): {readers}"


@pytest.mark.parametrize("body, line", [
    ("a.png,0,cat,test,extra\n", 2),  # csv.DictReader filed the extra field under None and went on
    ("a.png,0,cat,test\nb.png,1\n", 3),  # ... and padded a short row with None
])
def test_a_row_with_the_wrong_field_count_is_refused_by_every_reader(tmp_path, body, line):
    from reco_ref.memory import read_pairs
    from reco_ref.train.commands import class_names_of

    p = _write(tmp_path, HEADER + body)
    msgs = []
    for read, error in ((read_split, DatasetError), (class_names_of, DatasetError), (read_pairs, MemoryFormatError)):
        with pytest.raises(error) as e:
            read(p)
        msgs.append(str(e.value))
    assert all(f"line {line}" in m and "header has 4" in m and "\n" not in m for m in msgs), msgs


def test_latin1_is_named_the_same_way_by_every_reader(tmp_path):
    from reco_ref.memory import read_pairs

    p = _write(tmp_path, HEADER + "a.png,0,caf\xe9,test\n", encoding="latin-1")
    with pytest.raises(DatasetError) as a:
        read_split(p)
    with pytest.raises(MemoryFormatError) as b:
        read_pairs(p)
    assert str(a.value) == str(b.value) == f"{p}: not UTF-8 text (byte 0xe9 on line 2); re-save it as UTF-8"


def test_train_val_classes_refuses_a_label_naming_two_classes(tmp_path):
    """train's own reader kept the first name of a label silently; the one reader refuses it, naming the line."""
    from reco_ref.train.commands import class_names_of

    p = _write(tmp_path, HEADER + "a.png,0,cat,train\nb.png,1,dog,train\nc.png,0,lynx,test\n")
    with pytest.raises(DatasetError, match=r"manifest.csv:4: label 0 names both 'cat' and 'lynx'"):
        class_names_of(p)
    assert class_names_of(_write(tmp_path, HEADER + "a.png,1,dog,test\nb.png,0,cat,train\n")) == ["cat", "dog"]


def test_errors_name_the_real_line_after_blank_lines_and_quoted_breaks(tmp_path):
    p = _write(tmp_path, HEADER + "a.png,0,cat,test\n\n\"b\n.png\",x,dog,test\n")
    with pytest.raises(DatasetError, match=r"manifest.csv:5: label 'x' is not an integer"):
        read_split(p)


def test_rows_sources_and_a_folder(tmp_path):
    p = _write(tmp_path, "\ufeff" + HEADER + "img/a.png,1,cat,test\n\nimg/b.png,0,dog,train\n")  # a BOM is fine
    assert read_manifest_rows(tmp_path) == [{"file": "img/a.png", "label": "1", "class_name": "cat", "split": "test"},
                                            {"file": "img/b.png", "label": "0", "class_name": "dog", "split": "train"}]
    assert labels_by_source(p) == {"img/a.png": 1, "img/b.png": 0}
    cols, rows = read_table(p)
    assert cols == ("file", "label", "class_name", "split") and [line for line, _ in rows] == [2, 4]
    ds = read_split(p, "train")
    assert ds.files == [str(tmp_path.resolve() / "img/b.png")] and ds.class_names == ["dog", "cat"]


def test_oversized_field_is_refused_with_its_line(tmp_path):
    p = _write(tmp_path, HEADER + "a.png,0,cat,test\nb.png,0," + "x" * (2 << 20) + ",test\n")
    with pytest.raises(DatasetError, match=r"not a readable CSV \(line 3: field larger than field limit"):
        read_split(p)


def test_demo_pairs_files_read_through_the_one_reader(tmp_path, monkeypatch):
    from reco_ref.eval.data import pairs_data

    (tmp_path / "a.png").write_bytes(b"x")
    p = _write(tmp_path, "image,caption,category,label,split\na.png,a bird,bird,0,memory\na.png,a cat,cat,1,query\n"
               "a.png,a bird,owl,0,query\n", name="pairs.csv")
    with pytest.raises(DatasetError, match=r"pairs.csv:4: label 0 names both 'bird' and 'owl'"):
        pairs_data(p, name="t", prompt="{}")
    p = _write(tmp_path, "image,caption,category,label,split\na.png,a bird,bird,0,memory\na.png,a cat,cat,1,query\n",
               name="pairs.csv")
    ds = pairs_data(p, name="t", prompt="{}")
    assert ds["class_names"] == ["bird", "cat"] and ds["query_labels"].tolist() == [1] and len(ds["memory"]) == 1
