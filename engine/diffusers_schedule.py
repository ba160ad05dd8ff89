"""A diffusers model's sampling settings, the manifest's `schedule` section: a DiscreteSchedule with the scheduler's
prediction type, clip and variance, and the DDPM / DDIM / DPM-Solver++ step tables they give (no diffusers import)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .discrete_schedule import VARIANCE_TYPES, DiscreteSchedule, discrete_step_table
from .samplers import PREDICTIONS, StepTable, check_sampler

# The saved scheduler classes a pipeline may have, and the sampler each one runs by default.
SCHEDULERS = {"DDPMScheduler": "ddpm", "DDIMScheduler": "ddim"}
# Settings whose step is not a linear row (or not the one diffusers runs): refused by name.
_REFUSED = {"thresholding": "dynamic thresholding (Saharia et al. 2022) clips x0 at a per-sample quantile, which "
                            "is not linear",
            "rescale_betas_zero_snr": "zero-terminal-SNR rescaling (Lin et al. 2024) is not implemented"}
_SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "timestep_spacing",
                  "steps_offset", "set_alpha_to_one")


@dataclass(frozen=True)
class DiffusersSchedule:
    """What a diffusers scheduler config fixes about sampling; `table` builds the rows for any supported sampler."""

    schedule: DiscreteSchedule
    scheduler: str = "DDPMScheduler"
    prediction_type: str = "epsilon"
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    variance_type: str = "fixed_small"

    @classmethod
    def from_config(cls, class_name: str, config: dict) -> "DiffusersSchedule":
        """From a scheduler's class name and config (scheduler_config.json), refusing what the engine cannot run."""
        if class_name not in SCHEDULERS:
            raise ValueError(f"unsupported scheduler class {class_name!r}; supported: {sorted(SCHEDULERS)} (the "
                             "dpmpp-2m sampler runs from either one's config)")
        for key, why in _REFUSED.items():
            if config.get(key):
                raise ValueError(f"{class_name} has {key}=True: {why}; save the scheduler with {key}=False")
        variance = config.get("variance_type") or "fixed_small"  # DDIMScheduler has none: its variance is eta's
        if variance not in VARIANCE_TYPES:
            note = " (diffusers' fixed_large_log takes a log-variance as a variance)" if variance == \
                "fixed_large_log" else ""
            raise ValueError(f"unsupported variance_type {variance!r}{note}; supported: {list(VARIANCE_TYPES)}")
        prediction = config.get("prediction_type", "epsilon")
        if prediction not in PREDICTIONS:
            raise ValueError(f"unsupported prediction_type {prediction!r}; supported: {list(PREDICTIONS)}")
        betas = config.get("trained_betas")
        kwargs = {k: config[k] for k in _SCHEDULE_KEYS if config.get(k) is not None}
        schedule = DiscreteSchedule(**kwargs, trained_betas=None if betas is None else tuple(float(b) for b in betas))
        clip_range = float(config.get("clip_sample_range", 1.0))
        if not clip_range > 0:
            raise ValueError(f"clip_sample_range must be > 0, got {clip_range!r}")
        return cls(schedule, class_name, prediction, bool(config.get("clip_sample", True)), clip_range, variance)

    def as_dict(self) -> dict:
        """The manifest's `schedule` section (JSON)."""
        out = {k: v for k, v in asdict(self).items() if k != "schedule"}
        sched = asdict(self.schedule)
        sched["trained_betas"] = None if self.schedule.trained_betas is None else list(self.schedule.trained_betas)
        return {"kind": "diffusers", **out, **sched}

    @classmethod
    def from_dict(cls, section: dict) -> "DiffusersSchedule":
        """Inverse of as_dict."""
        section = {k: v for k, v in section.items() if k != "kind"}
        betas = section.pop("trained_betas", None)
        own = {k: section.pop(k) for k in ("scheduler", "prediction_type", "clip_sample", "clip_sample_range",
                                           "variance_type")}
        return cls(DiscreteSchedule(**section, trained_betas=None if betas is None else tuple(betas)), **own)

    @property
    def default_sampler(self) -> str:
        """The sampler of the saved scheduler class (what the diffusers pipeline would run)."""
        return SCHEDULERS[self.scheduler]

    def table(self, sampler: str | None, timesteps: int, eta: float = 0.0, tau: float = 1.0) -> StepTable:
        """Rows equal to diffusers' scheduler `step` of that sampler, built from this config (DPM-Solver++ never clips)."""
        sampler = check_sampler(sampler or self.default_sampler, timesteps)
        clip = self.clip_sample_range if self.clip_sample and not sampler.startswith("dpmpp") else 0.0
        return discrete_step_table(self.schedule, sampler, timesteps, prediction_type=self.prediction_type, clip=clip,
                                   eta=eta, tau=tau, variance_type=self.variance_type)
