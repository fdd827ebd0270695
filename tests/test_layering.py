"""The import rules of the source tree (DESIGN.md section 3), read statically from every file:

- packages import one way: common <- shards <- pipelines <- models <- train <- benchmarks
  (a package imports only itself and packages to its left);
- no project import inside a function or class body, but a lazy import of a heavy optional
  dependency marked with ``# lazy import:`` and the reason on its line;
- no import cycle between files (module-level imports).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ORDER = ("common", "shards", "pipelines", "models", "train", "benchmarks")
LAZY_MARK = "# lazy import:"


def source_files() -> dict[str, Path]:
    """Module name -> file, for every ``.py`` file of the project's packages."""
    files = {}
    for package in ORDER:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            files[".".join(parts)] = path
    return files


MODULES = source_files()


def imported_modules(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The project modules an import statement loads (``from a import b``: ``a.b`` when that is a
    module, else ``a``)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            anchor = module.split(".") if is_package else module.split(".")[:-1]
            anchor = anchor[: len(anchor) - node.level + 1]
            base = ".".join([*anchor, base] if base else anchor)
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
    return [name for name in names if name.split(".")[0] in ORDER]


def imports_of(module: str, path: Path) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(module-level project imports, project imports nested in a function or class body),
    each as (line, imported module); imports under ``if TYPE_CHECKING`` count as module-level."""
    tree = ast.parse(path.read_text(), str(path))
    lines = path.read_text().splitlines()
    top, nested = [], []

    def visit(node: ast.AST, inside: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for name in imported_modules(child, module, path.name == "__init__.py"):
                    if not inside:
                        top.append((child.lineno, name))
                    elif LAZY_MARK not in lines[child.lineno - 1]:
                        nested.append((child.lineno, name))
            visit(child, inside or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)))

    visit(tree, False)
    return top, nested


GRAPH = {module: imports_of(module, path) for module, path in MODULES.items()}


def test_the_walk_finds_every_package_and_some_imports():
    assert {m.split(".")[0] for m in MODULES} == set(ORDER)
    assert ("common.errors" in MODULES) and ("train.evaluation.metrics" in MODULES)
    assert sum(len(top) for top, _ in GRAPH.values()) > 100


@pytest.mark.parametrize("package", ORDER)
def test_packages_import_only_themselves_and_packages_to_their_left(package):
    allowed = set(ORDER[: ORDER.index(package) + 1])
    wrong = [f"{module}:{line} imports {name}" for module, (top, nested) in GRAPH.items()
             if module.split(".")[0] == package for line, name in top + nested
             if name.split(".")[0] not in allowed]
    assert not wrong, "\n".join(wrong)


def test_no_project_import_inside_a_function_or_class():
    nested = [f"{MODULES[module].relative_to(ROOT)}:{line} imports {name}"
              for module, (_, inner) in GRAPH.items() for line, name in inner]
    assert not nested, f"move these to the top of the file (or mark a heavy optional one '{LAZY_MARK} why'):\n" + \
        "\n".join(nested)


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph ``edges`` (module -> imported modules), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = dfs(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            found = dfs(node)
            if found:
                return found
    return None


def module_edges() -> dict[str, set[str]]:
    """File-level import graph: a package's ``__init__`` is its own node; importing
    ``a.b.c`` also runs ``a/__init__`` and ``a/b/__init__``, edges to those too."""
    edges: dict[str, set[str]] = {}
    for module, (top, _) in GRAPH.items():
        targets = set()
        for _, name in top:
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                prefix = ".".join(parts[:i])
                if prefix in MODULES and prefix != module and not module.startswith(prefix + "."):
                    targets.add(prefix)
        edges[module] = targets
    return edges


def test_cycle_finder_finds_a_hand_made_cycle_and_accepts_a_chain():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_between_files():
    cycle = find_cycle(module_edges())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
