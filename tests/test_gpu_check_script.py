"""bench/gpu_check.sh is run once, unattended, on a borrowed GPU machine (python3, no network, 15 minutes of
device time for everything): check on the CPU what can be checked without a GPU. Its syntax, its time budget
(5 minutes, so a second run fits), that everything it runs exists, how many files it leaves, and every path
through it (pass, skip for a missing module, failure, timeout against the budget), run with a stand-in python3.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
BUDGET_S = 5 * 60          # the issue: the whole check finishes within 5 minutes on an H100
MAX_FILES = 8              # what the device tool is asked to bring back, kept small
STEP = re.compile(r"^run_step (\S+) (\d+) (\S+) (.+)$")
needs_bash = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and timeout")


def _steps() -> list[tuple[str, int, str, str]]:
    """(name, limit seconds, needed modules, command) of every ``run_step`` line (continuations joined)."""
    steps = []
    lines = SCRIPT.read_text().splitlines()
    for i, line in enumerate(lines):
        match = STEP.match(line)
        if match:
            command = match.group(4)
            while command.endswith("\\") or command.count("'") % 2:
                i += 1                                   # a continued line, or a quoted script over several
                quoted = command.count("'") % 2
                command = (command + "\n" + lines[i]) if quoted else (command[:-1].rstrip() + " " + lines[i].strip())
            steps.append((match.group(1), int(match.group(2)), match.group(3), command))
    return steps


def _script_value(name: str) -> int:
    match = re.search(rf"^{name}=(\d+)$", SCRIPT.read_text(), re.MULTILINE)
    assert match, name
    return int(match.group(1))


@needs_bash
def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_time_limits_fit_the_budget():
    steps = _steps()
    assert [name for name, *_ in steps] == ["env", "install", "kernel_tests", "kernel_bench", "decode_bench"]
    grace = _script_value("KILL_GRACE_S")
    assert sum(limit for _, limit, _, _ in steps) + grace * len(steps) <= BUDGET_S
    assert _script_value("BUDGET_S") <= BUDGET_S


def test_it_runs_python3_unbuffered_and_installs_without_network():
    text = SCRIPT.read_text()
    assert 'PYTHON="${PYTHON:-python3}"' in text
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert not re.search(r"(^|\s)python(\s|$)", code), "the GPU machine documents python3, not python"
    assert "PYTHONUNBUFFERED=1" in text and "PIP_NO_INDEX=1" in text
    (install,) = [command for name, _, _, command in _steps() if name == "install"]
    for flag in ("--no-index", "--no-deps", "--no-build-isolation", "-e ."):
        assert flag in install


def test_everything_it_runs_exists():
    for _, _, needs, command in _steps():
        for module in re.findall(r"-m (glmserve\.[\w.]+)", command):
            assert importlib.util.find_spec(module) is not None, module
        for path in re.findall(r"\b(tests/[\w/.]+)", command):
            assert (ROOT / path).exists(), path
        assert needs == "-" or re.fullmatch(r"[\w.]+(,[\w.]+)*", needs), needs
    # Kernel timings are GPU time from replayed CUDA graphs, not plain do_bench (host work at small sizes).
    bench = (ROOT / "bench" / "kernels" / "triton_kernels.py").read_text()
    assert "do_bench_cudagraph" in bench and not re.search(r"do_bench\(", bench)


def test_it_leaves_at_most_eight_files():
    text = SCRIPT.read_text()
    logs = len(_steps())                                             # $RESULTS/NAME.log per step
    extra = set(re.findall(r'"\$RESULTS/([\w.]+)"', text)) - {"$name.log"}
    assert logs + len(extra) <= MAX_FILES, (logs, sorted(extra))


# ---- every path, run for real with a stand-in python3 -----------------------------------------------------------
STAND_IN = r"""#!/usr/bin/env bash
# A stand-in for python3: records each call; FAKE_MISSING names modules to report missing, FAKE_FAIL a step
# (pytest, triton_kernels, decode_throughput) to fail, FAKE_SLOW one to hang.
echo "$*" >> "$FAKE_CALLS"
case "$*" in
    *find_spec*) for m in ${FAKE_MISSING:-}; do case ",$3," in *",$m,"*) exit 1;; esac; done; exit 0;;
