"""Fixtures shared by tests/classify."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="module")
def _cache_in_tmp(tmp_path_factory):
    """`classify` caches embeddings by default in the user's cache: keep the tests' entries out of $HOME."""
    mp = pytest.MonkeyPatch()
    mp.setenv("RECO_REF_CACHE", str(tmp_path_factory.mktemp("emb-cache")))
    yield
    mp.undo()
