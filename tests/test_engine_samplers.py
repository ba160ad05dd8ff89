"""Step tables: edge cases of the seed's schedule, and the table reproducing the seed's updates longhand."""
import pytest
import torch

from ddpm_engine.engine import CosineSchedule, step_table
from ddpm_engine.engine.samplers import (COL_AO, COL_AX, COL_B0, COL_BH, COL_BLEND, COL_CE, COL_CLIP, COL_CX, COL_CZ,
                                         COL_RX, COL_RZ, COL_T, NUM_COLS, log_snr, time_grid)
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
        ({"sampler": "euler"}, r"unknown sampler 'euler'; must be one of \['ddpm', 'ddim', 'dpmpp-2m', 'dpmpp-2m-sde'\]"),
        ({"spacing": "karras"}, r"unknown spacing 'karras'; must be one of \['time', 'logsnr'\]"),
        ({"sampler": "dpmpp-2m", "eta": 0.5}, "eta applies to the 'ddim' sampler only; 'dpmpp-2m' has none"),
        ({"sampler": "dpmpp-2m-sde", "timesteps": 2}, r"sampler 'dpmpp-2m-sde' needs timesteps >= 3 \(its first"),
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
    for i, (t, c_x, c_e, c_z, r_x, r_z, blend) in enumerate(table.rows[:, :7].tolist()):
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


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_seed_tables_leave_the_x0_columns_at_zero(sampler):
    table = step_table(SCHED, sampler, 50, eta=0.3 if sampler == "ddim" else 0.0)
    assert table.rows.shape == (50, NUM_COLS)
    assert (table.rows[:, [COL_AX, COL_AO, COL_CLIP, COL_B0, COL_BH]] == 0).all()
    assert not table.x0_form and not table.history


@pytest.mark.parametrize("sampler", ["dpmpp-2m", "dpmpp-2m-sde"])
@pytest.mark.parametrize("spacing", ["time", "logsnr"])
def test_dpmpp_rows_are_first_order_on_the_first_and_last_step_and_never_clip(sampler, spacing):
    table = step_table(SCHED, sampler, 10, spacing=spacing)
    assert table.x0_form and table.history and table.draws_step_noise == (sampler == "dpmpp-2m-sde")
    b_h = table.rows[:, COL_BH]
    assert b_h[0] == 0 and b_h[-1] == 0 and (b_h[1:-1] != 0).all()
    assert (table.rows[:, COL_CLIP] == 0).all() and (table.rows[:, COL_CE] == 0).all()
    # epsilon prediction: x0_hat = (x - sqrt(1 - a) o) / sqrt(a), with sqrt(a) = r_x and sqrt(1 - a) = r_z
    r_x, r_z = table.rows[:, COL_RX].double(), table.rows[:, COL_RZ].double()
    torch.testing.assert_close(table.rows[:, COL_AX].double(), 1 / r_x, rtol=2e-7, atol=0)
    torch.testing.assert_close(table.rows[:, COL_AO].double(), -r_z / r_x, rtol=2e-7, atol=0)
    assert table.rows[-1, COL_CZ] == 0  # the seed's rule: no step noise into t = 0


def test_dpmpp_after_the_clamped_no_op_start_stays_first_order():
    """At 300 steps t_0 and t_1 both clamp to abar = 1e-4: h_0 = 0, so step 1 has no slope to extrapolate."""
    rows = step_table(SCHED, "dpmpp-2m", 300).rows
    assert rows[0, COL_CX] == 1 and rows[0, COL_B0] == 0  # an exact no-op, as DDPM's first step
    assert rows[1, COL_BH] == 0 and rows[2, COL_BH] != 0
    assert torch.isfinite(rows).all()


@pytest.mark.parametrize("t_range", [(1.0, 0.0), (0.5, 0.05)])
def test_logsnr_spacing_makes_equal_log_snr_steps_between_the_end_points(t_range):
    grid = time_grid(12, *t_range, spacing="logsnr", schedule=SCHED)
    assert grid[0] == t_range[0] and grid[-1] == t_range[1] and (grid[1:] < grid[:-1]).all()
    steps = log_snr(SCHED.alpha_cumprod(grid))[1:] - log_snr(SCHED.alpha_cumprod(grid))[:-1]
    assert steps.max() - steps.min() < 1e-9 * steps.mean()
    assert torch.equal(step_table(SCHED, "ddpm", 12, *t_range).rows[:, COL_T],
                       torch.from_numpy(time_grid(12, *t_range)[:-1]).float())  # "time" stays the seed's linspace
