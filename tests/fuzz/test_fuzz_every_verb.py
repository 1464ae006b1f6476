"""Issue 20: every verb of ``reco-ref --help`` fed a table of bad inputs, each case in a process of its own.

The verbs: encode, hf-clip-config, build-memory, memory-add, memory-info, memory-search, train, demo, eval,
query, ablate, classify train, classify eval, export-clip, export-fusion. The bad inputs: missing paths, folders
and devices (``/dev/zero``) and named pipes where a file is expected, empty / 0-row / tiny memories, k above a
memory's rows, nonsense numbers, outputs inside a memory or over an existing file, corrupt ``.npy`` / ``.npz``
files, and control characters or undecodable bytes in file names.

Each case asserts the contract (docs/bad_inputs.md):

* exit code 0, 1 or 2: never a signal, never a traceback, never an "unexpected … (a bug …)" line;
* exit 1 or 2: exactly one ``reco-ref VERB: error: …`` line, the last one (argparse's usage lines before it
  for exit 2), holding the words the table expects, with every control character escaped;
* exit 0 only for a case the table marks valid, and then its answer is checked;
* peak resident memory below 1.5 GB: the child's own ``ru_maxrss`` (``fuzz_lib.measured``), under an
  address-space cap of 1.5 GiB, or 3 GiB for the verbs that load reco-mini's ONNX towers (ONNX Runtime maps
  about 1 GiB of address space it never touches);
* nothing outside the case's declared outputs changes, appears or disappears: the input folders (and the
  case's own folder) are snapshotted before and after, links and pipes included.

One case per verb runs in the default test run (< 30 s together); the rest are ``slow``::

    RECO_REF_FUZZ_REPORT=/tmp/fuzz.json python3 -m pytest -q tests/fuzz/test_fuzz_every_verb.py -m "slow or not slow"

Outcomes are counted per verb (class ``every verb: VERB``) in the report.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import stat
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, NamedTuple

import numpy as np
import pytest
from fuzz_lib import MEMLIB, ROOT, measured, record
from fuzz_lib import arrays_memory as _arrays_memory
from fuzz_lib import unit_rows as _unit

RSS_BOUND = 1536 << 20  # the bound: 1.5 GB peak resident memory per case
AS_PLAIN = 1536 << 20  # address-space cap of a verb run with a test encoder (fake32, class doubles)
AS_MODEL = 3 << 30  # ... and of a verb that loads reco-mini (ONNX Runtime maps ~1 GiB it does not touch)
TIMEOUT = 120  # seconds a case may run (the slowest valid one takes ~20 s on 2 busy cores)
TESTS = ROOT / "tests"
PYTHONPATH = os.pathsep.join(str(p) for p in (ROOT, MEMLIB, TESTS / "train", TESTS / "classify"))
HAVE_RECO_MINI = (ROOT / "weights" / "reco-mini" / "encoder.json").is_file()
for _lib in (TESTS / "train", TESTS / "classify"):  # train_testlib, classify_testlib (the in-process fixtures)
    if str(_lib) not in sys.path:
        sys.path.insert(0, str(_lib))
CTRL = "ctl\x1b[31m\x07\nname"  # a file name holding an escape sequence, a bell and a line break


class Case(NamedTuple):
    """One row of the table.

    argv(w, t) -> the verb's arguments, given the shared inputs ``w`` and the case's own folder ``t``;
    expect: "ok" (exit 0, then ``check(p, w, t)`` judges the answer), "error" (exit 1) or "usage" (exit 2);
    words: text the error line must hold; setup(w, t): files the case needs in ``t`` (made before the snapshot);
    outs: paths below ``t`` the verb may write (a case that must be refused before any work declares none);
    model: the verb loads reco-mini; fast: in the default run; known: a finding left open (xfail).
    """

    verb: str
    name: str
    argv: Callable
    expect: str
    words: tuple = ()
    setup: Callable | None = None
    check: Callable | None = None
    outs: tuple = ()
    model: bool = False
    fast: bool = False
    known: str = ""  # a finding left open (xfail, strict: the case fails the day it is fixed, to be updated)


# ------------------------------------------------------------------------------------------ the shared inputs
def _fusion(path: Path, dim: int) -> Path:
    from reco_ref.fusion import init_params, save_param_set

    save_param_set(path, {"image": init_params(dim, 4, seed=0), "text": init_params(dim, 4, seed=1)},
                   extras={"logit_scale": np.array(np.log(1 / 0.07), np.float32)})
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Inputs every case reads (never written): memories of the test encoders, arrays, weights, manifests."""
    from classify_testlib import make_encoder, write_dataset
    from memory_testlib import FakeEncoder, make_pairs
    from train_testlib import CLASS_NAMES, build, clustered

    from reco_ref.memory import build_memory, read_pairs

    root = tmp_path_factory.mktemp("every_verb")
    w = SimpleNamespace(root=root)
    fake = FakeEncoder(32)
    w.pairs = make_pairs(root / "src", 12)
    w.mem = root / "mem"  # 12 rows, fake32
    build_memory(w.mem, read_pairs(w.pairs), fake, chunk_size=8, M=4, ef_construction=20, progress=False)
    w.empty = _arrays_memory(root / "empty", 0, 32, fake.name, fake.fingerprint)
    w.two = _arrays_memory(root / "two", 2, 32, fake.name, fake.fingerprint, seed=2)
    w.new_pairs = make_pairs(root / "src_new", 4, start=100)
    rng = np.random.default_rng(0)
    a = root / "arrays"
    a.mkdir()
    for name, arr in {"img": _unit(rng.standard_normal((12, 32))), "text": _unit(rng.standard_normal((12, 32))),
                      "short": _unit(rng.standard_normal((5, 32))),
                      "twice": 2 * _unit(rng.standard_normal((12, 32))), "d16": _unit(rng.standard_normal((12, 16))),
                      "int": np.zeros((12, 32), np.int64), "flat": np.ones(32, np.float32),
                      "zero_rows": np.zeros((0, 32), np.float32), "obj": np.array([{"a": 1}] * 12, object)}.items():
        np.save(a / f"{name}.npy", arr, allow_pickle=True)
    nan = _unit(rng.standard_normal((12, 32)))
    nan[3, 5] = np.nan
    np.save(a / "nan.npy", nan)
    (a / "garbage.npy").write_bytes(b"\x93NUMPY\x01\x00" + bytes(rng.integers(0, 256, 200, np.uint8)))
    (a / "garbage.npz").write_bytes(bytes(rng.integers(0, 256, 4096, np.uint8)))
    (a / "empty.npz").write_bytes(b"")
    w.fusion32 = _fusion(root / "fusion32.npz", 32)
    from reco_ref.reco.weights import init_reco_weights, save_reco_weights

    w.reco32 = root / "reco32.npz"  # RECO weights (image.*, text.*, tau, meta), as train writes them
    save_reco_weights(w.reco32, init_reco_weights(32, heads=4, seed=0))
    data = w.fusion32.read_bytes()
    (a / "truncated.npz").write_bytes(data[: len(data) // 2])
    with zipfile.ZipFile(a / "foreign.npz", "w") as zf:  # a zip of the right kind holding other arrays
        with zf.open("evil.npy", "w") as fh:
            np.lib.format.write_array(fh, np.zeros((4, 4), np.float32))
    w.arrays = a

    # train / ablate: the train room's clustered memories (class double encoder, 32-d, keys 48-d)
    image, text, keys, labels, _ = clustered(200, 32, 20, seed=0, key_dim=48)
    w.train_mem = build(root / "train_mem", image[:120], text[:120], keys[:120], labels[:120], CLASS_NAMES).root
    w.eval_mem = build(root / "eval_mem", image[120:125], text[120:125], keys[120:125], labels[120:125],
                       CLASS_NAMES).root
    w.train_empty = build(root / "train_empty", image[:0], text[:0], keys[:0], labels[:0], CLASS_NAMES).root
    w.tiny_mem = build(root / "tiny_mem", image[:2], text[:2], keys[:2], labels[:2], CLASS_NAMES).root
    test = list(range(130, 150))
    w.manifest = root / "manifest.csv"
    w.manifest.write_text("file,label,class_name,split\n"
                          + "".join(f"x{c}.jpg,{c},c{c},train\n" for c in range(20))
                          + "".join(f"t{i}.jpg,{labels[i]},c{labels[i]},test\n" for i in test))
    np.save(root / "eval_img.npy", image[test])
    np.save(root / "eval_keys.npy", keys[test])

    # classify: the classify room's dataset and class-fake encoder (16-d, keys 12-d)
    w.cls_manifest = write_dataset(root / "cls")
    enc = make_encoder()
    w.cls_mem = root / "cls_mem"
    build_memory(w.cls_mem, read_pairs(w.cls_manifest, split="train", caption_template="a photo of a {class_name}."),
                 enc, progress=False)
    w.cls_empty = _arrays_memory(root / "cls_empty", 0, enc.dim, enc.name, enc.fingerprint, key_dim=enc.key_dim)

    # manifests that are not
    w.header_only = root / "header_only.csv"
    w.header_only.write_text("file,label,class_name,split\n")
    w.latin1 = root / "latin1.csv"
    w.latin1.write_bytes(b"file,label,class_name,split\nx.jpg,0,caf\xe9,test\n")
    return w


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    """reco-mini-compatible memories of 0 and 3 rows and a 10-image dataset of shipped demo images."""
    if not HAVE_RECO_MINI:
        pytest.skip("weights/reco-mini not present")
    from reco_ref.encoders import load
    from reco_ref.paths import weights_dir

    enc = load("reco-mini")
    root = tmp_path_factory.mktemp("every_verb_mini")
    m = SimpleNamespace(root=root)
    m.mem0 = _arrays_memory(root / "mem0", 0, enc.dim, enc.name, enc.fingerprint, key_dim=enc.key_dim)
    m.mem3 = _arrays_memory(root / "mem3", 3, enc.dim, enc.name, enc.fingerprint, key_dim=enc.key_dim, seed=3)
    data = root / "data"
    (data / "img").mkdir(parents=True)
    demo = weights_dir() / "demo"
    with open(demo / "pairs.csv", newline="", encoding="utf-8") as fh:
        pairs = [p for p in csv.DictReader(fh) if p["category"] in ("bird", "car")]
    rows, taken = [], {}
    for p in pairs:  # 3 train + 2 test images of each class, copied so the manifest's paths stay inside it
        c = p["category"]
        if taken.get(c, 0) >= 5:
            continue
        split = "train" if taken.get(c, 0) < 3 else "test"
        taken[c] = taken.get(c, 0) + 1
        shutil.copyfile(demo / p["image"], data / "img" / Path(p["image"]).name)
        rows.append([f"img/{Path(p['image']).name}", 0 if c == "bird" else 1, c, split])
    with open(data / "manifest.csv", "w", newline="", encoding="utf-8") as fh:
        wr = csv.writer(fh)
        wr.writerow(["file", "label", "class_name", "split"])
        wr.writerows(rows)
    m.data = data
    m.image = data / rows[0][0]
    m.texts = root / "texts.txt"
    m.texts.write_text("a small bird\na red car\n")
    m.names = root / "names.txt"
    m.names.write_text("bird\ncar\n")
    return m


# ------------------------------------------------------------------------------------------ case helpers
def _link_zero(t: Path, name: str) -> Path:
    (t / name).symlink_to("/dev/zero")
    return t / name


def _fifo(t: Path, name: str) -> Path:
    os.mkfifo(t / name)
    return t / name


def _copy_memory(w, t: Path, src: str = "mem") -> Path:
    shutil.copytree(getattr(w, src), t / "mem")
    return t / "mem"


def _search_ok(n_queries: int, width: int):
    """memory-search's JSON: one list per query, ``width`` answers each, rows distinct, scores finite."""
    def check(p, w, t):
        res = json.loads(p.stdout)
        assert len(res) == n_queries and all(len(r) == width for r in res), res
        for r in res:
            assert len({a["row"] for a in r}) == width and all(np.isfinite(a["score"]) for a in r)
    return check


def _rows_ok(folder: str, rows: int):
    """The memory at ``t / folder`` opens with full verification and holds ``rows`` rows."""
    def check(p, w, t):
        from reco_ref.memory import open_memory

        mem = open_memory(t / folder, verify=True)
        assert len(mem) == rows, (len(mem), rows)
    return check


def _info_ok(rows: int):
    def check(p, w, t):
        assert json.loads(p.stdout)["rows"] == rows
    return check


def _query_ok(k: int, k_requested: int):
    def check(p, w, t):
        r = json.loads(p.stdout)
        assert (r["k"], r["k_requested"]) == (k, k_requested) and len(r["neighbours"]) == k, r
    return check


def _export_ok(p, w, t):
    assert sorted(x.name for x in (t / "out").iterdir()) == ["fusion_onnx.json", "phi_image.onnx", "phi_text.onnx"]
    assert json.loads((t / "out" / "fusion_onnx.json").read_text())


def _encode_ok(rows: int):
    def check(p, w, t):
        e = np.load(t / "e.npy")
        assert e.shape[0] == rows and np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-3)
    return check


# the common arguments of the verbs that need them
FAKE = ("--model", "memory_testlib:fake32")


def _train(w, t, *extra):
    return ["train", "--memory", w.train_mem, "--model", "train_testlib:class_encoder", "--epochs", "1",
            "--steps-per-epoch", "1", "--batch-size", "8", "--no-progress", "--out", t / "out", *extra]


def _ablate(w, t, *extra, eval_mem=None):
    return ["ablate", "--memory", w.train_mem, "--model", "train_testlib:class_encoder", "--eval-memory",
            eval_mem or w.eval_mem, "--eval-dataset", w.manifest, "--eval-embeddings", w.root / "eval_img.npy",
            "--eval-keys", w.root / "eval_keys.npy", "--arms", "k", "--ks", "1,10", "--epochs", "1",
            "--steps-per-epoch", "1", "--batch-size", "8", "--no-progress", "--out", t / "out", *extra]


def _ctrain(w, t, *extra):
    return ["classify", "train", "--dataset", w.cls_manifest, "--memory", w.cls_mem, "--model",
            "classify_testlib:make_encoder", "--epochs", "1", "--batch-size", "8", "--cache-dir", "off", "--quiet",
            "--no-progress", "--out", t / "w.npz", *extra]


def _ceval(w, t, weights, *extra):
    return ["classify", "eval", "--dataset", w.cls_manifest, "--memory", w.cls_mem, "--model",
            "classify_testlib:make_encoder", "--cache-dir", "off", "--quiet", "--no-progress", "--weights", weights,
            "--json", t / "r.json", *extra]


def _cls_weights(w, t):
    """A classify weights file made by the verb itself (for the eval cases that need a valid one)."""
    from fuzz_lib import run_cli

    p = run_cli(*_ctrain(w, t), limit=AS_PLAIN, PYTHONPATH=PYTHONPATH)
    assert p.returncode == 0, p.stderr[-2000:]


def _eval(m, t, *extra, mem=None):
    return ["eval", "--memory", mem or m.mem3, "--dataset", m.data / "manifest.csv", "--templates", "single",
            "--no-progress", "--json", t / "r.json", *extra]


def _query(m, t, *extra, mem=None):
    return ["query", "--memory", mem or m.mem3, "--text", "a small bird", *extra]


def _write(name: str, data: bytes | str):
    def setup(w, t):
        p = t / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data if isinstance(data, bytes) else data.encode())
    return setup


