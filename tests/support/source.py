"""The project's own source read as text, for the tests about its shape: what a module imports."""

from __future__ import annotations

import ast
from pathlib import Path


def module_name(path: Path, root: Path) -> str:
    """The dotted name `path` is imported by from `root` (a package's `__init__.py`: the package)."""
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, root: Path) -> set[str]:
    """Every module the file at `path` (under `root`) imports, imports inside functions included, relative ones
    resolved; `from M import N` counts as both `M` and `M.N` (N may be a module)."""
    name = module_name(path, root)
    package = (name if path.name == "__init__.py" else name.rpartition(".")[0]).split(".")
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            if module:
                out.add(module)
            out.update(f"{module}.{alias.name}" if module else alias.name for alias in node.names)
    return out
