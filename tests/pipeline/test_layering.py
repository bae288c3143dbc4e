"""The pipeline's parts depend on each other one way only, read from the source (imports inside functions count):

    io  <-  commit  <-  runner  <-  scoring, synth, curation      (no job imports another)
    encoded  <-  scoring, training                                 (training never imports scoring)

and `model/` imports none of the pipeline; no module of model/, pipeline/ or jobs/ imports itself back through
others (no import cycle, deferred imports included); `pipeline/` holds few modules directly, none over 400 lines, no
function over 80."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.support.source import imported_modules, module_name

ROOT = Path(__file__).resolve().parents[2]
PIPELINE = ROOT / "pipeline"

# part -> the parts it may import (besides itself, `pipeline.errors` and the model library)
ALLOWED = {
    "io": set(),
    "commit": {"io"},
    "runner": {"io", "commit"},
    "encoded": set(),
    "scoring": {"io", "commit", "runner", "encoded"},
    "synth": {"io", "commit", "runner"},
    "curation": {"io", "commit", "runner", "scoring.records"},  # reads score records (their schema), nothing else
    "training": {"io", "commit", "runner", "encoded"},
}


def part_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "pipeline" or len(parts) < 2:
        return None
    return parts[1]


def modules() -> list[tuple[str, Path]]:
    return sorted((module_name(path, ROOT), path) for path in PIPELINE.rglob("*.py"))


@pytest.mark.parametrize("name, path", modules(), ids=[m for m, _ in modules()])
def test_each_part_imports_only_the_parts_below_it(name, path):
    own = part_of(name)
    if own in (None, "errors"):
        return
    allowed = ALLOWED[own] | {own, "errors"}
    bad = []
    for imported in imported_modules(path, ROOT):
        other = part_of(imported)
        if other is None or other in allowed:
            continue
        if other == "scoring" and "scoring.records" in allowed and imported.startswith("pipeline.scoring.records"):
            continue
        bad.append(imported)
    assert not bad, f"{name} ({own}) imports {sorted(bad)}: not allowed by the layering {sorted(allowed)}"


def test_the_model_library_imports_nothing_of_the_pipeline_or_the_jobs():
    for path in (ROOT / "model").rglob("*.py"):
        found = {i for i in imported_modules(path, ROOT) if i.split(".")[0] in ("pipeline", "jobs")}
        assert not found, f"{path.relative_to(ROOT)} imports {sorted(found)}"


def test_pipeline_holds_few_modules_directly_and_none_is_long():
    direct = sorted(p.name for p in PIPELINE.glob("*.py"))
    assert len(direct) <= 6, direct
    long = {str(p.relative_to(ROOT)): n for p in PIPELINE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not long, f"modules over 400 lines: {long}"


def test_no_function_is_over_80_lines():
    long = []
    for path in [*PIPELINE.rglob("*.py"), *(ROOT / "model").rglob("*.py"), *(ROOT / "jobs").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 80:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    assert not long, long


def project_modules() -> dict[str, Path]:
    """Every module of model/, pipeline/ and jobs/ by its dotted name (a package by its own name)."""
    out = {}
    for package in ("model", "pipeline", "jobs"):
        for path in (ROOT / package).rglob("*.py"):
            rel = path.relative_to(ROOT).with_suffix("")
            out[".".join(rel.parts[:-1] if rel.parts[-1] == "__init__" else rel.parts)] = path
    return out


def project_imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project's modules that `name` imports, at module level or inside a function: `from a.b import c` is
    module `a.b.c` where that is one, else `a.b` (its `__init__`); relative imports resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                full = f"{base}.{alias.name}"
                out.add(full if full in known else base)
    return {m for m in out if m in known and m != name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_module_imports_itself_back_through_others():
    known = project_modules()
    graph = {name: project_imports(name, path, known) for name, path in known.items()}
    assert cycles(graph) == []


def test_the_cycle_check_sees_a_deferred_import(tmp_path):
    """The check itself: an import inside a function closes a cycle as surely as one at the top."""
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def late():\n    from a import x\n")
    known = {"a": tmp_path / "a.py", "b": tmp_path / "b.py"}
    graph = {name: project_imports(name, path, known) for name, path in known.items()}
    assert cycles(graph) == [["a", "b"]]


def test_the_style_the_project_holds_is_checked_by_ruff():
    """Lines at most 120 characters, no function of model/, pipeline/ or jobs/ over 8 parameters, imports sorted,
    the pyflakes and bugbear checks: `make lint`, run here too so the suite fails on a lapse."""
    import subprocess
    import sys

    ruff = Path(sys.executable).with_name("ruff")
    res = subprocess.run([str(ruff), "check", "model", "pipeline", "jobs", "tests", "benchmarks"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-1000:]
