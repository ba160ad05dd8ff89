"""Per-step sampler tables: DDPM (Ho et al. 2020, eq. 11) and DDIM (Song et al. 2021, eq. 12) as linear rows."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .schedule import CosineSchedule

SAMPLERS = ("ddpm", "ddim")

# Column order of StepTable.rows; the fused step kernel indexes the table with these.
COL_T, COL_CX, COL_CE, COL_CZ, COL_RX, COL_RZ, COL_BLEND = range(7)
NUM_COLS = 7


@dataclass(frozen=True)
class StepTable:
    """Row i: x_{i+1} = c_x x + c_e eps_hat + c_z eps2; known_i = r_x x_init + r_z eps1; model time t_i."""

    rows: torch.Tensor  # [T, NUM_COLS] float32, computed in float64
    sampler: str
    timesteps: int
    t_start: float
    t_end: float
    eta: float
    draws_step_noise: bool  # the seed draws eps2 every DDPM step, even where c_z == 0
    t_final: float  # t_T, the time of the returned sample

    def to(self, device) -> "StepTable":
        """The same table with its rows on `device` (the kernel reads them from device memory)."""
        return StepTable(**{**self.__dict__, "rows": self.rows.to(device)})


def check_time_range(timesteps, t_start, t_end) -> None:
    """Raise ValueError unless timesteps >= 1 and 1 >= t_start > t_end >= 0."""
    if isinstance(timesteps, bool) or not isinstance(timesteps, (int, np.integer)) or timesteps < 1:
        raise ValueError(f"timesteps must be an integer >= 1, got {timesteps!r}")
    for name, value in (("t_start", t_start), ("t_end", t_end)):
        if not isinstance(value, (int, float, np.floating, np.integer)) or not (0.0 <= float(value) <= 1.0):
            raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    if not float(t_start) > float(t_end):
        raise ValueError(f"t_start must be greater than t_end (sampling runs from noise to data), got "
                         f"t_start={t_start!r}, t_end={t_end!r}")


def check_sampler(sampler) -> str:
    """Return the sampler name or raise a ValueError listing the allowed ones."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; must be one of {list(SAMPLERS)}")
    return sampler


def check_eta_tau(sampler: str, eta: float, tau: float) -> None:
    """Raise ValueError unless 0 <= eta <= 1 (DDIM only) and 0 <= tau <= 1."""
    if not (0.0 <= eta <= 1.0):
        raise ValueError(f"eta must be in [0, 1], got {eta!r}")
    if sampler == "ddpm" and eta != 0.0:
        raise ValueError("eta applies to the 'ddim' sampler only")
    if not (0.0 <= tau <= 1.0):
        raise ValueError(f"tau (fraction of steps that blend the known pixels) must be in [0, 1], got {tau!r}")


def time_grid(timesteps: int, t_start: float, t_end: float) -> np.ndarray:
    """t_i = t_start + (t_end - t_start) i / T for i = 0..T, in float64 (the seed's linspace)."""
    i = np.arange(timesteps + 1, dtype=np.float64)
    grid = t_start + (t_end - t_start) * i / timesteps
    grid[-1] = t_end  # exact, so the "t_{i+1} == 0" test of the last step is exact too
    return grid


def step_table(
    schedule: CosineSchedule | None = None,
    sampler: str = "ddpm",
    timesteps: int = 300,
    t_start: float = 1.0,
    t_end: float = 0.0,
    eta: float = 0.0,
    tau: float = 1.0,
) -> StepTable:
    """Build the [T, 7] table; eta > 0 is DDIM with stochasticity (Song et al. 2021, eq. 16), tau the blended fraction."""
    schedule = schedule or CosineSchedule()
    check_sampler(sampler)
    check_time_range(timesteps, t_start, t_end)
    check_eta_tau(sampler, eta, tau)

    t = time_grid(timesteps, float(t_start), float(t_end))
    a, a_next = schedule.alpha_cumprod(t[:-1]), schedule.alpha_cumprod(t[1:])
    last_is_clean = t[1:] == 0.0  # the seed multiplies the step noise by (t_prev != 0)

    if sampler == "ddpm":
        alpha = a / a_next
        c_x = 1.0 / np.sqrt(alpha)
        c_e = -(1.0 - alpha) / (np.sqrt(alpha) * np.sqrt(1.0 - a))
        c_z = np.sqrt((1.0 - alpha) * (1.0 - a_next) / (1.0 - a))
    else:
        sigma = eta * np.sqrt((1.0 - a_next) / (1.0 - a) * (1.0 - a / a_next))
        c_x = np.sqrt(a_next / a)
        c_e = np.sqrt(1.0 - a_next - sigma**2) - np.sqrt(a_next) * np.sqrt(1.0 - a) / np.sqrt(a)
        c_z = sigma
    c_z = np.where(last_is_clean, 0.0, c_z)

    blend = (np.arange(timesteps) < tau * timesteps).astype(np.float64)
    rows = np.stack([t[:-1], c_x, c_e, c_z, np.sqrt(a), np.sqrt(1.0 - a), blend], axis=1)
    return StepTable(
        rows=torch.from_numpy(rows).to(torch.float32),
        sampler=sampler,
        timesteps=int(timesteps),
        t_start=float(t_start),
        t_end=float(t_end),
        eta=float(eta),
        draws_step_noise=sampler == "ddpm" or eta > 0.0,
        t_final=float(t[-1]),
    )
