"""Imports flow one way (docs/architecture.md): no module-level import cycle, and resilience sits below train."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "gigafactory"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the gigafactory modules it imports (anywhere in the file, including inside functions)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in modules and t.startswith("gigafactory")}
        graph[name] = deps - {name}
    return graph


def test_no_import_cycle():
    graph, state, cycles = import_graph(), {}, []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep] if dep in stack else [node, dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    # package __init__ re-exports point at their own submodules; those are not cycles between layers
    real = [c for c in cycles if not any(a.startswith(b + ".") or b.startswith(a + ".") for a, b in zip(c, c[1:]))]
    assert real == [], real


def test_resilience_sits_below_train_and_every_config_section_lives_in_config():
    graph = import_graph()
    above = ("gigafactory.train", "gigafactory.parallel", "gigafactory.cli", "gigafactory.serve", "gigafactory.inference")
    for name, deps in graph.items():
        if name.startswith("gigafactory.resilience"):
            assert not [d for d in deps if d.startswith(above)], (name, deps)
        if name.startswith("gigafactory.config"):
            assert not [d for d in deps if d.startswith("gigafactory.resilience")], (name, deps)
