"""Benchmarks write their results into folders that may not exist yet (a fresh clone has no results/).

`make bench-offline` once crashed at its very end, after the whole run, because results/ was missing. Every
writer in bench/ goes through ``output_path``; the bench tests write into missing folders (tmp/results/...), and
this module checks the helper and that no writer in bench/ bypasses it.
"""
from __future__ import annotations

import ast
from pathlib import Path

from glmserve.bench.common.output import output_path

from .paths import REPO_ROOT

WRITE_MODES = ("w", "a", "x")


def test_output_path_makes_the_missing_parent_folders(tmp_path):
    target = tmp_path / "results" / "deeper" / "offline.json"
    assert output_path(str(target)) == target and target.parent.is_dir()
    output_path(target).write_text("{}\n", encoding="utf-8")   # again: the folders already exist
    assert target.read_text(encoding="utf-8") == "{}\n"


def _goes_through_output_path(node: ast.expr) -> bool:
    return isinstance(node, ast.Call) and getattr(node.func, "id", None) == "output_path"


def _file_writes(tree: ast.AST):
    """(line, target expression) of every open(..., 'w'), .write_text/.write_bytes and savefig in a module."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if getattr(func, "id", None) == "open" and node.args:
            mode = node.args[1] if len(node.args) > 1 else next(
                (k.value for k in node.keywords if k.arg == "mode"), None)
            if isinstance(mode, ast.Constant) and str(mode.value).startswith(WRITE_MODES):
                yield node.lineno, node.args[0]
        elif isinstance(func, ast.Attribute) and func.attr in ("write_text", "write_bytes"):
            yield node.lineno, func.value
        elif isinstance(func, ast.Attribute) and func.attr == "savefig" and node.args:
            yield node.lineno, node.args[0]


def test_every_bench_writer_makes_its_folder():
    bypassing = []
    files = sorted((REPO_ROOT / "bench").rglob("*.py"))
    assert len(files) > 10
    writes = 0
    for path in files:
        for line, target in _file_writes(ast.parse(path.read_text(encoding="utf-8"))):
            writes += 1
            if not _goes_through_output_path(target):
                bypassing.append(f"{Path(path).relative_to(REPO_ROOT)}:{line}")
    assert writes >= 10, "the scan found too few writers: it no longer sees them"
    assert not bypassing, f"result writers that do not create their folder (use output_path): {bypassing}"
