"""The discrete schedule and its x0-form tables reproduce diffusers' schedulers step for step (diffusers: tests only).

Each step is fed a random state and a random model output, as diffusers' `step` would be inside a loop, and the
torch specification (kernels.step_torch) runs the table row, keeping the x0 history where the sampler has one.
diffusers keeps alphas_cumprod in float32, where 1 - abar near t = 0 carries ~1e-5 relative error; the step tests
hand it our float64 alphas_cumprod so that they measure the step maths, and the schedule is compared on its own.
Errors are relative to each step's scale, max(1, max |x_next|): N(0, 1) states at t = 999 give x_next up to ~10.
"""
import itertools
import warnings

import numpy as np
import pytest
import torch

from ddpm_engine.engine.discrete_schedule import DiscreteSchedule, discrete_step_table
from ddpm_engine.kernels import step_torch

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers 0.42 on numpy 2

SHAPE = (2, 3, 8, 8)
SCALED = {"beta_start": 0.00085, "beta_end": 0.012}


def schedule_kwargs(beta_schedule, **kw):
    return {"beta_schedule": beta_schedule, **(SCALED if beta_schedule == "scaled_linear" else {}), **kw}


def diffusers_scheduler(cls, schedule: DiscreteSchedule, steps: int, **kw):
    """A diffusers scheduler configured like `schedule`, running on its float64 alphas_cumprod."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = cls(num_train_timesteps=schedule.num_train_timesteps, beta_start=schedule.beta_start,
                beta_end=schedule.beta_end, beta_schedule=schedule.beta_schedule,
                timestep_spacing=schedule.timestep_spacing, steps_offset=schedule.steps_offset, **kw)
    d.alphas_cumprod = torch.from_numpy(schedule.alphas_cumprod)
    if hasattr(d, "final_alpha_cumprod"):
        d.final_alpha_cumprod = torch.tensor(schedule.final_alpha_cumprod, dtype=torch.float64)
    d.set_timesteps(steps)
    return d


def random_steps(steps, seed):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(SHAPE, generator=g) for _ in range(steps)] for _ in range(3)]  # states, outputs, noises


def table_steps(table, states, outputs, noises):
    """x_{i+1} of every row of `table` from (state_i, output_i, noise_i), the x0 history carried between rows."""
    x, model_in, t_in = torch.empty(SHAPE), torch.zeros(SHAPE), torch.zeros(SHAPE[0])
    history = torch.zeros(SHAPE) if table.history else None
    outs = []
    for i in range(table.timesteps):
        x.copy_(states[i])
        out = torch.empty(SHAPE)
        step_torch(x, outputs[i], table.rows, i, noises[i] if table.draws_step_noise else None, model_in=model_in,
                   t_in=t_in, x_out=out, x0_form=table.x0_form, x0_prev=history)
        outs.append(out)
    return outs


def max_step_error(ours, theirs):
    """max over steps of |ours - theirs| relative to that step's scale, max(1, max |theirs|)."""
    return max((a.double() - b.double()).abs().max().item() / max(1.0, b.abs().max().item())
               for a, b in zip(ours, theirs))


@pytest.mark.parametrize("beta_schedule,rtol", [("linear", 5e-7), ("scaled_linear", 1.2e-6),
                                                ("squaredcos_cap_v2", 1.5e-5)])
def test_alphas_cumprod_equal_diffusers_float32_ones_to_their_rounding(beta_schedule, rtol):
    """Measured: 3.6e-7, 9.3e-7, 1.3e-5 relative (diffusers' float32 cumulative product drifts over 1000 factors)."""
    ours = DiscreteSchedule(**schedule_kwargs(beta_schedule))
    theirs = diffusers.DDPMScheduler(**schedule_kwargs(beta_schedule)).alphas_cumprod.double().numpy()
    np.testing.assert_allclose(ours.alphas_cumprod, theirs, rtol=rtol, atol=0)
    assert ours.alphas_cumprod.dtype == np.float64


@pytest.mark.parametrize("spacing,offset", list(itertools.product(["leading", "trailing", "linspace"], [0, 1])))
def test_timesteps_equal_diffusers_for_every_spacing(spacing, offset):
    schedule = DiscreteSchedule(timestep_spacing=spacing, steps_offset=offset)
    for steps in (1, 3, 7, 10, 25, 50, 333):
        for cls, multistep in ((diffusers.DDIMScheduler, False), (diffusers.DDPMScheduler, False),
                               (diffusers.DPMSolverMultistepScheduler, True)):
            d = cls(timestep_spacing=spacing, steps_offset=offset)
            d.set_timesteps(steps)
            assert schedule.timesteps(steps, multistep=multistep).tolist() == d.timesteps.tolist(), (cls, steps)


def test_alpha_cumprod_is_indexed_by_integer_timesteps_with_minus_one_the_clean_end():
    schedule = DiscreteSchedule()
    assert schedule.alpha_cumprod(-1) == 1.0 and schedule.alpha_cumprod(0) == schedule.alphas_cumprod[0]
    got = schedule.alpha_cumprod(torch.tensor([999, 10]))
    assert got.dtype == torch.float64 and got.tolist() == schedule.alphas_cumprod[[999, 10]].tolist()
    with pytest.raises(ValueError, match="integer timesteps"):
        schedule.alpha_cumprod(0.5)
    with pytest.raises(ValueError, match=r"timesteps must lie in \[-1, 999\]"):
        schedule.alpha_cumprod(1000)


