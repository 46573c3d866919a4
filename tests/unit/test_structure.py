"""The package's shape: no import cycles, modules of a readable size, each says what it owns."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "serving"
MODULES = sorted(p for p in PACKAGE.rglob("*.py"))
MAX_LINES = 450  # split before this (docs: shared/STYLE.md)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every serving module this file imports, at module level or inside a function."""
    names = set()
    tree = ast.parse(path.read_text())
    assert not any(isinstance(n, ast.ImportFrom) and n.level for n in ast.walk(tree)), f"{path}: a relative import"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    known = {module_name(p) for p in MODULES}
    return {n for n in names if n in known and n != "serving"}


GRAPH = {module_name(p): imports(p) for p in MODULES}


def reaches(start: str, goal: str) -> bool:
    seen, todo = set(), [start]
    while todo:
        here = todo.pop()
        if here == goal:
            return True
        if here not in seen:
            seen.add(here)
            todo.extend(GRAPH.get(here, ()))
    return False


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_no_module_imports_one_that_imports_it_back(module):
    cycles = sorted(m for m in GRAPH[module] if reaches(m, module))
    assert not cycles, f"{module} imports {cycles}, which import it back"


def test_nothing_imports_the_cli():
    assert not [m for m, deps in GRAPH.items() if "serving.cli" in deps and m != "serving.__main__"]


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_each_module_is_readable_and_says_what_it_owns(path):
    text = path.read_text()
    assert len(text.splitlines()) < MAX_LINES
    if path.name not in ("__init__.py", "__main__.py"):
        docstring = ast.get_docstring(ast.parse(text))
        assert docstring and docstring.splitlines()[0].strip(), "no opening docstring line"
