"""The package layout is the architecture: stages as subpackages, imports a DAG.

Imports inside `if TYPE_CHECKING:` are left out (they never run); imports
inside functions count, since a lazy import is how a cycle hides.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

NODE = Path(__file__).resolve().parents[2] / "node"


def module_name(path: Path) -> str:
    parts = path.relative_to(NODE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in NODE.rglob("*.py")}


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
            yield from (n for branch in child.orelse for n in [branch, *_runtime_nodes(branch)])
            continue
        yield child
        yield from _runtime_nodes(child)


def imports_of(name: str) -> set[str]:
    found: set[str] = set()
    for item in _runtime_nodes(ast.parse(MODULES[name].read_text())):
        if isinstance(item, ast.ImportFrom) and item.module and item.level == 0:
            for alias in item.names:
                submodule = f"{item.module}.{alias.name}"
                found.add(submodule if submodule in MODULES else item.module)
        elif isinstance(item, ast.Import):
            found.update(alias.name for alias in item.names)
    return {imported for imported in found if imported in MODULES and imported != name}


def find_cycles(graph: dict[str, list[str]]) -> list[list[str]]:
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        path.append(name)
        for imported in graph[name]:
            if state.get(imported) == 1:
                cycles.append([*path[path.index(imported) :], imported])
            elif imported not in state:
                visit(imported)
        path.pop()
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
    return cycles


def test_the_import_graph_of_node_has_no_cycle() -> None:
    graph = {name: sorted(imports_of(name)) for name in MODULES}
    assert [" -> ".join(cycle) for cycle in find_cycles(graph)] == []


def test_the_cycle_finder_can_fail() -> None:
    graph = {"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": ["b"], "b": [], "c": ["a", "b"]}) == []


def test_imports_are_read_from_functions_but_not_from_type_checking_blocks() -> None:
    assert "node.daemon.server" in imports_of("node.cli.main")  # imported inside a function
    assert "node.daemon.server" not in imports_of("node.daemon.lifecycle")  # TYPE_CHECKING only


def test_no_module_sits_directly_under_node() -> None:
    flat = sorted(p.name for p in NODE.glob("*.py"))
    assert flat == ["__init__.py", "__main__.py"]


def test_every_stage_package_says_what_it_does() -> None:
    for init in sorted(NODE.glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert len(doc.split()) >= 12, f"{init.parent.name}: its docstring must say its stage"
        assert "May import" in doc, f"{init.parent.name}: say which stages it may import"
