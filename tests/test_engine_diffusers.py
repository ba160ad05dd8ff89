"""diffusers UNet2DModel engines: built from a saved pipeline, sampled number for number with diffusers' own loop.

The oracle is diffusers' pipeline loop written out (randn_tensor for x_T, set_timesteps, unet(x, t).sample, then
scheduler.step(..., generator=g)), with the scheduler loaded from the saved pipeline the engine was built from.
Tiny random-weight U-Nets (no hub); engines use the torch backend unless the test is about ONNX Runtime.
"""
import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from ddpm_engine.engine import build, load
from ddpm_engine.engine.cli import main
from ddpm_engine.engine.errors import EngineError

diffusers = pytest.importorskip("diffusers")
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]
SHAPE = (2, 3, 16, 16)
STEPS = 8


def tiny_unet(**kw):
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                                 layers_per_block=1, norm_num_groups=4, attention_head_dim=8,
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), **kw).eval()


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    from export_standin import single_thread

    with single_thread():
        yield


def save_pipeline(path, unet, scheduler):
    pipe = (diffusers.DDIMPipeline if isinstance(scheduler, diffusers.DDIMScheduler) else diffusers.DDPMPipeline)
    pipe(unet=unet, scheduler=scheduler).save_pretrained(path)
    return path


SCHEDULERS = {  # name -> the saved scheduler of a pipeline
    "ddpm-linear-clip": lambda: diffusers.DDPMScheduler(),
    "ddpm-cos-v": lambda: diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction"),
    "ddim": lambda: diffusers.DDIMScheduler(steps_offset=1),
    "trailing-fixed-large": lambda: diffusers.DDPMScheduler(timestep_spacing="trailing", variance_type="fixed_large"),
}


@pytest.fixture(scope="module")
def engines(tmp_path_factory, unet):
    """name -> (pipeline dir, torch-backend engine dir), built on first use from the saved pipeline."""
    made = {}

    def get(name):
        if name not in made:
            root = tmp_path_factory.mktemp(name)
            pipe = save_pipeline(root / "pipe", unet, SCHEDULERS[name]())
            build(pipe, root / "engine", backend="torch", batch=(1, 2, 4), verify=False)
            made[name] = pipe, root / "engine"
        return made[name]

    return get


