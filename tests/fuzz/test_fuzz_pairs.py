"""Fuzz the pairs readers (CSV, dataset manifest, JSONL, caption folders): encodings, BOMs, bad types, paths.

Every generated file must either read into well-formed items (image inside the file's folder, caption
None or non-blank, label int or None) or raise one named error; never another exception.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
from fuzz_lib import call, check_cli, peak_below, run_cli, tree, assert_unchanged
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reco_ref.memory import read_pairs

PATHS = ["img/a.jpg", "img/b.png", "a.jpg", "./img/a.jpg", "../a.jpg", "img/../../a.jpg", "/etc/passwd", "",
         " ", "img\\a.jpg", "img/a.jpg\x00x", "ïmg/ä.jpg", "img//a.jpg", "~/a.jpg"]
LABELS = ["", "0", "7", "-3", "one", "1.5", "1e3", " 2", "0x10", "99999999999999999999", "nan"]
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)
FIELD = st.one_of(st.sampled_from(PATHS), st.sampled_from(LABELS), TEXT, st.just('"'), st.just("a,b"),
                  st.just("x\ny"), st.just("\x00"), st.just("{class_name}"))
ENCODINGS = ["utf-8", "utf-8-sig", "latin-1", "utf-16", "cp1252", "utf-32"]
HEADERS = [["image", "caption"], ["image", "caption", "label", "split", "tags"], ["file", "label", "class_name", "split"],
           ["caption", "image"], ["img", "text"], []]


def _check_items(items, base: Path, allow_outside: bool):
    for it in items:
        assert set(it) == {"image", "caption", "source", "label", "split", "tags"}
        p = Path(it["image"])
        assert allow_outside or base.resolve() == p or base.resolve() in p.parents, it
        assert it["caption"] is None or (isinstance(it["caption"], str) and it["caption"].strip()), it
        assert it["label"] is None or (isinstance(it["label"], int) and not isinstance(it["label"], bool)), it


def _csv_bytes(header, rows, encoding, sep=","):
    def q(v):
        return '"' + v.replace('"', '""') + '"' if any(c in v for c in ',"\n') else v
    text = "\n".join(sep.join(q(v) for v in r) for r in [header] + rows) + "\n"
    return text.encode(encoding, errors="replace")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.sampled_from(HEADERS), rows=st.lists(st.lists(FIELD, min_size=0, max_size=6), max_size=6),
       encoding=st.sampled_from(ENCODINGS), template=st.sampled_from([None, "{class_name}", "{", "{x}", "{}", "a {label:d}",
                                                                      "{class_name.__class__}", "}{"]),
       allow_outside=st.booleans())
def test_csv_files(tmp_path_factory, header, rows, encoding, template, allow_outside):
    d = tmp_path_factory.mktemp("csv")
    path = d / "pairs.csv"
    path.write_bytes(_csv_bytes(header, rows, encoding))
    with peak_below(32 << 20):
        outcome, value = call("pairs: CSV / manifest", read_pairs, path, caption_template=template,
                              allow_outside=allow_outside)
    if outcome == "ok":
        _check_items(value, d, allow_outside)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.one_of(
    st.fixed_dictionaries({"image": st.one_of(st.sampled_from(PATHS), st.integers(), st.none(), st.lists(st.integers()))},
                          optional={"caption": st.one_of(TEXT, st.integers(), st.none(), st.lists(TEXT)),
                                    "label": st.one_of(st.sampled_from(LABELS), st.integers(-5, 5), st.floats(),
                                                       st.booleans(), st.none()),
                                    "split": st.one_of(TEXT, st.integers()), "tags": st.one_of(TEXT, st.lists(TEXT))}
                          ).map(json.dumps),
    st.sampled_from(["[1,2]", "3", "null", "{", '"x"', "[" * 5000 + "]" * 5000, "{\"caption\": \"c\"}"]),
    TEXT), max_size=6), bom=st.booleans(), encoding=st.sampled_from(["utf-8", "latin-1", "utf-16"]))
def test_jsonl_files(tmp_path_factory, lines, bom, encoding):
    d = tmp_path_factory.mktemp("jsonl")
    path = d / "pairs.jsonl"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + "\n".join(lines).encode(encoding, errors="replace"))
    with peak_below(32 << 20):
        outcome, value = call("pairs: JSONL", read_pairs, path)
    if outcome == "ok":
        _check_items(value, d, False)


def test_caption_folder_sidecars_and_links(tmp_path):
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    for name in ("a.jpg", "b.jpg", "c.jpg", "sub/d.jpg"):
        (d / name).write_bytes(b"OK" + name.encode())
    (d / "a.txt").write_text("a caption")
    (d / "b.txt").write_text("   \n")  # blank: caption None -> a reported failure, not an embedded ""
    os.symlink(d / "missing.jpg", d / "broken.jpg")  # listed; the decoder reports it
    items = read_pairs(d)
    caps = {Path(it["image"]).name: it["caption"] for it in items}
    assert caps == {"a.jpg": "a caption", "b.jpg": None, "c.jpg": None, "d.jpg": None, "broken.jpg": None}
    (d / "c.txt").write_bytes(b"caf\xe9")
    outcome, msg = call("pairs: caption folder", read_pairs, d)
    assert outcome == "error" and "c.txt: not UTF-8" in msg
    (d / "c.txt").unlink()
    os.symlink(d, d / "sub" / "loop")  # a folder link back to an ancestor
    outcome, msg = call("pairs: caption folder", read_pairs, d)
    assert outcome == "error" and "symbolic link loop" in msg and "loop" in msg


CLI_CASES = {
    "latin1.csv": "image,caption,label\nimg/00000.jpg,caf\xe9,1\n".encode("latin-1"),
    "label.csv": b"image,caption,label\nimg/00000.jpg,cafe,one\n",
    "outside.csv": b"image,caption\n../../../etc/hostname,x\n",
    "absolute.csv": b"image,caption\n/etc/hostname,x\n",
    "nul.csv": b"image,caption\nimg/00000.jpg,a\x00b\n",
    "bom.csv": b"\xef\xbb\xbfimage,caption\nimg/00000.jpg,a bom caption\n",
    # two blank captions beside one real one (every caption blank is refused at the door: test_fuzz_messages.py)
    "empty_captions.csv": b"image,caption\nimg/00000.jpg,   \nimg/00001.jpg,\nimg/00002.jpg,a cat\n",
    "cols.csv": b"a,b\n1,2\n",
    "bad.jsonl": b'{"image": "img/00000.jpg", "caption": 5}\n',
    "deep.jsonl": b"[" * 100000 + b"]" * 100000 + b"\n",
    "utf16.csv": "image,caption\nimg/00000.jpg,x\n".encode("utf-16"),
}


CLI_SLICE = ("latin1.csv", "label.csv", "outside.csv", "bom.csv", "empty_captions.csv")


@pytest.mark.parametrize("names", [CLI_SLICE, pytest.param(tuple(CLI_CASES), marks=pytest.mark.slow)],
                         ids=["slice", "all"])
def test_cli_pairs_files_one_line_and_no_change(tmp_path, names):
    """Through the real CLI: each bad pairs file gives one line (or builds correctly), nothing changes."""
    from memory_testlib import make_pairs

    src = make_pairs(tmp_path / "src", 4).parent
    for name, data in CLI_CASES.items():
        (src / name).write_bytes(data)
    before = tree(tmp_path)
    outcomes = {}
    for name in names:
        out = tmp_path / f"out_{name}"
        p = run_cli("build-memory", "--pairs", src / name, "--out", out, "--model", "memory_testlib:fake32",
                    "--no-progress")
        outcomes[name] = check_cli(p, "pairs: CLI build-memory")
    assert_unchanged(before, tree(tmp_path), "pairs CLI")
    assert outcomes["bom.csv"] == "ok" and outcomes["empty_captions.csv"] == "ok"
    assert all(v == "error" for k, v in outcomes.items() if k not in ("bom.csv", "empty_captions.csv", "nul.csv"))
    assert len(outcomes) == len(names)
    fail = (tmp_path / "out_empty_captions.csv" / "failures.jsonl").read_text()
    assert fail.count("no caption") == 2  # empty / whitespace captions are reported, never embedded


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(40))
def test_cli_random_pairs_files(tmp_path, seed):
    """Full run: random CSV/JSONL files through the CLI (subprocess, memory-capped)."""
    from memory_testlib import make_pairs

    rnd = random.Random(seed)
    src = make_pairs(tmp_path / "src", 4).parent
    fields = PATHS + LABELS + ['"', "a,b", "x\ny", "img/00001.jpg", "cap"]
    rows = [[rnd.choice(fields) for _ in range(rnd.randint(0, 5))] for _ in range(rnd.randint(0, 5))]
    name = rnd.choice(["p.csv", "p.jsonl"])
    if name.endswith(".csv"):
        data = _csv_bytes(rnd.choice(HEADERS), rows, rnd.choice(ENCODINGS))
    else:
        data = "\n".join(json.dumps(dict(zip(["image", "caption", "label"], r))) for r in rows).encode()
    (src / name).write_bytes(data)
    before = tree(tmp_path)
    p = run_cli("build-memory", "--pairs", src / name, "--out", tmp_path / "out", "--model", "memory_testlib:fake32",
                "--no-progress", *rnd.choice([[], ["--allow-outside-paths"], ["--caption-template", "{"]]))
    check_cli(p, "pairs: CLI build-memory")
    assert_unchanged(before, tree(tmp_path), "pairs CLI")


def test_oversized_csv_field(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("image,caption\nimg/a.jpg," + "x" * (2 << 20) + "\n")
    outcome, msg = call("pairs: CSV / manifest", read_pairs, path)
    assert outcome == "error" and "field larger than field limit" in msg
