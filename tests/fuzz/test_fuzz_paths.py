"""Issue 20, class 1: nothing is written outside a verb's output, nothing is replaced without ``--overwrite``,
no output lands inside a memory.

* names read from build-state files (``.build/COMMIT.json``, chunk item ids, ``shards.json``) are confined to
  their folder before they are joined to it;
* every verb that writes files checks all of them first (``reco_ref.paths.check_output_files`` /
  ``check_output_dir``): inside a memory -> refused; an existing file -> refused unless ``--overwrite``.

Each case hashes the folders around it before and after, so "refused" also means "nothing changed".
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from fuzz_lib import ROOT, assert_unchanged, check_cli, run_cli, tree
from memory_testlib import FakeEncoder, make_pairs

from reco_ref import paths
from reco_ref.cli import main
from reco_ref.errors import MemoryFormatError, RecoError
from reco_ref.memory import build_memory, read_pairs
from reco_ref.memory import format as fmt

HAVE_RECO_MINI = (ROOT / "weights" / "reco-mini" / "encoder.json").is_file()


def _memory(tmp_path: Path, n: int = 12) -> tuple[Path, Path]:
    pairs = make_pairs(tmp_path / "src", n)
    build_memory(tmp_path / "mem", read_pairs(pairs), FakeEncoder(32), chunk_size=8, M=4, ef_construction=20,
                 progress=False)
    return tmp_path / "mem", pairs


def _error(capsys, argv: list[str], verb: str) -> str:
    """Run the CLI in-process; assert exit 1 and one ``reco-ref VERB: error:`` line; return that line."""
    assert main(argv) == 1
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith(f"reco-ref {verb}: error: "), lines
    assert "unexpected" not in lines[-1] and "a bug" not in lines[-1], lines[-1]
    return lines[-1]


# ------------------------------------------------------------------------------------------------------------
# names read from a memory's build state
# ------------------------------------------------------------------------------------------------------------
def _craft_commit(mem: Path, files, *, manifest=None) -> None:
    """A ``.build/COMMIT.json`` listing ``files`` (with the memory's own manifest), as a crafted memory holds."""
    build = mem / ".build"
    (build / "staged").mkdir(parents=True, exist_ok=True)
    man = json.loads((mem / "manifest.json").read_text()) if manifest is None else manifest
    (build / "COMMIT.json").write_text(json.dumps({"files": files, "manifest": man}))


def test_commit_entry_leaving_the_memory_is_refused_by_memory_add_resume(tmp_path):
    """The reported case, end to end: ``memory-add --resume`` (the command the tool itself recommends) on a memory
    whose COMMIT.json lists ``../../somewhere/notes.txt`` refuses and leaves the user's file alone."""
    mem, pairs = _memory(tmp_path)
    (tmp_path / "somewhere").mkdir()
    notes = tmp_path / "somewhere" / "notes.txt"
    notes.write_text("the user's notes")
    _craft_commit(mem, ["../../somewhere/notes.txt"])
    # the staged source the roll-forward would move: .build/staged/../../somewhere/notes.txt = mem/somewhere/...
    (mem / "somewhere").mkdir()
    (mem / "somewhere" / "notes.txt").write_text("crafted")
    before = tree(tmp_path / "somewhere")
    p = run_cli("memory-add", mem, "--pairs", pairs, "--model", "memory_testlib:fake32", "--resume", "--no-progress")
    check_cli(p, "paths: crafted build state", must_fail=True)
    assert "COMMIT.json" in p.stderr and "leaves its folder" in p.stderr, p.stderr
    assert_unchanged(before, tree(tmp_path / "somewhere"), "memory-add --resume")
    assert notes.read_text() == "the user's notes"


@pytest.mark.parametrize("files, expect", [
    (["image.npy", "/ABS/notes.txt"], "leaves its folder"),
    (["sub/image.npy"], "leaves its folder"),
    ([".."], "leaves its folder"),
    (["manifest.json"], "not one of the expected"),
    (["notes.txt"], "not one of the expected"),
    ([5], "expected a file name"),
    ("image.npy", "must be a list"),
])
def test_commit_names_are_plain_memory_file_names(tmp_path, files, expect):
    mem, _ = _memory(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "notes.txt").write_text("keep")
    files = [f.replace("/ABS", str(outside)) if isinstance(f, str) else f for f in files] \
        if isinstance(files, list) else files
    _craft_commit(mem, files)
    before, mem_before = tree(outside), tree(mem)
    with pytest.raises(MemoryFormatError, match=expect):
        fmt.roll_forward(mem)
    assert_unchanged(before, tree(outside), "roll_forward")
    assert_unchanged(mem_before, tree(mem), "roll_forward")


@pytest.mark.parametrize("content, expect", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({"files": ["image.npy"], "manifest": {"format_version": 1}}), "field 'embed_dim' missing"),
])
def test_damaged_commit_record_is_one_named_error(tmp_path, capsys, content, expect):
    mem, pairs = _memory(tmp_path)
    (mem / ".build" / "staged").mkdir(parents=True)
    (mem / ".build" / "COMMIT.json").write_text(content)
    err = _error(capsys, ["memory-add", str(mem), "--pairs", str(pairs), "--model", "memory_testlib:fake32",
                          "--resume", "--no-progress"], "memory-add")
    assert "COMMIT.json" in err and expect in err, err


