"""The quality gate: a reduced-precision artefact is kept only if the main job's cloud RMSE stays within 1 % of fp32's."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from ddpm_engine.engine.errors import EngineError


class QualityGateError(EngineError, ValueError):
    """A reduced-precision artefact's end-to-end RMSE is not within the gate's tolerance of the fp32 engine's."""


@dataclass(frozen=True)
class GateSettings:
    """A reduced but honest version of `ddpm-engine reconstruct ENGINE --synthetic 4 --samples 4 --t-start 0.5
    --init background`: the same sampler, start and ensemble of 4, on held-out synthetic tiles
    (models.evaluate.held_out_tiles, never trained or calibrated on), with fewer steps over the same times and the
    same generator seed for every engine, so the fp32 and reduced runs draw the same noise (a paired comparison).
    Score: cloud-pixel RMSE in deg C of the ensemble mean (models.evaluate.evaluate's rmse_model)."""

    tiles: int = 4
    size: int = 64
    samples: int = 4
    timesteps: int = 25
    t_start: float = 0.5
    init: str = "background"
    sampler: str = "ddpm"
    seed: int = 0
    tolerance: float = 0.01  # |rmse - rmse_fp32| / rmse_fp32

    def as_dict(self) -> dict:
        return asdict(self)


def gate_applies(c_in: int, c_out: int) -> bool:
    """The gate's workload needs a model conditioned on a background (CARE-SST: sample + background channels)."""
    return c_in == 2 * c_out == 2


def gate_rmse(model_path: str | Path, compile_config: dict, profile, settings: GateSettings,
              threads: int | None = None) -> float:
    """Run the gate's job with one OpenVINO artefact (an IR, or the fp32 ONNX graph itself) and return its RMSE."""
    from ddpm_engine.engine.api import Engine
    from ddpm_engine.engine.backend_openvino import OpenVinoBackend
    from ddpm_engine.engine.runner import Runner
    from ddpm_engine.models.evaluate import evaluate, held_out_tiles

    from .quantize import fit_size

    rows = settings.tiles * settings.samples
    runner = Runner(OpenVinoBackend(model_path, compile_config, threads=threads), c_out=1, c_in=2)
    engine = Engine(runner, c_in=2, c_out=1, max_batch=rows)
    tiles = held_out_tiles(settings.tiles, fit_size(settings.size, profile))
    result = evaluate(engine, timesteps=settings.timesteps, sampler=settings.sampler, samples=settings.samples,
                      seed=settings.seed, t_start=settings.t_start, init=settings.init, tiles=tiles)
    return result["rmse_model"]


def judge(precision: str, backend: str, rmse: float, rmse_fp32: float, settings: GateSettings) -> dict:
    """The gate's record for the manifest: both RMSEs, their relative difference and whether it passed."""
    rel = abs(rmse - rmse_fp32) / rmse_fp32
    return {"precision": precision, "backend": backend, "rmse": round(rmse, 6), "rmse_fp32": round(rmse_fp32, 6),
            "relative_difference": round(rel, 6), "passed": rel <= settings.tolerance, "settings": settings.as_dict()}


def summary(record: dict) -> str:
    """'int8: cloud RMSE 0.7646 C vs fp32 0.7639 C, 0.10 % apart (tolerance 1 %): passed', for build, info and
    benchmark output."""
    return (f"{record['precision']}: cloud RMSE {record['rmse']:.4f} C vs fp32 {record['rmse_fp32']:.4f} C, "
            f"{100 * record['relative_difference']:.2f} % apart (tolerance {100 * record['settings']['tolerance']:g} "
            f"%): {'passed' if record['passed'] else 'refused'}")


def refusal(record: dict) -> str:
    """One message naming the precision, the backend and the measured RMSEs of an artefact the gate refused."""
    s = record["settings"]
    return (f"--precision {record['precision']} on the {record['backend']} backend fails the quality gate: cloud RMSE "
            f"{record['rmse']:.4f} C against fp32's {record['rmse_fp32']:.4f} C "
            f"({100 * record['relative_difference']:.2f} % apart, tolerance {100 * s['tolerance']:g} %; {s['tiles']} "
            f"held-out {s['size']}x{s['size']} tiles, {s['samples']} samples, {s['sampler']} {s['timesteps']} steps "
            f"from t={s['t_start']}); build fp32 or bf16 instead, or --precision auto")
