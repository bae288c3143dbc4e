"""The model library is a one-way chain: no module imports Ray, and no import circle among `model.*` modules,
counting imports inside functions too (read statically, so a circle cannot hide behind a lazy import)."""

from __future__ import annotations

import ast
from pathlib import Path

MODEL_DIR = Path(__file__).resolve().parents[2] / "model"  # read as text: nothing here imports the library


def module_name(path: Path) -> str:
    parts = path.relative_to(MODEL_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def model_modules() -> dict[str, Path]:
    return {module_name(p): p for p in MODEL_DIR.glob("*.py")}


def imported_names(path: Path, package: str = "model") -> set[str]:
    """Every module an `import` or `from ... import` anywhere in the file loads. `from pkg import x` is an import
    of the submodule `pkg.x` when x is one of the model's modules (the package itself is initialised first by
    any import, so that is no edge), else of `pkg` (x is a name defined there)."""
    submodules = set(model_modules())
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against the file's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                names.add(full if full in submodules or not base.startswith("model") else base)
            if not base.startswith("model"):
                names.add(base)
    return names


def import_graph() -> dict[str, set[str]]:
    modules = model_modules()
    return {name: {m for m in imported_names(path) if m in modules and m != name} for name, path in modules.items()}


def test_no_model_module_imports_ray():
    offenders = {module_name(p): sorted(n for n in imported_names(p) if n == "ray" or n.startswith("ray."))
                 for p in MODEL_DIR.glob("*.py")}
    assert not {m: names for m, names in offenders.items() if names}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}  # "visiting" or "done"

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "visiting"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "visiting":
                return [*path[path.index(nxt):], nxt] if nxt in path else [node, nxt]
            if nxt not in state and (cycle := visit(nxt, [*path, nxt])):
                return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_model_modules_import_each_other_one_way():
    graph = import_graph()
    assert "model.checkpoint" in graph and "model.weights" in graph["model.checkpoint"]  # the walk sees edges
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_function_level_circle(tmp_path):
    """The check itself: a circle made of a top-level import and one inside a function is reported."""
    graph = {"model.a": {"model.b"}, "model.b": {"model.a"}, "model.c": set()}
    assert find_cycle(graph) == ["model.a", "model.b", "model.a"]
    source = tmp_path / "lazy.py"
    source.write_text("def f():\n    from model.checkpoint import load\n    from model import weights, load\n"
                      "    import ray.data\n")
    assert imported_names(source) == {"model.checkpoint", "model.weights", "model", "ray.data"}
