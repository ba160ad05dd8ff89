"""gpu_check.sh's report: `machine` prints what the machine has; `OUT ELAPSED` summarises the logs in OUT.

    python benchmarks/gpu_summary.py machine
    python benchmarks/gpu_summary.py gpu_check_out 312

Each log NAME.log ends with the line "NAME exit CODE" (gpu_check.sh writes it; "NOT RUN (...)" when the time
budget was spent). pytest logs give their summary line and failing tests; benchmark logs their "JSON {...}" rows.
"""
from __future__ import annotations

import json
import platform
import re
import sys
from pathlib import Path

LIBRARIES = ("triton", "tensorrt", "onnxruntime", "openvino")
# What each benchmark row shows: (JSON key, label, format).
COLUMNS = {
    "bench_step": (("size", "", "{}"), ("path", "", "{}"), ("ms", "ms", "{:.4f}"), ("gbps", "GB/s", "{:.1f}"),
                   ("speedup_vs_seed", "vs seed", "{}x")),
    "bench_graphs": (("batch", "B=", "{}"), ("cuda_graphs", "graphs", "{}"), ("ms_per_step", "ms/step", "{:.3f}"),
                     ("images_per_s", "images/s", "{:.2f}"), ("graph_speedup", "gain", "{}x")),
}


def machine() -> None:
    import torch

    print("gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NONE")
    print("torch", torch.__version__, "cuda", torch.version.cuda, "python", platform.python_version())
    for name in LIBRARIES:
        try:
            print(name, __import__(name).__version__)
        except ImportError:
            print(name, "missing")


def exit_status(name: str, lines: list[str]) -> str:
    """The exit line gpu_check.sh appended: "exit 0", "TIMED OUT (124)", "NOT RUN (...)", or "no exit line"."""
    for line in reversed(lines):
        at = line.rfind(f"{name} exit ")  # may follow output without a final newline (pytest's progress dots)
        if at >= 0:
            code = line[at + len(name) + 6:]
            return {"124": "TIMED OUT (exit 124)", "0": "exit 0"}.get(code, code if code.startswith("NOT RUN")
                                                                       else f"FAILED (exit {code})")
    return "no exit line (cut off?)"


def pytest_result(name: str, lines: list[str]) -> list[str]:
    counts = [ln.strip("= ") for ln in lines if re.search(r"\d+ (passed|failed|skipped|errors?|deselected)", ln)
              and " in " in ln]
    failed = [ln for ln in lines if ln.startswith(("FAILED ", "ERROR "))]
    return [f"{counts[-1] if counts else 'no pytest summary'}; {exit_status(name, lines)}", *failed[:10]]


def bench_result(name: str, lines: list[str]) -> list[str]:
    rows = [json.loads(ln[len("JSON "):]) for ln in lines if ln.startswith("JSON ")]
    head = f"{len(rows)} JSON rows; {exit_status(name, lines)}"
    if not rows:
        tail = [ln for ln in lines if ln.strip() and f"{name} exit " not in ln][-1:]
        return [head, *(f"  last output: {ln[:200]}" for ln in tail)]
    out = [head]
    for row in rows:
        cells = []
        for key, label, fmt in COLUMNS.get(name, ()):
            value = row.get(key)
            if value is not None:
                cells.append(f"{label} {fmt.format(value)}".strip())
        out.append("  " + "  ".join(cells))
    return out


def tensorrt_line(out: Path, machine_lines: list[str]) -> str:
    log = out / "pytest_tensorrt.log"
    if log.is_file():
        return "TensorRT: " + pytest_result("pytest_tensorrt", log.read_text().splitlines())[0]
    missing = any(ln.split()[:2] == ["tensorrt", "missing"] for ln in machine_lines)
    reason = "tensorrt is not installed on this machine" if missing else "no TensorRT log"
    return f"TensorRT: NOT RUN ({reason})"


def summary(out: Path, elapsed: str) -> str:
    machine_lines = (out / "machine.log").read_text().splitlines() if (out / "machine.log").is_file() else []
    lines = [f"gpu_check summary (total {elapsed} s; logs in {out}/)"]
    lines += [f"machine: {', '.join(ln for ln in machine_lines if not ln.startswith(('$', 'machine exit')))}"]
    for log in sorted(out.glob("*.log"), key=lambda p: p.stat().st_mtime):  # in the order they ran
        name = log.stem
        if name in ("machine", "pytest_tensorrt"):
            continue
        text = log.read_text().splitlines()
        result = pytest_result(name, text) if name.startswith("pytest") else bench_result(name, text)
        lines.append(f"{name:24s} {result[0]}")
        lines += [f"{'':24s} {extra}" for extra in result[1:]]
    lines.append(tensorrt_line(out, machine_lines))
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:] == ["machine"]:
        machine()
    elif len(sys.argv) == 3:
        print(summary(Path(sys.argv[1]), sys.argv[2]))
    else:
        sys.exit(__doc__)
