"""The package's shape: no import cycles, and a command line that starts without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import localmim_cli

PACKAGE_DIR = Path(localmim_cli.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, modules: set[str], package: str, type_checking: bool = False) -> set[str]:
    """Every localmim_cli module this one imports, at module level or inside functions: an
    import moved into a function to dodge a cycle is still an edge of the graph. Imports under
    `if TYPE_CHECKING:` never run and are left out unless `type_checking`."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node) and not type_checking:
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            if node.level:   # relative import
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [node.module])
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in modules else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {m for m in found if m in modules}


def import_graph(type_checking: bool = False) -> dict[str, set[str]]:
    files = sorted(PACKAGE_DIR.rglob("*.py"))
    modules = {_module_name(f) for f in files}
    graph = {}
    for f in files:
        name = _module_name(f)
        package = name if f.name == "__init__.py" else name.rpartition(".")[0]
        graph[name] = _imports(ast.parse(f.read_text(), str(f)), modules, package, type_checking) - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search with colours)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := dfs(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := dfs(node)):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_package_has_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 30 and "localmim_cli.tasks.pretrain" in graph
    assert "localmim_cli.model.localmim" in graph["localmim_cli.tasks.pretrain"] or \
        "localmim_cli.model.build" in graph["localmim_cli.tasks.pretrain"]   # the walk sees edges
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_two_modules_import_each_other():
    """Each pair of modules has one direction, even where one side imports only inside a
    function or for type annotations: the shared piece belongs to a module both may import."""
    graph = import_graph(type_checking=True)
    assert "localmim_cli.weights.sources" in graph["localmim_cli.weights.via_timm"] or \
        "localmim_cli.weights.encoder_weights" in graph["localmim_cli.weights.via_timm"]   # edges are seen
    pairs = sorted({tuple(sorted((a, b))) for a, targets in graph.items() for b in targets if a in graph.get(b, ())})
    assert not pairs, "modules that import each other: " + "; ".join(f"{a} <-> {b}" for a, b in pairs)


def test_lower_layers_do_not_import_the_command_line_or_tasks():
    """model, encoders, targets, data, engine, config and weights stand below tasks and cli."""
    graph = import_graph()
    lower = ("model", "encoders", "targets", "data", "engine", "config", "weights", "plugins")
    for name, deps in graph.items():
        if name.split(".")[1:2] and name.split(".")[1] in lower:
            upward = sorted(d for d in deps if d.startswith(("localmim_cli.cli", "localmim_cli.tasks")))
            assert not upward, f"{name} imports {upward}"


def test_command_line_imports_no_torch_until_a_command_runs():
    code = ("import sys, localmim_cli.cli; "
            "print(sorted(m for m in ('torch', 'timm', 'torchvision', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
