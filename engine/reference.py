"""The seed's sampling loop in eager PyTorch: the oracle every faster path is checked against, and the baseline."""
from __future__ import annotations

import math

import torch

from .samplers import check_eta_tau, check_sampler, check_time_range, time_grid
from .schedule import CosineSchedule, diffuse
from .validation import check_sample_inputs, init_image


def _randn(shape, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=like.device, dtype=torch.float32)


@torch.no_grad()
def reference_sample(
    model,
    background: torch.Tensor,
    shape,
    mask: torch.Tensor | None = None,
    t_start: float = 1.0,
    t_end: float = 0.0,
    timesteps: int = 300,
    x_init: torch.Tensor | None = None,
    sampler: str = "ddpm",
    schedule: CosineSchedule | None = None,
    generator: torch.Generator | None = None,
    return_intermediates: bool = False,
    eta: float = 0.0,
    tau: float = 1.0,
    init: str = "noise",
    spacing: str = "time",
):
    """Run the seed's `Diffuzz.sample` (DDPM, DDIM with eta, DPM-Solver++(2M) or its SDE); return x, or the T states.

    Noise is drawn in the seed's order from `generator`: x_T; then per step eps1 (if masked), then eps2
    (DDPM, DDIM with eta > 0, dpmpp-2m-sde). CARE-SST variants: `init="background"|"x_init"` starts from
    diffuse(init image, t_start) instead of pure noise; `tau` < 1 stops blending after that fraction of steps.
    spacing: the time grid, "time" (the seed's linspace) or "logsnr" (uniform in log-SNR).
    """
    schedule = schedule or CosineSchedule()
    check_time_range(timesteps, t_start, t_end)
    check_sampler(sampler, timesteps)
    check_eta_tau(sampler, eta, tau)
    shape = check_sample_inputs(background, shape, mask, x_init)
    source = init_image(init, background, x_init, shape[1])

    b = shape[0]
    grid = time_grid(timesteps, float(t_start), float(t_end), spacing, schedule)
    history = (None, 0.0)  # (x0 of the previous step, its log-SNR step h) for DPM-Solver++(2M)
    x = _randn(shape, background, generator)
    if source is not None:
        x = diffuse(source.float(), torch.full((b,), grid[0], dtype=torch.float64), x, schedule)
    preds = []
    for i in range(timesteps):
        t, t_prev = grid[i], grid[i + 1]
        if mask is not None and i < tau * timesteps:
            x_renoised = diffuse(x_init.float(), torch.full((b,), t, dtype=torch.float64), _randn(shape, x, generator), schedule)
            x = x * mask + x_renoised * (1 - mask)
        t_model = torch.full((b,), t, dtype=torch.float32, device=x.device)
        pred_noise = model(torch.cat((x, background.to(x.dtype)), dim=1), t_model).float()

        # Schedule values stay Python floats (float64): in float32, 1 - 0.9999 is off by 2e-4 relative,
        # and in fp16/bf16 0.9999 rounds to 1 and 1 - abar vanishes.
        a, a_prev = schedule.alpha_cumprod(t), schedule.alpha_cumprod(t_prev)
        if sampler.startswith("dpmpp"):
            last = i == timesteps - 1
            x, history = _dpmpp_2m_step(x, pred_noise, a, a_prev, history, last, sampler == "dpmpp-2m-sde",
                                        lambda: _randn(shape, x, generator) * float(t_prev != 0))
        elif sampler == "ddpm":
            alpha = a / a_prev
            mu = (1.0 / alpha) ** 0.5 * (x - (1 - alpha) * pred_noise / (1 - a) ** 0.5)
            std = ((1 - alpha) * (1.0 - a_prev) / (1.0 - a)) ** 0.5 * _randn(shape, x, generator)
            x = mu + std * float(t_prev != 0)
        else:
            x0 = (x - (1 - a) ** 0.5 * pred_noise) / a**0.5
            sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)) ** 0.5
            x = a_prev**0.5 * x0 + (1 - a_prev - sigma**2) ** 0.5 * pred_noise
            if eta > 0:
                x = x + sigma * _randn(shape, x, generator) * float(t_prev != 0)
        if return_intermediates:
            preds.append(x)
    return preds if return_intermediates else x


def _dpmpp_2m_step(x, eps, a, a_next, history, last, sde, draw):
    """One DPM-Solver++(2M) step (Lu et al. 2022, alg. 2; sde: its SDE variant), first order on the first and last step.

    history = (x0 of the previous step or None, its log-SNR step h_prev); returns (x_next, new history).
    Where the previous step did not move (h_prev = 0, the clamped start of the seed's schedule) it is first order too.
    """
    x0 = (x - (1 - a) ** 0.5 * eps) / a**0.5
    lam = lambda v: 0.5 * math.log(v / (1 - v))  # noqa: E731
    h = lam(a_next) - lam(a)
    x0_prev, h_prev = history
    d = x0
    if x0_prev is not None and not last and h_prev > 0 and h > 0:
        r = h_prev / h
        d = x0 + (x0 - x0_prev) / (2 * r)
    e_h = math.exp(-h)
    if sde:
        x = ((1 - a_next) / (1 - a)) ** 0.5 * e_h * x + a_next**0.5 * (1 - e_h**2) * d \
            + (1 - a_next) ** 0.5 * (1 - e_h**2) ** 0.5 * draw()
    else:
        x = ((1 - a_next) / (1 - a)) ** 0.5 * x - a_next**0.5 * (e_h - 1) * d
    return x, (x0, h)