def saved_scheduler(pipe, cls=None):
    """The scheduler as diffusers loads it from the pipeline (optionally as another class, via from_config)."""
    config = diffusers.DDPMScheduler.load_config(pipe / "scheduler")
    cls = cls or getattr(diffusers, config["_class_name"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls.from_config(config)


@torch.no_grad()
def diffusers_loop(model, scheduler, steps, generator, eta=None, mask=None, x_init=None, x_scale=1.0):
    """DDPMPipeline / DDIMPipeline's loop; with a mask, known pixels renoised to t (add_noise) before each call.
    x_scale: multiplies x_T (1 + 2^-23 moves it by one float32 ulp: how far rounding alone moves the result)."""
    x = randn_tensor(SHAPE, generator=generator) * x_scale
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        if mask is not None:
            known = scheduler.add_noise(x_init, randn_tensor(SHAPE, generator=generator), t.reshape(1))
            x = mask * x + (1 - mask) * known
        out = model(x, t)
        kw = {} if eta is None else {"eta": eta}
        x = scheduler.step(out, t, x, generator=generator, **kw).prev_sample
    return x


def unet_call(unet):
    return lambda x, t: unet(x, t).sample


def engine_and_oracle(engine, oracle_args, sample_kw, unet_fn):
    """(engine sample, oracle sample, whether both generators end in the same state) from one seed."""
    g_engine, g_oracle = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    ours = engine.sample(batch_size=SHAPE[0], timesteps=STEPS, generator=g_engine, **sample_kw)
    theirs = diffusers_loop(unet_fn, *oracle_args(g_oracle))
    same_stream = torch.equal(torch.randn(4, generator=g_engine), torch.randn(4, generator=g_oracle))
    return ours, theirs, same_stream


def rounding_floor(oracle_args, unet_fn) -> float:
    """How far diffusers' own loop moves when x_T moves by one float32 ulp: the float32 noise floor of the loop."""
    a = diffusers_loop(unet_fn, *oracle_args(torch.Generator().manual_seed(7)))
    b = diffusers_loop(unet_fn, *oracle_args(torch.Generator().manual_seed(7)), x_scale=1 + 2**-23)
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name,sampler,eta,cls", [
    ("ddpm-linear-clip", None, None, None),
    ("ddpm-cos-v", None, None, None),
    ("ddim", None, 0.0, None),
    ("ddim", "ddim", 0.5, None),
    ("trailing-fixed-large", None, None, None),
    ("trailing-fixed-large", "ddim", 0.0, "DDIMScheduler"),
    ("ddpm-linear-clip", "dpmpp-2m", None, "DPMSolverMultistepScheduler"),
])
def test_engine_equals_diffusers_loop_with_the_same_generator(engines, unet, name, sampler, eta, cls):
    """Within 1e-5, or within twice the loop's own float32 floor where that is higher: the deterministic eps
    samplers (DDIM eta 0, DPM-Solver++) divide by sqrt(abar) ~ 6e-3 in their first steps, so one ulp of x_T moves
    diffusers' own result by 5e-5..8e-5. Measured engine vs diffusers on an AVX2 AMD CPU / an AVX-512 Intel CPU:
    DDPM 3e-6 / 3e-6 (cos-v 8e-6 / 7e-6, trailing fixed_large 3e-6 / 4e-6), DDIM eta 0.5 1.0e-5 / 1.3e-5 (floor
    below 1e-5 / 1.39e-5; 1.53e-5 on an AVX-512 AMD CPU), DDIM eta 0 2.1e-5 / 1.7e-5 (floor 5.2e-5 / 2.8e-5), trailing DDIM 5.3e-5 / 3.6e-5
    (floor 6.5e-5 / 1.1e-4), DPM-Solver++(2M) 9.2e-5 / 1.07e-4 (floor 7.6e-5 / 9.2e-5); the rows themselves agree
    step for step to 3e-7 (test_engine_discrete_schedule.py)."""
    pipe, engine_dir = engines(name)
    engine = load(engine_dir)
    scheduler = saved_scheduler(pipe, cls and getattr(diffusers, cls))
    kw = {"sampler": sampler} if sampler else {}
    args = lambda g: (scheduler, STEPS, g, eta)  # noqa: E731
    ours, theirs, same_stream = engine_and_oracle(engine, args, {**kw, "eta": eta or 0.0}, unet_call(unet))
    floor = rounding_floor(args, unet_call(unet))
    assert (ours - theirs).abs().max().item() < max(1e-5, 2 * floor)
    if sampler != "dpmpp-2m" and eta != 0.0:  # the stochastic samplers: the noise keeps the floor low
        assert floor < 1.6e-5
    assert same_stream  # the engine drew exactly as many numbers as diffusers, no more (DDPM skips t = 0)
    assert ours.abs().max() > 0.1  # a real sample, not a collapsed one


def test_dpmpp_follows_the_saved_leading_spacing_not_an_in_memory_default(engines):
    """The saved DDPM config keeps "leading": DPM-Solver++ then spaces num_train_timesteps // (N + 1)."""
    pipe, engine_dir = engines("ddpm-linear-clip")
    table = load(engine_dir).schedule.table("dpmpp-2m", STEPS)
    saved = saved_scheduler(pipe, diffusers.DPMSolverMultistepScheduler)
    saved.set_timesteps(STEPS)
    step = 1000 // (STEPS + 1)  # 111: the 9 points 0, 111, ..., 888, less the 0
    assert table.rows[:, 0].long().tolist() == saved.timesteps.tolist() == [step * k for k in range(STEPS, 0, -1)]
    fresh = diffusers.DPMSolverMultistepScheduler()
    fresh.set_timesteps(STEPS)
    assert fresh.timesteps.tolist() != saved.timesteps.tolist()


