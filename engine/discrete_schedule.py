"""A discrete DDPM schedule (alphas_cumprod from betas, Ho et al. 2020 sec. 2) and its step tables, as in diffusers.

The time value of a row is the model's integer timestep. Everything is float64 on the host, stored float32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from .samplers import (COL_AO, COL_AX, COL_B0, COL_CE, COL_CLIP, COL_CX, COL_CZ, StepTable, assemble, check_eta_tau,
                       check_sampler, dpmpp_2m, table_flags, x0_coefficients)

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")  # Lin et al. 2024, table 2


@dataclass(frozen=True)
class DiscreteSchedule:
    """alphas_cumprod[t] = prod_{s <= t} (1 - beta_s), t = 0..N-1, with diffusers' beta schedules and spacings."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    set_alpha_to_one: bool = True  # DDIM's last step goes to abar = 1 (else to alphas_cumprod[0])
    trained_betas: tuple[float, ...] | None = None  # given betas replace beta_start, beta_end and beta_schedule

    def __post_init__(self):
        if isinstance(self.num_train_timesteps, bool) or not isinstance(self.num_train_timesteps, int) \
                or self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be an integer >= 2, got {self.num_train_timesteps!r}")
        if self.trained_betas is not None:
            betas = np.asarray(self.trained_betas, dtype=np.float64)
            # diffusers spaces the timesteps by num_train_timesteps but indexes the betas: they must agree
            if betas.shape != (self.num_train_timesteps,) or not np.all((betas > 0) & (betas < 1)):
                raise ValueError(f"trained_betas must be {self.num_train_timesteps} (num_train_timesteps) values in "
                                 f"(0, 1), got {betas.size} values in [{betas.min():.3g}, {betas.max():.3g}]")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"unknown beta_schedule {self.beta_schedule!r}; must be one of {list(BETA_SCHEDULES)}")
        if self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"unknown timestep_spacing {self.timestep_spacing!r}; must be one of "
                             f"{list(TIMESTEP_SPACINGS)}")
        if not 0.0 < self.beta_start < self.beta_end < 1.0:
            raise ValueError(f"need 0 < beta_start < beta_end < 1, got {self.beta_start!r}, {self.beta_end!r}")
        if isinstance(self.steps_offset, bool) or not isinstance(self.steps_offset, int) or self.steps_offset < 0:
            raise ValueError(f"steps_offset must be an integer >= 0, got {self.steps_offset!r}")

    @cached_property
    def betas(self) -> np.ndarray:
        """beta_t, float64: linear (Ho et al. 2020), scaled_linear or squaredcos_cap_v2 (Nichol & Dhariwal 2021)."""
        n = self.num_train_timesteps
        if self.trained_betas is not None:
            return np.asarray(self.trained_betas, dtype=np.float64)
        if self.beta_schedule == "linear":
            return np.linspace(self.beta_start, self.beta_end, n, dtype=np.float64)
        if self.beta_schedule == "scaled_linear":
            return np.linspace(self.beta_start**0.5, self.beta_end**0.5, n, dtype=np.float64) ** 2
        abar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        return np.array([min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)], dtype=np.float64)

    @cached_property
    def alphas_cumprod(self) -> np.ndarray:
        """abar_t = prod_{s <= t} (1 - beta_s), float64, t = 0..N-1."""
        return np.cumprod(1.0 - self.betas)

    @property
    def final_alpha_cumprod(self) -> float:
        """abar of DDIM's step past t = 0: 1 with set_alpha_to_one, else alphas_cumprod[0]."""
        return 1.0 if self.set_alpha_to_one else float(self.alphas_cumprod[0])

    def alpha_cumprod(self, t):
        """abar at integer timesteps t (numpy, int or tensor; float64 out), t = -1 meaning the clean end (abar = 1)."""
        if isinstance(t, torch.Tensor):
            return torch.from_numpy(np.asarray(self.alpha_cumprod(t.detach().cpu().numpy()))).to(t.device)
        t = np.asarray(t)
        if not np.issubdtype(t.dtype, np.integer) and not np.all(t == np.round(t)):
            raise ValueError("a discrete schedule is indexed by integer timesteps")
        t = t.astype(np.int64)
        if t.size and (t.min() < -1 or t.max() >= self.num_train_timesteps):
            raise ValueError(f"timesteps must lie in [-1, {self.num_train_timesteps - 1}], got {t.min()}..{t.max()}")
        out = np.where(t < 0, 1.0, self.alphas_cumprod[np.maximum(t, 0)])
        return float(out) if out.ndim == 0 else out

    def timesteps(self, steps: int, multistep: bool = False) -> np.ndarray:
        """The descending integer timesteps of a `steps`-step run, as diffusers' DDPM/DDIM set_timesteps computes them.

        multistep: DPMSolverMultistepScheduler's variant (linspace, leading: steps + 1 points, the last one dropped).
        """
        n = self.num_train_timesteps
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= n:
            raise ValueError(f"timesteps must be an integer in [1, num_train_timesteps={self.num_train_timesteps}], "
                             f"got {steps!r}")
        k = int(steps) + int(multistep)
        if self.timestep_spacing == "linspace":
            ts = np.linspace(0, n - 1, k).round()[::-1]
        elif self.timestep_spacing == "leading":
            ts = (np.arange(0, k) * (n // k)).round()[::-1] + self.steps_offset
        else:
            ts = np.round(np.arange(n, 0, -n / steps)) - 1
        if multistep and self.timestep_spacing != "trailing":
            ts = ts[:-1]  # the multistep scheduler's extra point, timestep 0 (or steps_offset)
        ts = ts.astype(np.int64)
        if np.any(np.diff(ts) >= 0) or ts.max() >= n:
            raise ValueError(f"{steps} steps with {self.timestep_spacing!r} spacing and steps_offset "
                             f"{self.steps_offset} give repeated or out-of-range timesteps (from {ts[0]} to {ts[-1]}, "
                             f"N = {n})")
        return ts


VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large")  # DDPM's sigma^2: beta tilde, the same, beta


def _ddpm(a, a_next, ts, prediction, variance_type):
    """diffusers' DDPMScheduler.step: posterior mean (Ho et al. 2020, eq. 7) on the clipped x0, sigma^2 = beta tilde
    (fixed_small, and fixed_small_log: exp(log(var) / 2) is its square root) or beta (fixed_large, sec. 3.2)."""
    if variance_type not in VARIANCE_TYPES:
        raise ValueError(f"unsupported variance_type {variance_type!r}; must be one of {list(VARIANCE_TYPES)}")
    a_x, a_o = x0_coefficients(a, prediction)
    beta = 1.0 - a / a_next
    # diffusers clamps beta tilde at 1e-20 (it takes logs of it) but not beta
    var = beta if variance_type == "fixed_large" else np.maximum((1.0 - a_next) / (1.0 - a) * beta, 1e-20)
    return {COL_AX: a_x, COL_AO: a_o, COL_B0: np.sqrt(a_next) * beta / (1.0 - a),
            COL_CX: np.sqrt(a / a_next) * (1.0 - a_next) / (1.0 - a), COL_CZ: np.where(ts > 0, np.sqrt(var), 0.0)}


def _ddim(a, a_next, prediction, eta):
    """diffusers' DDIMScheduler.step (use_clipped_model_output=False): Song et al. 2021, eq. 12, unclipped eps."""
    a_x, a_o = x0_coefficients(a, prediction)
    sigma = eta * np.sqrt((1.0 - a_next) / (1.0 - a) * (1.0 - a / a_next))
    d = np.sqrt(1.0 - a_next - sigma**2)  # times eps_hat, which is o, or from v or x0 and x
    if prediction == "epsilon":
        b_x, b_o = np.zeros_like(a), d
    elif prediction == "v_prediction":  # eps = sqrt(a) v + sqrt(1 - a) x
        b_x, b_o = d * np.sqrt(1.0 - a), d * np.sqrt(a)
    else:  # eps = (x - sqrt(a) x0) / sqrt(1 - a)
        b_x, b_o = d / np.sqrt(1.0 - a), -d * np.sqrt(a) / np.sqrt(1.0 - a)
    return {COL_AX: a_x, COL_AO: a_o, COL_B0: np.sqrt(a_next), COL_CX: b_x, COL_CE: b_o, COL_CZ: sigma}


def discrete_step_table(schedule: DiscreteSchedule, sampler: str = "ddpm", timesteps: int = 50,
                        prediction_type: str = "epsilon", clip: float = 0.0, eta: float = 0.0,
                        tau: float = 1.0, variance_type: str = "fixed_small") -> StepTable:
    """x0-form rows reproducing diffusers' DDPMScheduler, DDIMScheduler or DPMSolverMultistepScheduler step for step.

    clip > 0 is diffusers' clip_sample with clip_sample_range = clip (DDPM, DDIM; DPM-Solver++ never clips).
    Row times are the model's integer timesteps; t_final = -1 marks the clean end of the chain.
    """
    check_sampler(sampler, timesteps)
    check_eta_tau(sampler, eta, tau)
    if not clip >= 0.0:
        raise ValueError(f"clip must be >= 0 (0: no clipping), got {clip!r}")
    if clip and sampler.startswith("dpmpp"):
        raise ValueError("DPM-Solver++ does not clip x0 (diffusers ignores clip_sample for it); use clip=0")
    ts = schedule.timesteps(timesteps, multistep=sampler.startswith("dpmpp"))
    a = schedule.alpha_cumprod(ts)
    if sampler == "ddim":
        prev = ts - schedule.num_train_timesteps // int(timesteps)
        a_next = np.where(prev >= 0, schedule.alphas_cumprod[np.maximum(prev, 0)], schedule.final_alpha_cumprod)
        columns = _ddim(a, a_next, prediction_type, eta)
    else:
        a_next = np.append(a[1:], 1.0)  # the next timestep of the list, then the clean end
        if sampler == "ddpm":
            columns = _ddpm(a, a_next, ts, prediction_type, variance_type)
        else:
            columns = dpmpp_2m(a, a_next, sde=sampler == "dpmpp-2m-sde")
            columns[COL_AX], columns[COL_AO] = x0_coefficients(a, prediction_type)
    columns[COL_CLIP] = np.full(len(ts), float(clip))
    blend = (np.arange(len(ts)) < tau * len(ts)).astype(np.float64)
    rows = assemble(ts.astype(np.float64), a, blend, columns)
    return StepTable(rows=rows, sampler=sampler, timesteps=len(ts), t_start=float(ts[0]), t_end=-1.0, eta=float(eta),
                     draws_step_noise=sampler in ("ddpm", "dpmpp-2m-sde") or eta > 0.0, t_final=-1.0,
                     # DDPMScheduler draws its noise only where t > 0: not at a last step to t = 0
                     last_step_draws=sampler != "ddpm" or bool(ts[-1] > 0),
                     spacing=schedule.timestep_spacing, **table_flags(rows))