def _both(*setups):
    def setup(w, t):
        for s in setups:
            s(w, t)
    return setup


A = lambda w, name: w.arrays / name  # noqa: E731 - one of the shared arrays


# ------------------------------------------------------------------------------------------------ the table
CASES = [
    # ---- encode (reco-mini)
    Case("encode", "texts-missing", lambda m, t: ["encode", "--texts", t / "none.txt", "--out", t / "e.npy"],
         "error", ("none.txt", "no such"), model=True),
    Case("encode", "texts-dev-zero", lambda m, t: ["encode", "--texts", t / "z.txt", "--out", t / "e.npy"],
         "error", ("not a regular file",), setup=lambda m, t: _link_zero(t, "z.txt"), model=True, fast=True),
    Case("encode", "texts-fifo", lambda m, t: ["encode", "--texts", t / "p.txt", "--out", t / "e.npy"],
         "error", ("named pipe",), setup=lambda m, t: _fifo(t, "p.txt"), model=True),
    Case("encode", "texts-folder", lambda m, t: ["encode", "--texts", t / "d", "--out", t / "e.npy"],
         "error", ("is a folder",), setup=_write("d/x.txt", "a cat\n"), model=True),
    Case("encode", "texts-empty", lambda m, t: ["encode", "--texts", t / "e.txt", "--out", t / "e.npy"],
         "error", ("e.txt", "nothing to encode"), setup=_write("e.txt", ""), model=True),
    Case("encode", "images-empty-folder", lambda m, t: ["encode", "--images", t / "d", "--out", t / "e.npy"],
         "error", ("nothing to encode",), setup=_write("d/readme.md", "no images here"), model=True),
    Case("encode", "texts-latin1", lambda m, t: ["encode", "--texts", t / "l.txt", "--out", t / "e.npy"],
         "error", ("not UTF-8",), setup=_write("l.txt", b"caf\xe9\n"), model=True),
    Case("encode", "texts-ctrl-name", lambda m, t: ["encode", "--texts", t / CTRL, "--out", t / "e.npy"],
         "error", ("\\x1b",), model=True),
    Case("encode", "texts-undecodable-name", lambda m, t: ["encode", "--texts", os.fsencode(t) + b"/n\xff.txt",
                                                            "--out", t / "e.npy"],
         "error", ("no such",), model=True),
    Case("encode", "images-garbage", lambda m, t: ["encode", "--images", t / "x.png", "--out", t / "e.npy"],
         "error", ("every item failed",), setup=_write("x.png", b"\x89PNG\r\n\x1a\n garbage"), model=True,
         outs=("e.npy", "e.meta.json", "e.ok_index.npy", "e.items.txt", "e.keys.npy")),
    Case("encode", "images-list-missing", lambda m, t: ["encode", "--images", t / "l.txt", "--out", t / "e.npy"],
         "error", ("0 of 2 images", "every item failed"), setup=_write("l.txt", "nope1.png\nnope2.png\n"),
         model=True, outs=("e.npy", "e.meta.json", "e.ok_index.npy", "e.items.txt", "e.keys.npy")),
    Case("encode", "out-in-memory", lambda m, t: ["encode", "--texts", m.texts, "--out", m.mem3 / "e.npy"],
         "error", ("inside the memory",), model=True),
    Case("encode", "out-exists", lambda m, t: ["encode", "--texts", m.texts, "--out", t / "e.npy"],
         "error", ("--overwrite",), setup=_write("e.npy", "mine"), model=True),
    Case("encode", "batch-nan", lambda m, t: ["encode", "--texts", m.texts, "--out", t / "e.npy", "--batch-size",
                                              "nan"], "usage", ("--batch-size",), model=True),
    Case("encode", "valid-two-texts", lambda m, t: ["encode", "--texts", m.texts, "--out", t / "e.npy",
                                                         "--no-progress"],
         "ok", check=_encode_ok(2), outs=("e.npy", "e.meta.json"), model=True),

    # ---- hf-clip-config
    Case("hf-clip-config", "dir-missing", lambda w, t: ["hf-clip-config", t / "none"], "error", ("none",)),
    Case("hf-clip-config", "dir-is-file", lambda w, t: ["hf-clip-config", t / "f"], "error", ("f",),
         setup=_write("f", "x")),
    Case("hf-clip-config", "dir-empty", lambda w, t: ["hf-clip-config", t], "error", ("vision_model.onnx",),
         fast=True),
    Case("hf-clip-config", "config-garbage", lambda w, t: ["hf-clip-config", t], "error",
         ("preprocessor_config.json", "not valid JSON"),
         setup=_both(_write("preprocessor_config.json", "{not json"), _write("vision_model.onnx", b"garbage"), _write("text_model.onnx", b"garbage"))),
    Case("hf-clip-config", "config-dev-zero", lambda w, t: ["hf-clip-config", t], "error",
         ("preprocessor_config.json", "not a regular file"),
         setup=_both(lambda w, t: _link_zero(t, "preprocessor_config.json"), _write("vision_model.onnx", b"garbage"), _write("text_model.onnx", b"garbage"))),
    Case("hf-clip-config", "config-fifo", lambda w, t: ["hf-clip-config", t], "error",
         ("preprocessor_config.json", "named pipe"),
         setup=_both(lambda w, t: _fifo(t, "preprocessor_config.json"), _write("vision_model.onnx", b"garbage"), _write("text_model.onnx", b"garbage"))),
    Case("hf-clip-config", "config-nested", lambda w, t: ["hf-clip-config", t], "error",
         ("preprocessor_config.json",),
         setup=_both(_write("preprocessor_config.json", "[" * 100000 + "]" * 100000), _write("vision_model.onnx", b"garbage"), _write("text_model.onnx", b"garbage"))),
    Case("hf-clip-config", "config-a-list", lambda w, t: ["hf-clip-config", t], "error",
         ("expected a JSON object",), setup=_both(_write("preprocessor_config.json", "[1, 2]"), _write("vision_model.onnx", b"garbage"), _write("text_model.onnx", b"garbage"))),
    Case("hf-clip-config", "config-wrong-types", lambda w, t: ["hf-clip-config", t], "error",
         ("crop_size",), setup=_both(_write("preprocessor_config.json", '{"crop_size": "big", "resample": []}'),
                                     _write("vision_model.onnx", b"garbage"), _write("text_model.onnx", b"garbage"))),
    Case("hf-clip-config", "resample-a-list", lambda w, t: ["hf-clip-config", t], "error",
         ("resample",), setup=_both(_write("preprocessor_config.json", '{"resample": [3]}'), _write("vision_model.onnx", b"garbage"), _write("text_model.onnx", b"garbage"))),
    Case("hf-clip-config", "graph-dev-zero", lambda w, t: ["hf-clip-config", t], "error",
         ("vision_model.onnx", "not a regular file"),
         setup=_both(lambda w, t: _link_zero(t, "vision_model.onnx"), _write("text_model.onnx", b"x"))),
    Case("hf-clip-config", "onnx-garbage", lambda w, t: ["hf-clip-config", t], "error",
         ("vision_model.onnx", "cannot load the graph"),
         setup=_both(_write("preprocessor_config.json", json.dumps(
             {"crop_size": 224, "size": {"shortest_edge": 224}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3})),
             _write("vision_model.onnx", b"garbage"), _write("text_model.onnx", b"garbage"))),
    Case("hf-clip-config", "vision-leaves-folder", lambda w, t: ["hf-clip-config", t, "--vision", "../x.onnx"],
         "error", ("x.onnx",), setup=_write("preprocessor_config.json", "{}")),
    Case("hf-clip-config", "inside-memory", lambda w, t: ["hf-clip-config", w.mem], "error", ("inside the memory",)),
    Case("hf-clip-config", "ctrl-name", lambda w, t: ["hf-clip-config", t / CTRL], "error", ("\\x1b",)),

    # ---- build-memory (fake32)
    Case("build-memory", "pairs-missing", lambda w, t: ["build-memory", "--pairs", t / "p.csv", *FAKE, "--out",
                                                        t / "o"], "error", ("p.csv",)),
    Case("build-memory", "pairs-dev-zero", lambda w, t: ["build-memory", "--pairs", t / "p.csv", *FAKE, "--out",
                                                         t / "o"], "error", ("not a regular file",),
         setup=lambda w, t: _link_zero(t, "p.csv"), fast=True),
    Case("build-memory", "pairs-fifo", lambda w, t: ["build-memory", "--pairs", t / "p.csv", *FAKE, "--out",
                                                     t / "o"], "error", ("named pipe",),
         setup=lambda w, t: _fifo(t, "p.csv")),
    Case("build-memory", "pairs-empty-file", lambda w, t: ["build-memory", "--pairs", t / "p.csv", *FAKE, "--out",
                                                           t / "o"], "error", ("p.csv",), setup=_write("p.csv", "")),
    Case("build-memory", "pairs-header-only", lambda w, t: ["build-memory", "--pairs", t / "p.csv", *FAKE, "--out",
                                                            t / "o"], "error", ("p.csv",),
         setup=_write("p.csv", "image,caption\n")),
    Case("build-memory", "pairs-ctrl-name", lambda w, t: ["build-memory", "--pairs", t / (CTRL + ".csv"), *FAKE,
                                                          "--out", t / "o"], "error", ("\\x1b",)),
    Case("build-memory", "arrays-garbage", lambda w, t: ["build-memory", "--image-embeddings", A(w, "garbage.npy"),
                                                         "--text-embeddings", A(w, "text.npy"), "--out", t / "o"],
         "error", ("garbage.npy",)),
    Case("build-memory", "arrays-rows-differ", lambda w, t: ["build-memory", "--image-embeddings", A(w, "img.npy"),
                                                             "--text-embeddings", A(w, "short.npy"), "--out",
                                                             t / "o"], "error", ("must both be",)),
    Case("build-memory", "arrays-dims-differ", lambda w, t: ["build-memory", "--image-embeddings", A(w, "img.npy"),
                                                             "--text-embeddings", A(w, "d16.npy"), "--out", t / "o"],
         "error", ("must both be",)),
    Case("build-memory", "arrays-nan", lambda w, t: ["build-memory", "--image-embeddings", A(w, "nan.npy"),
                                                     "--text-embeddings", A(w, "text.npy"), "--out", t / "o"],
         "error", ("NaN",)),
    Case("build-memory", "arrays-int", lambda w, t: ["build-memory", "--image-embeddings", A(w, "int.npy"),
                                                     "--text-embeddings", A(w, "text.npy"), "--out", t / "o"],
         "error", ("int.npy",)),
    Case("build-memory", "arrays-object", lambda w, t: ["build-memory", "--image-embeddings", A(w, "obj.npy"),
                                                        "--text-embeddings", A(w, "text.npy"), "--out", t / "o"],
         "error", ("obj.npy",)),
    Case("build-memory", "arrays-0-rows", lambda w, t: ["build-memory", "--image-embeddings", A(w, "zero_rows.npy"),
                                                        "--text-embeddings", A(w, "zero_rows.npy"), "--out",
                                                        t / "o"], "error", ("zero_rows.npy",)),
    Case("build-memory", "arrays-not-unit", lambda w, t: ["build-memory", "--image-embeddings", A(w, "twice.npy"),
                                                          "--text-embeddings", A(w, "text.npy"), "--out", t / "o"],
         "error", ("L2 norm", "--normalize")),
    Case("build-memory", "arrays-dev-zero", lambda w, t: ["build-memory", "--image-embeddings", t / "z.npy",
                                                          "--text-embeddings", A(w, "text.npy"), "--out", t / "o"],
         "error", ("not a regular file",), setup=lambda w, t: _link_zero(t, "z.npy")),
    Case("build-memory", "out-in-memory", lambda w, t: ["build-memory", "--pairs", w.pairs, *FAKE, "--out",
                                                        w.mem / "inner"], "error", ("inside the memory",)),
    Case("build-memory", "out-is-file", lambda w, t: ["build-memory", "--pairs", w.pairs, *FAKE, "--out", t / "o"],
         "error", ("is a file",), setup=_write("o", "mine")),
    Case("build-memory", "out-users-folder", lambda w, t: ["build-memory", "--pairs", w.pairs, *FAKE, "--out",
                                                           t / "o"], "error", ("not empty",),
         setup=_write("o/notes.txt", "mine")),
    Case("build-memory", "template-width", lambda w, t: ["build-memory", "--pairs", w.manifest, *FAKE,
                                                         "--caption-template", "{class_name:>900000000}", "--out",
                                                         t / "o"], "error", ("format spec",)),
    Case("build-memory", "M-zero", lambda w, t: ["build-memory", "--pairs", w.pairs, *FAKE, "--M", "0", "--out",
                                                 t / "o"], "usage", ("--M",)),
    Case("build-memory", "chunk-nan", lambda w, t: ["build-memory", "--pairs", w.pairs, *FAKE, "--chunk-size",
                                                    "nan", "--out", t / "o"], "usage", ("--chunk-size",)),
    Case("build-memory", "split-matches-nothing", lambda w, t: ["build-memory", "--pairs", w.pairs, *FAKE, "--split",
                                                                "nope", "--out", t / "o"], "error",
         ("no pairs to build from", "'nope'")),
    Case("build-memory", "pairs-folder-without-images", lambda w, t: ["build-memory", "--pairs", t / "d", *FAKE,
                                                                      "--out", t / "o"], "error", ("d",),
         setup=_write("d/readme.md", "nothing")),
    Case("build-memory", "keys-rows-differ", lambda w, t: ["build-memory", "--image-embeddings", A(w, "img.npy"),
                                                           "--text-embeddings", A(w, "text.npy"), "--image-keys",
                                                           A(w, "short.npy"), "--out", t / "o"], "error",
         ("image_keys",)),
    Case("build-memory", "valid-ctrl-out-name", lambda w, t: ["build-memory", "--pairs", w.pairs, *FAKE,
                                                              "--no-progress", "--out", t / CTRL],
         "ok", check=_rows_ok(CTRL, 12), outs=(CTRL,)),

    # ---- memory-add (fake32; the memory is the case's own copy)
    Case("memory-add", "memory-missing", lambda w, t: ["memory-add", t / "none", "--pairs", w.new_pairs, *FAKE],
         "error", ("none",)),
    Case("memory-add", "memory-is-file", lambda w, t: ["memory-add", t / "f", "--pairs", w.new_pairs, *FAKE],
         "error", ("f",), setup=_write("f", "x")),
    Case("memory-add", "memory-plain-folder", lambda w, t: ["memory-add", t, "--pairs", w.new_pairs, *FAKE],
         "error", ("memory",), fast=True),
    Case("memory-add", "same-pairs-again", lambda w, t: ["memory-add", t / "mem", "--pairs", w.pairs, *FAKE,
                                                         "--no-progress"], "error", ("--allow-duplicates",),
         setup=lambda w, t: _copy_memory(w, t)),
    Case("memory-add", "pairs-dev-zero", lambda w, t: ["memory-add", t / "mem", "--pairs", t / "z.csv", *FAKE],
         "error", ("not a regular file",), setup=lambda w, t: (_copy_memory(w, t), _link_zero(t, "z.csv"))),
    Case("memory-add", "arrays-wrong-dim", lambda w, t: ["memory-add", t / "mem", "--image-embeddings",
                                                         A(w, "d16.npy"), "--text-embeddings", A(w, "d16.npy"),
                                                         "--encoder-fingerprint", "x"], "error", ("16",),
         setup=lambda w, t: _copy_memory(w, t)),
    Case("memory-add", "manifest-garbage", lambda w, t: ["memory-add", t / "mem", "--pairs", w.new_pairs, *FAKE],
         "error", ("manifest.json",),
         setup=lambda w, t: (_copy_memory(w, t), (t / "mem" / "manifest.json").write_text("{"))),
    Case("memory-add", "text-npy-truncated", lambda w, t: ["memory-add", t / "mem", "--pairs", w.new_pairs, *FAKE,
                                                           "--no-progress"], "error", ("text.npy",),
         setup=lambda w, t: (_copy_memory(w, t), os.truncate(t / "mem" / "text.npy", 200))),
    Case("memory-add", "resume-nothing", lambda w, t: ["memory-add", t / "mem", "--pairs", w.new_pairs, *FAKE,
                                                       "--resume", "--no-progress"],
         "ok", check=_rows_ok("mem", 16), setup=lambda w, t: _copy_memory(w, t), outs=("mem",)),
    Case("memory-add", "into-0-row-memory", lambda w, t: ["memory-add", t / "mem", "--pairs", w.new_pairs, *FAKE,
                                                          "--no-progress"],
         "ok", check=_rows_ok("mem", 4), setup=lambda w, t: _copy_memory(w, t, "empty"), outs=("mem",)),
    Case("memory-add", "split-matches-nothing", lambda w, t: ["memory-add", t / "mem", "--pairs", w.new_pairs, *FAKE,
                                                              "--split", "nope", "--no-progress"], "error",
         ("no pairs to add", "'nope'"),
         setup=lambda w, t: _copy_memory(w, t)),
    Case("memory-add", "chunk-zero", lambda w, t: ["memory-add", w.mem, "--pairs", w.new_pairs, *FAKE,
                                                   "--chunk-size", "0"], "usage", ("--chunk-size",)),

    # ---- memory-info
    Case("memory-info", "missing", lambda w, t: ["memory-info", t / "none"], "error", ("no such memory",)),
    Case("memory-info", "is-file", lambda w, t: ["memory-info", t / "f"], "error", ("f",), setup=_write("f", "x")),
    Case("memory-info", "plain-folder", lambda w, t: ["memory-info", t], "error", ("manifest.json",)),
    Case("memory-info", "0-rows", lambda w, t: ["memory-info", w.empty], "ok", check=_info_ok(0), fast=True),
    Case("memory-info", "manifest-dev-zero", lambda w, t: ["memory-info", t / "mem"], "error",
         ("manifest.json", "not a regular file"),
         setup=lambda w, t: (_copy_memory(w, t), (t / "mem" / "manifest.json").unlink(),
                             _link_zero(t / "mem", "manifest.json"))),
    Case("memory-info", "manifest-fifo", lambda w, t: ["memory-info", t / "mem"], "error",
         ("manifest.json", "named pipe"),
         setup=lambda w, t: (_copy_memory(w, t), (t / "mem" / "manifest.json").unlink(),
                             _fifo(t / "mem", "manifest.json"))),
    Case("memory-info", "text-npy-dev-zero", lambda w, t: ["memory-info", t / "mem"], "error",
         ("text.npy", "not a regular file"),
         setup=lambda w, t: (_copy_memory(w, t), (t / "mem" / "text.npy").unlink(), _link_zero(t / "mem", "text.npy"))),
    Case("memory-info", "text-npy-missing", lambda w, t: ["memory-info", t / "mem"], "error", ("text.npy", "missing"),
         setup=lambda w, t: (_copy_memory(w, t), (t / "mem" / "text.npy").unlink())),
    Case("memory-info", "failures-fifo", lambda w, t: ["memory-info", t / "mem"], "error",
         ("failures.jsonl", "not a regular file"),
         setup=lambda w, t: (_copy_memory(w, t), (t / "mem" / "failures.jsonl").unlink(),
                             _fifo(t / "mem", "failures.jsonl"))),
    Case("memory-info", "image-npy-flipped", lambda w, t: ["memory-info", t / "mem"], "error", ("image.npy",),
         setup=lambda w, t: (_copy_memory(w, t), _flip(t / "mem" / "image.npy", 200))),
    Case("memory-info", "sqlite-garbage-size", lambda w, t: ["memory-info", t / "mem", "--verify", "size"],
         "error", ("meta.sqlite",),
         setup=lambda w, t: (_copy_memory(w, t), _garble(t / "mem" / "meta.sqlite"))),
    Case("memory-info", "ctrl-name", lambda w, t: ["memory-info", t / CTRL], "error", ("\\x1b",)),
    Case("memory-info", "verify-bogus", lambda w, t: ["memory-info", w.mem, "--verify", "md5"], "usage",
         ("--verify",)),

    # ---- memory-search (fake32)
    Case("memory-search", "k-above-rows", lambda w, t: ["memory-search", w.mem, "--text", "a photo", "x", "-k",
                                                        "1000", *FAKE], "ok", check=_search_ok(2, 12), fast=True),
    Case("memory-search", "k-above-rows-2", lambda w, t: ["memory-search", w.two, "--text", "a", "-k", "10",
                                                          "--exact", *FAKE], "ok", check=_search_ok(1, 2)),
    Case("memory-search", "0-rows", lambda w, t: ["memory-search", w.empty, "--text", "a photo", *FAKE],
         "ok", check=_search_ok(1, 0)),
    Case("memory-search", "k-zero", lambda w, t: ["memory-search", w.mem, "--text", "a", "-k", "0", *FAKE],
         "usage", ("-k",)),
    Case("memory-search", "ef-nan", lambda w, t: ["memory-search", w.mem, "--text", "a", "--ef", "nan", *FAKE],
         "usage", ("--ef",)),
    Case("memory-search", "image-missing", lambda w, t: ["memory-search", w.mem, "--image", t / "x.jpg", *FAKE],
         "error", ("x.jpg",)),
    Case("memory-search", "image-dev-zero", lambda w, t: ["memory-search", w.mem, "--image", t / "z.jpg", *FAKE],
         "error", ("not a regular file",), setup=lambda w, t: _link_zero(t, "z.jpg")),
    Case("memory-search", "image-fifo", lambda w, t: ["memory-search", w.mem, "--image", t / "p.jpg", *FAKE],
         "error", ("named pipe",), setup=lambda w, t: _fifo(t, "p.jpg")),
    Case("memory-search", "image-undecodable", lambda w, t: ["memory-search", w.mem, "--image", t / "b.jpg", *FAKE],
         "error", ("b.jpg",), setup=_write("b.jpg", "BAD")),
    Case("memory-search", "image-ctrl-name", lambda w, t: ["memory-search", w.mem, "--image", t / CTRL, *FAKE],
         "error", ("\\x1b",)),
    Case("memory-search", "no-query", lambda w, t: ["memory-search", w.mem, *FAKE], "error", ("--text",)),
    Case("memory-search", "wrong-encoder", lambda w, t: ["memory-search", w.mem, "--text", "a", "--model",
                                                         "memory_testlib:fake32_keys"], "error", ("fingerprint",)),
    Case("memory-search", "text-ctrl", lambda w, t: ["memory-search", w.mem, "--text", CTRL, *FAKE],
         "ok", check=_search_ok(1, 5)),
    Case("memory-search", "hnsw-truncated", lambda w, t: ["memory-search", t / "mem", "--text", "a", *FAKE],
         "error", ("text.hnsw",), setup=lambda w, t: (_copy_memory(w, t), os.truncate(t / "mem" / "text.hnsw", 500))),

    # ---- query (reco-mini)
    Case("query", "k-above-rows", lambda m, t: _query(m, t, "-k", "50", "--fusion", "none", "--json", "-"),
         "ok", check=_query_ok(3, 50), model=True),
    Case("query", "0-rows", lambda m, t: _query(m, t, "--fusion", "none", mem=m.mem0), "error",
         ("memory holds 0 rows",), model=True),
    Case("query", "image-missing", lambda m, t: ["query", "--memory", m.mem3, t / "x.jpg"], "error", ("x.jpg",),
         model=True),
    Case("query", "image-dev-zero", lambda m, t: ["query", "--memory", m.mem3, t / "z.jpg"], "error",
         ("not a regular file",), setup=lambda m, t: _link_zero(t, "z.jpg"), model=True),
    Case("query", "image-garbage", lambda m, t: ["query", "--memory", m.mem3, t / "g.jpg", "--fusion", "none"],
         "error", ("g.jpg",), setup=_write("g.jpg", b"\xff\xd8\xff\xe0 garbage"), model=True),
    Case("query", "image-ctrl-name", lambda m, t: ["query", "--memory", m.mem3, t / CTRL], "error", ("\\x1b",),
         model=True),
    Case("query", "json-in-memory", lambda m, t: _query(m, t, "--json", m.mem3 / "q.json"), "error",
         ("inside the memory",), model=True, fast=True),
    Case("query", "json-exists", lambda m, t: _query(m, t, "--json", t / "q.json"), "error", ("--overwrite",),
         setup=_write("q.json", "mine"), model=True),
    Case("query", "fusion-garbage", lambda m, t: _query(m, t, "--fusion", A(m.w, "garbage.npz")), "error",
         ("garbage.npz",), model=True),
    Case("query", "fusion-dev-zero", lambda m, t: _query(m, t, "--fusion", t / "z.npz"), "error",
         ("not a regular file",), setup=lambda m, t: _link_zero(t, "z.npz"), model=True),
    Case("query", "fusion-truncated", lambda m, t: _query(m, t, "--fusion", A(m.w, "truncated.npz")), "error",
         ("truncated.npz",), model=True),
    Case("query", "fusion-wrong-dim", lambda m, t: _query(m, t, "--fusion", m.w.fusion32), "error",
         ("fusion32.npz",), model=True),
    Case("query", "class-names-empty", lambda m, t: _query(m, t, "--class-names", t / "n.txt", "--fusion", "none"),
         "error", ("n.txt",), setup=_write("n.txt", ""), model=True),
    Case("query", "classes-latin1", lambda m, t: _query(m, t, "--classes", m.w.latin1, "--fusion", "none"),
         "error", ("not UTF-8",), model=True),
    Case("query", "templates-field", lambda m, t: _query(m, t, "--class-names", m.names, "--templates",
                                                         t / "tp.txt", "--fusion", "none"), "error", ("{x}",),
         setup=_write("tp.txt", "a {x} photo\n"), model=True),
    Case("query", "class-names-fifo", lambda m, t: _query(m, t, "--class-names", t / "n.txt", "--fusion", "none"),
         "error", ("named pipe",), setup=lambda m, t: _fifo(t, "n.txt"), model=True),
    Case("query", "templates-dev-zero", lambda m, t: _query(m, t, "--class-names", m.names, "--templates",
                                                            t / "tp.txt", "--fusion", "none"), "error", ("tp.txt",),
         setup=lambda m, t: _link_zero(t, "tp.txt"), model=True),
    Case("query", "classes-header-only", lambda m, t: _query(m, t, "--classes", m.w.header_only, "--fusion", "none"),
         "error", ("header_only.csv",), model=True),
    Case("query", "top-above-classes", lambda m, t: _query(m, t, "--class-names", m.names, "--top", "50", "--fusion",
                                                           "none", "--json", "-"), "ok",
         check=lambda p, m, t: _top_ok(p, 2), model=True),
    Case("query", "fake-memory", lambda m, t: _query(m, t, mem=m.w.mem), "error", ("fingerprint",), model=True),
    Case("query", "k-nan", lambda m, t: _query(m, t, "-k", "nan"), "usage", ("-k",), model=True),
    Case("query", "top-zero", lambda m, t: _query(m, t, "--top", "0"), "usage", ("--top",), model=True),

    # ---- eval (reco-mini)
    Case("eval", "0-rows", lambda m, t: _eval(m, t, "--fusion", "none", mem=m.mem0), "error",
         ("memory holds 0 rows",), model=True),
    Case("eval", "dataset-missing", lambda m, t: ["eval", "--memory", m.mem3, "--dataset", t / "none.csv"],
         "error", ("none.csv",), model=True, fast=True),
    Case("eval", "dataset-header-only", lambda m, t: ["eval", "--memory", m.mem3, "--dataset", m.w.header_only,
                                                      "--no-progress"], "error", ("header_only.csv",), model=True),
    Case("eval", "dataset-dev-zero", lambda m, t: ["eval", "--memory", m.mem3, "--dataset", t / "z.csv"], "error",
         ("not a regular file",), setup=lambda m, t: _link_zero(t, "z.csv"), model=True),
    Case("eval", "split-absent", lambda m, t: _eval(m, t, "--split", "nope", "--fusion", "none"), "error",
         ("nope",), model=True),
    Case("eval", "json-in-memory", lambda m, t: ["eval", "--memory", m.mem3, "--dataset", m.data / "manifest.csv",
                                                 "--json", m.mem3 / "r.json"], "error", ("inside the memory",),
         model=True),
    Case("eval", "png-exists", lambda m, t: _eval(m, t, "--png", t / "r.png"), "error", ("--overwrite",),
         setup=_write("r.png", "mine"), model=True),
    Case("eval", "fusion-garbage", lambda m, t: _eval(m, t, "--fusion", A(m.w, "garbage.npz")), "error",
         ("garbage.npz",), model=True),
    Case("eval", "fusion-dev-zero", lambda m, t: _eval(m, t, "--fusion", t / "z.npz"), "error",
         ("not a regular file",), setup=lambda m, t: _link_zero(t, "z.npz"), model=True),
    Case("eval", "fusion-foreign-zip", lambda m, t: _eval(m, t, "--fusion", A(m.w, "foreign.npz")), "error",
         ("foreign.npz",), model=True),
    Case("eval", "dup-threshold-nan", lambda m, t: _eval(m, t, "--dup-threshold", "nan"), "usage",
         ("--dup-threshold",), model=True),
    Case("eval", "batch-size-zero", lambda m, t: _eval(m, t, "--batch-size", "0"), "usage", ("--batch-size",),
         model=True),
    Case("eval", "alpha-nan", lambda m, t: _eval(m, t, "--alpha", "nan"), "usage", ("--alpha",), model=True),
    Case("eval", "templates-empty", lambda m, t: _eval(m, t, "--templates", t / "tp.txt", "--fusion", "none"),
         "error", ("tp.txt",), setup=_write("tp.txt", "\n"), model=True),
    Case("eval", "templates-width", lambda m, t: _eval(m, t, "--templates", t / "tp.txt", "--fusion", "none"),
         "error", ("format spec",), setup=_write("tp.txt", "{:>900000000}\n"), model=True),
    Case("eval", "cache-in-memory", lambda m, t: _eval(m, t, "--cache", m.mem3 / "c"), "error",
         ("inside the memory",), model=True),
    Case("eval", "pairs-unquoted-comma", lambda m, t: ["eval", "--memory", m.mem3, "--pairs", t / "p.csv",
                                                       "--split", "all", "--no-progress"], "error", ("quoted",),
         setup=_write("p.csv", "image,caption\nimg/a.png,a bird, small\n"), model=True),
    Case("eval", "images-missing", lambda m, t: ["eval", "--memory", m.mem3, "--dataset", t / "m.csv",
                                                 "--fusion", "none", "--no-progress"], "error",
         ("nope.jpg", "no such image file"),
         setup=_write("m.csv", "file,label,class_name,split\nnope.jpg,0,bird,test\nnope2.jpg,1,car,test\n"),
         model=True),

    # ---- ablate (train_testlib class double)
    Case("ablate", "ks-nonsense", lambda w, t: _ablate(w, t, "--ks", "0,abc"), "error", ("--ks",)),
    Case("ablate", "arms-bogus", lambda w, t: [*_ablate(w, t)[:-2], "--arms", "bogus", "--out", t / "out"],
         "error", ("bogus",), fast=True),
    Case("ablate", "eval-embeddings-garbage", lambda w, t: _ablate(w, t, "--eval-embeddings", A(w, "garbage.npy")),
         "error", ("garbage.npy",)),
    Case("ablate", "eval-embeddings-dev-zero", lambda w, t: _ablate(w, t, "--eval-embeddings", t / "z.npy"),
         "error", ("not a regular file",), setup=lambda w, t: _link_zero(t, "z.npy")),
    Case("ablate", "eval-memory-0-rows", lambda w, t: _ablate(w, t, eval_mem=w.train_empty), "error",
         ("memory holds 0 rows",)),
    Case("ablate", "out-in-memory", lambda w, t: [*_ablate(w, t)[:-2], "--out", w.eval_mem / "o"], "error",
         ("inside the memory",)),
    Case("ablate", "out-exists", lambda w, t: _ablate(w, t), "error", ("--overwrite",),
         setup=_write("out/ablations.md", "mine")),
    Case("ablate", "small-memory-missing", lambda w, t: [*_ablate(w, t), "--small-memory", t / "none"], "error",
         ("none",)),
    Case("ablate", "eval-dataset-latin1", lambda w, t: _ablate(w, t, "--eval-dataset", w.latin1), "error",
         ("not UTF-8",)),
    Case("ablate", "memory-missing", lambda w, t: ["ablate", "--memory", t / "none", "--eval-memory", w.eval_mem,
                                                   "--eval-dataset", w.manifest, "--out", t / "out"], "error",
         ("none",)),
    Case("ablate", "valid-k-above-rows", lambda w, t: _ablate(w, t), "ok",
         check=lambda p, w, t: _ablate_ok(t), outs=("out",)),

    # ---- demo (reco-mini)
    Case("demo", "out-exists", lambda m, t: ["demo", "--out", t / "d"], "error", ("--overwrite",),
         setup=_write("d/results.json", "mine"), model=True, fast=True),
    Case("demo", "out-in-memory", lambda m, t: ["demo", "--out", m.mem3 / "d"], "error", ("inside the memory",),
         model=True),
    Case("demo", "data-missing", lambda m, t: ["demo", "--data", t / "none", "--out", t / "d"], "error", ("none",),
         model=True),
    Case("demo", "data-without-manifest", lambda m, t: ["demo", "--data", t / "ds", "--out", t / "d"], "error",
         ("manifest.csv",), setup=_write("ds/readme.txt", "x"), model=True),
    Case("demo", "data-header-only", lambda m, t: ["demo", "--data", t / "ds", "--out", t / "d"], "error",
         ("manifest.csv",), setup=_write("ds/manifest.csv", "file,label,class_name,split\n"), model=True),
    Case("demo", "data-no-test-split", lambda m, t: ["demo", "--data", t / "ds", "--out", t / "d"], "error",
         ("test",), setup=_write("ds/manifest.csv", "file,label,class_name,split\na.jpg,0,bird,train\n"),
         model=True),
    Case("demo", "limit-zero", lambda m, t: ["demo", "--limit", "0", "--out", t / "d"], "usage", ("--limit",),
         model=True),
    Case("demo", "memory-limit-negative", lambda m, t: ["demo", "--memory-limit", "-1", "--out", t / "d"], "usage",
         ("--memory-limit",), model=True),
    Case("demo", "fusion-garbage", lambda m, t: ["demo", "--data", m.data, "--fusion", A(m.w, "garbage.npz"),
                                                 "--no-compare", "--quiet", "--out", t / "d"], "error",
         ("garbage.npz",), model=True),
    Case("demo", "k-zero", lambda m, t: ["demo", "-k", "0", "--out", t / "d"], "usage", ("-k",), model=True),

    # ---- train (train_testlib class double)
    Case("train", "memory-0-rows", lambda w, t: [*_train(w, t), "--memory", w.train_empty], "error",
         ("memory holds 0 rows",), fast=True),
    Case("train", "memory-missing", lambda w, t: [*_train(w, t)[:2], t / "none", *_train(w, t)[3:]], "error",
         ("none",)),
    Case("train", "memory-2-rows", lambda w, t: [*_train(w, t)[:2], w.tiny_mem, *_train(w, t)[3:]], "ok",
         check=lambda p, w, t: _train_ok(t), outs=("out",)),
    Case("train", "weight-zero", lambda w, t: _train(w, t, "--weight", "0"), "usage", ("--weight",)),
    Case("train", "lr-nan", lambda w, t: _train(w, t, "--lr", "nan"), "usage", ("--lr",)),
    Case("train", "out-in-memory", lambda w, t: [*_train(w, t)[:-2], "--out", w.train_mem / "run"], "error",
         ("inside the memory",)),
    Case("train", "out-is-file", lambda w, t: _train(w, t), "error", ("is a file",), setup=_write("out", "mine")),
    Case("train", "retrieval-0-rows", lambda w, t: _train(w, t, "--retrieval", w.train_empty), "error",
         ("memory holds 0 rows",)),
    Case("train", "val-classes-latin1", lambda w, t: _train(w, t, "--val-memory", w.eval_mem, "--val-retrieval",
                                                            w.train_mem, "--val-classes", w.latin1), "error",
         ("not UTF-8",)),
    Case("train", "val-classes-dev-zero", lambda w, t: _train(w, t, "--val-memory", w.eval_mem, "--val-retrieval",
                                                              w.train_mem, "--val-classes", t / "z.csv"), "error",
         ("not a regular file",), setup=lambda w, t: _link_zero(t, "z.csv")),
    Case("train", "template-field", lambda w, t: _train(w, t, "--val-memory", w.eval_mem, "--val-retrieval",
                                                        w.train_mem, "--val-classes", w.manifest, "--template",
                                                        "a {x}"), "error", ("{x}",)),
    Case("train", "resume-garbage-checkpoint", lambda w, t: _train(w, t, "--resume"), "error", ("checkpoint.npz",),
         setup=_write("out/checkpoint.npz", b"PK\x03\x04 garbage"), outs=("out/.train.lock",)),
    Case("train", "heads-7", lambda w, t: _train(w, t, "--heads", "7"), "error", ("--heads 7",)),
    Case("train", "retrieval-count-differs", lambda w, t: _train(w, t, "--retrieval", w.train_mem, "--retrieval",
                                                                 w.train_mem), "error", ("--retrieval",)),
    Case("train", "val-memory-without-classes", lambda w, t: _train(w, t, "--val-memory", w.eval_mem,
                                                                    "--val-retrieval", w.train_mem), "error",
         ("--val-classes",)),
    Case("train", "steps-zero", lambda w, t: _train(w, t, "--steps-per-epoch", "0"), "usage",
         ("--steps-per-epoch",)),
    Case("train", "valid", lambda w, t: _train(w, t), "ok", check=lambda p, w, t: _train_ok(t), outs=("out",)),

    # ---- classify train (classify_testlib class-fake encoder)
    Case("classify train", "dataset-missing", lambda w, t: [*_ctrain(w, t), "--dataset", t / "none.csv"], "error",
         ("none.csv",), fast=True),
    Case("classify train", "dataset-header-only", lambda w, t: [*_ctrain(w, t), "--dataset", w.header_only],
         "error", ("header_only.csv",)),
    Case("classify train", "memory-0-rows", lambda w, t: [*_ctrain(w, t), "--memory", w.cls_empty], "error",
         ("memory holds 0 rows",)),
    Case("classify train", "split-absent", lambda w, t: _ctrain(w, t, "--split", "nope"), "error", ("nope",)),
    Case("classify train", "out-in-memory", lambda w, t: [*_ctrain(w, t), "--out", w.cls_mem / "w.npz"], "error",
         ("inside the memory",)),
    Case("classify train", "out-exists", lambda w, t: _ctrain(w, t), "error", ("--overwrite",),
         setup=_write("w.npz", "mine")),
    Case("classify train", "lr-nan", lambda w, t: _ctrain(w, t, "--lr", "nan"), "usage", ("--lr",)),
    Case("classify train", "k-above-rows", lambda w, t: _ctrain(w, t, "-k", "100000"), "ok",
         check=lambda p, w, t: _classify_ok(t), outs=("w.npz", "w.json", "w.npz.json")),
    Case("classify train", "resume-garbage-checkpoint", lambda w, t: _ctrain(w, t, "--resume"), "error",
         ("ckpt",), setup=_write("w.npz.ckpt.npz", b"PK\x03\x04 garbage")),
    Case("classify train", "cache-dir-is-file", lambda w, t: [*_ctrain(w, t), "--cache-dir", t / "c"], "error",
         ("c",), setup=_write("c", "mine")),
    Case("classify train", "cache-dir-in-memory", lambda w, t: [*_ctrain(w, t), "--cache-dir", w.cls_mem / "c"],
         "error", ("inside the memory",)),

    Case("classify train", "val-split-absent", lambda w, t: _ctrain(w, t, "--val-split", "nope"), "error",
         ("nope",)),
    # ---- classify eval
    Case("classify eval", "weights-garbage", lambda w, t: _ceval(w, t, A(w, "garbage.npz")), "error",
         ("garbage.npz",), fast=True),
    Case("classify eval", "weights-missing", lambda w, t: _ceval(w, t, t / "none.npz"), "error", ("none.npz",)),
    Case("classify eval", "weights-dev-zero", lambda w, t: _ceval(w, t, t / "z.npz"), "error",
         ("not a regular file",), setup=lambda w, t: _link_zero(t, "z.npz")),
    Case("classify eval", "weights-are-fusion", lambda w, t: _ceval(w, t, w.fusion32), "error", ("fusion32.npz",)),
    Case("classify eval", "weights-empty-file", lambda w, t: _ceval(w, t, A(w, "empty.npz")), "error",
         ("empty.npz",)),
    Case("classify eval", "json-in-memory", lambda w, t: [*_ceval(w, t, A(w, "garbage.npz")), "--json",
                                                          w.cls_mem / "r.json"], "error", ("inside the memory",)),
    Case("classify eval", "split-absent", lambda w, t: _ceval(w, t, t / "w.npz", "--split", "nope"), "error",
         ("nope",), setup=_cls_weights),
    Case("classify eval", "valid", lambda w, t: _ceval(w, t, t / "w.npz"), "ok", check=lambda p, w, t: _ceval_ok(t),
         setup=_cls_weights, outs=("r.json", "r.md", "r.png")),
    Case("classify eval", "json-exists", lambda w, t: _ceval(w, t, t / "w.npz"), "error", ("--overwrite",),
         setup=lambda w, t: (_cls_weights(w, t), (t / "r.md").write_text("mine"))),
    Case("classify eval", "memory-0-rows", lambda w, t: [*_ceval(w, t, t / "w.npz"), "--memory", w.cls_empty],
         "error", ("memory holds 0 rows",), setup=_cls_weights),

    # ---- export-fusion
    Case("export-fusion", "garbage", lambda w, t: ["export-fusion", "--fusion", A(w, "garbage.npz"), "--out",
                                                   t / "out"], "error", ("garbage.npz",), fast=True),
    Case("export-fusion", "missing", lambda w, t: ["export-fusion", "--fusion", t / "none.npz", "--out", t / "out"],
         "error", ("none.npz",)),
    Case("export-fusion", "dev-zero", lambda w, t: ["export-fusion", "--fusion", t / "z.npz", "--out", t / "out"],
         "error", ("not a regular file",), setup=lambda w, t: _link_zero(t, "z.npz")),
    Case("export-fusion", "folder", lambda w, t: ["export-fusion", "--fusion", w.arrays, "--out", t / "out"],
         "error", ("folder",)),
    Case("export-fusion", "empty-file", lambda w, t: ["export-fusion", "--fusion", A(w, "empty.npz"), "--out",
                                                      t / "out"], "error", ("empty.npz",)),
    Case("export-fusion", "truncated", lambda w, t: ["export-fusion", "--fusion", A(w, "truncated.npz"), "--out",
                                                     t / "out"], "error", ("truncated.npz",)),
    Case("export-fusion", "foreign-zip", lambda w, t: ["export-fusion", "--fusion", A(w, "foreign.npz"), "--out",
                                                       t / "out"], "error", ("foreign.npz",)),
    Case("export-fusion", "classify-weights", lambda w, t: ["export-fusion", "--fusion", t / "w.npz", "--out",
                                                            t / "out"], "error", ("w.npz",), setup=_cls_weights),
    Case("export-fusion", "out-in-memory", lambda w, t: ["export-fusion", "--fusion", w.fusion32, "--out",
                                                         w.mem / "x"], "error", ("inside the memory",)),
    Case("export-fusion", "out-exists", lambda w, t: ["export-fusion", "--fusion", w.fusion32, "--out", t / "out"],
         "error", ("--overwrite",), setup=_write("out/phi_text.onnx", "mine")),
    Case("export-fusion", "ctrl-name", lambda w, t: ["export-fusion", "--fusion", t / CTRL, "--out", t / "out"],
         "error", ("\\x1b",)),
    Case("export-fusion", "modules-bogus", lambda w, t: ["export-fusion", "--fusion", w.fusion32, "--modules",
                                                         "image,bogus", "--out", t / "out"], "usage", ("--modules",)),
    Case("export-fusion", "valid", lambda w, t: ["export-fusion", "--fusion", w.fusion32, "--out", t / "out"],
         "ok", check=_export_ok, outs=("out",)),

    # ---- export-image-weights
    Case("export-image-weights", "garbage", lambda w, t: ["export-image-weights", "--fusion", A(w, "garbage.npz"),
                                                          "--out", t / "i.npz"], "error", ("garbage.npz",),
         fast=True),
    Case("export-image-weights", "missing", lambda w, t: ["export-image-weights", "--fusion", t / "none.npz",
                                                          "--out", t / "i.npz"], "error", ("none.npz",)),
    Case("export-image-weights", "dev-zero", lambda w, t: ["export-image-weights", "--fusion", t / "z.npz",
                                                           "--out", t / "i.npz"], "error", ("not a regular file",),
         setup=lambda w, t: _link_zero(t, "z.npz")),
    Case("export-image-weights", "fifo", lambda w, t: ["export-image-weights", "--fusion", t / "p.npz",
                                                       "--out", t / "i.npz"], "error", ("named pipe",),
         setup=lambda w, t: _fifo(t, "p.npz")),
    Case("export-image-weights", "truncated", lambda w, t: ["export-image-weights", "--fusion",
                                                            A(w, "truncated.npz"), "--out", t / "i.npz"], "error",
         ("truncated.npz",)),
    Case("export-image-weights", "param-set-without-meta", lambda w, t: ["export-image-weights", "--fusion",
                                                                         w.fusion32, "--out", t / "i.npz"], "error",
         ("fusion32.npz",)),
    Case("export-image-weights", "out-in-memory", lambda w, t: ["export-image-weights", "--fusion", w.reco32,
                                                                "--out", w.mem / "i.npz"], "error",
         ("inside the memory",)),
    Case("export-image-weights", "out-exists", lambda w, t: ["export-image-weights", "--fusion", w.reco32,
                                                             "--out", t / "i.npz"], "error", ("--overwrite",),
         setup=_write("i.npz", "mine")),
    Case("export-image-weights", "out-is-folder", lambda w, t: ["export-image-weights", "--fusion", w.reco32,
                                                                "--out", t], "error", ("folder",)),
    Case("export-image-weights", "ctrl-name", lambda w, t: ["export-image-weights", "--fusion", t / CTRL, "--out",
                                                            t / "i.npz"], "error", ("\\x1b",)),
    Case("export-image-weights", "valid", lambda w, t: ["export-image-weights", "--fusion", w.reco32, "--out",
                                                        t / "i.npz"], "ok", check=lambda p, w, t: _image_only_ok(t),
         outs=("i.npz",)),

    # ---- class-text (reco-mini)
    Case("class-text", "0-rows", lambda m, t: ["class-text", "--memory", m.mem0, "--class-names", m.names, "--out",
                                               t / "c.npz"], "error", ("memory holds 0 rows",), model=True),
    Case("class-text", "no-classes", lambda m, t: ["class-text", "--memory", m.mem3, "--out", t / "c.npz"], "error",
         ("--class-names",), model=True, fast=True),
    Case("class-text", "class-names-empty", lambda m, t: ["class-text", "--memory", m.mem3, "--class-names",
                                                          t / "n.txt", "--out", t / "c.npz"], "error", ("n.txt",),
         setup=_write("n.txt", "\n"), model=True),
    Case("class-text", "class-names-dev-zero", lambda m, t: ["class-text", "--memory", m.mem3, "--class-names",
                                                             t / "n.txt", "--out", t / "c.npz"], "error",
         ("not a regular file",), setup=lambda m, t: _link_zero(t, "n.txt"), model=True),
    Case("class-text", "fusion-garbage", lambda m, t: ["class-text", "--memory", m.mem3, "--class-names", m.names,
                                                       "--fusion", A(m.w, "garbage.npz"), "--out", t / "c.npz"],
         "error", ("garbage.npz",), model=True),
    Case("class-text", "fusion-wrong-dim", lambda m, t: ["class-text", "--memory", m.mem3, "--class-names", m.names,
                                                         "--fusion", m.w.reco32, "--out", t / "c.npz"], "error",
         ("reco32.npz",), model=True),
    Case("class-text", "out-in-memory", lambda m, t: ["class-text", "--memory", m.mem3, "--class-names", m.names,
                                                      "--out", m.mem3 / "c.npz"], "error", ("inside the memory",),
         model=True),
    Case("class-text", "out-exists", lambda m, t: ["class-text", "--memory", m.mem3, "--class-names", m.names,
                                                   "--out", t / "c.npz"], "error", ("--overwrite",),
         setup=_write("c.npz", "mine"), model=True),
    Case("class-text", "templates-width", lambda m, t: ["class-text", "--memory", m.mem3, "--class-names", m.names,
                                                        "--templates", t / "tp.txt", "--out", t / "c.npz"], "error",
         ("format spec",), setup=_write("tp.txt", "{:>900000000}\n"), model=True),
    Case("class-text", "classes-header-only", lambda m, t: ["class-text", "--memory", m.mem3, "--classes",
                                                            m.w.header_only, "--out", t / "c.npz"], "error",
         ("header_only.csv",), model=True),
    Case("class-text", "k-zero", lambda m, t: ["class-text", "--memory", m.mem3, "--class-names", m.names, "-k", "0",
                                               "--out", t / "c.npz"], "usage", ("-k",), model=True),
    Case("class-text", "k-above-rows", lambda m, t: ["class-text", "--memory", m.mem3, "--class-names", m.names,
                                                     "-k", "40", "--out", t / "c.npz"], "ok",
         check=lambda p, m, t: _class_text_ok(t, 3, 40), outs=("c.npz",), model=True),
    Case("query", "class-text-garbage", lambda m, t: ["query", "--memory", m.mem3, m.image, "--class-text",
                                                      A(m.w, "garbage.npz")], "error", ("garbage.npz",), model=True),
    Case("query", "class-text-is-fusion", lambda m, t: ["query", "--memory", m.mem3, m.image, "--class-text",
                                                        m.w.reco32], "error", ("reco32.npz",), model=True),

    # ---- export-clip (open_clip absent here: the refusals must come first or name the missing extra)
    Case("export-clip", "out-in-memory", lambda w, t: ["export-clip", "--model", "ViT-B-32", "--out", w.mem / "x"],
         "error", ("inside the memory",), fast=True),
    Case("export-clip", "out-exists", lambda w, t: ["export-clip", "--model", "ViT-B-32", "--out", t / "out"],
         "error", ("--overwrite",), setup=_write("out/encoder.json", "mine")),
    Case("export-clip", "out-is-file", lambda w, t: ["export-clip", "--model", "ViT-B-32", "--out", t / "out"],
         "error", ("out",), setup=_write("out", "mine")),
    Case("export-clip", "opset-zero", lambda w, t: ["export-clip", "--model", "ViT-B-32", "--opset", "0", "--out",
                                                    t / "out"], "usage", ("--opset",)),
    Case("export-clip", "seed-negative", lambda w, t: ["export-clip", "--model", "ViT-B-32", "--seed", "-1",
                                                       "--out", t / "out"], "usage", ("--seed",)),
    Case("export-clip", "pretrained-dev-zero", lambda w, t: ["export-clip", "--model", "ViT-B-32", "--pretrained",
                                                             t / "z.pt", "--out", t / "out"], "error", (),
         setup=lambda w, t: _link_zero(t, "z.pt")),
]