class _DiesOnSecondChunk(FakeEncoder):
    """The fake encoder (same fingerprint) that fails on its second image batch: the build stops after chunk 0."""

    def encode_images(self, items, *a, **kw):
        if self.calls >= 1:
            raise KeyboardInterrupt
        return super().encode_images(items, *a, **kw)


@pytest.mark.parametrize("shift", [-8, 8, -100])
def test_chunk_item_ids_outside_the_chunk_are_refused_on_resume(tmp_path, shift):
    """A chunk read back by --resume indexes the item list with its ids: an id outside the chunk (a negative one
    would wrap) must not give a row another item's caption."""
    from reco_ref.io import atomic_save_npz, load_npz

    items = read_pairs(make_pairs(tmp_path / "src", 16))
    out = tmp_path / "mem"
    with pytest.raises(KeyboardInterrupt):
        build_memory(out, items, _DiesOnSecondChunk(32), chunk_size=8, M=4, ef_construction=20, progress=False)
    chunk = out / ".build" / "chunks" / "chunk_000000.npz"
    z = load_npz(chunk)
    z["item"] = z["item"] + shift
    atomic_save_npz(chunk, z)
    with pytest.raises(MemoryFormatError, match="item ids in"):
        build_memory(out, items, FakeEncoder(32), chunk_size=8, M=4, ef_construction=20, progress=False,
                     resume=True)
    assert not (out / "manifest.json").exists()


@pytest.mark.parametrize("link", [".build", ".build/chunks", ".build/staged"])
def test_symlinked_build_folders_are_refused(tmp_path, link):
    """The build writes chunks and staged files in .build/ and deletes it: a crafted link there must not make it
    write (or delete) in another folder."""
    items = read_pairs(make_pairs(tmp_path / "src", 4))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "mem" / ".build").mkdir(parents=True)
    if link == ".build":
        (tmp_path / "mem" / ".build").rmdir()
    (tmp_path / "mem" / link).symlink_to(elsewhere)
    with pytest.raises(MemoryFormatError, match="symbolic link"):
        build_memory(tmp_path / "mem", items, FakeEncoder(32), progress=False, resume=True)
    assert list(elsewhere.iterdir()) == []


def test_lock_file_link_does_not_create_a_file_elsewhere(tmp_path):
    mem, pairs = _memory(tmp_path)
    target = tmp_path / "created-by-the-lock"
    (mem / ".lock").unlink()
    (mem / ".lock").symlink_to(target)
    with pytest.raises(OSError):
        from reco_ref.memory import add_to_memory

        add_to_memory(mem, read_pairs(make_pairs(tmp_path / "more", 2, start=50)), FakeEncoder(32), progress=False)
    assert not target.exists()


@pytest.mark.parametrize("entry", ["../mem", "/tmp", "a/b", 7])
def test_shard_folder_names_are_confined(tmp_path, entry):
    from reco_ref.memory import open_memory

    mem, _ = _memory(tmp_path)
    root = tmp_path / "sharded"
    root.mkdir()
    shutil.copytree(mem, root / "shard_000")
    spec = {"format_version": 1, "kind": "sharded", "embed_dim": 32, "key_dim": None, "dtype": "float32",
            "encoder": json.loads((mem / "manifest.json").read_text())["encoder"],
            "shards": [{"dir": entry, "rows": 12, "offset": 0}], "counts": {"rows": 12, "items": 12, "failed": 0}}
    (root / "shards.json").write_text(json.dumps(spec))
    with pytest.raises(RecoError, match=r"shards\[0\]\.dir"):
        open_memory(root, verify="size")


# ------------------------------------------------------------------------------------------------------------
# the shared output checks
# ------------------------------------------------------------------------------------------------------------
def test_memory_markers_match_the_memory_format():
    """paths.py (a shared helper, importing no room) repeats how a memory is recognised: keep them in step."""
    assert paths.MEMORY_MANIFEST == fmt.MANIFEST and paths.MEMORY_SHARDS == fmt.SHARDS
    assert paths.MEMORY_BUILD_DIR == fmt.BUILD_DIR
    assert set(paths.MEMORY_FILES) == set(fmt.COMMIT_FILES)


