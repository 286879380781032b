"""bench/gpu_check.sh is run once, unattended, on a borrowed GPU machine: check on the CPU what can be checked
without running it (syntax, time limits, what it runs exists, how many files it leaves)."""
from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.sh"
BUDGET_S = 8 * 60          # the issue: the whole check finishes in under 8 minutes
MAX_FILES = 8              # the device tool brings back at most 8 files


def _steps() -> list[tuple[str, int, str]]:
    """(name, limit seconds, command) of every ``run_step`` line."""
    steps = []
    for line in SCRIPT.read_text().splitlines():
        match = re.match(r"\s*run_step (\S+) (\d+) (.+)$", line)
        if match:
            steps.append((match.group(1), int(match.group(2)), match.group(3)))
    return steps


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_time_limits_fit_the_budget():
    steps = _steps()
    assert len(steps) >= 4
    kill_grace = 10 * len(steps)                     # timeout -k 10 per step
    assert sum(limit for _, limit, _ in steps) + kill_grace <= BUDGET_S


def test_everything_it_runs_exists():
    root = SCRIPT.parents[1]
    for _, _, command in _steps():
        for module in re.findall(r"-m (glmserve\.[\w.]+)", command):
            assert importlib.util.find_spec(module) is not None, module
        for path in re.findall(r"\b(tests/[\w/.]+)", command):
            assert (root / path).exists(), path


def test_it_leaves_at_most_eight_files():
    text = SCRIPT.read_text()
    logs = len(_steps())                                             # $RESULTS/NAME.log per step
    extra = set(re.findall(r'"\$RESULTS/([\w.]+)"', text)) - {"$name.log"}
    assert logs + len(extra) <= MAX_FILES, (logs, sorted(extra))