def _flip(path: Path, byte: int) -> None:
    b = bytearray(path.read_bytes())
    b[byte] ^= 0x10
    path.write_bytes(bytes(b))


def _garble(path: Path) -> None:
    """Same size, garbage past the SQLite header page."""
    b = bytearray(path.read_bytes())
    b[100:] = bytes((i * 37) % 256 for i in range(len(b) - 100))
    path.write_bytes(bytes(b))


def _ablate_ok(t: Path) -> None:
    rows = json.loads((t / "out" / "ablations.json").read_text())["rows"]
    assert sorted((r["k_requested"], r["k"]) for r in rows if r["arm"] == "k") == [(1, 1), (10, 5)], rows
    assert all(np.isfinite(r["top1"]) for r in rows if r.get("top1") is not None)


def _train_ok(t: Path) -> None:
    from reco_ref.reco.weights import load_reco_weights

    w = load_reco_weights(t / "out" / "best.npz")
    assert w is not None
    log = [json.loads(ln) for ln in (t / "out" / "log.jsonl").read_text().splitlines()]
    assert log and all(np.isfinite(r["loss"]) for r in log if "loss" in r)


def _image_only_ok(t: Path) -> None:
    from reco_ref.eval.edge import load_image_weights

    w = load_image_weights(t / "i.npz")
    assert w.text is None and w.image is not None


