#!/usr/bin/env bash
# One prepared check for a GPU machine that already has torch and triton (no network needed):
#   bench/gpu_check.sh [RESULTS_DIR]        (default: $OUT)
# 1. installs this checkout in editable mode (no dependencies, no build isolation)
# 2. runs the kernel tests compiled on the GPU and the CUDA-graph test (log in RESULTS_DIR)
# 3. runs the kernel benchmark (RESULTS_DIR/kernels.json)
# 4. runs the end-to-end decode benchmark at ChatGLM3-6B shape, eager and with CUDA graphs (RESULTS_DIR/decode.json)
# A failing step does not stop the later ones; the script exits 1 if any step failed. Each step has a time
# limit so the whole check stays under 8 minutes. It writes 8 files (the device tool brings back at most 8).
set -u

RESULTS="${1:-${OUT:-}}"
if [ -z "$RESULTS" ]; then
    echo "usage: $0 RESULTS_DIR (or set \$OUT)" >&2
    exit 2
fi
mkdir -p "$RESULTS"
RESULTS="$(cd "$RESULTS" && pwd)"
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"

SUMMARY=()
FAILED=0

# run_step NAME LIMIT_SECONDS COMMAND...: runs COMMAND with a time limit, logs to RESULTS/NAME.log, records the result.
run_step() {
    local name="$1" limit="$2"
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$RESULTS/$name.log"
    local rc=${PIPESTATUS[0]} note=""
    local took=$((SECONDS - start))
    if [ "$rc" -eq 0 ]; then
        SUMMARY+=("PASS  $name (${took}s)")
    else
        [ "$rc" -eq 124 ] && note=" timed out"
        SUMMARY+=("FAIL  $name (rc=$rc$note, ${took}s, log: $RESULTS/$name.log)")
        FAILED=1
    fi
}

"$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")' \
    | tee "$RESULTS/env.log"
"$PYTHON" -c 'import triton; print("triton", triton.__version__)' | tee -a "$RESULTS/env.log"

run_step install 40 "$PYTHON" -m pip install --no-deps --no-build-isolation -e .
run_step kernel_tests 140 "$PYTHON" -m pytest -q tests/kernels tests/test_cuda_graph.py
run_step kernel_bench 100 "$PYTHON" -m glmserve.bench.kernels.triton_kernels --out "$RESULTS/kernels.json"
run_step decode_bench 150 "$PYTHON" -m glmserve.bench.kernels.decode_throughput --out "$RESULTS/decode.json"

echo
echo "=== summary"
printf '%s\n' "${SUMMARY[@]}" | tee "$RESULTS/summary.txt"
exit "$FAILED"
