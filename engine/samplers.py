"""Per-step sampler tables (DESIGN.md 3, 3b): the seed's DDPM / DDIM as linear rows, DPM-Solver++(2M) as x0-form rows.

A row reads x_next = b_x x + b_o o + b_0 x0_hat + b_h x0_prev + c_z eps2 with x0_hat = clip(a_x x + a_o o); the
seed's rows keep the x0 columns at zero (then the kernel skips the x0 work and nothing changes, bit for bit).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .schedule import CosineSchedule

SAMPLERS = ("ddpm", "ddim", "dpmpp-2m", "dpmpp-2m-sde")
# The 2M samplers take their first and last steps first order: below 3 steps none would be second order.
MIN_STEPS = {"ddpm": 1, "ddim": 1, "dpmpp-2m": 3, "dpmpp-2m-sde": 3}
SPACINGS = ("time", "logsnr")  # the seed's grid uniform in t, or uniform in log-SNR (Lu et al. 2022)
PREDICTIONS = ("epsilon", "v_prediction", "sample")

# Column order of StepTable.rows; the fused step kernel indexes the table with these. c_x and c_e are the
# x0-form's b_x and b_o; a_x, a_o, clip, b_0, b_h are the x0-form's own columns (zero in the seed's rows).
COL_T, COL_CX, COL_CE, COL_CZ, COL_RX, COL_RZ, COL_BLEND, COL_AX, COL_AO, COL_CLIP, COL_B0, COL_BH = range(12)
NUM_COLS = 12


@dataclass(frozen=True)
class StepTable:
    """Row i: x_{i+1} = c_x x + c_e o + b_0 x0_hat + b_h x0_prev + c_z eps2; known_i = r_x x_init + r_z eps1; t_i."""

    rows: torch.Tensor  # [T, NUM_COLS] float32, computed in float64
    sampler: str
    timesteps: int
    t_start: float
    t_end: float
    eta: float
    draws_step_noise: bool  # the seed draws eps2 every DDPM step, even where c_z == 0
    t_final: float  # t_T, the time of the returned sample
    x0_form: bool = False  # some row uses x0_hat (a_x, a_o, b_0 or b_h != 0): the kernel computes it
    history: bool = False  # some row has b_h != 0: the kernel reads and writes the x0_prev buffer
    spacing: str = "time"
    last_step_draws: bool = True  # eps2 drawn at the last step too: the seed's always, diffusers' DDPM not at t = 0

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


def check_sampler(sampler, timesteps=None) -> str:
    """Return the sampler name, or raise a ValueError listing the allowed ones (or the steps it needs at least)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; must be one of {list(SAMPLERS)}")
    need = MIN_STEPS[sampler]
    if isinstance(timesteps, (int, np.integer)) and not isinstance(timesteps, bool) and timesteps < need:
        raise ValueError(f"sampler {sampler!r} needs timesteps >= {need} (its first and last steps are first "
                         f"order), got {timesteps}")
    return sampler


def check_spacing(spacing) -> str:
    """Return the spacing name or raise a ValueError listing the allowed ones."""
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; must be one of {list(SPACINGS)}")
    return spacing


def check_eta_tau(sampler: str, eta: float, tau: float) -> None:
    """Raise ValueError unless 0 <= eta <= 1 (DDIM only) and 0 <= tau <= 1."""
    if not (0.0 <= eta <= 1.0):
        raise ValueError(f"eta must be in [0, 1], got {eta!r}")
    if sampler != "ddim" and eta != 0.0:
        raise ValueError(f"eta applies to the 'ddim' sampler only; {sampler!r} has none")
    if not (0.0 <= tau <= 1.0):
        raise ValueError(f"tau (fraction of steps that blend the known pixels) must be in [0, 1], got {tau!r}")


def log_snr(a: np.ndarray) -> np.ndarray:
    """lambda = log(sqrt(a) / sqrt(1 - a)), the half log-SNR of Lu et al. 2022 (inf where a = 1)."""
    with np.errstate(divide="ignore"):
        return 0.5 * (np.log(a) - np.log1p(-a))


def time_grid(timesteps: int, t_start: float, t_end: float, spacing: str = "time",
              schedule: CosineSchedule | None = None) -> np.ndarray:
    """t_0..t_T in float64: the seed's linspace, or (spacing="logsnr") the times whose log-SNR is uniformly spaced."""
    i = np.arange(timesteps + 1, dtype=np.float64)
    if check_spacing(spacing) == "time":
        grid = t_start + (t_end - t_start) * i / timesteps
    else:
        schedule = schedule or CosineSchedule()
        lam0, lam1 = log_snr(schedule.alpha_cumprod(np.array([t_start, t_end], dtype=np.float64)))
        lam = lam0 + (lam1 - lam0) * i / timesteps
        grid = schedule.time_at(1.0 / (1.0 + np.exp(-2.0 * lam)))  # a = sigmoid(2 lambda)
        grid[0] = t_start
    grid[-1] = t_end  # exact, so the "t_{i+1} == 0" test of the last step is exact too
    return grid


def x0_coefficients(a: np.ndarray, prediction: str = "epsilon") -> tuple[np.ndarray, np.ndarray]:
    """(a_x, a_o), x0_hat = a_x x + a_o o: Ho et al. 2020 eq. 15 (epsilon), Salimans & Ho 2022 (v), or o (sample)."""
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction type {prediction!r}; must be one of {list(PREDICTIONS)}")
    if prediction == "epsilon":
        return 1.0 / np.sqrt(a), -np.sqrt(1.0 - a) / np.sqrt(a)
    if prediction == "v_prediction":
        return np.sqrt(a), -np.sqrt(1.0 - a)
    return np.zeros_like(a), np.ones_like(a)


