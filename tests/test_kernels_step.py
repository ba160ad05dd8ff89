"""Fused step: the Triton kernels equal the torch specification (spec against the seed's loop: test_kernels_spec.py).

On CPU the Triton kernels run in the interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without CUDA);
on a GPU, paired-noise launches use fp_fusion=False so the kernel rounds exactly as torch's separate ops do.
"""
import pytest
import torch

from ddpm_engine.engine import step_table
from ddpm_engine.engine.samplers import COL_AO, COL_AX, COL_B0, COL_BH, COL_CLIP, COL_T, NUM_COLS
from ddpm_engine.kernels import initial_torch, step_torch

triton_kernels = pytest.importorskip("ddpm_engine.kernels.fused_step_triton")
initial_triton, step_triton, philox_noise = (
    triton_kernels.initial_triton, triton_kernels.step_triton, triton_kernels.philox_noise)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
C_BG = 1
SHAPES = [(1, 1, 37, 29), (3, 2, 13, 17), (8, 1, 16, 16)]
T = 12


def table(sampler, eta=0.0, tau=1.0, timesteps=T):
    return step_table(sampler=sampler, timesteps=timesteps, eta=eta, tau=tau).to(DEVICE)


def make_mask(kind, shape, g):
    B, C, H, W = shape
    if kind is None:
        return None
    mshape = (1, 1, H, W) if kind == "broadcast" else (B, C, H, W)
    return (torch.rand(mshape, generator=g) > 0.5).float().to(DEVICE)


def buffers(shape, model_dtype, g, eps_dtype=None):
    """x, eps_hat, x_init, model_in (background channels random), t_in, eps1, eps2: all on DEVICE."""
    B, C, H, W = shape
    r = lambda *s: torch.randn(*s, generator=g).to(DEVICE)  # noqa: E731
    return dict(
        x=r(B, C, H, W), eps_hat=r(B, C, H, W).to(eps_dtype or model_dtype), x_init=r(B, C, H, W),
        model_in=r(B, C + C_BG, H, W).to(model_dtype), t_in=torch.full((B,), -1.0, device=DEVICE),
        eps1=r(B, C, H, W), eps2=r(B, C, H, W),
    )


def clone(bufs):
    return {k: v.clone() for k, v in bufs.items()}


def run_both(bufs, rows, i, mask, with_eps2, x_out=False):
    """The same step on two copies of the buffers: (torch spec, Triton with the same noises)."""
    a, b = clone(bufs), clone(bufs)
    out_a = torch.empty_like(bufs["x"]) if x_out else None
    out_b = torch.empty_like(bufs["x"]) if x_out else None
    step_torch(a["x"], a["eps_hat"], rows, i, a["eps2"] if with_eps2 else None, a["eps1"],
               model_in=a["model_in"], t_in=a["t_in"], mask=mask, x_init=a["x_init"], x_out=out_a)
    step_triton(b["x"], b["eps_hat"], rows, torch.tensor([i], device=DEVICE), None,
                model_in=b["model_in"], t_in=b["t_in"], mask=mask, x_init=b["x_init"], x_out=out_b,
                eps1=b["eps1"], eps2=b["eps2"] if with_eps2 else None, fp_fusion=False)
    return (a, out_a), (b, out_b)


def assert_same(a, b, atol=1e-6):
    torch.testing.assert_close(b["x"], a["x"], rtol=0, atol=atol)
    # model_in in its own dtype: both round fp32 -> dtype to nearest even, so equal values cast equally
    torch.testing.assert_close(b["model_in"].float(), a["model_in"].float(), rtol=0, atol=atol)
    torch.testing.assert_close(b["t_in"], a["t_in"], rtol=0, atol=0)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mask_kind", [None, "broadcast", "full"])
