"""ddpm_engine.engine: schedules, sampler tables, the eager reference loop, backends, Runner, API and CLI."""
from .reference import reference_sample
from .samplers import SAMPLERS, StepTable, step_table
from .schedule import CosineSchedule, diffuse

__all__ = ["CosineSchedule", "SAMPLERS", "StepTable", "diffuse", "reference_sample", "step_table"]
