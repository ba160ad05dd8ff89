"""An independent implementation of the seed's sampling loop, written out longhand as the seed does it.

Float32 tensors; schedule values as Python floats (float64, as DESIGN requires). Shared by the tests of
the step tables, the reference loop and the fused step, which must all reproduce it.
"""
import math

import numpy as np
import torch

from ddpm_engine.engine import CosineSchedule

SCHED = CosineSchedule()



def abar(t: float) -> float:
    """The seed's _alpha_cumprod for one time value, written out as a Python float (float64)."""
    s = 0.008
    v = math.cos((t + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2
    return min(max(v, 1e-4), 0.9999)


def seed_ddpm_step(x, t, t_prev, eps_hat, z):
    a, a_prev = abar(t), abar(t_prev)
    alpha = a / a_prev
    mu = (1.0 / alpha) ** 0.5 * (x - (1 - alpha) * eps_hat / (1 - a) ** 0.5)
    std = ((1 - alpha) * (1.0 - a_prev) / (1.0 - a)) ** 0.5 * z
    return mu + std * float(t_prev != 0)


def seed_ddim_step(x, t, t_prev, eps_hat, z):
    a, a_prev = abar(t), abar(t_prev)
    x0 = (x - (1 - a) ** 0.5 * eps_hat) / a**0.5
    return a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps_hat


def toy_model(x_cat, t):
    """A stand-in denoiser: the noise that would explain x around a guess of x0 from the background.

    Nonlinear in x, the background and t, and stable (the samples stay O(1), as with a trained model).
    """
    x, bg = x_cat[:, :1], x_cat[:, 1:]
    a = torch.from_numpy(SCHED.alpha_cumprod(t.double().numpy())).float().view(-1, 1, 1, 1)
    x0_guess = torch.tanh(bg + 0.1 * x)
    return (x - a.sqrt() * x0_guess) / (1 - a).sqrt()


def draw_seed_noises(generator, shape, T, masked, sampler):
    """x_T, then per step (eps1 if masked, eps2 if DDPM): the seed's order of randn calls."""
    x_T = torch.randn(shape, generator=generator)
    noises = []
    for _ in range(T):
        eps1 = torch.randn(shape, generator=generator) if masked else None
        eps2 = torch.randn(shape, generator=generator) if sampler == "ddpm" else None
        noises.append((eps1, eps2))
    return x_T, noises


def run_longhand(sampler, T, t_start, t_end, x_T, noises, bg, mask, x_init, tau=1.0, intermediates=None):
    """The seed's loop from x_T; `noises[i]` = (eps1, eps2) of step i; appends each state to `intermediates`."""
    grid = np.linspace(t_start, t_end, T + 1)
    grid[-1] = t_end
    step = seed_ddpm_step if sampler == "ddpm" else seed_ddim_step
    x = x_T
    for i in range(T):
        if mask is not None and i < tau * T:
            a = abar(grid[i])
            x = x * mask + (a**0.5 * x_init + (1 - a) ** 0.5 * noises[i][0]) * (1 - mask)
        eps_hat = toy_model(torch.cat([x, bg], 1), torch.full((x.shape[0],), grid[i], dtype=torch.float32))
        x = step(x, grid[i], grid[i + 1], eps_hat, noises[i][1])
        if intermediates is not None:
            intermediates.append(x)
    return x


