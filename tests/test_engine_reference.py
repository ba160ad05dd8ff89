"""reference_sample: the seed's loop, number for number, with noise in the seed's order; and its validation."""
import math

import pytest
import torch
from seed_longhand import abar, draw_seed_noises, run_longhand, toy_model

from ddpm_engine.engine import reference_sample

SHAPE = (2, 1, 9, 7)


def inputs(seed=0, shape=SHAPE):
    g = torch.Generator().manual_seed(seed)
    bg = torch.rand(shape, generator=g) * 2 - 1
    x_init = torch.rand(shape, generator=g) * 2 - 1
    mask = (torch.rand(1, 1, *shape[2:], generator=g) > 0.5).float()
    return bg, x_init, mask


@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 0.4), ("ddim", 1.0)])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("t_range", [(1.0, 0.0), (0.8, 0.1)])
def test_matches_the_longhand_seed_loop_with_the_same_generator(sampler, eta, masked, t_range):
    # eta > 0: Song et al.'s DDIM step longhand, with the step noise drawn where the engine draws it.
    bg, x_init, mask = inputs()
    mask = mask if masked else None
    T = 40
    x_T, noises = draw_seed_noises(torch.Generator().manual_seed(7), SHAPE, T, masked, sampler, eta)
    expected = run_longhand(sampler, T, *t_range, x_T, noises, bg, mask, x_init if masked else None, eta=eta)
    got = reference_sample(toy_model, bg, SHAPE, mask=mask, x_init=x_init if masked else None, timesteps=T,
                           t_start=t_range[0], t_end=t_range[1], sampler=sampler, eta=eta,
                           generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)  # measured: equal


