"""The suite shares through `tests/support/` and fixtures: no module under tests/ imports a test module or a
conftest (a fixture is used by its name, never imported; a helper two test modules need lives in support)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.source import imported_modules, module_name

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "tests").rglob("*.py"))


def is_test_module(module: str) -> bool:
    """A module pytest collects tests from (its default `test_*.py` and `*_test.py`), or a conftest."""
    last = module.rsplit(".", 1)[-1]
    return last.startswith("test_") or last.endswith("_test") or last == "conftest"


@pytest.mark.parametrize("path", SOURCES, ids=[str(p.relative_to(ROOT)) for p in SOURCES])
def test_no_module_of_the_suite_imports_a_test_module_or_a_conftest(path):
    found = {m for m in imported_modules(path, ROOT) if m.startswith("tests.") and is_test_module(m)}
    assert not found, f"{module_name(path, ROOT)} imports {sorted(found)}: share it through tests/support/ or a fixture"


def test_a_relative_import_of_a_test_module_is_seen(tmp_path):
    module = tmp_path / "tests" / "io" / "test_b.py"
    module.parent.mkdir(parents=True)
    module.write_text("from . import test_a\nfrom ..conftest import helper\n")
    assert {"tests.io.test_a", "tests.conftest"} <= imported_modules(module, tmp_path)