def test_masked_run_equals_diffusers_loop_with_renoised_known_pixels(engines, unet):
    pipe, engine_dir = engines("ddpm-linear-clip")
    g = torch.Generator().manual_seed(1)
    x_init = torch.rand(SHAPE, generator=g) * 2 - 1
    mask = (torch.rand(1, 1, 16, 16, generator=g) > 0.5).float()
    scheduler = saved_scheduler(pipe)
    ours, theirs, same_stream = engine_and_oracle(
        load(engine_dir), lambda g: (scheduler, STEPS, g, None, mask, x_init), {"mask": mask, "x_init": x_init},
        unet_call(unet))
    assert (ours - theirs).abs().max().item() < 1e-5 and same_stream
    unmasked, _, _ = engine_and_oracle(load(engine_dir), lambda g: (scheduler, 1, g), {}, unet_call(unet))
    assert (ours - unmasked).abs().max() > 0.1


@pytest.fixture(scope="module")
def ort_engine(tmp_path_factory, unet):
    root = tmp_path_factory.mktemp("ort")
    pipe = save_pipeline(root / "pipe", unet, diffusers.DDPMScheduler())
    return pipe, build(pipe, root / "engine", backend="onnxruntime", batch=(1, 2, 4), size="16x16:16x16:32x32")