def _class_text_ok(t: Path, k: int, k_requested: int) -> None:
    from reco_ref.eval.edge import load_class_text

    ct = load_class_text(t / "c.npz")
    assert ct["frozen"].shape == ct["refined"].shape == (2, 768)
    assert (ct["header"]["k"], ct["header"]["k_requested"]) == (k, k_requested)


def _top_ok(p, n_classes: int) -> None:
    r = json.loads(p.stdout)
    assert len(r["frozen_top"]) == n_classes, r


def _ceval_ok(t: Path) -> None:
    r = json.loads((t / "r.json").read_text())
    assert r, r


def _classify_ok(t: Path) -> None:
    with np.load(t / "w.npz") as z:
        assert z.files and all(np.isfinite(z[n]).all() for n in z.files if z[n].dtype.kind == "f")


# ------------------------------------------------------------------------------------------ the snapshot
def _state(folder: Path) -> dict[str, str]:
    """{relative path: content digest, or the kind of a non-regular entry}, links not followed, pipes not opened."""
    out = {}
    for dirpath, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = Path(dirpath) / name
            st = os.lstat(p)
            rel = str(p.relative_to(folder))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = "link:" + os.readlink(p)
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = "dir"
            elif stat.S_ISREG(st.st_mode):
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[rel] = f"special:{stat.S_IFMT(st.st_mode)}"
    return out


