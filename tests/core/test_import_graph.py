"""emo_core's internal imports form no cycle (deferred imports inside functions included)."""

from __future__ import annotations

import ast
from pathlib import Path

import emo_core

CORE = Path(emo_core.__file__).parent


def _internal_imports(path: Path) -> set[str]:
    """The emo_core modules ``path`` imports anywhere in its body, by module name."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            found.add(node.module.split(".")[0])
        elif (
            isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("emo_core.")
        ):
            found.add(node.module.split(".")[1])
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return [*trail, node, nxt]
            if nxt not in state and (found := visit(nxt, [*trail, node])):
                return found
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [])):
            return found
    return None


def test_cycle_finder_sees_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_core_modules_import_no_cycle() -> None:
    modules = {p.stem: p for p in CORE.glob("*.py") if p.stem != "__init__"}
    graph = {name: _internal_imports(path) & set(modules) for name, path in modules.items()}
    assert _cycle(graph) is None, f"import cycle in emo_core: {' -> '.join(_cycle(graph))}"
    assert "_base" in graph["adapters"]  # the graph sees the real imports