def test_intermediates_are_the_state_after_every_step_ending_with_the_sample():
    bg, x_init, mask = inputs()
    x_T, noises = draw_seed_noises(torch.Generator().manual_seed(3), SHAPE, 12, True, "ddpm")
    expected = []
    run_longhand("ddpm", 12, 1.0, 0.0, x_T, noises, bg, mask, x_init, intermediates=expected)
    preds = reference_sample(toy_model, bg, SHAPE, mask=mask, x_init=x_init, timesteps=12,
                             generator=torch.Generator().manual_seed(3), return_intermediates=True)
    assert len(preds) == 12
    for got, want in zip(preds, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    final = reference_sample(toy_model, bg, SHAPE, mask=mask, x_init=x_init, timesteps=12,
                             generator=torch.Generator().manual_seed(3))
    assert torch.equal(final, preds[-1])


def test_first_step_of_300_is_an_exact_no_op_that_still_calls_the_model():
    bg, _, _ = inputs()
    calls = []

    def model(x_cat, t):
        calls.append(t[0].item())
        return toy_model(x_cat, t)

    preds = reference_sample(model, bg, SHAPE, timesteps=300, generator=torch.Generator().manual_seed(1),
                             return_intermediates=True)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    assert torch.equal(preds[0], x_T)
    assert not torch.equal(preds[1], preds[0])
    assert len(calls) == 300 and calls[0] == 1.0


def test_known_pixels_are_not_repasted_at_the_end():
    bg, x_init, mask = inputs()
    x = reference_sample(toy_model, bg, SHAPE, mask=mask, x_init=x_init, timesteps=20,
                         generator=torch.Generator().manual_seed(0))
    known = (1 - mask).bool().expand(SHAPE)
    assert not torch.equal(x[known], x_init[known])


def test_tau_stops_blending_and_start_from_the_diffused_background():
    bg, x_init, mask = inputs()
    T, tau = 20, 0.5
    g = torch.Generator().manual_seed(5)
    eps_T = torch.randn(SHAPE, generator=g)
    noises = [(torch.randn(SHAPE, generator=g) if i < tau * T else None, torch.randn(SHAPE, generator=g))
              for i in range(T)]
    x_T = math.sqrt(abar(1.0)) * bg + math.sqrt(1 - abar(1.0)) * eps_T
    expected = run_longhand("ddpm", T, 1.0, 0.0, x_T, noises, bg, mask, x_init, tau=tau)
    got = reference_sample(toy_model, bg, SHAPE, mask=mask, x_init=x_init, timesteps=T, tau=tau,
                           init="background", generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_batch_size_comes_from_x_init_as_in_the_seed():
    bg, x_init, mask = inputs()
    x = reference_sample(toy_model, bg, (5, 1, 9, 7), mask=mask, x_init=x_init, timesteps=3)
    assert x.shape == SHAPE


def test_generator_makes_it_reproducible():
    bg, _, _ = inputs()
    a = reference_sample(toy_model, bg, SHAPE, timesteps=5, generator=torch.Generator().manual_seed(9))
    b = reference_sample(toy_model, bg, SHAPE, timesteps=5, generator=torch.Generator().manual_seed(9))
    c = reference_sample(toy_model, bg, SHAPE, timesteps=5, generator=torch.Generator().manual_seed(10))
    assert torch.equal(a, b) and not torch.equal(a, c)


def bad(**overrides):
    bg, x_init, mask = inputs()
    kwargs = dict(background=bg, shape=SHAPE, timesteps=3)
    kwargs.update(overrides)
    return kwargs


NAN = torch.full(SHAPE, float("nan"))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (bad(background=torch.zeros(3, 1, 9, 7)), r"background has shape \(3, 1, 9, 7\), expected \[2, C_bg, 9, 7\]"),
        (bad(background=torch.zeros(2, 1, 8, 7)), "background has shape"),
        (bad(background=torch.zeros(2, 9, 7)), "background must have 4 dimensions"),
        (bad(background=torch.zeros(SHAPE, dtype=torch.int64)), "background must be a floating-point tensor"),
        (bad(background=NAN), "background contains NaN or inf"),
        (bad(background=torch.full(SHAPE, float("inf"))), "background contains NaN or inf"),
        (bad(mask=torch.ones(1, 1, 9, 7)), "mask given without x_init"),
        (bad(mask=torch.ones(1, 1, 9, 7), x_init=torch.zeros(2, 2, 9, 7)), r"x_init has shape \(2, 2, 9, 7\)"),
        (bad(mask=torch.ones(1, 1, 9, 6), x_init=torch.zeros(SHAPE)), r"mask has shape \(1, 1, 9, 6\)"),
        (bad(mask=torch.ones(3, 1, 9, 7), x_init=torch.zeros(SHAPE)), r"mask has shape \(3, 1, 9, 7\)"),
        (bad(mask=torch.full((1, 1, 9, 7), 1.5), x_init=torch.zeros(SHAPE)), r"mask values must lie in \[0, 1\]"),
        (bad(mask=torch.full((1, 1, 9, 7), -0.1), x_init=torch.zeros(SHAPE)), r"mask values must lie in \[0, 1\]"),
        (bad(mask=torch.full((1, 1, 9, 7), float("nan")), x_init=torch.zeros(SHAPE)), "mask contains NaN or inf"),
        (bad(mask=torch.ones(1, 1, 9, 7), x_init=NAN), "x_init contains NaN or inf"),
        (bad(shape=(2, 9, 7)), r"shape must be 4 positive sizes"),
        (bad(shape=(2, 0, 9, 7)), r"shape must be 4 positive sizes"),
        (bad(timesteps=0), "timesteps must be an integer >= 1"),
        (bad(timesteps=-3), "timesteps must be an integer >= 1"),
        (bad(t_start=1.2), r"t_start must be a number in \[0, 1\]"),
        (bad(t_end=-0.5), r"t_end must be a number in \[0, 1\]"),
        (bad(t_start=0.2, t_end=0.6), "t_start must be greater than t_end"),
        (bad(sampler="dpm++"), r"unknown sampler 'dpm\+\+'; must be one of \['ddpm', 'ddim', 'dpmpp-2m', 'dpmpp-2m-sde'\]"),
        (bad(spacing="karras"), r"unknown spacing 'karras'; must be one of \['time', 'logsnr'\]"),
        (bad(sampler="dpmpp-2m", timesteps=2), r"sampler 'dpmpp-2m' needs timesteps >= 3"),
        (bad(sampler="dpmpp-2m-sde", eta=0.3), "eta applies to the 'ddim' sampler only; 'dpmpp-2m-sde' has none"),
        (bad(init="zeros"), r"unknown init 'zeros'; must be one of \['noise', 'background', 'x_init'\]"),
        (bad(init="x_init"), "init='x_init' needs x_init"),
        (bad(tau=2.0), r"tau \(fraction of steps that blend the known pixels\) must be in \[0, 1\]"),
        (bad(eta=0.5), "eta applies to the 'ddim' sampler only"),
        (bad(eta=1.5, sampler="ddim"), r"eta must be in \[0, 1\]"),
    ],
)
def test_invalid_inputs_raise_one_clear_error_naming_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        reference_sample(toy_model, **kwargs)
