"""Model-library fixtures: every test gets its own checkpoint cache directory, so nothing lands in ~/.cache."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def checkpoint_cache(tmp_path_factory, monkeypatch):
    path = tmp_path_factory.mktemp("checkpoint-cache")
    monkeypatch.setenv("UNIFILTER_CACHE_DIR", str(path))
    return path