def _diff(before: dict, after: dict) -> list[str]:
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


def _ids(c: Case) -> str:
    return f"{c.verb.replace(' ', '-')}:{c.name}"


def _marks(c: Case) -> list:
    marks = [] if c.fast else [pytest.mark.slow]
    if c.known:
        marks.append(pytest.mark.xfail(reason=c.known, strict=True))
    return marks


@pytest.mark.parametrize("case", [pytest.param(c, id=_ids(c), marks=_marks(c)) for c in CASES])
def test_every_verb(case: Case, world, request, tmp_path):
    if case.model:
        m = request.getfixturevalue("mini")
        m.w = world
        inputs, roots = m, [world.root, m.root]
    else:
        inputs, roots = world, [world.root]
    t = tmp_path / "case"
    t.mkdir()
    if case.setup:
        case.setup(inputs, t)
    argv = [sys.executable, "-m", "reco_ref.cli", *case.argv(inputs, t)]
    before = {r: _state(r) for r in roots + [t]}
    p, peak = measured(argv, limit=AS_MODEL if case.model else AS_PLAIN, timeout=TIMEOUT, PYTHONPATH=PYTHONPATH)
    err = p.stderr

    # the process: a clean exit, no traceback, no "a bug" line, bounded memory
    assert p.returncode >= 0, f"killed by signal {-p.returncode}: {err[-2000:]}"
    assert p.returncode in (0, 1, 2), (p.returncode, err[-2000:])
    assert "Traceback" not in err and "a bug" not in err, err[-3000:]
    assert peak < RSS_BOUND, f"peak RSS {peak / 2**20:.0f} MiB"
    assert "\x1b" not in err and "\x07" not in err and "\x1b" not in p.stdout, repr(err[-500:])
    outcome = {0: "ok", 1: "error", 2: "usage"}[p.returncode]
    record(f"every verb: {case.verb}", "known (xfail)" if case.known else "error" if outcome == "usage" else outcome,
           peak)
    assert outcome == case.expect, f"expected {case.expect}, got exit {p.returncode}: {err[-1500:]} {p.stdout[-500:]}"

    # its message: one line, the last, naming the verb and what the table expects
    if outcome != "ok":
        lines = [ln for ln in err.splitlines() if ln.strip()]
        errs = [ln for ln in lines if ": error: " in ln]
        assert len(errs) == 1 and lines[-1] == errs[0], err[-2000:]
        assert errs[0].startswith(f"reco-ref {case.verb.split()[0]}"), errs[0]
        for word in case.words:
            assert word in errs[0], (word, errs[0])
    else:
        case.check(p, inputs, t)

    # nothing outside the case's outputs changed, appeared or disappeared
    allowed = tuple(str(t / o) for o in case.outs)
    for r in roots + [t]:
        changed = [k for k in _diff(before[r], _state(r))
                   if not any(str(r / k) == a or str(r / k).startswith(a + os.sep) for a in allowed)]
        assert not changed, f"{r}: changed outside the outputs: {changed[:8]}"


def test_the_table_reaches_every_verb():
    """Every verb of ``reco-ref --help`` (and each classify sub-verb) has cases here, a default one included."""
    from reco_ref.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    verbs = set(sub.choices)
    verbs.discard("classify")
    csub = next(a for a in sub.choices["classify"]._actions if a.__class__.__name__ == "_SubParsersAction")
    verbs |= {f"classify {v}" for v in csub.choices}
    have = {c.verb for c in CASES}
    assert verbs == have, (verbs - have, have - verbs)
    assert {c.verb for c in CASES if c.fast} == verbs