def onnx_unet(engine_dir):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(engine_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    return lambda x, t: torch.from_numpy(sess.run(None, {"sample": x.numpy(), "timestep": np.full(
        x.shape[0], float(t), np.float32)})[0])


def test_onnxruntime_engine_is_verified_and_matches_diffusers(ort_engine, unet):
    """DDPM: within 1e-4 of diffusers' loop. DDIM eta 0 with eps prediction multiplies the graph's ~1e-6 per call
    by up to ~100 in its first steps (x0 = (x - sqrt(1 - abar) eps) / sqrt(abar), abar ~ 4e-5), so it is held to
    the rule of the torch-backend test against the same loop run on the exported graph, and its distance to the
    PyTorch loop is only bounded."""
    pipe, result = ort_engine
    manifest = result.manifest
    assert manifest["schedule"]["scheduler"] == "DDPMScheduler" and manifest["profile"]["multiple"] == 2
    assert manifest["artefacts"]["onnx"]["dynamic_hw"] and manifest["artefacts"]["onnx"]["verification"]
    assert {(c["height"], c["width"]) for c in manifest["artefacts"]["onnx"]["verification"]["cases"]} > {(16, 16)}
    engine = load(result.directory)
    assert engine.backend == "onnxruntime"
    ours, theirs, same = engine_and_oracle(engine, lambda g: (saved_scheduler(pipe), STEPS, g), {}, unet_call(unet))
    assert (ours - theirs).abs().max().item() < 1e-4 and same
    ddim = lambda g: (saved_scheduler(pipe, diffusers.DDIMScheduler), STEPS, g, 0.0)  # noqa: E731
    ours, theirs, _ = engine_and_oracle(engine, ddim, {"sampler": "ddim"}, onnx_unet(result.directory))
    assert (ours - theirs).abs().max().item() < max(1e-5, 2 * rounding_floor(ddim, onnx_unet(result.directory)))
    _, torch_loop, _ = engine_and_oracle(engine, ddim, {"sampler": "ddim"}, unet_call(unet))
    assert (ours - torch_loop).abs().max().item() < 1e-3


def test_unconditional_seed_path_shapes_and_reproducibility(ort_engine):
    engine = load(ort_engine[1].directory)
    a = engine.sample(batch_size=3, height=32, width=32, timesteps=4, sampler="ddim", seed=0)
    b = engine.sample(batch_size=3, height=32, width=32, timesteps=4, sampler="ddim", seed=0)
    assert a.shape == (3, 3, 32, 32) and torch.equal(a, b)
    assert engine.sample(timesteps=2).shape == (1, 3, 16, 16)  # default batch 1 at the built OPT size


def test_loading_and_sampling_never_import_diffusers(ort_engine):
    code = (
        "import sys; sys.modules['diffusers'] = None\n"
        "from ddpm_engine.engine import load\n"
        f"e = load({str(ort_engine[1].directory)!r})\n"
        "x = e.sample(batch_size=2, timesteps=3, seed=0)\n"
        "assert x.shape == (2, 3, 16, 16), x.shape\n"
        "try:\n"
        f"    load({str(ort_engine[1].directory)!r}, backend='torch')\n"
        "except Exception as exc:\n"
        "    print('TORCH:', exc)\n"
        "print('OK', 'diffusers' in sys.modules and sys.modules['diffusers'] is not None)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "OK False" in out.stdout
    assert "TORCH: building a diffusers model (and running its torch backend) needs diffusers" in out.stdout


def test_cli_builds_a_pipeline_dir_and_samples_npy_and_png(tmp_path, unet, capsys):
    pipe = save_pipeline(tmp_path / "pipe", unet, diffusers.DDIMScheduler())
    assert main(["build", str(pipe), "-o", str(tmp_path / "eng"), "--backend", "onnxruntime", "--batch", "1:2:4",
                 "--no-verify"]) == 0
    out, png = tmp_path / "x.npy", tmp_path / "x.png"
    assert main(["sample", str(tmp_path / "eng"), "--batch-size", "4", "--timesteps", "3", "-o", str(out),
                 "--png", str(png)]) == 0
    x = np.load(out)
    assert x.shape == (4, 3, 16, 16)
    np.testing.assert_array_equal(x, load(tmp_path / "eng").sample(batch_size=4, timesteps=3, seed=0).numpy())
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[16:24] == (32).to_bytes(4, "big") * 2  # 2x2 grid of 16x16
    import zlib

    idat = data[data.index(b"IDAT") + 4:data.index(b"IEND") - 8]
    rows = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(32, 1 + 32 * 3)[:, 1:].reshape(32, 32, 3)
    want = np.round(np.clip(x[1] / 2 + 0.5, 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0)  # top-right tile
    np.testing.assert_array_equal(rows[:16, 16:], want)
    capsys.readouterr()
    assert main(["build", str(tmp_path), "-o", str(tmp_path / "bad")]) == 2
    assert "is not a model directory: not an engine (engine.json), a ddpm-engine checkpoint (config.json) or a " \
        "diffusers pipeline (model_index.json)" in capsys.readouterr().err


def test_bad_pipelines_are_refused_by_name(tmp_path, unet):
    (tmp_path / "half" / "unet").mkdir(parents=True)
    with pytest.raises(EngineError, match="not a diffusers pipeline directory: model_index.json is missing"):
        build(tmp_path / "half", tmp_path / "e0")
    euler = save_pipeline(tmp_path / "euler", unet, diffusers.EulerDiscreteScheduler())
    with pytest.raises(ValueError, match=r"unsupported scheduler class 'EulerDiscreteScheduler'; supported: "
                                         r"\['DDIMScheduler', 'DDPMScheduler'\]"):
        build(euler, tmp_path / "e1")
    for kw, message in (({"thresholding": True}, "thresholding=True: dynamic thresholding"),
                        ({"variance_type": "fixed_large_log"}, "unsupported variance_type 'fixed_large_log'"),
                        ({"variance_type": "learned_range"}, "unsupported variance_type 'learned_range'")):
        with pytest.raises(ValueError, match=message):
            build(unet, tmp_path / "e2", scheduler=diffusers.DDPMScheduler(**kw))
    with pytest.raises(EngineError, match="class-conditional UNet2DModel"):
        build(tiny_unet(num_class_embeds=4), tmp_path / "e3", scheduler=diffusers.DDPMScheduler())
    with pytest.raises(EngineError, match="needs its scheduler"):
        build(unet, tmp_path / "e4")
    with pytest.raises(ValueError, match="size 15x15 is not a multiple of 2"):
        build(unet, tmp_path / "e5", scheduler=diffusers.DDPMScheduler(), size="15x15")
    assert not any((tmp_path / f"e{i}").exists() for i in range(6))


def test_bad_sampling_calls_are_refused_by_name(ort_engine):
    engine = load(ort_engine[1].directory)
    with pytest.raises(ValueError, match="this model takes no background"):
        engine.sample(np.zeros((1, 1, 16, 16), np.float32), timesteps=2)
    with pytest.raises(ValueError, match="18x19 is not a multiple of 2"):
        engine.sample(height=18, width=19, timesteps=2)
    with pytest.raises(ValueError, match="outside what this engine was built for"):
        engine.sample(height=64, width=64, timesteps=2)
    with pytest.raises(ValueError, match="t_start, t_end and spacing set the seed's continuous time grid"):
        engine.sample(timesteps=2, spacing="logsnr")
    with pytest.raises(ValueError, match="init='background' needs background with 3 channels"):
        engine.sample(timesteps=2, init="background")
    from ddpm_engine.serve.serve_http import Service

    with pytest.raises(EngineError, match="serving a diffusers engine is not supported yet"):
        Service(engine, "tiny")


def test_the_schedule_is_part_of_the_cache_key_and_rebuilds_from_the_engine_keep_it(tmp_path, unet):
    first = build(unet, tmp_path / "e", backend="torch", scheduler=diffusers.DDPMScheduler(), verify=False)
    again = build(unet, tmp_path / "e", backend="torch", scheduler=diffusers.DDPMScheduler(), verify=False)
    assert again.cached and not first.cached
    v = build(unet, tmp_path / "e", backend="torch", scheduler=diffusers.DDPMScheduler(prediction_type="v_prediction"),
              verify=False)
    assert not v.cached and json.loads((tmp_path / "e" / "engine.json").read_text())["schedule"]["prediction_type"] \
        == "v_prediction"
    rebuilt = build(tmp_path / "e", tmp_path / "r", backend="torch", verify=False)  # from the kept weights
    assert rebuilt.manifest["schedule"] == v.manifest["schedule"]
    assert rebuilt.manifest["model"]["weights_sha256"] == v.manifest["model"]["weights_sha256"]


def test_trained_betas_replace_the_beta_schedule_and_must_fit_num_train_timesteps():
    from ddpm_engine.engine.diffusers_schedule import DiffusersSchedule

    betas = np.linspace(1e-4, 0.03, 50) ** 1.1
    theirs = diffusers.DDPMScheduler(num_train_timesteps=50, trained_betas=betas.tolist())
    config = {k: v for k, v in dict(theirs.config).items() if not k.startswith("_")}
    ours = DiffusersSchedule.from_config("DDPMScheduler", config)
    assert DiffusersSchedule.from_dict(json.loads(json.dumps(ours.as_dict()))) == ours  # the manifest round trip
    np.testing.assert_allclose(ours.schedule.alphas_cumprod, theirs.alphas_cumprod.double().numpy(), rtol=1e-6)
    theirs.set_timesteps(5)
    assert ours.table("ddpm", 5).rows[:, 0].long().tolist() == theirs.timesteps.tolist()
    with pytest.raises(ValueError, match=r"trained_betas must be 60 \(num_train_timesteps\) values in \(0, 1\)"):
        DiffusersSchedule.from_config("DDPMScheduler", {**config, "num_train_timesteps": 60})
