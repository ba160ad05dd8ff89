#!/usr/bin/env bash
# The GPU tests and benchmarks in one go on a machine with an NVIDIA GPU, in at most 6 minutes (a fix and a rerun
# fit in 15 minutes of GPU time). Works without installing the package (the device machine has no network): the
# ddpm_engine namespace is assembled from symlinks to the component folders. Every log is tee'd into
# ${OUT:-gpu_check_out}/ as it is written (a timeout keeps what ran); benchmarks/gpu_summary.py prints the summary.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_check_out}
py=${PYTHON:-python3}
mkdir -p "$out"
shim=$(mktemp -d)
mkdir -p "$shim/ddpm_engine"
for c in models export engine kernels serve; do ln -s "$PWD/$c" "$shim/ddpm_engine/$c"; done
export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
start=$(date +%s)
deadline=$((start + 340))  # 6 minutes less start-up and summary

# run NAME MAX_SECONDS CMD...: tee output to $out/NAME.log, cut at MAX_SECONDS or the overall deadline, record the exit.
run() {
    local name=$1 limit=$2 left
    shift 2
    left=$((deadline - $(date +%s)))
    (( left < limit )) && limit=$left
    if (( limit < 10 )); then
        echo "$name exit NOT RUN (the 6-minute budget was spent)" | tee -a "$out/$name.log"
        return
    fi
    echo "\$ $* (limit ${limit} s)" >> "$out/$name.log"
    timeout "$limit" "$@" 2>&1 | tee -a "$out/$name.log"
    echo "$name exit ${PIPESTATUS[0]}" | tee -a "$out/$name.log"
}

run machine 30 "$py" benchmarks/gpu_summary.py machine

# Per-test timeouts where pytest-timeout is installed; each file is also cut at its own limit.
per_test=()
"$py" -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout=90)
pytest=("$py" -m pytest -q -p no:cacheprovider -rfEs "${per_test[@]}")
run pytest_cuda 100 "${pytest[@]}" -m "not tensorrt" tests/test_engine_cuda.py
run pytest_slots_cuda 60 "${pytest[@]}" -m cuda tests/test_engine_slots.py
run pytest_kernels_step 90 "${pytest[@]}" tests/test_kernels_step.py
run pytest_kernels_noise 45 "${pytest[@]}" tests/test_kernels_noise.py
run pytest_kernels_compile 75 "${pytest[@]}" tests/test_kernels_compile.py
if "$py" -c "import tensorrt" 2>/dev/null; then
    run pytest_tensorrt 120 "${pytest[@]}" -m tensorrt tests/test_export_tensorrt.py tests/test_engine_cuda.py
fi
run bench_step 45 "$py" benchmarks/bench_step.py --no-compile --sizes 1x1x300x300,8x1x300x300,16x4x512x512
run bench_graphs 100 "$py" benchmarks/bench_graphs.py --batch 1,8 --size 300 --steps 50 --seconds 60

"$py" benchmarks/gpu_summary.py "$out" $(( $(date +%s) - start )) | tee "$out/summary.txt"
