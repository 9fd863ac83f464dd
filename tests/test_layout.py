"""The layout's import rules (docs/architecture.md): which package may import which, and no cycles between packages.

Every import in `src/blip` counts, including those inside functions; imports under `if TYPE_CHECKING:` count for the
"imports nothing from" rules (a type names a dependency too) but not for cycles (they never run).
"""

from __future__ import annotations

import ast
import functools
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "blip"

# unit -> units it must not import. A unit is a top-level package (`models`) or module (`api`) of blip.
FORBIDDEN = {
    "models": {
        "api",
        "cli",
        "capfilt",
        "data",
        "demo",
        "evaluation",
        "jobs",
        "losses",
        "serve",
        "tasks",
        "train",
        "weights",
        "transforms",
        "tokenizer",
        "distributed",
        "io",
        "fetch",
        "export",
        "__init__",
    },
    "tasks": {"train", "serve", "jobs", "capfilt", "demo", "cli", "export"},
    "export": {"train", "serve", "jobs", "capfilt", "demo", "cli", "data", "losses"},
    "api": {"train", "serve", "jobs", "capfilt", "demo", "cli"},
    "weights": {"train", "serve", "jobs", "capfilt", "demo", "cli", "tasks"},
    "losses": {"train", "serve", "jobs", "capfilt", "demo", "cli"},
    "serve": {"jobs", "train", "capfilt", "demo"},
    "data": {"train", "serve", "jobs", "capfilt", "demo", "cli"},
    "evaluation": {"train", "serve", "jobs", "capfilt", "demo", "cli"},
    "distributed": {"train", "serve", "jobs", "capfilt", "demo", "cli", "tasks", "api"},
    "io": {"train", "serve", "jobs", "capfilt", "demo", "cli", "tasks", "api", "models", "weights"},
    "fetch": {"train", "serve", "jobs", "capfilt", "demo", "cli", "tasks", "api", "models", "weights"},
}


def _unit(module: str) -> str:
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported blip module, runs at run time) for every import in the file."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, runtime: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.body:
                    visit_stmt(sub, False)
                for sub in child.orelse:
                    visit_stmt(sub, runtime)
                continue
            visit_stmt(child, runtime)

    def visit_stmt(node: ast.AST, runtime: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend((a.name, runtime) for a in node.names if a.name.split(".")[0] == "blip")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "blip":
                if target == "blip":  # `from blip import x`: x may be a subpackage
                    found.extend((f"blip.{a.name}", runtime) for a in node.names)
                else:
                    found.append((target, runtime))
        visit(node, runtime)

    visit(ast.parse(path.read_text(encoding="utf-8")), True)
    return found


@functools.cache
def _graph() -> tuple[dict[str, set[tuple[str, str]]], dict[str, set[str]]]:
    """unit -> {(importing module, imported module)}; runtime unit graph for the cycle check."""
    edges: dict[str, set[tuple[str, str]]] = defaultdict(set)
    runtime: dict[str, set[str]] = defaultdict(set)
    for path in sorted(SRC.rglob("*.py")):
        module = _module_name(path)
        for target, runs in _imports(path):
            if target.startswith("blip.") and target.split(".")[1] in {"__version__"}:
                continue
            a, b = _unit(module), _unit(target)
            if a == b:
                continue
            edges[a].add((module, target))
            if runs:
                runtime[a].add(b)
    return edges, runtime


@pytest.mark.parametrize("unit", sorted(FORBIDDEN))
def test_import_rules(unit):
    edges, _ = _graph()
    broken = sorted(f"{m} imports {t}" for m, t in edges.get(unit, ()) if _unit(t) in FORBIDDEN[unit])
    assert not broken, "\n".join(broken)


def test_no_cycles_between_packages():
    _, runtime = _graph()
    # `import blip` is an edge into `__init__` (the public API), which imports api, config, tasks and weights.
    cycles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(runtime.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif nxt not in state:
                dfs(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(runtime):
        if node not in state:
            dfs(node)
    assert not cycles, "\n".join(cycles)