def test_memory_containing_sees_nested_paths_links_and_partial_memories(tmp_path):
    mem, _ = _memory(tmp_path)
    assert paths.memory_containing(mem / "x.npy") == mem.resolve()
    assert paths.memory_containing(mem / "deeper" / "still" / "x.npy") == mem.resolve()
    (tmp_path / "link").symlink_to(mem)
    assert paths.memory_containing(tmp_path / "link" / "x.npy") == mem.resolve()
    assert paths.memory_containing(tmp_path / "src" / "x.npy") is None
    # a web folder with a manifest.json of its own is not a memory
    (tmp_path / "web").mkdir()
    (tmp_path / "web" / "manifest.json").write_text("{}")
    assert paths.memory_containing(tmp_path / "web" / "x.json") is None
    partial = tmp_path / "partial"
    (partial / ".build").mkdir(parents=True)
    (partial / ".build" / "plan.json").write_text("{}")
    assert paths.memory_containing(partial / "x.npy") == partial.resolve()


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../x", "/etc/passwd", "a\\b", "a\0b", None, 3])
def test_plain_name_refuses_anything_but_a_plain_name(name):
    with pytest.raises(RecoError):
        paths.plain_name(name, "f.json: field")


def test_check_output_files_rules(tmp_path):
    f = tmp_path / "a.json"
    assert paths.check_output_files([f]) == [f]  # new file: fine
    f.write_text("user")
    with pytest.raises(RecoError, match="already exists; pass --overwrite"):
        paths.check_output_files([f])
    paths.check_output_files([f], overwrite=True)
    with pytest.raises(RecoError, match="is a folder"):
        paths.check_output_files([tmp_path])
    (tmp_path / "zero").symlink_to("/dev/zero")
    with pytest.raises(RecoError, match="not a regular file"):
        paths.check_output_files([tmp_path / "zero"], overwrite=True)


# ------------------------------------------------------------------------------------------------------------
# every verb that writes files: inside a memory -> refused; an existing file -> refused unless --overwrite
# ------------------------------------------------------------------------------------------------------------
def _verb_cases(mem: Path, tmp: Path) -> list[tuple[str, list[str], Path | None]]:
    """(verb, argv with OUT standing for the output, the file the verb writes there) for every writing verb."""
    texts = tmp / "texts.txt"
    texts.write_text("a cat\n")
    return [
        ("encode", ["encode", "--texts", str(texts), "--out", "OUT/e.npy"], Path("e.npy")),
        ("query", ["query", "--text", "a cat", "--memory", str(mem), "--json", "OUT/q.json"], Path("q.json")),
        ("eval", ["eval", "--memory", str(mem), "--dataset", str(tmp / "m.csv"), "--json", "OUT/r.json"],
         Path("r.json")),
        ("eval", ["eval", "--memory", str(mem), "--dataset", str(tmp / "m.csv"), "--png", "OUT/r.png"],
         Path("r.png")),
        ("ablate", ["ablate", "--memory", str(mem), "--eval-memory", str(mem), "--eval-dataset", str(tmp / "m.csv"),
                    "--out", "OUT"], Path("ablations.json")),
        ("demo", ["demo", "--out", "OUT"], Path("results.json")),
        ("train", ["train", "--memory", str(mem), "--out", "OUT"], Path("best.npz")),
        ("classify", ["classify", "train", "--dataset", str(tmp / "m.csv"), "--memory", str(mem), "--out",
                      "OUT/w.npz"], Path("w.npz")),
        ("classify", ["classify", "eval", "--dataset", str(tmp / "m.csv"), "--weights", str(tmp / "w.npz"),
                      "--json", "OUT/c.json"], Path("c.md")),
        ("export-fusion", ["export-fusion", "--fusion", str(tmp / "f.npz"), "--out", "OUT"], Path("fusion_onnx.json")),
        ("export-clip", ["export-clip", "--model", "ViT-B-32", "--out", "OUT"], Path("encoder.json")),
        ("hf-clip-config", ["hf-clip-config", "OUT"], Path("encoder.json")),
    ]


def test_no_verb_writes_inside_a_memory(tmp_path, capsys):
    """Every writing verb refuses an output inside a memory before any work (the memory is unchanged)."""
    mem, _ = _memory(tmp_path)
    before = tree(mem)
    for verb, argv, _ in _verb_cases(mem, tmp_path):
        for target in (mem, mem / "sub"):
            args = [a.replace("OUT", str(target)) for a in argv]
            err = _error(capsys, args, verb)
            assert "inside the memory" in err, (args, err)
    # eval's embedding cache is written too
    err = _error(capsys, ["eval", "--memory", str(mem), "--dataset", str(tmp_path / "m.csv"), "--cache",
                          str(mem / "cache")], "eval")
    assert "--cache" in err and "inside the memory" in err
    assert_unchanged(before, tree(mem), "writing verbs")
    assert not (mem / "sub").exists()


