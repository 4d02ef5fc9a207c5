"""The project's import graph is a layering without cycles (issue 15, "one concept, one place").

Every ``.py`` file under ``src/`` and ``evaluation/`` is parsed with ``ast`` (nothing is imported) and every
project-internal import is collected: module level, inside functions, under ``TYPE_CHECKING``, relative forms.
A module may import only from its own layer or from layers below it; and no chain of imports may come back to
where it started, not even inside one layer. Benchmarks and tests stand outside the graph.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("src", "evaluation")

LAYERS: list[tuple[str, ...]] = [
    # 1: entry points
    ("src.cli", "src.__main__"),
    # 2: tools built on training and evaluation; `evaluate` and `compare` are commands too (they log to MLflow
    # through src/training/mlflow_logging.py), though they live in evaluation/
    ("src.commands", "src.export", "src.lora_tool", "src.sweep", "evaluation.evaluate", "evaluation.compare"),
    # 3: Lightning modules, the experiment runner
    ("src.training",),
    # 4: evaluation
    ("evaluation",),
    # 5: plain models and data
    ("src.models", "src.data"),
    # 6: core helpers with no project imports above them
    (
        "src.errors",
        "src.atomic",
        "src.config_files",
        "src.config_parsing",
        "src.dtypes",
        "src.folders",
        "src.hub",
        "src.progress",
        "src.threads",
        "src.cpu_allocator",
        "src.content_hash",
    ),
]
"""Top to bottom; an entry names a module or a package (then every module inside it); the first layer that names
a module (or its package) is its layer."""


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[module_name(path)] = path
    return found


def is_package(name: str, modules: dict[str, Path]) -> bool:
    return name in modules and modules[name].name == "__init__.py"


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[int, str]]:
    """(line, project module) for every project-internal import in the file, wherever it sits."""
    found = []
    package = name if is_package(name, modules) else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PACKAGES:
                    found.append((node.lineno, alias.name))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] not in PACKAGES:
                continue
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                found.append((node.lineno, submodule if submodule in modules else target))
    return found


def layer_of(name: str) -> int | None:
    for index, entries in enumerate(LAYERS):
        if any(name == entry or name.startswith(entry + ".") for entry in entries):
            return index
    return None


def import_graph() -> tuple[dict[str, Path], dict[str, set[str]], list[tuple[str, int, str]]]:
    modules = project_modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    edges = []
    for name, path in modules.items():
        for line, target in imported_modules(name, path, modules):
            if target != name:
                graph[name].add(target)
                if (name, line, target) not in edges:
                    edges.append((name, line, target))
    return modules, graph, edges


def cycles(graph: dict[str, set[str]]) -> list[tuple[list[str], list[str]]]:
    """(one concrete cycle, all its modules) per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)

    found = []
    for component in components:
        members = set(component)
        start = component[0]
        # shortest path from start back to itself inside the component (breadth first)
        previous: dict[str, str] = {}
        frontier = [start]
        while frontier and start not in previous:
            following = []
            for node in frontier:
                for nxt in sorted(graph[node] & members):
                    if nxt not in previous:
                        previous[nxt] = node
                        following.append(nxt)
            frontier = following
        path = [start]
        node = previous[start]
        while node != start:
            path.append(node)
            node = previous[node]
        found.append(([start, *reversed(path[1:]), start], component))
    return found


def test_every_project_module_has_a_layer():
    modules = project_modules()
    missing = [name for name in modules if name not in PACKAGES and layer_of(name) is None]
    assert not missing, f"modules outside every layer (add them to LAYERS): {missing}"


def test_no_import_cycles():
    _, graph, _ = import_graph()
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(
        f"{' -> '.join(cycle)} (modules that import each other: {', '.join(members)})" for cycle, members in found
    )


def test_no_upward_imports():
    modules, _, edges = import_graph()
    upward = []
    for name, line, target in edges:
        here, there = layer_of(name), layer_of(target)
        if here is not None and there is not None and there < here:
            path = modules[name].relative_to(ROOT)
            upward.append(f"{path}:{line} imports {target} (layer {there + 1} above layer {here + 1})")
    assert not upward, "imports that point up the layer order:\n" + "\n".join(upward)
