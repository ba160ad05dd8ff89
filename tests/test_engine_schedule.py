"""The seed's cosine schedule: end points, clamp boundaries, time warp, float64 evaluation."""
import math

import numpy as np
import pytest
import torch

from ddpm_engine.engine import CosineSchedule, diffuse, step_table


def unclamped(t, s=0.008):
    return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2


def test_end_points_hit_the_clamp():
    sched = CosineSchedule()
    assert sched.alpha_cumprod(0.0) == 0.9999  # unclamped value is exactly 1
    assert sched.alpha_cumprod(1.0) == 1e-4  # unclamped value is ~1e-33
    assert unclamped(0.0) == pytest.approx(1.0)


def crossing(bound, s=0.008):
    """t where the unclamped cosine equals `bound` (it decreases monotonically), by bisection."""
    lo, hi = 0.0, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if unclamped(mid, s) > bound else (lo, mid)
    return lo


def test_clamp_boundaries_are_where_the_cosine_crosses_them():
    sched = CosineSchedule()
    t_hi, t_lo = crossing(0.9999), crossing(1e-4)
    assert t_hi == pytest.approx(0.002256, abs=1e-5) and t_lo == pytest.approx(0.993583, abs=1e-5)
    assert sched.alpha_cumprod(t_hi - 1e-6) == 0.9999
    assert 1e-4 < sched.alpha_cumprod(t_hi + 1e-6) < 0.9999
    assert 1e-4 < sched.alpha_cumprod(t_lo - 1e-6) < 0.9999
    assert sched.alpha_cumprod(t_lo + 1e-6) == 1e-4


def test_midpoint_matches_the_formula_in_float64():
    sched = CosineSchedule()
    for t in (0.1, 0.25, 0.5, 0.75, 0.9):
        assert sched.alpha_cumprod(t) == pytest.approx(unclamped(t), rel=1e-14)


def test_schedule_is_float64_for_tensors_and_arrays():
    sched = CosineSchedule()
    t32 = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float32)
    out = sched.alpha_cumprod(t32)
    assert out.dtype == torch.float64
    assert sched.alpha_cumprod(np.array([0.0, 1.0])).dtype == np.float64
    assert 1 - out[0].item() == pytest.approx(1e-4)


@pytest.mark.parametrize("t", [torch.linspace(0, 1, 301).bfloat16(), torch.linspace(0, 1, 301).half(),
                               np.linspace(0, 1, 301).astype(np.float16)], ids=["torch-bf16", "torch-fp16", "numpy-fp16"])
def test_low_precision_times_are_evaluated_in_float64(t):
    # Times may arrive in 16 bits; the schedule at exactly those times is still computed in float64, so 1 - abar
    # keeps its 1e-4 at the clamp (in fp16/bf16 0.9999 rounds to 1 and 1 - abar vanishes).
    out = CosineSchedule().alpha_cumprod(t)
    assert out.dtype in (torch.float64, np.float64)
    times = [float(v) for v in t]
    assert [float(v) for v in out] == pytest.approx([min(max(unclamped(v), 1e-4), 0.9999) for v in times], rel=1e-14)
    assert float((1 - out).min()) == pytest.approx(1e-4, rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 0.5)])
def test_step_table_does_not_follow_a_low_precision_default_dtype(dtype, sampler, eta):
    expected = step_table(CosineSchedule(), sampler, 300, eta=eta).rows
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        rows = step_table(CosineSchedule(), sampler, 300, eta=eta).rows
    finally:
        torch.set_default_dtype(previous)
    assert rows.dtype == torch.float32 and torch.equal(rows, expected)


def test_scaler_warps_time_as_the_seed_does():
    base = CosineSchedule()
    for k in (2.0, 0.5):
        warped = CosineSchedule(scaler=k)
        t = 0.3
        t_w = 1 - (1 - t) ** k if k > 1 else t**k
        assert warped.alpha_cumprod(t) == pytest.approx(base.alpha_cumprod(t_w), rel=1e-14)


@pytest.mark.parametrize("kwargs", [{"s": 0.0}, {"scaler": -1.0}, {"clamp_min": 0.5, "clamp_max": 0.1}])
def test_invalid_schedule_parameters_raise(kwargs):
    with pytest.raises(ValueError, match="CosineSchedule"):
        CosineSchedule(**kwargs)


def test_diffuse_is_the_closed_form_forward_process():
    sched = CosineSchedule()
    x0 = torch.randn(2, 1, 4, 4)
    eps = torch.randn(2, 1, 4, 4)
    t = torch.tensor([0.2, 0.7])
    out = diffuse(x0, t, eps, sched)
    for b in range(2):
        a = sched.alpha_cumprod(float(t[b]))
        torch.testing.assert_close(out[b], math.sqrt(a) * x0[b] + math.sqrt(1 - a) * eps[b], rtol=0, atol=1e-6)
