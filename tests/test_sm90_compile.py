"""Every Triton kernel variant the engine can launch for ChatGLM3-6B (bf16 and fp16), compiled for an H100 (sm_90)
on this machine, no GPU needed (bench/kernels/triton_compile.py; its table is in bench/RESULTS.md).

Fails on a compile failure, a register spill, shared memory over the H100's 227 KB, or a variant the server would
launch that the start-up warm-up does not compile. Skips where the installed triton cannot target CUDA.
The compile runs in a subprocess without TRITON_INTERPRET, which tests/conftest.py sets on machines without a GPU
(the interpreter compiles nothing). About 25 s on two cores (20 variants, ptxas included).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from glmserve.bench.kernels.triton_compile import EXIT_NO_CUDA_TARGET, HALF_DTYPES, problems


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    """The compile report for bf16 and fp16, from a subprocess (tests using it are marked ``subprocess``)."""
    out = tmp_path_factory.mktemp("sm90") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-W", "ignore", "-m", "glmserve.bench.kernels.triton_compile",
                           "--dtypes", ",".join(HALF_DTYPES), "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode == EXIT_NO_CUDA_TARGET:
        pytest.skip(proc.stderr.strip())
    assert out.exists(), f"no report (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    result = json.loads(out.read_text(encoding="utf-8"))
    result["returncode"], result["stdout"] = proc.returncode, proc.stdout
    return result


@pytest.mark.subprocess
def test_every_variant_compiles_for_sm90_without_spills_within_shared_memory(report):
    assert not report["problems"], "\n".join(report["problems"])
    assert report["returncode"] == 0, report["stdout"][-3000:]


@pytest.mark.subprocess
def test_the_report_covers_every_kernel_and_variant(report):
    rows = report["variants"]
    for dtype in HALF_DTYPES:
        mine = [r for r in rows if r["dtype"] == dtype]
        by_kernel = {}
        for r in mine:
            by_kernel.setdefault(r["kernel"], []).append(r)
        assert set(by_kernel) == {"_write_kv_cache_kernel", "_decode_split_kernel", "_extend_kernel",
                                  "_merge_splits_kernel"}
        assert sorted(r["constexprs"]["DIRECT"] for r in by_kernel["_decode_split_kernel"]) == [False, True]
        extend = {(r["constexprs"]["BLOCK_T"], r["constexprs"]["DIRECT"]) for r in by_kernel["_extend_kernel"]}
        assert extend == {(t, d) for t in (2, 4, 8) for d in (False, True)}     # ChatGLM3: 16 heads a group
        assert len(by_kernel["_merge_splits_kernel"]) == 1 and len(by_kernel["_write_kv_cache_kernel"]) == 1
        for r in by_kernel["_decode_split_kernel"] + by_kernel["_extend_kernel"]:
            assert r["load_buffers"] >= 2, f"{r['kernel']} {r['constexprs']}: K/V loads are not pipelined"
            assert r["registers"] > 0
    # The serving launches checked against the warm-up include the CUDA-graph decode steps (whose split count is
    # fixed from the model length): they needed no variant of their own.
    assert report["serving_launches_checked"]["cuda_graph"] > 0 and report["serving_launches_checked"]["eager"] > 0
    assert report["uncovered"] == []


@pytest.mark.subprocess
def test_the_bandwidth_model_uses_what_the_compiler_reports(report):
    # bench/kernels/decode_bandwidth_model.py predicts from recorded sm_90 figures: they must still hold.
    from glmserve.bench.kernels.decode_bandwidth_model import RECORDED_SM90, KernelResources
    version = ".".join(report["triton"].split(".")[:2])
    if version not in RECORDED_SM90:
        pytest.skip(f"no sm_90 figures recorded for triton {report['triton']}")
    decode, merge = RECORDED_SM90[version]
    bf16 = {(r["kernel"], r["constexprs"].get("DIRECT")): r for r in report["variants"] if r["dtype"] == "bfloat16"}
    for recorded, row in ((decode, bf16[("_decode_split_kernel", False)]),
                          (merge, bf16[("_merge_splits_kernel", None)])):
        compiled = KernelResources(row["shared_bytes"], row["registers"], row["num_warps"], row["load_buffers"])
        assert (compiled.resident_per_sm(), compiled.load_buffers, compiled.shared_bytes) == \
            (recorded.resident_per_sm(), recorded.load_buffers, recorded.shared_bytes), (compiled, recorded)


def test_problems_flags_each_failure_kind():
    def row(**kw):
        base = dict(kernel="_k", dtype="bfloat16", constexprs={}, error=None, spill_store_bytes=0,
                    spill_load_bytes=0, shared_bytes=1024)
        return {**base, **kw}
    report = {"shared_limit_bytes": 227 * 1024, "uncovered": [],
              "variants": [row(), row(dtype="float32", spill_store_bytes=64)]}
    assert problems(report) == []                                   # fp32 (tests only) may spill
    for bad, words in ((row(spill_load_bytes=8), "spills"), (row(dtype="float16", spill_store_bytes=4), "spills"),
                       (row(shared_bytes=227 * 1024 + 1), "shared memory"), (row(error="PTXASError: x"), "failed")):
        found = problems({**report, "variants": [bad]})
        assert len(found) == 1 and words in found[0]
    assert problems({**report, "uncovered": ["bfloat16 8K _decode_split_kernel: decode b=3"]})
