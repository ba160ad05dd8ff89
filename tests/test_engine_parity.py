"""The bundled sst-small model through the engine equals the seed's loop (parity mode) on every CPU path."""
import pytest
import torch

from ddpm_engine.engine import build, load, reference_sample
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


@pytest.mark.skipif(not cpu_supports("bf16"), reason="this CPU has no native bf16 (AVX-512 BF16 or AMX): OpenVINO "
                    "would run the bf16 engine in fp32")
def test_openvino_bf16_stays_within_its_bound(model, workload, reference, tmp_path):
    bg, mask, x_init = workload
    bf16_dir = tmp_path / "bf16"
    build(model, bf16_dir, backend="openvino", precision="bf16", batch=(1, 2, 4),
          size=((16, 16), (SIZE, SIZE), (64, 64)))
    bf16 = load(bf16_dir).sample(bg, mask=mask, x_init=x_init, timesteps=T, generator=torch.Generator().manual_seed(0))
    err16 = (bf16 - reference).abs().max().item()
    rms16 = (bf16 - reference).pow(2).mean().sqrt().item()
    print(f"openvino bf16: max err {err16:.3f}, rms {rms16:.4f} (data range [-1, 1])")
    # bf16 keeps 8 bits of mantissa: 50 steps of the loop amplify its ~4e-3 relative error in eps_hat. Two runs on
    # an AVX-512 BF16 CPU measured max 0.029 / rms 0.0039 and max 0.039 / rms 0.0048 on the normalised [-1, 1]
    # scale; the bound is 1.5x the larger (eps scaled by 1.02 in the bf16 path gave 0.16 / 0.013 there).
    assert rms16 <= 0.0075 and err16 <= 0.06
    assert err16 > 1e-3  # reduced precision really ran (fp32 stays within 1e-4)
