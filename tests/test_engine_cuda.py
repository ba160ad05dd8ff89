"""CUDA paths of the runtime: graph capture, the Triton step on the GPU, padding, TensorRT. Skipped without a GPU."""
import pytest
import torch

from ddpm_engine.engine import build, load, reference_sample
from ddpm_engine.models import build_model

H = W = 32
pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("care-sst", c_in=2, c_out=1, embed_dim=16, dim=8, heads=1, dim_head=8).eval()


@pytest.fixture(scope="module")
def engine_dir(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("cuda") / "tiny"
    build(model, out, backend="onnxruntime", batch=(1, 4, 8), size=((16, 16), (32, 32), (64, 64)))
    return out


def inputs(batch=3):
    g = torch.Generator().manual_seed(1)
    bg = torch.rand(batch, 1, H, W, generator=g) * 2 - 1
    x_init = torch.rand(batch, 1, H, W, generator=g) * 2 - 1
    mask = (torch.rand(1, 1, H, W, generator=g) > 0.5).float()
    return bg, x_init, mask


def test_graph_replay_equals_the_eager_cuda_loop(engine_dir):
    bg, x_init, mask = inputs()
    graphed = load(engine_dir, backend="torch", device="cuda", debug=True)
    eager = load(engine_dir, backend="torch", device="cuda", cuda_graphs=False)
    assert graphed.runner.cuda_graphs and graphed.runner.step_impl == "triton"
    for sampler in ("ddpm", "ddim"):
        a = graphed.sample(bg, mask=mask, x_init=x_init, timesteps=20, sampler=sampler, seed=3)
        b = eager.sample(bg, mask=mask, x_init=x_init, timesteps=20, sampler=sampler, seed=3)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        again = graphed.sample(bg, mask=mask, x_init=x_init, timesteps=20, sampler=sampler, seed=3)  # replayed
        assert torch.equal(a, again)


def test_padding_to_a_captured_batch_leaves_the_real_rows_unchanged(engine_dir):
    bg, x_init, mask = inputs(batch=3)
    engine = load(engine_dir, backend="torch", device="cuda")
    assert engine.runner.padded_batch(3, engine.max_batch) == 4
    three = engine.sample(bg, mask=mask, x_init=x_init, timesteps=10, seed=5)
    four = engine.sample(torch.cat([bg, bg[:1]]), mask=mask, x_init=torch.cat([x_init, x_init[:1]]), timesteps=10,
                         seed=5)
    torch.testing.assert_close(three, four[:3], rtol=0, atol=0)


def test_parity_mode_on_cuda_equals_the_reference_loop(engine_dir, model):
    bg, x_init, mask = inputs()
    engine = load(engine_dir, backend="torch", device="cuda")
    dev = torch.device("cuda")
    ref = reference_sample(model.to(dev), bg.to(dev), (3, 1, H, W), mask=mask.to(dev), x_init=x_init.to(dev),
                           timesteps=30, generator=torch.Generator(dev).manual_seed(2))
    got = engine.sample(bg, mask=mask, x_init=x_init, timesteps=30, generator=torch.Generator(dev).manual_seed(2))
    scale = max(1.0, ref.abs().max().item())
    assert (got - ref.cpu()).abs().max().item() <= 1e-4 * scale


def test_cuda_fast_mode_has_no_host_sync_inside_the_loop(engine_dir):
    bg, x_init, mask = inputs()
    engine = load(engine_dir, backend="torch", device="cuda")
    engine.sample(bg, mask=mask, x_init=x_init, timesteps=5, seed=0)  # allocate, bind and capture first
    runner = engine.runner
    bufs = runner.buffers(4, H, W)
    table = __import__("ddpm_engine.engine", fromlist=["step_table"]).step_table(timesteps=5)
    dev = torch.device("cuda")
    # Inputs are made on the device and synchronised before the check: copies to the device are not the loop's.
    bg, x_init = (torch.cat([t, t[:1]]).to(dev) for t in (bg, x_init))
    mask = mask.to(dev)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        runner.run(bufs, table, bg, mask=mask, x_init=x_init, seed=1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_the_loop_runs_on_the_runners_own_stream(engine_dir):
    from ddpm_engine.engine.backends import TorchBackend

    streams = []

    class Recording(TorchBackend):
        """The torch backend, noting the stream each U-Net call is enqueued on."""

        def bind(self, sample, timestep, eps):
            run = super().bind(sample, timestep, eps)

            def record():
                streams.append(torch.cuda.current_stream())
                run()

            return record

    engine = load(engine_dir, backend="torch", device="cuda", cuda_graphs=False)
    engine.runner.backend.__class__ = Recording
    bg, x_init, mask = inputs()
    engine.sample(bg, mask=mask, x_init=x_init, timesteps=4, seed=0)
    assert len(streams) == 4 and all(s == engine.runner.stream for s in streams)
    assert engine.runner.stream != torch.cuda.default_stream()


@pytest.mark.tensorrt
def test_tensorrt_engine_matches_pytorch(model, tmp_path):
    out = tmp_path / "trt"
    build(model, out, backend="tensorrt", batch=(1, 2, 4), size=((16, 16), (32, 32), (64, 64)))
    bg, x_init, mask = inputs()
    trt_engine = load(out, backend="tensorrt")
    ref_engine = load(out, backend="torch", device="cuda")
    a = trt_engine.sample(bg, mask=mask, x_init=x_init, timesteps=20, generator=torch.Generator("cuda").manual_seed(0))
    b = ref_engine.sample(bg, mask=mask, x_init=x_init, timesteps=20, generator=torch.Generator("cuda").manual_seed(0))
    assert (a - b).abs().max().item() <= 1e-3 * max(1.0, b.abs().max().item())
    # The fast path (in-kernel Philox noise, CUDA graphs around TensorRT) against the torch CUDA engine's fast path
    # with the same seed: the same noise, so only the U-Nets differ. TF32 is off on both sides (the plan is fp32).
    assert trt_engine.runner.cuda_graphs and ref_engine.runner.cuda_graphs
    allow_tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        ref = ref_engine.sample(bg, mask=mask, x_init=x_init, timesteps=20, seed=4)
    finally:
        torch.backends.cudnn.allow_tf32 = allow_tf32
    fast = trt_engine.sample(bg, mask=mask, x_init=x_init, timesteps=20, seed=4)
    assert (fast - ref).abs().max().item() <= 1e-3 * max(1.0, ref.abs().max().item())
