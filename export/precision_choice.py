"""`--precision auto` for OpenVINO: time each candidate at the profile's optimal shape and keep the fastest that passes."""
from __future__ import annotations

import os
import time

import numpy as np

ROUNDS = 5  # timed calls per candidate (plus one warm-up): a few seconds at 300x300 on 2 cores


def time_candidates(candidates: dict[str, tuple[str, dict]], batch: int, c_in: int, size: tuple[int, int],
                    rounds: int = ROUNDS, threads: int | None = None) -> dict[str, float]:
    """Median ms per U-Net call of each candidate {precision: (model path, compile config)} at [batch, c_in, H, W].

    Calls alternate between candidates round by round, so a load change on a shared machine hits all of them
    alike (what matters is their order, not their absolute times).
    """
    import openvino as ov

    core = ov.Core()
    calls = {}
    rng = np.random.default_rng(0)
    feed = {"sample": rng.standard_normal((batch, c_in, *size)).astype(np.float32),
            "timestep": np.full(batch, 0.3, np.float32)}
    for name, (path, config) in candidates.items():
        model = core.read_model(str(path))
        model.reshape({"sample": list(feed["sample"].shape), "timestep": [batch]})
        cfg = {"PERFORMANCE_HINT": "LATENCY", **config, **({"INFERENCE_NUM_THREADS": threads} if threads else {})}
        request = core.compile_model(model, "CPU", cfg).create_infer_request()
        request.infer(feed)  # first call: memory and kernel set-up
        calls[name] = request
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, request in calls.items():
            t0 = time.perf_counter()
            request.infer(feed)
            times[name].append(time.perf_counter() - t0)
    return {name: round(1000 * float(np.median(t)), 3) for name, t in times.items()}


def choose(timings_ms: dict[str, float], passed: dict[str, bool]) -> str:
    """The fastest precision that passed the quality gate; fp32 is the reference, always eligible, so the choice is
    never slower than fp32 as timed."""
    eligible = {p: ms for p, ms in timings_ms.items() if p == "fp32" or passed.get(p, False)}
    return min(eligible, key=lambda p: (eligible[p], p != "fp32"))  # a tie goes to fp32


def record(timings_ms: dict[str, float], gates: dict[str, dict], chosen: str, batch: int, size, rounds: int,
           threads: int | None) -> dict:
    """The manifest's account of the choice: timings, gate results, the shape, and the load it ran under."""
    return {"chosen": chosen, "timings_ms": timings_ms, "gate": gates,
            "shape": {"batch": batch, "height": size[0], "width": size[1]}, "rounds": rounds,
            "threads": threads or os.cpu_count(), "loadavg_1min": round(os.getloadavg()[0], 2)}


def measured_openvino_artefact(stage, onnx_name: str, profile, precision: str, c_in: int, c_out: int, gate,
                               note) -> tuple[dict, dict | None]:
    """The OpenVINO artefact for precision "int8" (refused unless it passes the quality gate) or "auto" (fp32, bf16
    where native, int8 where the gate applies: timed, and the fastest that passes kept). Files of the candidates
    not kept are removed from the staging dir. Returns (manifest entry without hashes, the auto choice's record)."""
    from .openvino_build import build_openvino_ir, cpu_supports
    from .quality_gate import QualityGateError, gate_applies, gate_rmse, judge, refusal, summary
    from .quantize import quantize_openvino_ir

    applies = gate_applies(c_in, c_out)
    if precision == "int8" and not applies:
        raise ValueError(f"--precision int8 on the openvino backend needs the quality gate's workload (a model that "
                         f"takes a background: {c_out} sample + {c_out} background channels, CARE-SST); this model "
                         f"has {c_in} input and {c_out} output channels, so no int8 artefact can be checked: build "
                         "fp32 or bf16")
    fp32 = build_openvino_ir(stage / onnx_name, stage, "fp32")
    candidates = {"fp32": fp32}
    if precision == "auto" and cpu_supports("bf16"):  # the same IR, compiled with the bf16 hint
        candidates["bf16"] = {**fp32, "precision": "bf16", "inference_precision_hint": "bf16",
                              "compile_config": {"INFERENCE_PRECISION_HINT": "bf16"}, "native": True}
    if applies:
        candidates["int8"] = quantize_openvino_ir(stage / onnx_name, stage, profile)
    gates = {}
    if applies and len(candidates) > 1:
        rmse_fp32 = gate_rmse(stage / fp32["path"], fp32["compile_config"], profile, gate)
        for name, entry in candidates.items():
            if name != "fp32":
                gates[name] = judge(name, "openvino", gate_rmse(stage / entry["path"], entry["compile_config"],
                                                                 profile, gate), rmse_fp32, gate)
                note(f"  quality gate {summary(gates[name])}")
    choice = None
    if precision == "int8":
        if not gates["int8"]["passed"]:
            raise QualityGateError(refusal(gates["int8"]))
        chosen = "int8"
    else:
        batch, size = profile.batch[1], profile.opt_size
        timings = time_candidates({n: (stage / e["path"], e["compile_config"]) for n, e in candidates.items()},
                                  batch, c_in, size)
        # Without the gate's workload (no background), bf16 stands on its per-call verification alone.
        chosen = choose(timings, {n: gates[n]["passed"] if n in gates else True for n in candidates})
        choice = record(timings, gates, chosen, batch, size, ROUNDS, None)
        note(f"  auto: {', '.join(f'{n} {ms:.1f} ms' for n, ms in timings.items())} at batch {batch} "
             f"{size[0]}x{size[1]} -> {chosen}")
    entry = candidates[chosen]
    for name, other in candidates.items():
        for rel in set(other["files"]) - set(entry["files"]):
            (stage / rel).unlink(missing_ok=True)
    if chosen in gates:
        entry["quality_gate"] = gates[chosen]
    return entry, choice
