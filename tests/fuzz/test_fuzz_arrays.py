"""Fuzz the array readers (``reco_ref.io.load_npy`` / ``load_npz``): crafted headers, truncation, bit flips, bombs.

Each case must load correctly or raise one named error, with allocations bounded by the file's own
size (tracemalloc counts numpy's buffers): a 1 KB file must never make the reader allocate gigabytes.
"""

from __future__ import annotations

import io
import random
import zipfile

import numpy as np
import pytest
from fuzz_lib import call, check_cli, flip_bit, peak_below, run_cli, tree, assert_unchanged
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reco_ref.io import load_npy, load_npz

DESCRS = ["<f4", "<f8", ">i8", "|u1", "|O", "<U3", "|V10", "|S5", "<c8", "<f2", "bogus", "<i4"]


def _npy(header: str, body: bytes, version: bytes = b"\x01\x00") -> bytes:
    h = header.encode("latin-1")
    pad = 64 - (10 + len(h) + 1) % 64
    h = h + b" " * pad + b"\n"
    return b"\x93NUMPY" + version + len(h).to_bytes(2, "little") + h + body


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(descr=st.sampled_from(DESCRS), fortran=st.booleans(),
       shape=st.lists(st.one_of(st.integers(0, 8), st.sampled_from([2**31, 2**40, 2**62, -1])), max_size=3),
       body=st.integers(0, 300), raw=st.sampled_from(["", "{", "{'descr': '<f4'}", "1+1"]))
def test_crafted_npy_headers(tmp_path_factory, descr, fortran, shape, body, raw):
    header = raw or f"{{'descr': '{descr}', 'fortran_order': {fortran}, 'shape': {tuple(shape)!r}, }}"
    p = tmp_path_factory.mktemp("npy") / "a.npy"
    p.write_bytes(_npy(header, bytes(body)))
    for mmap in (True, False):
        with peak_below(4 << 20):
            outcome, a = call("arrays: crafted .npy header", load_npy, p, mmap=mmap)
        if outcome == "ok":
            assert a.nbytes == body and a.dtype != object


def _valid_npz(compressed: bool) -> bytes:
    buf = io.BytesIO()
    arrays = {"image": np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32),
              "item": np.arange(6), "failed_error": np.array(["x", "yy"])}
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    return buf.getvalue()


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_bit_flips_and_truncation(tmp_path, compressed):
    good = _valid_npz(compressed)
    rnd = random.Random(7)
    cases = [flip_bit(good, rnd.randrange(len(good) * 8)) for _ in range(60)] + \
            [good[:rnd.randrange(len(good))] for _ in range(20)]
    for i, data in enumerate(cases):
        p = tmp_path / f"c{i}.npz"
        p.write_bytes(data)
        with peak_below(max(4 << 20, 40 * len(good))):
            outcome, z = call("arrays: flipped/truncated .npz", load_npz, p, names=("image", "item", "failed_error"))
        if outcome == "ok":  # a flip in a CRC-less place (zip comment, padding) or in the data itself
            assert set(z) <= {"image", "item", "failed_error"}


def _bomb(path, entry: str, nbytes: int) -> None:
    """An .npz whose one entry is ``nbytes`` of zeros (an honest header), deflated to almost nothing."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": (nbytes,)})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        with zf.open(entry, "w", force_zip64=True) as fh:
            fh.write(header.getvalue())
            zero = bytes(16 << 20)
            for lo in range(0, nbytes, len(zero)):
                fh.write(zero[:min(len(zero), nbytes - lo)])


def test_npz_bomb_and_foreign_names_refused_before_decompression(tmp_path):
    _bomb(tmp_path / "bomb.npz", "image.npy", 400 << 20)  # ~400 KB on disk, 400 MB inside
    assert (tmp_path / "bomb.npz").stat().st_size < 1 << 20
    with peak_below(8 << 20):
        outcome, msg = call("arrays: .npz bomb / foreign entry", load_npz, tmp_path / "bomb.npz")
    assert outcome == "error" and "decompression bomb" in msg
    _bomb(tmp_path / "names.npz", "evil.npy", 1 << 20)
    with peak_below(4 << 20):
        outcome, msg = call("arrays: .npz bomb / foreign entry", load_npz, tmp_path / "names.npz", names=("image",))
    assert outcome == "error" and "unexpected entry 'evil.npy'" in msg
    with zipfile.ZipFile(tmp_path / "txt.npz", "w") as zf:
        zf.writestr("notes.txt", "hello")
    outcome, msg = call("arrays: .npz bomb / foreign entry", load_npz, tmp_path / "txt.npz")
    assert outcome == "error" and "notes.txt" in msg
    np.savez(tmp_path / "obj.npz", o=np.array([{"a": 1}], dtype=object))
    outcome, msg = call("arrays: .npz bomb / foreign entry", load_npz, tmp_path / "obj.npz")
    assert outcome == "error" and "pickle" in msg


@pytest.mark.slow
def test_npz_bomb_1_5_gb(tmp_path):
    """The issue's example: a 1.5 GB zero entry in a ~1.5 MB file, refused before decompression."""
    _bomb(tmp_path / "bomb.npz", "image.npy", 1536 << 20)
    with peak_below(8 << 20):
        outcome, msg = call("arrays: .npz bomb / foreign entry", load_npz, tmp_path / "bomb.npz")
    assert outcome == "error" and "decompression bomb" in msg


@pytest.mark.parametrize("names", [("1d", "nan", "crafted", "good"), pytest.param(None, marks=pytest.mark.slow)],
                         ids=["slice", "all"])
def test_cli_embedding_arrays(tmp_path, names):
    """--image-embeddings / --text-embeddings through the CLI: 1-D, int, truncated, crafted, NaN, unnormalised."""
    rng = np.random.default_rng(0)
    good = rng.standard_normal((8, 16)).astype(np.float32)
    good /= np.linalg.norm(good, axis=1, keepdims=True)
    cases = {"1d": np.ones(5, np.float32), "int": np.ones((4, 4), np.int64), "empty": np.zeros((0, 16), np.float32),
             "nan": np.where(np.arange(16) == 3, np.nan, good).astype(np.float32), "unnorm": good * 3,
             "f16": good.astype(np.float16), "3d": good.reshape(2, 4, 16)}
    for name, a in cases.items():
        np.save(tmp_path / f"{name}.npy", a)
    np.save(tmp_path / "good.npy", good)
    raw = (tmp_path / "good.npy").read_bytes()
    (tmp_path / "trunc.npy").write_bytes(raw[:-7])
    (tmp_path / "crafted.npy").write_bytes(_npy("{'descr': '<f4', 'fortran_order': False, 'shape': (4000000, 100000), }", b""))
    before = tree(tmp_path)
    want_ok = {"f16", "good"}
    for name in names or list(cases) + ["trunc", "crafted", "good"]:
        p = run_cli("build-memory", "--image-embeddings", tmp_path / f"{name}.npy", "--text-embeddings",
                    tmp_path / "good.npy" if name not in ("1d", "3d") else tmp_path / f"{name}.npy",
                    "--out", tmp_path / f"m_{name}", "--encoder-fingerprint", "f" * 64, "--no-progress")
        outcome = check_cli(p, "arrays: CLI --*-embeddings")
        assert (outcome == "ok") == (name in want_ok), (name, p.stderr[-400:])
    assert_unchanged(before, tree(tmp_path), "arrays CLI")
