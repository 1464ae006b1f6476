import os

import numpy as np
import pytest

from reco_ref import io as rio
from reco_ref.checks import check_array
from reco_ref.errors import RecoError, ShapeError


def test_atomic_write_leaves_old_file_on_error(tmp_path):
    p = tmp_path / "a.json"
    rio.atomic_write_json(p, {"x": 1})
    with pytest.raises(RuntimeError):
        with rio.atomic_open(p, "wb") as fh:
            fh.write(b"partial")
            raise RuntimeError("boom")
    assert p.read_text().strip().startswith("{")
    assert [f for f in os.listdir(tmp_path) if f.startswith(rio.TMP_PREFIX)] == []


def test_npz_roundtrip_and_no_pickle(tmp_path):
    p = tmp_path / "a.npz"
    rio.atomic_save_npz(p, {"w": np.arange(6.0).reshape(2, 3)})
    assert np.array_equal(rio.load_npz(p)["w"], np.arange(6.0).reshape(2, 3))
    with pytest.raises(RecoError, match="pickle"):
        rio.atomic_save_npz(p, {"o": np.array([{"a": 1}], dtype=object)})
    np.savez(tmp_path / "evil.npz", o=np.array([{"a": 1}], dtype=object))
    with pytest.raises(RecoError):
        rio.load_npz(tmp_path / "evil.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(RecoError, match="junk.npz"):
        rio.load_npz(tmp_path / "junk.npz")


def test_npy_mmap(tmp_path):
    p = tmp_path / "a.npy"
    rio.atomic_save_npy(p, np.ones((3, 4), np.float16))
    a = rio.load_npy(p)
    assert isinstance(a, np.memmap) and a.dtype == np.float16 and a.shape == (3, 4)


def test_check_array_messages():
    x = np.zeros((2, 3), np.float32)
    assert check_array("q [B,D]", x, shape=(None, 3)) is x
    with pytest.raises(ShapeError, match=r"q \[B,D\]: axis 1 has size 3, expected 4"):
        check_array("q [B,D]", x, shape=(None, 4))
    with pytest.raises(ShapeError, match="dtype int64"):
        check_array("q", np.zeros(3, np.int64))
    x[0, 0] = np.nan
    with pytest.raises(ShapeError, match="1 NaN"):
        check_array("q", x)
    with pytest.raises(ShapeError, match="expected a numpy array"):
        check_array("q", [1.0])


def test_atomic_files_get_umask_mode_not_mkstemp_0600(tmp_path):
    old = os.umask(0o022)
    try:
        rio.atomic_write_text(tmp_path / "a.txt", "x")
        with rio.atomic_path(tmp_path / "b.bin") as tmp:
            tmp.write_bytes(b"y")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.bin").read_bytes() == b"y"
    assert [f for f in os.listdir(tmp_path) if f.startswith(rio.TMP_PREFIX)] == []
