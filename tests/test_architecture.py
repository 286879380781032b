"""The architecture holds: the layering contracts (import-linter, configured in pyproject.toml), no import cycle
anywhere, and no protocol below the entrypoints."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp
import pytest

from .paths import REPO_ROOT

ROOTS = ("glmserve.engine", "glmserve.kernels", "glmserve.bench", "glmserve.proto")
BELOW_ENTRYPOINTS = ("config", "text", "core", "structured", "attention", "model", "lora", "worker",
                     "distributed", "runtime")


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    # Every import statement counts, function-local ones too: a cycle dodged with a local import is still a cycle.
    return grimp.build_graph(*ROOTS)


def ours(graph: grimp.ImportGraph) -> list[str]:
    return sorted(m for m in graph.modules if m.startswith(tuple(r + "." for r in ROOTS)))


def test_import_linter_contracts_hold():
    lint_imports = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint_imports), "--config", str(REPO_ROOT / "pyproject.toml")], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "BROKEN" not in result.stdout and "3 kept, 0 broken" in result.stdout


def strongly_connected(graph: grimp.ImportGraph, modules: list[str]) -> list[list[str]]:
    """Tarjan's algorithm, iteratively: the groups of modules that import each other (the import cycles)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []
    inside = set(modules)
    for root in modules:
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next((c for c in children if c in inside), None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    groups.append(sorted(group))
    return groups


def test_no_import_cycles(graph):
    assert strongly_connected(graph, ours(graph)) == []


def test_the_cycle_finder_finds_a_cycle(tmp_path, monkeypatch):
    """The check above can fail: two modules importing each other are reported."""
    package = tmp_path / "cyclic_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from cyclic_pkg import b\n")
    (package / "b.py").write_text("def f():\n    from cyclic_pkg import a  # a local import is still an import\n")
    (package / "c.py").write_text("from cyclic_pkg import a\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    graph = grimp.build_graph("cyclic_pkg")
    assert strongly_connected(graph, sorted(graph.modules)) == [["cyclic_pkg.a", "cyclic_pkg.b"]]


def test_only_the_entrypoints_import_the_protocol_stubs(graph):
    offenders = [(m, imported) for m in ours(graph) if m.startswith(tuple(f"glmserve.engine.{p}." for p in
                                                                           BELOW_ENTRYPOINTS))
                 for imported in graph.find_modules_directly_imported_by(m) if imported.startswith("glmserve.proto")]
    assert offenders == []
