"""The bundled sst-small model through the engine equals the seed's loop (parity mode) on every CPU path."""
import pytest
import torch

from ddpm_engine.engine import CosineSchedule, build, load, reference_sample
from ddpm_engine.engine.schedule import diffuse
from ddpm_engine.export.openvino_build import cpu_supports
from ddpm_engine.models import load_model
from ddpm_engine.models.data import synthetic_tile

SIZE, BATCH, T = 32, 2, 50


@pytest.fixture(scope="module")
def model():
    return load_model("sst-small")


@pytest.fixture(scope="module")
def engine_dir(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("parity") / "sst-small"
    build(model, out, backend="onnxruntime", batch=(1, 2, 4), size=((16, 16), (SIZE, SIZE), (64, 64)))
    return out


@pytest.fixture(scope="module")
def workload():
    """CARE-SST inputs: two synthetic tiles (observed x_init, background, cloud mask)."""
    import numpy as np

    rng = np.random.default_rng(7)
    tiles = [synthetic_tile(rng, SIZE) for _ in range(BATCH)]
    stack = lambda f: torch.stack([getattr(t, f) for t in tiles])  # noqa: E731
    return stack("background"), stack("mask"), stack("x_init")


@pytest.fixture(scope="module")
def reference(model, workload):
    bg, mask, x_init = workload
    return reference_sample(model, bg, (BATCH, 1, SIZE, SIZE), mask=mask, x_init=x_init, timesteps=T,
                            generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_fp32_backends_match_reference_sample_after_50_masked_ddpm_steps(engine_dir, workload, reference, backend):
    bg, mask, x_init = workload
    x = load(engine_dir, backend=backend).sample(bg, mask=mask, x_init=x_init, timesteps=T,
                                                 generator=torch.Generator().manual_seed(0))
    err = (x - reference).abs().max().item()
    print(f"{backend}: max |engine - reference_sample| = {err:.2e} (|x| <= {reference.abs().max().item():.2f})")
    assert err <= 1e-4


def test_triton_step_under_the_interpreter_matches_reference_sample(engine_dir, workload, reference):
    bg, mask, x_init = workload
    x = load(engine_dir, backend="onnxruntime", step="triton").sample(
        bg, mask=mask, x_init=x_init, timesteps=T, generator=torch.Generator().manual_seed(0))
    err = (x - reference).abs().max().item()
    print(f"triton step: max |engine - reference_sample| = {err:.2e}")
    assert err <= 1e-4


def test_openvino_fp32_matches_reference_sample(engine_dir, workload, reference):
    bg, mask, x_init = workload
    fp32 = load(engine_dir, backend="openvino").sample(bg, mask=mask, x_init=x_init, timesteps=T,
                                                        generator=torch.Generator().manual_seed(0))
    err32 = (fp32 - reference).abs().max().item()
    print(f"openvino fp32: max err {err32:.2e}")
    assert err32 <= 1e-4


needs_native_bf16 = pytest.mark.skipif(
    not cpu_supports("bf16"), reason="this CPU has no native bf16 (AVX-512 BF16 or AMX): OpenVINO would run the bf16 "
    "engine in fp32")


@pytest.fixture(scope="module")
def bf16_engine(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("bf16") / "sst-small"
    build(model, out, backend="openvino", precision="bf16", batch=(1, 2, 4), size=((16, 16), (SIZE, SIZE), (64, 64)))
    return load(out)


# Bounds below: benchmarks/bench_bf16_spread.py, 12 noise seeds, on an Intel Xeon with AVX-512 BF16 and AMX
# (OpenVINO 2026.4, load average 5-8 on 2 shared cores; OpenVINO fp32 stayed within 5e-6 / 3e-7 relative).


@needs_native_bf16
def test_openvino_bf16_stays_within_its_bound(bf16_engine, workload, reference):
    bg, mask, x_init = workload
    bf16 = bf16_engine.sample(bg, mask=mask, x_init=x_init, timesteps=T, generator=torch.Generator().manual_seed(0))
    err16 = (bf16 - reference).abs().max().item()
    rms16 = (bf16 - reference).pow(2).mean().sqrt().item()
    print(f"openvino bf16: max err {err16:.3f}, rms {rms16:.4f} (data range [-1, 1])")
    # bf16 keeps 8 bits of mantissa, and 50 stochastic steps amplify its ~0.7 % error in eps_hat unevenly: over 12
    # noise seeds on these tiles the max error measured 0.036-0.206 (median 0.067) and the rms 0.0070-0.0223
    # (median 0.0100); the bound is 1.2x the worst. A 2 % error in eps (0.11-0.23 / 0.013-0.021 at seeds 0-2) stays
    # inside this spread: the one-call test below is the one that catches it.
    assert rms16 <= 0.027 and err16 <= 0.25
    assert err16 > 0.01  # reduced precision really ran (bf16 measured >= 0.023, fp32 <= 5e-6)


@needs_native_bf16
@torch.no_grad()
def test_openvino_bf16_unet_call_is_within_bf16_rounding(model, bf16_engine, workload):
    bg, _, x_init = workload
    t = torch.tensor([0.3, 0.7])  # mid-range: near t = 0 eps is nearly unpredictable and its relative error doubles
    x = diffuse(x_init, t, torch.randn(x_init.shape, generator=torch.Generator().manual_seed(0)), CosineSchedule())
    sample = torch.cat([x, bg], 1)
    want = model(sample, t)
    rel = ((bf16_engine.runner.predict_eps(sample, t) - want).pow(2).mean().sqrt() / want.pow(2).mean().sqrt()).item()
    print(f"openvino bf16, one U-Net call: rms error {rel:.2e} of rms(eps)")
    # Measured 0.0064-0.0070 (median 0.0067) over 12 noise seeds on these and on 12 other tile pairs; the bound is
    # 1.2x the worst, so eps off by 2 % (0.021) fails it.
    assert 1e-3 < rel <= 0.0085  # above 1e-3: reduced precision really ran (fp32 measured 2.6e-7)