def test_build_memory_refuses_an_output_inside_another_memory(tmp_path, capsys):
    mem, pairs = _memory(tmp_path)
    before = tree(mem)
    err = _error(capsys, ["build-memory", "--pairs", str(pairs), "--out", str(mem / "inner"), "--model",
                          "memory_testlib:fake32", "--no-progress"], "build-memory")
    assert "inside the memory" in err
    assert_unchanged(before, tree(mem), "build-memory")
    assert not (mem / "inner").exists()


def test_no_verb_replaces_an_existing_output_without_overwrite(tmp_path, capsys):
    mem, _ = _memory(tmp_path)
    for i, (verb, argv, name) in enumerate(_verb_cases(mem, tmp_path)):
        out = tmp_path / f"out-{i}-{verb}"
        out.mkdir()
        (out / name).write_text("the user's file")
        args = [a.replace("OUT", str(out)) for a in argv]
        err = _error(capsys, args, verb)
        assert "already exist" in err and "--overwrite" in err and name.name in err, (args, err)
        assert (out / name).read_text() == "the user's file"
        assert sorted(p.name for p in out.iterdir()) == [name.name], (verb, list(out.iterdir()))


def test_train_leaves_an_interrupted_run_to_its_resume_logic(tmp_path, capsys):
    """With OUT/checkpoint.npz present the run folder is the trainer's own: --resume continues it (no
    --overwrite needed), and without --resume the trainer's message says to pass it."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "best.npz").write_bytes(b"x")
    (out / "checkpoint.npz").write_bytes(b"x")
    paths.check_output_dir(out, ("best.npz",), resume_from="checkpoint.npz")  # no refusal
    with pytest.raises(RecoError, match="--overwrite"):
        paths.check_output_dir(out, ("best.npz",))


def test_encode_refuses_a_parts_folder_it_did_not_create(tmp_path, capsys):
    """``encode --out x.npy`` keeps its chunks in ``x.parts/`` and deletes it at the end (or on --restart): a
    user's folder of that name is refused, not written into and deleted."""
    (tmp_path / "t.txt").write_text("a cat\n")
    parts = tmp_path / "x.parts"
    parts.mkdir()
    (parts / "mine.txt").write_text("user")
    err = _error(capsys, ["encode", "--texts", str(tmp_path / "t.txt"), "--out", str(tmp_path / "x.npy"),
                          "--restart"], "encode")
    assert "x.parts" in err and "plan.json" in err
    assert (parts / "mine.txt").read_text() == "user"


def _fusion_weights(path: Path) -> Path:
    from reco_ref.fusion import init_params, save_param_set

    save_param_set(path, {"image": init_params(32, 4, seed=0), "text": init_params(32, 4, seed=1)},
                   extras={"logit_scale": np.array(np.log(1 / 0.07), np.float32)})
    return path


def test_export_fusion_checks_every_output_before_writing(tmp_path, capsys):
    """The reported case: DIR/phi_image.onnx of the user's is neither replaced nor joined by other files; with
    --overwrite the export replaces it and completes."""
    pytest.importorskip("onnx")
    w = _fusion_weights(tmp_path / "f.npz")
    out = tmp_path / "exp"
    out.mkdir()
    (out / "phi_image.onnx").write_text("the user's graph")
    err = _error(capsys, ["export-fusion", "--fusion", str(w), "--out", str(out)], "export-fusion")
    assert "phi_image.onnx" in err and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == ["phi_image.onnx"]
    assert (out / "phi_image.onnx").read_text() == "the user's graph"
    assert main(["export-fusion", "--fusion", str(w), "--out", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["fusion_onnx.json", "phi_image.onnx", "phi_text.onnx"]
    capsys.readouterr()
    # a second export into its own finished output is a replacement too: told, it goes through
    assert "--overwrite" in _error(capsys, ["export-fusion", "--fusion", str(w), "--out", str(out)], "export-fusion")


@pytest.mark.skipif(not HAVE_RECO_MINI, reason="weights/reco-mini not present")
def test_encode_overwrite_replaces_and_the_default_refuses(tmp_path, capsys):
    (tmp_path / "t.txt").write_text("a cat\na dog\n")
    out = tmp_path / "e.npy"
    argv = ["encode", "--texts", str(tmp_path / "t.txt"), "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    first = out.read_bytes()
    out.write_bytes(b"user")
    assert "--overwrite" in _error(capsys, argv, "encode")
    assert out.read_bytes() == b"user"
    assert main(argv + ["--overwrite"]) == 0
    assert out.read_bytes() == first
