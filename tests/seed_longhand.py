"""An independent implementation of the seed's sampling loop, written out longhand as the seed does it.

Float32 tensors; schedule values as Python floats (float64, as DESIGN requires). Shared by the tests of
the step tables, the reference loop and the fused step, which must all reproduce it. Nothing here uses the
engine: the cosine schedule, the steps and the toy model are all spelled out below.
"""
import math

import numpy as np
import torch


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


def song_ddim_eta_step(x, t, t_prev, eps_hat, z, eta):
    """DDIM with stochasticity eta, from Song et al. 2021 ("Denoising Diffusion Implicit Models"), eqs. 12 and 16.

    eq. 16: sigma_t(eta) = eta sqrt((1 - a_{t-1}) / (1 - a_t)) sqrt(1 - a_t / a_{t-1})
    eq. 12: x_{t-1} = sqrt(a_{t-1}) (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)      ("predicted x0")
                      + sqrt(1 - a_{t-1} - sigma_t^2) eps                       ("direction pointing to x_t")
                      + sigma_t z                                               (random noise)
    The paper's a_0 = 1 makes sigma vanish on the step to t = 0; here a(0) is clamped to 0.9999, so, as the
    seed does for DDPM, that step adds no noise (z is still drawn).
    """
    a, a_prev = abar(t), abar(t_prev)
    sigma = eta * math.sqrt((1 - a_prev) / (1 - a)) * math.sqrt(1 - a / a_prev)
    x0_pred = (x - math.sqrt(1 - a) * eps_hat) / math.sqrt(a)
    direction = math.sqrt(1 - a_prev - sigma**2) * eps_hat
    return math.sqrt(a_prev) * x0_pred + direction + sigma * z * float(t_prev != 0)


def toy_model(x_cat, t):
    """A stand-in denoiser: the noise that would explain x around a guess of x0 from the background.

    Nonlinear in x, the background and t, and stable (the samples stay O(1), as with a trained model).
    """
    x, bg = x_cat[:, :1], x_cat[:, 1:]
    a = torch.tensor([abar(v) for v in t.tolist()], dtype=torch.float32).view(-1, 1, 1, 1)
    x0_guess = torch.tanh(bg + 0.1 * x)
    return (x - a.sqrt() * x0_guess) / (1 - a).sqrt()


def draw_seed_noises(generator, shape, T, masked, sampler, eta=0.0):
    """x_T, then per step (eps1 if masked, eps2 if DDPM or DDIM with eta > 0): the seed's order of randn calls."""
    x_T = torch.randn(shape, generator=generator)
    noises = []
    for _ in range(T):
        eps1 = torch.randn(shape, generator=generator) if masked else None
        eps2 = torch.randn(shape, generator=generator) if sampler == "ddpm" or eta > 0 else None
        noises.append((eps1, eps2))
    return x_T, noises


def run_longhand(sampler, T, t_start, t_end, x_T, noises, bg, mask, x_init, tau=1.0, intermediates=None, eta=0.0):
    """The seed's loop from x_T; `noises[i]` = (eps1, eps2) of step i; appends each state to `intermediates`.
    DDIM with eta > 0 takes Song et al.'s step in place of the seed's eta = 0 one."""
    grid = np.linspace(t_start, t_end, T + 1)
    grid[-1] = t_end
    step = seed_ddpm_step if sampler == "ddpm" else seed_ddim_step
    if sampler == "ddim" and eta > 0:
        step = lambda x, t, t_prev, eps_hat, z: song_ddim_eta_step(x, t, t_prev, eps_hat, z, eta)  # noqa: E731
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


