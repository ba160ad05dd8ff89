#!/usr/bin/env bash
# Every GPU test and the GPU benchmarks, in one go, on a machine with an NVIDIA GPU (target: < 6 minutes).
# Works without installing the package (the device machine has no network): the ddpm_engine namespace is
# assembled from symlinks to the component folders. Prints one summary table; logs and JSON lines go to
# ${OUT:-gpu_check_out}/.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_check_out}
mkdir -p "$out"
shim=$(mktemp -d)
mkdir -p "$shim/ddpm_engine"
for c in models export engine kernels; do ln -s "$PWD/$c" "$shim/ddpm_engine/$c"; done
export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET

python - <<'PY' | tee "$out/machine.txt"
import platform, torch
print("gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NONE")
print("torch", torch.__version__, "cuda", torch.version.cuda, "python", platform.python_version())
try:
    import triton; print("triton", triton.__version__)
except ImportError:
    print("triton missing")
try:
    import tensorrt; print("tensorrt", tensorrt.__version__)
except ImportError:
    print("tensorrt missing (TensorRT tests skip)")
PY

start=$(date +%s)
# The runtime's CUDA tests, the kernel tests (they run on the GPU where there is one) and every TensorRT test.
timeout 240 python -m pytest -q -p no:cacheprovider -rs tests/test_engine_cuda.py tests/test_kernels_*.py \
    $(grep -l "mark.tensorrt" tests/test_*.py | grep -v test_engine_cuda.py) > "$out/pytest.log" 2>&1
echo "pytest exit $?" >> "$out/pytest.log"
timeout 120 python benchmarks/bench_step.py --cuda-graphs > "$out/bench_step.log" 2>&1
echo "bench_step exit $?" >> "$out/bench_step.log"
# bench_sample uses CUDA when it is visible: the torch engine there runs the Triton step under CUDA graphs.
timeout 150 python benchmarks/bench_sample.py --size 300 --batch 1,8 --steps 20 --engines-only --no-split-build \
    > "$out/bench_sample.log" 2>&1
echo "bench_sample exit $?" >> "$out/bench_sample.log"
elapsed=$(( $(date +%s) - start ))

python - "$out" "$elapsed" <<'PY'
import json, pathlib, re, sys
out, elapsed = pathlib.Path(sys.argv[1]), sys.argv[2]
rows = []
log = (out / "pytest.log").read_text()
summary = [l for l in log.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", l)]
rows.append(("pytest (CUDA, kernels, TensorRT)", summary[-1].strip("= ") if summary else "no summary"))
for name in ("bench_step", "bench_sample"):
    path = out / f"{name}.log"
    if not path.exists():
        continue
    lines = path.read_text().splitlines()
    records = [json.loads(l) for l in lines if l.startswith("{")]
    rows.append((name, f"{len(records)} JSON rows; {lines[-1]}"))
print()
print(f"{'check':40s} result   (total {elapsed} s; logs in {out}/)")
for name, result in rows:
    print(f"{name:40s} {result}")
PY
