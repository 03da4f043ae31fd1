"""The architecture as a test: fescale's import graph, read with `ast`, has no cycle and no arrow
against the layers

    actors  <-  engine  <-  train  <-  benchmarks  <-  cli

(a module imports only its own layer and the layers below it; nothing imports the CLI). Every
import counts, also one inside a function: a lazy import is still a dependency. Also checked here:
no source file of the project is over 400 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LAYERS = ["actors", "engine", "train", "benchmarks", "cli"]
MAX_LINES = 400


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in LAYERS:
        for path in (REPO / package).rglob("*.py"):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `name` imports (`from pkg import mod` resolves to the module pkg.mod)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import engine.config.x` -> the module that exists
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def layer(module: str) -> int:
    return LAYERS.index(module.split(".")[0])


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_has_no_cycle():
    assert cycles(graph()) == []


def test_every_import_points_down_the_layers_and_nothing_imports_the_cli():
    upward = [f"{a} -> {b}" for a, targets in graph().items() for b in sorted(targets) if layer(b) > layer(a)]
    assert upward == [], "imports against the layers actors <- engine <- train <- benchmarks <- cli"


def test_the_checker_sees_lazy_imports_cycles_and_upward_arrows(tmp_path):
    """The checker itself, on a made-up graph: a function-level import is an arrow, a cycle is found."""
    source = tmp_path / "mod.py"
    source.write_text("def f():\n    from engine import steps\n    import actors.backend as b\n")
    modules = {"actors.mod": source, "engine.steps": source, "actors.backend": source, "engine": source}
    assert imports_of("actors.mod", source, modules) == {"engine.steps", "actors.backend"}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layer("engine.steps") > layer("actors.mod")


def test_no_source_file_is_over_400_lines():
    long = {str(p.relative_to(REPO)): n for p in project_modules().values() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}
