"""Optional ONNX graph simplification with onnxslim, kept only when it removes nodes without slowing ONNX Runtime."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ddpm_engine.engine.errors import BackendUnavailableError


def _median_latency(path_or_bytes, c_in: int, hw: tuple[int, int], runs: int = 7) -> float:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1  # one thread: less noise from other processes on a shared machine
    so.log_severity_level = 3
    sess = ort.InferenceSession(path_or_bytes, so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, c_in, *hw), dtype=np.float32)
    t = np.full((1,), 0.5, np.float32)
    sess.run(None, {"sample": x, "timestep": t})
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, {"sample": x, "timestep": t})
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def simplify_onnx(path: str | Path, c_in: int, hw: tuple[int, int], save) -> dict:
    """Simplify the graph at `path` in place (through `save(proto, path)`) if onnxslim removes nodes and ONNX Runtime
    is not slower on it (median of 7 single-thread runs at batch 1, `hw`, within 5 %); returns what was measured."""
    import onnx

    try:
        import onnxslim
    except ImportError:
        raise BackendUnavailableError("graph simplification needs onnxslim: pip install onnxslim") from None
    path = Path(path)
    original = onnx.load(str(path))
    slim = onnxslim.slim(original)
    before, after = len(original.graph.node), len(slim.graph.node)
    # Latency on what ORT would load; a graph above protobuf's limit is judged by its node count alone.
    small = slim.ByteSize() < 2**31 - 2**26
    t_before = _median_latency(str(path), c_in, hw)
    t_after = _median_latency(slim.SerializeToString(), c_in, hw) if small else None
    kept = after < before and (t_after is None or t_after <= 1.05 * t_before)
    if kept:
        save(slim, path)
    return {"tool": f"onnxslim {getattr(onnxslim, '__version__', '?')}", "nodes_before": before, "nodes_after": after,
            "ort_ms_before": round(t_before * 1e3, 3), "ort_ms_after": t_after and round(t_after * 1e3, 3),
            "kept": kept,
            "measured_at": f"batch 1, {hw[0]}x{hw[1]}, 1 thread"}
