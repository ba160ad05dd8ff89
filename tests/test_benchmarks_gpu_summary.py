"""benchmarks/gpu_summary.py, gpu_check.sh's summary step, on benchmark and pytest output saved here on CPU."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_step(out: Path, name: str, *cmd: str) -> str:
    """What gpu_check.sh's `run` leaves: NAME.log with the command's output, then the line "NAME exit CODE"."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    text = proc.stdout + proc.stderr + f"{name} exit {proc.returncode}\n"
    (out / f"{name}.log").write_text(text)
    return text


def test_summary_reads_the_json_rows_exit_codes_and_pytest_results(tmp_path):
    py = sys.executable
    run_step(tmp_path, "machine", py, "benchmarks/gpu_summary.py", "machine")
    step = run_step(tmp_path, "bench_step", py, "benchmarks/bench_step.py", "--no-compile", "--sizes",
                    "1x1x32x32,2x1x48x48")
    run_step(tmp_path, "bench_graphs", py, "benchmarks/bench_graphs.py", "--seconds", "1")  # needs CUDA: exit 2
    run_step(tmp_path, "pytest_layout", py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs",
             "tests/test_layout.py")
    summary = subprocess.run([py, "benchmarks/gpu_summary.py", str(tmp_path), "42"], capture_output=True, text=True,
                             timeout=60, cwd=ROOT, check=True).stdout
    print(summary)
    lines = summary.splitlines()
    rows = [ln for ln in step.splitlines() if ln.startswith("JSON {")]
    assert len(rows) >= 4  # two sizes, at least the seed's ops and the torch specification each
    assert f"bench_step               {len(rows)} JSON rows; exit 0" in lines
    assert sum(ln.strip().startswith(("1x1x32x32 ", "2x1x48x48 ")) for ln in lines) == len(rows)
    assert any("seed torch ops" in ln and " ms " in ln and "GB/s" in ln for ln in lines)
    assert "bench_graphs             0 JSON rows; FAILED (exit 2)" in lines
    assert any("last output:" in ln and "needs an NVIDIA GPU" in ln for ln in lines)
    assert any(ln.startswith("pytest_layout") and " passed in " in ln and ln.endswith("; exit 0") for ln in lines)
    assert lines[-1] == "TensorRT: NOT RUN (tensorrt is not installed on this machine)"
    assert lines[0] == f"gpu_check summary (total 42 s; logs in {tmp_path}/)"
