#!/usr/bin/env bash
# One short, unattended check for a GPU machine that already has torch and triton (no network needed):
#   bash bench/gpu_check.sh [RESULTS_DIR]        (default: $OUT)
# 1. env: versions, the GPU, which optional modules are importable (env.log)
# 2. install: this checkout in editable mode, from the local disk only (no index, no dependencies, no isolation)
# 3. kernel_tests: the kernel tests compiled for the GPU and the CUDA-graph tests (kernel_tests.log)
# 4. kernel_bench: the kernels timed with do_bench_cudagraph, beside the bandwidth model's predictions
#    (kernels.json, rewritten after every point)
# 5. decode_bench: end-to-end decode at ChatGLM3-6B shape (random weights), eager and with CUDA graphs, batch 1
#    and 64 at context 1024, without the HF baseline (decode.json, rewritten after every point)
# Budget: the whole check stays under 5 minutes on an H100 (BUDGET_S): each step has its own limit, cut to what
# is left of the budget, so a second run fits a 15-minute GPU allowance. A failing or skipped step does not stop
# the later ones; summary.txt gets a line as each step ends; the script exits 1 if any step failed.
# Output is unbuffered, so a run cut short still leaves every log up to its last line. It writes 8 files.
set -u

RESULTS="${1:-${OUT:-}}"
if [ -z "$RESULTS" ]; then
    echo "usage: $0 RESULTS_DIR (or set \$OUT)" >&2
    exit 2
fi
mkdir -p "$RESULTS"
RESULTS="$(cd "$RESULTS" && pwd)"
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
BUDGET_S=295
KILL_GRACE_S=2
: > "$RESULTS/summary.txt"
FAILED=0

# has_modules A,B,...: true when python can import every module named.
has_modules() {
    local check='import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in sys.argv[1].split(",")))'
    "$PYTHON" -c "$check" "$1" 2>/dev/null
}

# run_step NAME LIMIT_SECONDS NEEDED_MODULES COMMAND...: runs COMMAND within min(LIMIT, what is left of the
# budget), logs to RESULTS/NAME.log and appends its result to summary.txt. NEEDED_MODULES ("-" for none): a
# missing one skips the step, with the reason.
run_step() {
    local name="$1" limit="$2" needs="$3"
    shift 3
    local left=$((BUDGET_S - SECONDS - KILL_GRACE_S)) line
    if [ "$needs" != "-" ] && ! has_modules "$needs"; then
        line="SKIP  $name (needs the modules $needs, not all installed)"
    elif [ "$left" -lt 5 ]; then
        line="SKIP  $name (no time left in the ${BUDGET_S}s budget)"
    else
        [ "$left" -lt "$limit" ] && limit=$left
        echo "=== $name (limit ${limit}s, at ${SECONDS}s): $*"
        local start=$SECONDS
        timeout -k "$KILL_GRACE_S" "$limit" "$@" 2>&1 | tee "$RESULTS/$name.log"
        local rc=${PIPESTATUS[0]} took=$((SECONDS - start))
        if [ "$rc" -eq 0 ]; then
            line="PASS  $name (${took}s)"
        else
            local note=""
            [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && note=" timed out"
            line="FAIL  $name (rc=$rc$note, ${took}s, log: $name.log)"
            FAILED=1
        fi
    fi
    echo "$line" | tee -a "$RESULTS/summary.txt"
}

run_step env 15 - "$PYTHON" -c '
import importlib.util, platform, torch, triton
print("python", platform.python_version(), "torch", torch.__version__, "triton", triton.__version__)
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
for m in ("pytest", "sentencepiece", "safetensors", "transformers"):
    print(m, "installed" if importlib.util.find_spec(m) else "MISSING")
'
run_step install 25 pip "$PYTHON" -m pip install --no-index --no-deps --no-build-isolation -e .
run_step kernel_tests 105 pytest,sentencepiece "$PYTHON" -m pytest -q -p no:cacheprovider tests/kernels \
    tests/test_cuda_graph.py
run_step kernel_bench 60 - "$PYTHON" -u -m glmserve.bench.kernels.triton_kernels --out "$RESULTS/kernels.json"
run_step decode_bench 85 sentencepiece "$PYTHON" -u -m glmserve.bench.kernels.decode_throughput --batch-sizes 1,64 \
    --context 1024 --decode-steps 16 --skip-hf --out "$RESULTS/decode.json"

echo
echo "=== summary (${SECONDS}s)"
cat "$RESULTS/summary.txt"
exit "$FAILED"
