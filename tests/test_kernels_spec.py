"""The fused step's torch specification equals the seed's loop (reference_sample); needs no Triton.

Kept apart from tests/test_kernels_step.py, whose file-level importorskip of the Triton module would
otherwise turn an import error there into a silent skip of these tests too.
"""
import pytest
import torch

from ddpm_engine.engine import CosineSchedule, reference_sample, step_table
from ddpm_engine.kernels import initial_torch, step_torch


class StandInModel(torch.nn.Module):
    """A real, deterministic eps predictor: x0_hat = tanh(fixed random 3x3 conv), eps = (x - sqrt(a) x0_hat) / sqrt(1 - a).

    Predicting a bounded x0 keeps the sampled x in [-1, 1]-ish, so an absolute tolerance means something.
    """

    def __init__(self, c_in, c_out, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.c_out = c_out
        self.conv = torch.nn.Conv2d(c_in, c_out, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.3)
            self.conv.bias.copy_(torch.randn(self.conv.bias.shape, generator=g) * 0.1)

    def forward(self, inp, t):
        a = CosineSchedule().alpha_cumprod(t.double()).float().view(-1, 1, 1, 1)
        x0_hat = torch.tanh(self.conv(inp))
        return (inp[:, : self.c_out] - a.sqrt() * x0_hat) / (1 - a).sqrt()


def spec_loop(model, background, shape, table, generator, mask=None, x_init=None, init_image=None):
    """initial_torch + T x step_torch, drawing the noise in the seed's order (x_T; per step eps1 then eps2)."""
    rows, draws_step_noise = table.rows, table.draws_step_noise
    Tn = rows.shape[0]
    blends = [mask is not None and bool(rows[i, 6] != 0) for i in range(Tn)]
    draw = lambda: torch.randn(shape, generator=generator)  # noqa: E731
    eps0 = draw()
    eps1_at = [None] * (Tn + 1)
    eps2_at = [None] * Tn
    for i in range(Tn):
        if blends[i]:
            eps1_at[i] = draw()
        if draws_step_noise:
            eps2_at[i] = draw()
    B, C = shape[:2]
    x = torch.empty(shape)
    model_in = torch.empty(B, C + background.shape[1], *shape[2:])
    model_in[:, C:] = background
    t_in = torch.empty(B)
    initial_torch(x, rows, eps0, eps1_at[0], model_in=model_in, t_in=t_in, mask=mask, x_init=x_init,
                  init_image=init_image)
    x0_prev = torch.zeros(shape) if table.history else None
    for i in range(Tn):
        eps_hat = model(model_in, t_in)
        step_torch(x, eps_hat, rows, i, eps2_at[i], eps1_at[i + 1], model_in=model_in, t_in=t_in, mask=mask,
                   x_init=x_init, x0_form=table.x0_form, x0_prev=x0_prev)
    return x


def workload(seed, masked):
    """background and x_init in [-1, 1] and a broadcast cloud mask (or None), [2, 1, 12, 10], from one seed."""
    shape = (2, 1, 12, 10)
    g = torch.Generator().manual_seed(seed)
    background = torch.rand(shape, generator=g) * 2 - 1
    x_init = torch.rand(shape, generator=g) * 2 - 1
    mask = (torch.rand(1, 1, 12, 10, generator=g) > 0.4).float() if masked else None
    return shape, background, x_init, mask


@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 0.5)])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("init", ["noise", "x_init"])
def test_torch_spec_loop_equals_reference_sample(sampler, eta, masked, init):
    shape, background, x_init, mask = workload(12, masked)
    model = StandInModel(2, 1)
    Tn = 25
    tab = step_table(sampler=sampler, timesteps=Tn, eta=eta, tau=0.8)
    got = spec_loop(model, background, shape, tab, torch.Generator().manual_seed(99), mask=mask, x_init=x_init,
                    init_image=x_init if init == "x_init" else None)
    expected = reference_sample(model, background, shape, mask=mask, x_init=x_init, timesteps=Tn, sampler=sampler,
                                eta=eta, tau=0.8, init=init, generator=torch.Generator().manual_seed(99))
    # the spec's coefficients come from float64, the seed's loop computes them in float32: rounding only
    assert expected.abs().max() < 10
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_torch_spec_loop_equals_reference_sample_over_the_default_300_steps(sampler):
    shape = (1, 1, 8, 8)
    g = torch.Generator().manual_seed(13)
    background, x_init = torch.rand(shape, generator=g) * 2 - 1, torch.rand(shape, generator=g) * 2 - 1
    mask = (torch.rand(1, 1, 8, 8, generator=g) > 0.4).float()
    model = StandInModel(2, 1)
    tab = step_table(sampler=sampler, timesteps=300)
    got = spec_loop(model, background, shape, tab, torch.Generator().manual_seed(5), mask=mask, x_init=x_init)
    expected = reference_sample(model, background, shape, mask=mask, x_init=x_init, timesteps=300, sampler=sampler,
                                generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("sampler", ["dpmpp-2m", "dpmpp-2m-sde"])
@pytest.mark.parametrize("spacing", ["time", "logsnr"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("Tn,t_start", [(10, 1.0), (300, 1.0), (6, 0.5)])
def test_dpmpp_table_in_the_spec_loop_equals_reference_sample(sampler, spacing, masked, Tn, t_start):
    """The x0-form rows run by step_torch (with the x0_prev history) equal the eager DPM-Solver++(2M) update."""
    shape, background, x_init, mask = workload(14, masked)
    model = StandInModel(2, 1)
    tab = step_table(sampler=sampler, timesteps=Tn, t_start=t_start, tau=0.8, spacing=spacing)
    assert tab.x0_form and tab.history
    got = spec_loop(model, background, shape, tab, torch.Generator().manual_seed(7), mask=mask, x_init=x_init)
    expected = reference_sample(model, background, shape, mask=mask, x_init=x_init, timesteps=Tn, sampler=sampler,
                                t_start=t_start, tau=0.8, spacing=spacing, generator=torch.Generator().manual_seed(7))
    assert expected.abs().max() < 10
    torch.testing.assert_close(got, expected, rtol=0, atol=5e-6)  # measured: at most 3.5e-6
