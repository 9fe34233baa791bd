"""The source files a stage runs: the import closure of its module inside the package.

Every ``import`` and ``from ... import`` in a module (at its top or inside functions) that names
a module of this package is followed, with the ``__init__`` of every package passed through (Python
runs them on import), and the data files a module declares in ``DATA_FILES`` (C++ sources,
templates). Computed from the source text (``ast``): nothing is imported. A stage's DVC
dependencies are this list, so no change to code it runs can leave its outputs looking current.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # sae_clt/
PACKAGE = PACKAGE_DIR.name


def module_file(name: str, root: Path = PACKAGE_DIR) -> Path | None:
    """The file of a dotted module name of this package (``sae_clt.data.store``), or None."""
    parts = name.split(".")
    if parts[0] != root.name:
        return None
    base = root.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def module_name(path: Path, root: Path = PACKAGE_DIR) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(path: Path, root: Path) -> tuple[set[str], list[str]]:
    """Dotted names of the package's modules that ``path`` imports, and the data files it declares."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = module_name(path, root)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    names: set[str] = set()
    data: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            names.add(stem)
            names.update(f"{stem}.{a.name}" for a in node.names)  # `from pkg import module`
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "DATA_FILES" for t in node.targets):
            data.extend(ast.literal_eval(node.value))
    return {n for n in names if n.split(".")[0] == root.name}, data


def import_closure(start: str, root: Path = PACKAGE_DIR) -> list[Path]:
    """Files (modules, package ``__init__`` files, declared data files) that running module
    ``start`` can execute or read, sorted."""
    seen: set[Path] = set()
    todo = [start]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__, a/b/__init__, then c
            path = module_file(".".join(parts[:i]), root)
            if path is None or path in seen:
                continue
            seen.add(path)
            modules, data = _imported(path, root)
            seen.update(path.parent / d for d in data)
            todo.extend(modules)
    return sorted(seen)


@functools.cache
def code_deps(start: str) -> tuple[str, ...]:
    """``import_closure`` as paths relative to the project root (``sae_clt/...``), for dvc.yaml."""
    return tuple(str(p.relative_to(PACKAGE_DIR.parent)) for p in import_closure(start))
