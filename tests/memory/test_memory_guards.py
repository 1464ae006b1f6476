"""The guards of issue 11 that are about meaning, not bytes: refused folders, duplicate adds, the encoder
name, key-indexed memories and text queries, the path policy of pairs files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from memory_testlib import FakeEncoder, make_pairs

from reco_ref.errors import MemoryFormatError, SearchError
from reco_ref.memory import Memory, add_to_memory, build_memory, read_pairs
from reco_ref.memory.commands import search as cli_search


def test_build_refuses_a_foreign_folder_and_a_file(tmp_path):
    items = read_pairs(make_pairs(tmp_path / "src", 5))
    user = tmp_path / "user"
    user.mkdir()
    (user / "image.npy").write_bytes(b"my own file")  # shares a memory file name
    with pytest.raises(MemoryFormatError, match="not empty and is not a memory.*image.npy"):
        build_memory(user, items, FakeEncoder(8), progress=False)
    assert (user / "image.npy").read_bytes() == b"my own file" and sorted(p.name for p in user.iterdir()) == ["image.npy"]
    with pytest.raises(MemoryFormatError, match="is a file"):
        build_memory(user / "image.npy", items, FakeEncoder(8), progress=False)
    (tmp_path / "empty").mkdir()
    assert build_memory(tmp_path / "empty", items, FakeEncoder(8), progress=False)["counts"]["rows"] == 5


def test_add_refuses_duplicates_and_keeps_the_encoder_name(tmp_path):
    pairs = make_pairs(tmp_path / "src", 10)
    items = read_pairs(pairs)
    build_memory(tmp_path / "m", items[:6], FakeEncoder(8), progress=False)
    with pytest.raises(MemoryFormatError, match="6 of the pairs to add are already in the memory"):
        add_to_memory(tmp_path / "m", items, FakeEncoder(8), progress=False)  # 6 old + 4 new
    assert not (tmp_path / "m" / ".build").exists()  # a refused add leaves nothing pending
    with pytest.raises(MemoryFormatError, match="already added"):
        add_to_memory(tmp_path / "m", items[:6], FakeEncoder(8), progress=False)  # the very same input
    renamed = FakeEncoder(8)
    renamed.name = "a-new-name"  # same weights (fingerprint), another label
    logs = []
    add_to_memory(tmp_path / "m", items[6:], renamed, progress=False, log=logs.append)
    m = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert m["encoder"]["name"] == "fake-8" and any("keeps its name" in x for x in logs)
    assert len(Memory.open(tmp_path / "m")) == 10
    # same source and caption but other bytes is not a duplicate (two folders may both hold img/00000.jpg)
    other = make_pairs(tmp_path / "other", 3, start=500)
    (tmp_path / "other" / "img").rename(tmp_path / "other" / "img_")
    (tmp_path / "other" / "img").mkdir()
    for i in range(3):
        (tmp_path / "other" / "img" / f"{i:05d}.jpg").write_bytes(b"OK other bytes %d" % i)
    lines = (tmp_path / "other" / "pairs.csv").read_text().replace("img/00500", "img/00000").replace(
        "img/00501", "img/00001").replace("img/00502", "img/00002")
    (tmp_path / "other" / "pairs.csv").write_text(lines)
    add_to_memory(tmp_path / "m", read_pairs(tmp_path / "other" / "pairs.csv"), FakeEncoder(8), progress=False)
    assert len(Memory.open(tmp_path / "m")) == 13
    add_to_memory(tmp_path / "m", items[:2], FakeEncoder(8), progress=False, allow_duplicates=True)
    assert len(Memory.open(tmp_path / "m")) == 15


def test_text_queries_on_a_key_indexed_memory_get_text_advice(tmp_path):
    items = read_pairs(make_pairs(tmp_path / "src", 8))
    build_memory(tmp_path / "k", items, FakeEncoder(32, key_dim=16), progress=False)
    with pytest.raises(SearchError, match="text queries cannot.*--modality text"):
        cli_search(memory=str(tmp_path / "k"), text=["a bird"], modality="image", model="memory_testlib:fake32_keys")
    mem = Memory.open(tmp_path / "k")
    q = np.asarray(mem.text[:2], np.float32)
    with pytest.raises(SearchError, match="encode_image_keys.*text queries cannot search this index"):
        mem.search(q, modality="image")
    assert cli_search(memory=str(tmp_path / "k"), text=["a bird"], model="memory_testlib:fake32_keys")


def test_pairs_outside_their_folder_need_the_flag(tmp_path):
    make_pairs(tmp_path / "data", 2)
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "p.csv").write_text("image,caption\n../data/img/00000.jpg,a cat\n")
    with pytest.raises(MemoryFormatError, match="outside the pairs file's folder.*--allow-outside-paths"):
        read_pairs(tmp_path / "lists" / "p.csv")
    items = read_pairs(tmp_path / "lists" / "p.csv", allow_outside=True)
    assert items[0]["image"] == str(tmp_path / "data" / "img" / "00000.jpg")
