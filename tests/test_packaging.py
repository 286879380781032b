"""No top-level folder of the checkout shadows an installed distribution: a Python started in the repo root (which
puts the root on sys.path: ``python -m pytest``, ``python -c``) still imports the installed ``kernels``, ``proto``,
``engine``... (setup.py: the top-level folders are namespace portions, only their subfolders are packages)."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from .paths import REPO_ROOT

pytestmark = pytest.mark.subprocess

TOP_LEVEL_FOLDERS = sorted(p.name for p in REPO_ROOT.iterdir() if p.is_dir() and not p.name.startswith(".")
                           and p.name.isidentifier())


def run_in_repo_root(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def test_no_top_level_folder_is_a_regular_package():
    assert {"engine", "kernels", "proto", "bench", "tests"} <= set(TOP_LEVEL_FOLDERS)
    assert [name for name in TOP_LEVEL_FOLDERS if (REPO_ROOT / name / "__init__.py").exists()] == []


def test_installed_distributions_win_over_the_checkouts_folders(tmp_path):
    """An installed regular package named like each top-level folder is what ``import NAME`` finds from the root."""
    site = tmp_path / "site"
    for name in TOP_LEVEL_FOLDERS:
        (site / name).mkdir(parents=True)
        (site / name / "__init__.py").write_text(f"WHO = 'installed {name}'\n")
    code = ("import importlib\n"
            f"for name in {TOP_LEVEL_FOLDERS!r}:\n"
            "    print(name, importlib.import_module(name).WHO)\n")
    result = run_in_repo_root(code, PYTHONPATH=str(site))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:-1] == [f"{name} installed {name}" for name in TOP_LEVEL_FOLDERS]


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers is not installed")
def test_transformers_and_its_kernels_package_import_from_the_repo_root():
    code = ("import importlib.util, transformers\n"
            "from transformers import GlmForCausalLM\n"
            "spec = importlib.util.find_spec('kernels')\n"
            "print(spec.origin if spec else None)\n")
    result = run_in_repo_root(code)
    assert result.returncode == 0, result.stderr[-3000:]
    origin = result.stdout.strip().splitlines()[-1]
    # transformers 5 depends on HF's `kernels`; where it is installed, it is the one found, never the checkout's.
    assert origin == "None" or not origin.startswith(str(REPO_ROOT)), origin


def test_the_engine_imports_under_its_namespace_from_anywhere(tmp_path):
    result = subprocess.run([sys.executable, "-c", "import glmserve.engine.entrypoints.llm, glmserve.kernels.cpu.native, "
                             "glmserve.proto.generation_pb2, glmserve.bench.cli; print('ok')"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
