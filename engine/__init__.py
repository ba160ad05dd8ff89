"""ddpm_engine.engine: schedules, sampler tables, the eager reference loop, backends, Runner, API and CLI."""
from .api import Engine, load
from .discrete_schedule import DiscreteSchedule, discrete_step_table
from .reference import reference_sample
from .samplers import SAMPLERS, StepTable, step_table
from .schedule import CosineSchedule, diffuse

__all__ = ["CosineSchedule", "DiscreteSchedule", "Engine", "SAMPLERS", "StepTable", "build", "diffuse",
           "discrete_step_table", "load", "reference_sample", "step_table"]


def __getattr__(name):
    # `build` lives in ddpm_engine.export, which imports this package: resolve it on first use, not at import.
    if name == "build":
        from ddpm_engine.export import build

        return build
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