@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_triton_step_equals_torch_step_with_the_same_noise(shape, mask_kind, model_dtype, sampler):
    g = torch.Generator().manual_seed(hash((shape, mask_kind, sampler)) % 2**31)
    bufs = buffers(shape, model_dtype, g)
    mask = make_mask(mask_kind, shape, g)
    tab = table(sampler)
    for i in (0, T // 2, T - 1):  # first step (a = a' clamp, no-op for DDPM), a middle one, the last (no blend)
        (a, out_a), (b, out_b) = run_both(bufs, tab.rows, i, mask, tab.draws_step_noise, x_out=True)
        assert_same(a, b)
        torch.testing.assert_close(out_b, out_a, rtol=0, atol=1e-6)


@pytest.mark.parametrize("eps_dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
def test_model_output_is_read_in_its_own_dtype(eps_dtype):
    g = torch.Generator().manual_seed(1)
    shape = (2, 1, 19, 23)
    bufs = buffers(shape, torch.float16, g, eps_dtype=eps_dtype)
    (a, _), (b, _) = run_both(bufs, table("ddpm").rows, 3, make_mask("broadcast", shape, g), True)
    assert_same(a, b)


def test_ddim_with_eta_draws_step_noise_and_matches():
    g = torch.Generator().manual_seed(2)
    shape = (2, 2, 11, 9)
    tab = table("ddim", eta=0.7)
    assert tab.draws_step_noise
    bufs = buffers(shape, torch.float32, g)
    (a, _), (b, _) = run_both(bufs, tab.rows, 4, make_mask("full", shape, g), True)
    assert_same(a, b)
    assert not torch.equal(a["x"], run_both(bufs, tab.rows, 4, make_mask("full", shape, g), False)[0][0]["x"])


def test_steps_past_tau_do_not_blend():
    g = torch.Generator().manual_seed(3)
    shape = (2, 1, 8, 8)
    tab = table("ddpm", tau=0.5)  # blend flag on rows 0..5, off on 6..11
    bufs = buffers(shape, torch.float32, g)
    mask = make_mask("broadcast", shape, g)
    (masked, _), (masked_triton, _) = run_both(bufs, tab.rows, 7, mask, True)
    (plain, _), _ = run_both(bufs, tab.rows, 7, None, True)
    assert_same(masked, masked_triton)
    assert torch.equal(masked["x"], plain["x"])
    (blended, _), _ = run_both(bufs, tab.rows, 4, mask, True)  # row 5 still blends
    (plain4, _), _ = run_both(bufs, tab.rows, 4, None, True)
    assert not torch.equal(blended["x"], plain4["x"])


@pytest.mark.parametrize("kernel", ["torch", "triton"])
def test_only_the_x_channels_of_the_model_input_change(kernel):
    g = torch.Generator().manual_seed(4)
    shape = (3, 2, 10, 12)
    bufs = buffers(shape, torch.bfloat16, g)
    before = bufs["model_in"].clone()
    a, b = run_both(bufs, table("ddpm").rows, 2, make_mask("full", shape, g), True)
    after = (a if kernel == "torch" else b)[0]
    C = shape[1]
    assert torch.equal(after["model_in"][:, C:], before[:, C:])  # background channels: not a bit changed
    assert torch.equal(after["model_in"][:, :C], after["x"].to(torch.bfloat16))
    assert not torch.equal(after["model_in"][:, :C], before[:, :C])


def test_the_last_step_leaves_model_input_and_time_alone_and_does_not_blend():
    g = torch.Generator().manual_seed(5)
    shape = (2, 1, 9, 9)
    tab = table("ddpm")
    bufs = buffers(shape, torch.float32, g)
    mask = make_mask("broadcast", shape, g)
    (a, out_a), (b, out_b) = run_both(bufs, tab.rows, T - 1, mask, True, x_out=True)
    for got in (a, b):
        assert torch.equal(got["model_in"], bufs["model_in"])
        assert torch.equal(got["t_in"], bufs["t_in"])
    assert torch.equal(a["x"], out_a) and torch.equal(b["x"], out_b)  # never re-pasted
    (c, _), _ = run_both(bufs, tab.rows, T - 2, mask, True)
    assert torch.equal(c["t_in"], tab.rows[T - 1, COL_T].expand(2))


def test_torch_step_takes_the_index_as_a_device_tensor_without_changing_results():
    g = torch.Generator().manual_seed(6)
    shape = (2, 1, 7, 5)
    tab = table("ddpm")
    bufs = buffers(shape, torch.bfloat16, g)
    mask = make_mask("full", shape, g)
    for i in (0, 5, T - 1):
        a, b = clone(bufs), clone(bufs)
        step_torch(a["x"], a["eps_hat"], tab.rows, i, a["eps2"], a["eps1"], model_in=a["model_in"],
                   t_in=a["t_in"], mask=mask, x_init=a["x_init"])
        step_torch(b["x"], b["eps_hat"], tab.rows, torch.tensor([i], device=DEVICE), b["eps2"], b["eps1"],
                   model_in=b["model_in"], t_in=b["t_in"], mask=mask, x_init=b["x_init"])
        for k in ("x", "model_in", "t_in"):
            assert torch.equal(a[k], b[k]), (i, k)


@pytest.mark.parametrize("mask_kind", [None, "broadcast"])
@pytest.mark.parametrize("init", ["noise", "image"])
@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_initial_step_equals_torch(mask_kind, init, model_dtype):
    g = torch.Generator().manual_seed(7)
    shape = (3, 2, 13, 17)
    bufs = buffers(shape, model_dtype, g)
    mask = make_mask(mask_kind, shape, g)
    image = torch.randn(shape, generator=g).to(DEVICE) if init == "image" else None
    rows = table("ddpm", timesteps=300).rows
    a, b = clone(bufs), clone(bufs)
    initial_torch(a["x"], rows, a["eps2"], a["eps1"], model_in=a["model_in"], t_in=a["t_in"], mask=mask,
                  x_init=a["x_init"], init_image=image)
    initial_triton(b["x"], rows, None, model_in=b["model_in"], t_in=b["t_in"], mask=mask, x_init=b["x_init"],
                   init_image=image, eps0=b["eps2"], eps1=b["eps1"], fp_fusion=False)
    assert_same(a, b)
    assert torch.equal(b["model_in"][:, 2:], bufs["model_in"][:, 2:])
    assert torch.equal(b["t_in"], rows[0, COL_T].expand(3))


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp-2m", "dpmpp-2m-sde"])
@pytest.mark.parametrize("masked", [False, True])
def test_in_kernel_noise_is_the_philox_noise_of_its_phase(sampler, masked):
    """A runner-style loop (device step counter advanced by step.add_(1)) equals the spec fed philox_noise."""
    g = torch.Generator().manual_seed(8)
    shape = (2, 2, 12, 11)
    tab = table(sampler, timesteps=5)
    bufs = buffers(shape, torch.bfloat16, g)
    mask = make_mask("broadcast", shape, g) if masked else None
    seed = torch.tensor([2024], device=DEVICE)
    a, b = clone(bufs), clone(bufs)
    eps0, eps1 = philox_noise(seed, 0, shape)
    initial_torch(a["x"], tab.rows, eps0, eps1, model_in=a["model_in"], t_in=a["t_in"], mask=mask,
                  x_init=a["x_init"])
    initial_triton(b["x"], tab.rows, seed, model_in=b["model_in"], t_in=b["t_in"], mask=mask, x_init=b["x_init"],
                   fp_fusion=False)
    assert_same(a, b)
    step = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    hist_a, hist_b = (torch.zeros(shape, device=DEVICE) if tab.history else None for _ in range(2))
    for i in range(5):
        eps_hat = torch.randn(shape, generator=g).to(DEVICE).bfloat16()
        eps2, eps1 = philox_noise(seed, i + 1, shape)
        step_torch(a["x"], eps_hat, tab.rows, i, eps2 if tab.draws_step_noise else None, eps1,
                   model_in=a["model_in"], t_in=a["t_in"], mask=mask, x_init=a["x_init"], x0_form=tab.x0_form,
                   x0_prev=hist_a)
        step_triton(b["x"], eps_hat, tab.rows, step, seed, model_in=b["model_in"], t_in=b["t_in"], mask=mask,
                    x_init=b["x_init"], draws_step_noise=tab.draws_step_noise, x0_form=tab.x0_form, x0_prev=hist_b,
                    fp_fusion=False)
        step.add_(1)
        assert_same(a, b)
        if tab.history:
            torch.testing.assert_close(hist_b, hist_a, rtol=0, atol=1e-6)


def test_kernel_plane_counter_crosses_2_to_the_32_planes_in_int64():
    """plane_offset puts the batch across the 2^32 plane boundary: the kernel's 64-bit plane counter must not wrap."""
    g = torch.Generator().manual_seed(9)
    shape = (2, 2, 16, 15)
    offset = 2**32 - 2  # planes 2^32 - 2 .. 2^32 + 1
    tab = table("ddpm")
    bufs = buffers(shape, torch.float32, g)
    mask = make_mask("broadcast", shape, g)
    seed = torch.tensor([11], device=DEVICE)
    a, b, c = clone(bufs), clone(bufs), clone(bufs)
    eps2, eps1 = philox_noise(seed, 4, shape, plane_offset=offset)
    step_torch(a["x"], a["eps_hat"], tab.rows, 3, eps2, eps1, model_in=a["model_in"], t_in=a["t_in"], mask=mask,
               x_init=a["x_init"])
    step_triton(b["x"], b["eps_hat"], tab.rows, torch.tensor([3], device=DEVICE), seed, model_in=b["model_in"],
                t_in=b["t_in"], mask=mask, x_init=b["x_init"], plane_offset=offset, fp_fusion=False)
    assert_same(a, b)
    step_triton(c["x"], c["eps_hat"], tab.rows, torch.tensor([3], device=DEVICE), seed, model_in=c["model_in"],
                t_in=c["t_in"], mask=mask, x_init=c["x_init"], plane_offset=offset + 2**32)  # same low words
    assert not torch.isclose(b["x"], c["x"]).any()


def test_a_split_batch_with_plane_offset_draws_the_noise_of_the_whole_batch():
    g = torch.Generator().manual_seed(10)
    shape = (4, 1, 9, 10)
    tab = table("ddpm")
    bufs = buffers(shape, torch.float32, g)
    seed = torch.tensor([5], device=DEVICE)
    step = torch.tensor([2], device=DEVICE)
    whole = clone(bufs)
    step_triton(whole["x"], whole["eps_hat"], tab.rows, step, seed, model_in=whole["model_in"], t_in=whole["t_in"])
    half = clone(bufs)
    for lo in (0, 2):
        sl = slice(lo, lo + 2)
        x = half["x"][sl].clone()
        step_triton(x, half["eps_hat"][sl].contiguous(), tab.rows, step, seed, model_in=half["model_in"][sl],
                    t_in=half["t_in"][sl], plane_offset=lo * shape[1])
        half["x"][sl] = x
    assert torch.equal(whole["x"], half["x"])
    assert torch.equal(whole["model_in"], half["model_in"])


def x0_form_rows(g, n=4):
    """A table whose every x0-form column is non-zero somewhere, clip on in some rows and off in others."""
    rows = step_table(sampler="ddpm", timesteps=n).rows.clone()
    for col, scale in ((COL_AX, 2.0), (COL_AO, 2.0), (COL_B0, 1.0), (COL_BH, 1.0)):
        rows[:, col] = torch.randn(n, generator=g) * scale
    rows[:, COL_CLIP] = torch.tensor([0.5, 0.0, 1.0, 0.0][:n])
    assert rows.shape[1] == NUM_COLS
    return rows.to(DEVICE)


@pytest.mark.parametrize("history", [False, True])
@pytest.mark.parametrize("mask_kind", [None, "full"])
@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_x0_form_step_equals_torch_in_every_column(history, mask_kind, model_dtype):
    g = torch.Generator().manual_seed(21)
    shape = (2, 2, 13, 17)
    rows = x0_form_rows(g)
    bufs = buffers(shape, model_dtype, g)
    mask = make_mask(mask_kind, shape, g)
    x0_prev = torch.randn(shape, generator=g).to(DEVICE)
    for i in range(rows.shape[0]):
        a, b = clone(bufs), clone(bufs)
        hist_a, hist_b = (x0_prev.clone() if history else None for _ in range(2))
        step_torch(a["x"], a["eps_hat"], rows, i, a["eps2"], a["eps1"], model_in=a["model_in"], t_in=a["t_in"],
                   mask=mask, x_init=a["x_init"], x0_form=True, x0_prev=hist_a)
        step_triton(b["x"], b["eps_hat"], rows, torch.tensor([i], device=DEVICE), None, model_in=b["model_in"],
                    t_in=b["t_in"], mask=mask, x_init=b["x_init"], eps1=b["eps1"], eps2=b["eps2"], x0_form=True,
                    x0_prev=hist_b, fp_fusion=False)
        assert_same(a, b)
        if history:
            torch.testing.assert_close(hist_b, hist_a, rtol=0, atol=1e-6)
            assert not torch.equal(hist_a, x0_prev)  # overwritten with this step's x0_hat
        # the x0 columns changed the result: the same rows read as a seed table differ
        c = clone(bufs)
        step_torch(c["x"], c["eps_hat"], rows, i, c["eps2"], c["eps1"], model_in=c["model_in"], t_in=c["t_in"],
                   mask=mask, x_init=c["x_init"])
        assert not torch.equal(c["x"], a["x"])


def test_x0_form_clips_the_x0_prediction_where_the_row_says():
    """With only b_0 = 1, x_next = clamp(a_x x + a_o o, -clip, clip): x0_hat itself, clipped on rows with clip > 0."""
    g = torch.Generator().manual_seed(22)
    shape = (1, 1, 9, 9)
    rows = torch.zeros(2, NUM_COLS)
    rows[:, COL_AX], rows[:, COL_AO], rows[:, COL_B0] = 3.0, -1.0, 1.0
    rows[0, COL_CLIP] = 0.5
    rows = rows.to(DEVICE)
    bufs = buffers(shape, torch.float32, g)
    x0 = 3.0 * bufs["x"] - bufs["eps_hat"]
    assert x0.abs().max() > 0.5
    for i, expected in ((0, x0.clamp(-0.5, 0.5)), (1, x0)):
        for kernel in ("torch", "triton"):
            a = clone(bufs)
            if kernel == "torch":
                step_torch(a["x"], a["eps_hat"], rows, i, model_in=a["model_in"], t_in=a["t_in"], x0_form=True)
            else:
                step_triton(a["x"], a["eps_hat"], rows, torch.tensor([i], device=DEVICE), None,
                            model_in=a["model_in"], t_in=a["t_in"], draws_step_noise=False, x0_form=True)
            torch.testing.assert_close(a["x"], expected, rtol=0, atol=1e-6)
