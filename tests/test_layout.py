"""The layout is the architecture (docs/architecture.md): the import graph of the project's own modules has no cycle
and every arrow points down the layers; every docs/ path named in a docstring exists; functions stay short.

The graph is read statically: every import statement of every module under npo/ and services/ (generated stubs
under services/proto excluded), wherever it sits (top level or inside a function).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOTS = ("npo", "services")
GENERATED = REPO / "services" / "proto"
ROLES = ("services.rollout", "services.learner", "services.guidance_cache", "services.controller")
MAX_FUNCTION_LINES = 80


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_files() -> list[Path]:
    files = []
    for root in ROOTS:
        files += [p for p in (REPO / root).rglob("*.py") if GENERATED not in p.parents]
    return sorted(files)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The project modules `path` imports (a `from package import name` of a submodule counts as that submodule)."""
    found: set[str] = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = project_files()
    known = {module_name(p) for p in files}
    graph = {}
    for path in files:
        name = module_name(path)
        # importing a.b.c also runs a and a.b; package __init__ files are not edges of a cycle by themselves
        graph[name] = {m for m in imported_modules(path, known) if m != name and not name.startswith(m + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def edges_from(graph: dict[str, set[str]], prefix: str) -> list[tuple[str, str]]:
    return sorted((a, b) for a, deps in graph.items() if a == prefix or a.startswith(prefix + ".") for b in deps)


def under(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


GRAPH = import_graph()


def test_the_graph_sees_the_layers():
    assert {"npo.core.loss", "npo.runtime.runner", "npo.analysis.report", "services.cli"} <= set(GRAPH)
    assert "npo.core.gate" in GRAPH["npo.runtime.runner"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_among_project_modules():
    assert find_cycle(GRAPH) is None, " -> ".join(find_cycle(GRAPH) or [])


def test_core_imports_nothing_else_of_the_project():
    bad = [(a, b) for a, b in edges_from(GRAPH, "npo.core") if not under(b, "npo.core", "npo")]
    assert bad == []


def test_runtime_never_imports_analysis_or_services():
    bad = [(a, b) for a, b in edges_from(GRAPH, "npo.runtime") if under(b, "npo.analysis", "services")]
    assert bad == []


def test_npo_never_imports_services():
    bad = [(a, b) for a, b in edges_from(GRAPH, "npo") if under(b, "services")]
    assert bad == []


@pytest.mark.parametrize("role", ROLES)
def test_role_packages_never_import_the_cli_or_ops(role):
    bad = [(a, b) for a, b in edges_from(GRAPH, role) if under(b, "services.cli", "services.ops")]
    assert bad == []


def test_nothing_imports_the_cli():
    assert [a for a, deps in GRAPH.items() if "services.cli" in deps] == []


DOC_PATH = re.compile(r"\b(docs/[A-Za-z0-9_./-]+\.md)\b")


def test_every_docs_path_named_in_the_code_exists():
    missing = []
    for path in project_files() + sorted((REPO / "tests").glob("*.py")) + sorted((REPO / "bench").glob("*.py")):
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            for ref in DOC_PATH.findall(line):
                if "shared/docs" not in line and not (REPO / ref).is_file():
                    missing.append(f"{path.relative_to(REPO)}:{lineno} {ref}")
    assert missing == []


def long_functions(limit: int) -> list[str]:
    found = []
    scripts = sorted((REPO / "bench").glob("*.py")) + sorted((REPO / "scripts").glob("*.py"))
    for path in project_files() + scripts + sorted((REPO / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > limit:
                    found.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_no_function_is_longer_than_80_lines():
    assert long_functions(MAX_FUNCTION_LINES) == []