def seed_ddpm(a: np.ndarray, a_next: np.ndarray) -> dict:
    """The seed's DDPM step as a linear row (Ho et al. 2020, eq. 11; sigma^2 = beta tilde, eq. 7)."""
    alpha = a / a_next
    return {COL_CX: 1.0 / np.sqrt(alpha), COL_CE: -(1.0 - alpha) / (np.sqrt(alpha) * np.sqrt(1.0 - a)),
            COL_CZ: np.sqrt((1.0 - alpha) * (1.0 - a_next) / (1.0 - a))}


def seed_ddim(a: np.ndarray, a_next: np.ndarray, eta: float) -> dict:
    """The seed's DDIM step as a linear row (Song et al. 2021, eq. 12; eta-scaled sigma, eq. 16)."""
    sigma = eta * np.sqrt((1.0 - a_next) / (1.0 - a) * (1.0 - a / a_next))
    return {COL_CX: np.sqrt(a_next / a),
            COL_CE: np.sqrt(1.0 - a_next - sigma**2) - np.sqrt(a_next) * np.sqrt(1.0 - a) / np.sqrt(a), COL_CZ: sigma}


def dpmpp_2m(a: np.ndarray, a_next: np.ndarray, sde: bool) -> dict:
    """DPM-Solver++(2M), Lu et al. 2022, alg. 2 (sde: its SDE variant, diffusers' "sde-dpmsolver++").

    First order (DPM-Solver++1 = DDIM on x0) on the first and last step, and wherever the previous step did not
    move (h_prev = 0: the seed's clamped first steps), since then r = h_prev / h gives no slope.
    """
    T = len(a)
    # e^-h = sigma'/alpha' * alpha/sigma, written without logs so that a' = 1 (the final sigma zero) gives 0.
    e_h = np.sqrt(a * (1.0 - a_next) / ((1.0 - a) * a_next))
    h = log_snr(a_next) - log_snr(a)
    second = np.zeros(T, dtype=bool)
    second[1:T - 1] = (h[:T - 2] > 0) & (h[1:T - 1] > 0)
    i = np.flatnonzero(second)
    k = np.zeros(T)  # 1 / (2 r), r = h_prev / h
    k[i] = h[i] / (2.0 * h[i - 1])
    ratio = np.sqrt(1.0 - a_next) / np.sqrt(1.0 - a)
    if sde:
        b = np.sqrt(a_next) * (1.0 - e_h**2)
        return {COL_CX: e_h * ratio, COL_B0: b * (1.0 + k), COL_BH: -b * k,
                COL_CZ: np.sqrt(1.0 - a_next) * np.sqrt(1.0 - e_h**2)}
    b = np.sqrt(a_next) * (e_h - 1.0)
    return {COL_CX: ratio, COL_B0: -b * (1.0 + k), COL_BH: b * k}


def assemble(t_model: np.ndarray, a: np.ndarray, blend: np.ndarray, columns: dict) -> torch.Tensor:
    """The [T, NUM_COLS] float32 rows from float64 columns; time, renoise (r_x, r_z at a) and blend filled in."""
    rows = np.zeros((len(a), NUM_COLS), dtype=np.float64)
    rows[:, COL_T], rows[:, COL_RX], rows[:, COL_RZ], rows[:, COL_BLEND] = t_model, np.sqrt(a), np.sqrt(1.0 - a), blend
    for col, values in columns.items():
        rows[:, col] = values
    return torch.from_numpy(rows).to(torch.float32)


def table_flags(rows: torch.Tensor) -> dict:
    """x0_form and history of a row set: whether the kernel must compute x0_hat, and keep x0_prev."""
    x0_cols = rows[:, [COL_AX, COL_AO, COL_CLIP, COL_B0, COL_BH]]
    return {"x0_form": bool((x0_cols != 0).any()), "history": bool((rows[:, COL_BH] != 0).any())}


def step_table(
    schedule: CosineSchedule | None = None,
    sampler: str = "ddpm",
    timesteps: int = 300,
    t_start: float = 1.0,
    t_end: float = 0.0,
    eta: float = 0.0,
    tau: float = 1.0,
    spacing: str = "time",
) -> StepTable:
    """Build the [T, NUM_COLS] table on the seed's cosine schedule; eta > 0 is DDIM's (Song et al. 2021, eq. 16)."""
    schedule = schedule or CosineSchedule()
    check_time_range(timesteps, t_start, t_end)
    check_sampler(sampler, timesteps)
    check_eta_tau(sampler, eta, tau)

    t = time_grid(timesteps, float(t_start), float(t_end), spacing, schedule)
    a, a_next = schedule.alpha_cumprod(t[:-1]), schedule.alpha_cumprod(t[1:])
    if sampler == "ddpm":
        columns = seed_ddpm(a, a_next)
    elif sampler == "ddim":
        columns = seed_ddim(a, a_next, eta)
    else:
        columns = dpmpp_2m(a, a_next, sde=sampler == "dpmpp-2m-sde")
        columns[COL_AX], columns[COL_AO] = x0_coefficients(a)
    # The seed multiplies the step noise by (t_prev != 0): every sampler's last step to t = 0 is noise-free.
    columns[COL_CZ] = np.where(t[1:] == 0.0, 0.0, columns.get(COL_CZ, 0.0))

    blend = (np.arange(timesteps) < tau * timesteps).astype(np.float64)
    rows = assemble(t[:-1], a, blend, columns)
    return StepTable(
        rows=rows,
        sampler=sampler,
        timesteps=int(timesteps),
        t_start=float(t_start),
        t_end=float(t_end),
        eta=float(eta),
        draws_step_noise=sampler in ("ddpm", "dpmpp-2m-sde") or eta > 0.0,
        t_final=float(t[-1]),
        spacing=spacing,
        **table_flags(rows),
    )