esac
module=""
prev=""
for arg in "$@"; do [ "$prev" = "-m" ] && module="$arg"; prev="$arg"; done
for step in pytest triton_kernels decode_throughput; do
    case "$module" in *"$step")
        [ "${FAKE_SLOW:-}" = "$step" ] && exec sleep 60
        [ "${FAKE_FAIL:-}" = "$step" ] && { echo "$step failed"; exit 1; }
        out=$(echo "$*" | sed -n 's/.*--out \([^ ]*\).*/\1/p')
        [ -n "$out" ] && echo '{"measured": true}' > "$out"
        echo "$step ran"; exit 0;;
    esac
done
echo "ran: $*"
"""


def _run(tmp_path: Path, budget: int | None = None, **fake) -> tuple[int, str, list[str]]:
    stand_in = tmp_path / "python3"
    stand_in.write_text(STAND_IN)
    stand_in.chmod(stand_in.stat().st_mode | stat.S_IEXEC)
    out = tmp_path / "out"
    calls = tmp_path / "calls.txt"
    script = SCRIPT.read_text()
    if budget is not None:                       # a short budget, to reach the time-limit paths quickly
        script = re.sub(r"^BUDGET_S=\d+$", f"BUDGET_S={budget}", script, flags=re.MULTILINE)
    copy = ROOT / "bench" / f".gpu_check_test_{os.getpid()}.sh"    # beside the real one: it cds to the repo root
    copy.write_text(script)
    try:
        env = {**os.environ, "PYTHON": str(stand_in), "FAKE_CALLS": str(calls),
               **{f"FAKE_{k.upper()}": v for k, v in fake.items()}}
        proc = subprocess.run(["bash", str(copy), str(out)], env=env, capture_output=True, text=True, timeout=120)
    finally:
        copy.unlink()
    summary = (out / "summary.txt").read_text().splitlines()
    return proc.returncode, proc.stdout, summary


@needs_bash
@pytest.mark.subprocess
def test_a_clean_run_passes_every_step_and_leaves_its_files(tmp_path):
    rc, stdout, summary = _run(tmp_path)
    assert rc == 0, stdout
    assert [line.split()[:2] for line in summary] == [["PASS", s] for s in
                                                     ("env", "install", "kernel_tests", "kernel_bench", "decode_bench")]
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == sorted(["summary.txt", "env.log", "install.log", "kernel_tests.log", "kernel_bench.log",
                            "kernels.json", "decode_bench.log", "decode.json"])
    assert len(files) <= MAX_FILES
    calls = (tmp_path / "calls.txt").read_text()
    assert "-m pip install --no-index --no-deps --no-build-isolation -e ." in calls
    assert "-u -m glmserve.bench.kernels.triton_kernels --out" in calls


@needs_bash
@pytest.mark.subprocess
def test_a_missing_module_skips_its_step_and_a_failure_does_not_stop_the_rest(tmp_path):
    rc, stdout, summary = _run(tmp_path, missing="pytest", fail="triton_kernels")
    assert rc == 1, stdout
    status = {line.split()[1]: line.split()[0] for line in summary}
    assert status == {"env": "PASS", "install": "PASS", "kernel_tests": "SKIP", "kernel_bench": "FAIL",
                      "decode_bench": "PASS"}
    assert "needs the modules pytest,sentencepiece" in "\n".join(summary)


@needs_bash
@pytest.mark.subprocess
def test_a_hanging_step_is_cut_at_the_budget_and_the_rest_skipped(tmp_path):
    rc, stdout, summary = _run(tmp_path, budget=9, slow="pytest")
    assert rc == 1
    status = {line.split()[1]: line.split()[0] for line in summary}
    assert status["kernel_tests"] == "FAIL" and "timed out" in "\n".join(summary)
    assert status["kernel_bench"] == "SKIP" and status["decode_bench"] == "SKIP"
    assert "no time left" in "\n".join(summary)
