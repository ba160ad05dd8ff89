"""The fused step's in-kernel noise: N(0, 1), independent across draws, steps and neighbours, keyed by seed, no wrap.

`philox_noise` is the kernels' own generator (tests/test_kernels_step.py checks the kernels draw exactly it).
Bounds are 6 standard errors, so a correct generator fails them with probability ~1e-8 per check.
"""
import math

import pytest
import torch

triton_kernels = pytest.importorskip("ddpm_engine.kernels.fused_step_triton")
philox_noise, MAX_STEPS = triton_kernels.philox_noise, triton_kernels.MAX_STEPS

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
N = 1 << 19
Z = 6.0


def seed(value):
    return torch.tensor([value], dtype=torch.int64, device=DEVICE)


def corr(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


@pytest.fixture(scope="module")
def draws():
    a, b = philox_noise(seed(1234), 7, (N,))
    a_next, _ = philox_noise(seed(1234), 8, (N,))
    return a.cpu().double(), b.cpu().double(), a_next.cpu().double()


def test_both_draws_are_standard_normal(draws):
    for z in draws[:2]:
        assert abs(float(z.mean())) < Z / math.sqrt(N)
        assert abs(float(z.var()) - 1.0) < Z * math.sqrt(2.0 / N)
        assert abs(float(((z - z.mean()) ** 4).mean() / z.var() ** 2) - 3.0) < Z * math.sqrt(24.0 / N)  # kurtosis
        assert abs(float((z.abs() < 1).double().mean()) - 0.682689) < Z * math.sqrt(0.2166 / N)
        assert abs(float((z.abs() < 2).double().mean()) - 0.954500) < Z * math.sqrt(0.0434 / N)
        assert float(z.abs().max()) > 4.0  # tails exist (Box-Muller clamps at ~5.7 sigma)
        assert torch.isfinite(z).all()


def test_step_noise_and_blend_noise_are_uncorrelated(draws):
    a, b, _ = draws
    assert abs(corr(a, b)) < Z / math.sqrt(N)
    assert abs(corr(a * a, b * b)) < Z * math.sqrt(2.0) / math.sqrt(N)  # not just linearly
    for sa in (1, -1):  # every quadrant of the joint law holds a quarter (b is no function of a)
        for sb in (1, -1):
            quarter = float(((sa * a > 0) & (sb * b > 0)).double().mean())
            assert abs(quarter - 0.25) < Z * math.sqrt(0.1875 / N)


def test_consecutive_steps_are_uncorrelated(draws):
    a, b, a_next = draws
    assert abs(corr(a, a_next)) < Z / math.sqrt(N)
    assert abs(corr(b, a_next)) < Z / math.sqrt(N)


@pytest.mark.parametrize("lag", [1, 2, 300, 512])
def test_neighbouring_elements_are_uncorrelated(draws, lag):
    a, b, _ = draws
    for z in (a, b):
        assert abs(corr(z[:-lag], z[lag:])) < Z / math.sqrt(N)


def test_same_seed_reproduces_and_other_seeds_differ():
    a1, b1 = philox_noise(seed(42), 3, (4096,))
    a2, b2 = philox_noise(seed(42), 3, (4096,))
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    for other in (43, 42 + 2**32, -42):  # the 64-bit seed is the key: its high word counts too
        c, _ = philox_noise(seed(other), 3, (4096,))
        assert not torch.isclose(a1, c).any()
        assert abs(corr(a1, c)) < Z / math.sqrt(4096)


def test_plane_counter_is_64_bit():
    s = seed(7)
    low, _ = philox_noise(s, 1, (2, 16, 16))
    for base in (2**31, 2**32, 2**40, 2**64 - 2):
        far, _ = philox_noise(s, 1, (2, 16, 16), plane_offset=base)
        assert not torch.isclose(low, far).any(), base  # no wrap to plane 0
    # planes across 2^32 are the planes on both sides: one counter, no seam
    across, _ = philox_noise(s, 1, (4, 8, 9), plane_offset=2**32 - 2)
    below, _ = philox_noise(s, 1, (2, 8, 9), plane_offset=2**32 - 2)
    above, _ = philox_noise(s, 1, (2, 8, 9), plane_offset=2**32)
    assert torch.equal(across, torch.cat([below, above]))
    with pytest.raises(ValueError, match="plane_offset"):
        philox_noise(s, 1, (2, 8, 9), plane_offset=2**64 - 1)


def test_draws_do_not_depend_on_the_block_size():
    s = seed(8)
    shape = (3, 47, 49)  # odd plane size, not a multiple of the 1024-element chunk
    ref = philox_noise(s, 2, shape)
    for block in (1024, 2048, 4096):
        got = philox_noise(s, 2, shape, block=block)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]), block


def test_the_two_elements_of_a_philox_block_are_independent(draws):
    a, b, _ = draws  # elements hw and hw + 512 of a 1024-element chunk share one Philox block
    a, b = a.view(-1, 2, 512), b.view(-1, 2, 512)
    for x, y in ((a[:, 0], a[:, 1]), (a[:, 0], b[:, 1]), (b[:, 0], b[:, 1]), (b[:, 0], a[:, 1])):
        assert abs(corr(x, y)) < Z / math.sqrt(N / 2)
        assert abs(corr(x * x, y * y)) < Z * math.sqrt(2.0) / math.sqrt(N / 2)


def test_step_counter_is_a_full_32_bit_word_beyond_int32():
    """Phase (step + 1) has its own counter word: huge step * numel products never exist, large steps don't wrap."""
    s = seed(7)
    small, small_b = philox_noise(s, 5, (512,))
    for phase in (2**31 + 5, 2**32 - 2, MAX_STEPS):
        big, big_b = philox_noise(s, phase, (512,))
        assert torch.isfinite(big).all()
        assert not torch.isclose(small, big).any() and not torch.isclose(small_b, big_b).any(), phase
    # a step index whose step * numel would overflow int32 many times over (300x300 tiles, B = 64)
    z, _ = philox_noise(s, 2**31 + 7, (1, 300, 300), plane_offset=63)
    assert torch.isfinite(z).all() and abs(float(z.std()) - 1) < 0.05
    with pytest.raises(ValueError, match="phase"):
        philox_noise(s, MAX_STEPS + 1, (8,))


def test_no_two_phases_or_elements_share_a_draw():
    s = seed(99)
    rows = [torch.cat(philox_noise(s, phase, (2048,))) for phase in range(6)]
    allz = torch.cat(rows)
    assert torch.unique(allz).numel() > 0.999 * allz.numel()  # distinct counters give distinct floats
