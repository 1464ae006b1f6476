"""Pairs inputs that used to give a silently wrong memory, or an "unexpected" error (issue 20, classes 3 and 4).

- a CSV row with more or fewer fields than the header (an unquoted comma in a caption cut it; extra
  columns were dropped) is refused, naming the line and both counts;
- a label outside SQLite's 64-bit integer range is refused by the reader (it overflowed at the commit
  and left ``.build/`` behind);
- a build that fails after it started says so to the next run (what failed, how to resume or start over);
- an image name holding a line break or another control character is refused by ``encode`` before
  anything is written (it broke the one-name-per-line ``.items.txt`` sidecar).
"""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
from fuzz_lib import check_cli, record, run_cli

from reco_ref.errors import MemoryFormatError, RecoError
from reco_ref.memory import build_memory, read_pairs

CLS = "pairs: strict fields (field count, label range)"


def _pairs(tmp_path, text: str, name: str = "pairs.csv"):
    (tmp_path / "img").mkdir(exist_ok=True)
    for f in ("a", "b"):
        (tmp_path / "img" / f"{f}.jpg").write_bytes(b"OK" + f.encode())
    (tmp_path / name).write_text(text, encoding="utf-8")
    return tmp_path / name


def _refused(path, *must, **kw):
    with pytest.raises(MemoryFormatError) as e:
        read_pairs(path, **kw)
    msg = str(e.value)
    assert "\n" not in msg and all(m in msg for m in must), msg
    record(CLS, "error")
    return msg


@pytest.mark.parametrize("text, line, found, header", [
    ("image,caption\nimg/a.jpg,a dog, running\n", 2, 3, 2),  # the unquoted comma used to cut the caption
    ("image,caption,label\nimg/a.jpg,x,1\nimg/b.jpg,y,2,extra\n", 3, 4, 3),  # an extra column used to vanish
    ("image,caption,label,split\nimg/a.jpg,x\n", 2, 2, 4),
    ("file,label,class_name,split\nimg/a.jpg,1,rose,train,extra\n", 2, 5, 4),
    ('image,caption\n"img/a.jpg","two\nlines",1\n', 3, 3, 2),  # a quoted newline: the line where the row ends
])
def test_field_count_differs_from_header(tmp_path, text, line, found, header):
    _refused(_pairs(tmp_path, text), f"line {line}", f"{found} fields", f"header has {header}", "quote")


def test_quoted_comma_keeps_the_whole_caption(tmp_path):
    items = read_pairs(_pairs(tmp_path, 'image,caption\nimg/a.jpg,"a dog, running"\nimg/b.jpg,plain\n'))
    assert [it["caption"] for it in items] == ["a dog, running", "plain"]


@pytest.mark.parametrize("label, ok", [(2**63 - 1, True), (-2**63, True), (2**63, False), (-2**63 - 1, False),
                                       (10**30, False)])
def test_label_range(tmp_path, label, ok):
    csv_path = _pairs(tmp_path, f"image,caption,label\nimg/a.jpg,x,1\nimg/b.jpg,y,{label}\n")
    jsonl = _pairs(tmp_path, json.dumps({"image": "img/b.jpg", "caption": "y", "label": label}) + "\n",
                   name="pairs.jsonl")
    for path, where in ((csv_path, "row 3"), (jsonl, "pairs.jsonl:1")):
        if ok:
            assert read_pairs(path)[-1]["label"] == label
        else:
            _refused(path, where, "label", str(label), "-2**63", "2**63")


def test_label_overflow_leaves_nothing_behind(tmp_path):
    """CLI: one line, exit 1, and no half memory (the label used to reach SQLite at the commit)."""
    path = _pairs(tmp_path, f"image,caption,label\nimg/a.jpg,x,{2**63}\nimg/b.jpg,y,1\n")
    out = tmp_path / "mem"
    p = run_cli("build-memory", "--pairs", path, "--model", "memory_testlib:fake32", "--out", out, "--no-progress")
    check_cli(p, CLS, must_fail=True)
    assert "label" in p.stderr and not (out / ".build").exists()


def test_label_overflow_from_python_items_leaves_nothing_behind(tmp_path):
    """A Python caller's items bypass the readers: the build checks labels before it writes anything."""
    from memory_testlib import FakeEncoder

    items = read_pairs(_pairs(tmp_path, "image,caption,label\nimg/a.jpg,x,1\nimg/b.jpg,y,2\n"))
    items[1]["label"] = 2**64
    with pytest.raises(MemoryFormatError, match=r"item 1 .*label 18446744073709551616 .*-2\*\*63"):
        build_memory(tmp_path / "mem", items, FakeEncoder(32), progress=False)
    assert not (tmp_path / "mem" / ".build").exists()


def test_failed_build_tells_the_next_run_what_happened(tmp_path, monkeypatch):
    """A failure after the first chunk keeps the encoded chunks (a resume reuses them) and says so: the next
    run names the failure and the way on, instead of calling it an interruption."""
    from memory_testlib import FakeEncoder

    import reco_ref.memory.build as build

    items = read_pairs(_pairs(tmp_path, "image,caption,label\nimg/a.jpg,x,1\nimg/b.jpg,y,2\n"))
    real = build.hnsw_build

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(build, "hnsw_build", full_disk)
    with pytest.raises(OSError, match="No space"):
        build_memory(tmp_path / "mem", items, FakeEncoder(32), progress=False, resume_hint="RESUME-CMD")
    monkeypatch.setattr(build, "hnsw_build", real)
    with pytest.raises(MemoryFormatError) as e:
        build_memory(tmp_path / "mem", items, FakeEncoder(32), progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "failed" in msg and "No space left on device" in msg and "RESUME-CMD" in msg, msg
    assert "delete" in msg, msg
    enc = FakeEncoder(32)
    build_memory(tmp_path / "mem", items, enc, progress=False, resume=True)
    assert enc.calls == 0 and not (tmp_path / "mem" / ".build").exists()  # the chunks were reused


def _fake_encoder():
    def encode_images(chunk, on_error="skip", with_keys=False, **kw):
        return types.SimpleNamespace(embeddings=np.eye(len(chunk), 4, dtype=np.float32),
                                     ok_index=np.arange(len(chunk)), errors=[])
    return types.SimpleNamespace(name="fake", fingerprint="0" * 64, dim=4, key_dim=None,
                                 config=types.SimpleNamespace(image=types.SimpleNamespace(key_output=None)),
                                 encode_images=encode_images)


@pytest.mark.parametrize("bad", ["a\nb.png", "a\rb.png", "a\x1bb.png", "a\u2028b.png", "a\x85b.png", "a\udcffb.png"])
def test_image_name_that_breaks_items_txt_is_refused(tmp_path, bad):
    from reco_ref.encoders.stream import encode_to_file

    names = [str(tmp_path / "ok.png"), str(tmp_path / bad)]
    with pytest.raises(RecoError) as e:
        encode_to_file(_fake_encoder(), names, tmp_path / "emb.npy", kind="images", progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "\x1b" not in msg and "item 1" in msg and ".items.txt" in msg, msg
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written, not even the parts folder
    record("encode: image names", "error")


def test_ordinary_names_round_trip_through_items_txt(tmp_path):
    from reco_ref.encoders.stream import encode_to_file

    names = [str(tmp_path / n) for n in ("a b.png", "ü,ñ.png", "#x.png", 'q"uote.png', "tab\u00a0nbsp.png")]
    encode_to_file(_fake_encoder(), names, tmp_path / "emb.npy", kind="images", progress=False)
    assert (tmp_path / "emb.items.txt").read_text(encoding="utf-8").splitlines() == names