def test_timesteps_that_repeat_or_leave_the_schedule_are_refused():
    with pytest.raises(ValueError, match=r"give repeated or out-of-range timesteps \(from 1000"):
        DiscreteSchedule(steps_offset=1).timesteps(999, multistep=True)
    with pytest.raises(ValueError, match=r"timesteps must be an integer in \[1, num_train_timesteps=1000\]"):
        DiscreteSchedule().timesteps(1001)
    with pytest.raises(ValueError, match="unknown beta_schedule 'cosine'; must be one of"):
        DiscreteSchedule(beta_schedule="cosine")
    with pytest.raises(ValueError, match="DPM-Solver\\+\\+ does not clip x0"):
        discrete_step_table(DiscreteSchedule(), "dpmpp-2m", 10, clip=1.0)


@pytest.mark.parametrize("sampler", ["dpmpp-2m", "dpmpp-2m-sde"])
@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [5, 12, 25])
def test_dpmpp_rows_equal_diffusers_dpm_solver_step_for_step(sampler, beta_schedule, spacing, steps):
    schedule = DiscreteSchedule(**schedule_kwargs(beta_schedule, timestep_spacing=spacing, steps_offset=1))
    algorithm = "sde-dpmsolver++" if sampler == "dpmpp-2m-sde" else "dpmsolver++"
    for prediction in ("epsilon", "v_prediction"):
        table = discrete_step_table(schedule, sampler, steps, prediction_type=prediction)
        d = diffusers_scheduler(diffusers.DPMSolverMultistepScheduler, schedule, steps, algorithm_type=algorithm,
                                solver_order=2, prediction_type=prediction)
        assert table.rows[:, 0].long().tolist() == d.timesteps.tolist()
        states, outputs, noises = random_steps(steps, seed=steps)
        theirs = [d.step(o, t, x, variance_noise=z if algorithm.startswith("sde") else None).prev_sample
                  for x, o, z, t in zip(states, outputs, noises, d.timesteps)]
        # Measured 8.1e-7 (AVX2 AMD CPU) and 1.54e-6 (AVX-512 Intel CPU); the issue asks for 1e-5.
        assert max_step_error(table_steps(table, states, outputs, noises), theirs) < 2e-6


def test_dpmpp_history_is_what_makes_the_middle_steps_second_order():
    """Dropping the x0 history (b_h) leaves the first and last steps right and every middle step wrong."""
    schedule = DiscreteSchedule(timestep_spacing="trailing")
    table = discrete_step_table(schedule, "dpmpp-2m", 6)
    d = diffusers_scheduler(diffusers.DPMSolverMultistepScheduler, schedule, 6, solver_order=2)
    states, outputs, noises = random_steps(6, seed=3)
    theirs = [d.step(o, t, x).prev_sample for x, o, t in zip(states, outputs, d.timesteps)]
    no_history = type(table)(**{**table.__dict__, "history": False})
    ours = table_steps(no_history, states, outputs, noises)
    errors = [(a - b).abs().max().item() for a, b in zip(ours, theirs)]
    assert errors[0] < 1e-5 and errors[-1] < 1e-5 and min(errors[1:-1]) > 1e-2


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("beta_schedule", ["linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddpm_rows_with_clip_sample_equal_diffusers_ddpm_step(prediction, beta_schedule, spacing):
    steps = 10
    schedule = DiscreteSchedule(**schedule_kwargs(beta_schedule, timestep_spacing=spacing))
    table = discrete_step_table(schedule, "ddpm", steps, prediction_type=prediction, clip=1.0)
    d = diffusers_scheduler(diffusers.DDPMScheduler, schedule, steps, prediction_type=prediction, clip_sample=True,
                            clip_sample_range=1.0)
    states, outputs, _ = random_steps(steps, seed=11)
    # DDPMScheduler draws its noise from the generator only where t > 0; the table's row has c_z = 0 at t = 0.
    noises = [torch.randn(SHAPE, generator=torch.Generator().manual_seed(100 + i)) for i in range(steps)]
    theirs = [d.step(o, t, x, generator=torch.Generator().manual_seed(100 + i)).prev_sample
              for i, (x, o, t) in enumerate(zip(states, outputs, d.timesteps))]
    ours = table_steps(table, states, outputs, noises)
    # measured 1.2e-7, and 1.4e-5 at t = 999 of squaredcos_cap_v2 (abar = 2.4e-9): a_x x + a_o o cancels
    # two terms of ~2e4 in float32 there, where diffusers divides (x - sqrt(1 - a) o) by sqrt(a)
    assert max_step_error(ours, theirs) < 2e-5
    clipped_away = discrete_step_table(schedule, "ddpm", steps, prediction_type=prediction)
    assert max_step_error(table_steps(clipped_away, states, outputs, noises), theirs) > 1e-2


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("clip", [0.0, 1.0])
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
def test_ddim_rows_with_eta_equal_diffusers_ddim_step(prediction, clip, set_alpha_to_one):
    steps, eta = 8, 0.6
    schedule = DiscreteSchedule(timestep_spacing="trailing", set_alpha_to_one=set_alpha_to_one)
    table = discrete_step_table(schedule, "ddim", steps, prediction_type=prediction, clip=clip, eta=eta)
    assert table.draws_step_noise
    d = diffusers_scheduler(diffusers.DDIMScheduler, schedule, steps, prediction_type=prediction,
                            clip_sample=clip > 0, clip_sample_range=clip or 1.0, set_alpha_to_one=set_alpha_to_one)
    states, outputs, noises = random_steps(steps, seed=12)
    theirs = [d.step(o, t, x, eta=eta, variance_noise=z).prev_sample
              for x, o, z, t in zip(states, outputs, noises, d.timesteps)]
    assert max_step_error(table_steps(table, states, outputs, noises), theirs) < 3e-7  # measured 1.8e-7
