"""Step tables: edge cases of the seed's schedule, and the table reproducing the seed's updates longhand."""
import pytest
import torch

from ddpm_engine.engine import CosineSchedule, step_table
from ddpm_engine.engine.samplers import COL_BLEND, COL_CE, COL_CX, COL_CZ, COL_RX, COL_RZ, COL_T
from seed_longhand import run_longhand, toy_model

SCHED = CosineSchedule()


def test_first_ddpm_step_at_300_steps_is_an_exact_no_op():
    rows = step_table(SCHED, "ddpm", 300).rows
    # a = abar(1) and a' = abar(1 - 1/300) are both clamped to 1e-4, so alpha = 1.
    assert SCHED.alpha_cumprod(1.0) == SCHED.alpha_cumprod(1 - 1 / 300) == 1e-4
    assert rows[0, COL_CX].item() == 1.0 and rows[0, COL_CE].item() == 0.0 and rows[0, COL_CZ].item() == 0.0
    # With 50 steps the second time point is outside the clamp, so the first step does work.
    assert step_table(SCHED, "ddpm", 50).rows[0, COL_CE].item() != 0.0


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_last_step_is_noise_free_only_when_t_end_is_zero(sampler):
    eta = 0.5 if sampler == "ddim" else 0.0
    rows = step_table(SCHED, sampler, 50, eta=eta).rows
    assert rows[-1, COL_CZ].item() == 0.0
    assert (rows[1:-1, COL_CZ] > 0).all()  # the first step of DDIM-eta is also 0 (alpha = 1 only at T=300)
    # a' at the last step is 0.9999, not 1: the final DDIM coefficient on x is not 1/sqrt(a).
    assert SCHED.alpha_cumprod(0.0) == 0.9999
    rows_end = step_table(SCHED, sampler, 50, t_end=0.1, eta=eta).rows
    assert rows_end[-1, COL_CZ].item() > 0.0


def test_ddim_without_eta_draws_no_step_noise():
    table = step_table(SCHED, "ddim", 20)
    assert not table.draws_step_noise and (table.rows[:, COL_CZ] == 0).all()
    assert step_table(SCHED, "ddpm", 20).draws_step_noise
    assert step_table(SCHED, "ddim", 20, eta=0.3).draws_step_noise


def test_time_column_is_the_seed_linspace_and_renoise_is_sqrt_abar():
    table = step_table(SCHED, "ddpm", 10, t_start=0.8, t_end=0.2)
    t = torch.linspace(0.8, 0.2, 11)[:-1]
    torch.testing.assert_close(table.rows[:, COL_T], t, rtol=0, atol=1e-7)
    a = torch.from_numpy(SCHED.alpha_cumprod(t.double().numpy())).float()
    torch.testing.assert_close(table.rows[:, COL_RX], a.sqrt(), rtol=0, atol=2e-7)
    torch.testing.assert_close(table.rows[:, COL_RZ], (1 - a).sqrt(), rtol=0, atol=2e-7)
    assert table.t_final == 0.2


def test_tau_stops_blending_after_that_fraction_of_steps():
    rows = step_table(SCHED, "ddpm", 10, tau=0.35).rows
    assert rows[:, COL_BLEND].tolist() == [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    assert (step_table(SCHED, "ddpm", 10).rows[:, COL_BLEND] == 1).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sampler": "euler"}, r"unknown sampler 'euler'; must be one of \['ddpm', 'ddim'\]"),
        ({"timesteps": 0}, "timesteps must be an integer >= 1"),
        ({"timesteps": 2.5}, "timesteps must be an integer >= 1"),
        ({"t_start": 1.5}, r"t_start must be a number in \[0, 1\]"),
        ({"t_end": -0.1}, r"t_end must be a number in \[0, 1\]"),
        ({"t_start": 0.3, "t_end": 0.5}, "t_start must be greater than t_end"),
        ({"t_start": 0.5, "t_end": 0.5}, "t_start must be greater than t_end"),
        ({"sampler": "ddpm", "eta": 0.5}, "eta applies to the 'ddim' sampler only"),
        ({"sampler": "ddim", "eta": 2.0}, r"eta must be in \[0, 1\]"),
        ({"tau": 1.5}, r"tau .* must be in \[0, 1\]"),
    ],
)
def test_invalid_table_arguments_raise_naming_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        step_table(SCHED, **kwargs)


def run_table(table, x_T, noises, bg, mask, x_init):
    x = x_T
    for i, (t, c_x, c_e, c_z, r_x, r_z, blend) in enumerate(table.rows.tolist()):
        if mask is not None and blend:
            x = mask * x + (1 - mask) * (r_x * x_init + r_z * noises[i][0])
        eps_hat = toy_model(torch.cat([x, bg], 1), torch.full((x.shape[0],), t, dtype=torch.float32))
        x = c_x * x + c_e * eps_hat + c_z * noises[i][1]
    return x


@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 0.4), ("ddim", 1.0)])
@pytest.mark.parametrize("T", [50, 300])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("t_range", [(1.0, 0.0), (0.7, 0.2)])
def test_table_reproduces_the_seed_updates_longhand(sampler, eta, T, masked, t_range):
    # eta > 0: against DDIM with stochasticity written out from Song et al. 2021 (seed_longhand.py).
    g = torch.Generator().manual_seed(T + masked)
    shape = (2, 1, 9, 7)
    bg = torch.rand(shape, generator=g) * 2 - 1
    x_init = torch.rand(shape, generator=g) * 2 - 1
    mask = (torch.rand(1, 1, 9, 7, generator=g) > 0.5).float() if masked else None
    x_T = torch.randn(shape, generator=g)
    noises = [(torch.randn(shape, generator=g), torch.randn(shape, generator=g)) for _ in range(T)]
    table = step_table(SCHED, sampler, T, *t_range, eta=eta)
    expected = run_longhand(sampler, T, *t_range, x_T, noises, bg, mask, x_init, eta=eta)
    got = run_table(table, x_T, noises, bg, mask, x_init)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(got, expected, rtol=0, atol=3e-6)  # float32 rows: measured at most 2.0e-6
