"""Issue 20, class 6: messages that name the real cause, and no terminal injection.

* every caption blank -> "no caption could be embedded", not an encoder key-dimension error;
* a link to ``/dev/zero``, a named pipe or a device given as an image, pairs or array input -> "not a regular
  file", not "broken symbolic link" / "no such file";
* text read from a memory or a file (a plan's ``resume_hint``, the ``source`` column, error messages quoting
  file names) reaches the terminal with its control characters escaped (``reco_ref.paths.printable``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from fuzz_lib import ROOT, check_cli, run_cli
from memory_testlib import FakeEncoder, make_pairs

from reco_ref.cli import main, one_line
from reco_ref.errors import ImageDecodeError, MemoryFormatError, RecoError
from reco_ref.memory import build_memory, read_pairs
from reco_ref.paths import printable

HAVE_RECO_MINI = (ROOT / "weights" / "reco-mini" / "encoder.json").is_file()
ESC = "\x1b]0;owned\x07\x1b[2J"  # set the window title, clear the screen


def _blank_pairs(folder: Path, n: int, blank: range | None = None) -> Path:
    """``make_pairs`` with the captions of ``blank`` (default: every item) set to whitespace."""
    p = make_pairs(folder, n)
    lines = p.read_text().splitlines()
    blank = range(n) if blank is None else blank
    out = [lines[0]] + [(ln.split(",")[0] + ",   ,0,train") if i in blank else ln for i, ln in enumerate(lines[1:])]
    p.write_text("\n".join(out) + "\n")
    return p


# ------------------------------------------------------------------------------------------------------------
# blank captions
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["memory_testlib:fake32_keys", "memory_testlib:fake32"])
def test_all_blank_captions_say_so(tmp_path, model):
    pairs = _blank_pairs(tmp_path / "src", 5)
    p = run_cli("build-memory", "--pairs", pairs, "--out", tmp_path / "mem", "--model", model, "--no-progress")
    check_cli(p, "messages: blank captions", must_fail=True)
    err = p.stderr.strip().splitlines()[-1]
    assert "no caption could be embedded" in err and "all 5 captions are blank" in err, err
    assert "key_dim" not in err
    assert not (tmp_path / "mem").exists()


def test_a_chunk_of_blank_captions_with_a_keyed_encoder_is_a_list_of_failures(tmp_path):
    """Blank captions filling one whole chunk (others fine) are failures of that chunk, not a key-dim error."""
    items = read_pairs(_blank_pairs(tmp_path / "src", 12, blank=range(4, 8)))
    m = build_memory(tmp_path / "mem", items, FakeEncoder(32, key_dim=16), chunk_size=4, M=4, ef_construction=20,
                     progress=False)
    assert m["counts"] == {"rows": 8, "items": 12, "failed": 4}
    failures = [json.loads(ln) for ln in (tmp_path / "mem" / "failures.jsonl").read_text().splitlines()]
    assert [f["item"] for f in failures] == [4, 5, 6, 7] and all("no caption" in f["error"] for f in failures)


# ------------------------------------------------------------------------------------------------------------
# inputs that are not regular files
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture
def odd_files(tmp_path):
    """A link to /dev/zero, a named pipe and a broken link, each under an image / pairs / array name."""
    if not os.path.exists("/dev/zero"):
        pytest.skip("no /dev/zero")
    d = tmp_path / "odd"
    d.mkdir()
    for name in ("zero.png", "pairs.csv", "e.npy", "e.npz"):
        (d / name).symlink_to("/dev/zero")
    os.mkfifo(d / "pipe.png")
    os.mkfifo(d / "pipe.csv")
    (d / "gone.png").symlink_to(d / "missing.png")
    return d


def test_non_regular_image_is_named_so(odd_files):
    from reco_ref.encoders.images import decode_image

    for name, want in (("zero.png", "not a regular file (a character device"), ("pipe.png", "a named pipe"),
                       ("gone.png", "broken symbolic link")):
        with pytest.raises(ImageDecodeError) as e:
            decode_image(odd_files / name)
        assert want in str(e.value), str(e.value)
    with pytest.raises(ImageDecodeError, match="/dev/zero"):
        decode_image(odd_files / "zero.png")


def test_non_regular_pairs_and_arrays_are_named_so(odd_files):
    from reco_ref.io import load_npy, load_npz

    for fn, name in ((read_pairs, "pairs.csv"), (read_pairs, "pipe.csv"), (load_npy, "e.npy"), (load_npz, "e.npz")):
        with pytest.raises(RecoError, match="not a regular file"):
            fn(odd_files / name)
    with pytest.raises(FileNotFoundError, match="pairs file not found"):
        read_pairs(odd_files / "absent.csv")


def test_encode_names_a_device_given_as_images(odd_files, tmp_path, capsys):
    assert main(["encode", "--images", str(odd_files / "zero.png"), "--out", str(tmp_path / "e.npy")]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "not a regular file" in err and "neither a folder" not in err, err


# ------------------------------------------------------------------------------------------------------------
# text from files, escaped on the terminal
# ------------------------------------------------------------------------------------------------------------
def test_printable_escapes_controls_and_keeps_text():
    assert printable("a\x1b[31mb\nc\x9bd\u202ee\udcff") == "a\\x1b[31mb\\nc\\x9bd\\u202ee\\udcff"
    assert printable("thé café ≤ φ …") == "thé café ≤ φ …"
    assert one_line(RecoError(f"f.csv: {ESC}")) == "f.csv: \\x1b]0;owned\\x07\\x1b[2J"


def test_resume_hint_from_a_plan_is_printed_escaped(tmp_path, capsys):
    pairs = make_pairs(tmp_path / "src", 4)
    mem = tmp_path / "mem"
    (mem / ".build").mkdir(parents=True)
    (mem / ".build" / "plan.json").write_text(json.dumps({"kind": "build", "n_chunks": 1,
                                                          "resume_hint": f"reco-ref {ESC} --resume"}))
    assert main(["memory-info", str(mem)]) == 1
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\x07" not in err
    assert "Resume it with: reco-ref \\x1b]0;owned\\x07" in err
    # a plan that is not one (a list, a bad chunk count) still gives the one-line "incomplete" message
    (mem / ".build" / "plan.json").write_text(json.dumps({"kind": ESC, "n_chunks": "many"}))
    assert main(["memory-info", str(mem)]) == 1
    err = capsys.readouterr().err
    assert "interrupted with 0 of ? chunks" in err and "\x1b" not in err, err
    (mem / ".build" / "plan.json").write_text("[]")
    with pytest.raises(MemoryFormatError, match="expected a JSON object"):
        build_memory(mem, read_pairs(pairs), FakeEncoder(32), progress=False, resume=True)


def test_resume_hint_is_a_pasteable_command():
    from reco_ref.memory.commands import resume_hint_from_argv

    assert resume_hint_from_argv(["build-memory", "--out", "my mem", "--resume"]) == \
        "reco-ref build-memory --out 'my mem' --resume"


@pytest.mark.skipif(not HAVE_RECO_MINI, reason="weights/reco-mini not present")
def test_query_prints_sources_and_captions_escaped(tmp_path, capsys):
    from reco_ref.encoders import load
    from reco_ref.memory import build_memory_from_arrays

    enc = load("reco-mini")
    caps = ["a cat", "a dog", "a bird"]
    txt = np.asarray(enc.encode_texts(caps), np.float32)
    items = [{"image": "", "caption": c + ESC, "source": f"{ESC}img{i}.jpg", "label": None, "split": None,
              "tags": None} for i, c in enumerate(caps)]
    build_memory_from_arrays(tmp_path / "mem", txt, txt, items=items, name=enc.name, fingerprint=enc.fingerprint,
                             progress=False)
    assert main(["query", "--text", "a cat", "--memory", str(tmp_path / "mem"), "--fusion", "none", "-k", "3"]) == 0
    out = capsys.readouterr().out
    assert "img0.jpg" in out and "\\x1b]0;owned" in out
    assert "\x1b" not in out and "\x07" not in out
