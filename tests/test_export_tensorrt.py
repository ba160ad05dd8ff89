"""TensorRT: profiles, settings, cache keys and bf16 rules on CPU; plan builds where TensorRT and a GPU exist."""
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto

from ddpm_engine.engine.errors import BackendUnavailableError
from ddpm_engine.export import TOLERANCES, Profile, build, convert_precision, export_onnx, parse_batch, parse_size
from ddpm_engine.export.build import _stage_keys, graph_verify_runtime, resolve_backend
from ddpm_engine.export.model_source import describe_model
from ddpm_engine.export.profile import tensorrt_shapes
from ddpm_engine.export.tensorrt_build import (TensorRTSettings, plan_tolerance, require_tensorrt, tensorrt_status,
                                              unsupported_version)
from export_standin import TinyUNet


def test_profile_from_cli_strings_gives_min_opt_max_shapes():
    profile = Profile(parse_batch("1:4:8"), parse_size("32x32:300x300:320x304"))
    shapes = tensorrt_shapes(profile, c_in=2)
    assert shapes["sample"] == ((1, 2, 32, 32), (4, 2, 300, 300), (8, 2, 320, 304))
    assert shapes["timestep"] == ((1,), (4,), (8,))
    assert profile.accepts(3, (75, 75)) and not profile.accepts(9, (75, 75)) and not profile.accepts(2, (16, 300))


def test_profile_shorthands():
    assert parse_batch("8") == (8, 8, 8) and parse_batch("1:8") == (1, 8, 8) and parse_batch(4) == (4, 4, 4)
    assert parse_size("300x300") == ((300, 300),) * 3 and parse_size("300") == ((300, 300),) * 3
    assert parse_size("64x64:300x300") == ((64, 64), (300, 300), (300, 300))
    assert parse_size((75, 37)) == ((75, 37),) * 3
    assert Profile.from_dict(Profile((1, 2, 4), parse_size("8x8:16x16:32x32")).as_dict()).batch == (1, 2, 4)


@pytest.mark.parametrize("batch,size,message", [
    ("0:1:2", "8x8", "1 <= MIN"), ("4:2:8", "8x8", "MIN <= OPT <= MAX"), ("1:x:2", "8x8", "--batch must be"),
    ("1", "64x64:32x32:128x128", "MIN <= OPT <= MAX in both H and W"), ("1", "0x8", "positive"),
])
def test_bad_profiles_are_refused(batch, size, message):
    with pytest.raises(ValueError, match=message):
        Profile(parse_batch(batch), parse_size(size))


def test_builder_settings_are_validated():
    TensorRTSettings(builder_optimization_level=5, refit="identical")
    with pytest.raises(ValueError, match="0..5"):
        TensorRTSettings(builder_optimization_level=6)
    with pytest.raises(ValueError, match="refit"):
        TensorRTSettings(refit="sometimes")


def test_cache_key_covers_tensorrt_settings_gpu_and_version_but_keeps_the_onnx_key():
    torch.manual_seed(0)
    desc = describe_model(TinyUNet())
    libs = {"torch": "2.13", "onnx": "1.23", "onnxruntime": "1.32", "openvino": "2026.4", "tensorrt": "11.4.0"}
    gpu = {"name": "NVIDIA H100", "compute_capability": "9.0", "cuda": "13.0"}
    profile = Profile((1, 4, 8), parse_size("32x32:64x64:128x128"))

    def keys(**over):
        args = dict(desc=desc, profile=profile, precision="fp16", io_precision="fp32", backend="tensorrt", opset=17,
                    dynamic_hw=True, external_data_threshold=1 << 31, trt=TensorRTSettings(), verify=True,
                    tolerance=None, libs=libs, gpu=gpu)
        args.update(over)
        return _stage_keys(**args)

    base = keys()
    assert keys() == base  # deterministic
    for change in (dict(trt=TensorRTSettings(builder_optimization_level=5)),
                   dict(trt=TensorRTSettings(workspace_bytes=1 << 30)), dict(trt=TensorRTSettings(refit="identical")),
                   dict(trt=TensorRTSettings(tf32=True)),
                   dict(gpu={**gpu, "name": "NVIDIA A100", "compute_capability": "8.0"}),
                   dict(libs={**libs, "tensorrt": "11.3.0"}), dict(precision="bf16")):
        other = keys(**change)
        assert other["tensorrt"] != base["tensorrt"] and other["cache_key"] != base["cache_key"], change
        assert other["onnx"] == base["onnx"], change  # the exported fp32 graph is reused
    assert keys(profile=Profile((1, 4, 16), profile.sizes))["onnx"] != base["onnx"]  # verification cases change
    # An OpenVINO engine's key ignores TensorRT: installing or upgrading it does not force a rebuild.
    ov = keys(backend="openvino", precision="bf16")
    assert keys(backend="openvino", precision="bf16", libs={**libs, "tensorrt": None})["cache_key"] == ov["cache_key"]
    assert keys(backend="openvino", precision="bf16", libs={**libs, "openvino": "2026.5"})["cache_key"] != ov["cache_key"]


def test_fp32_plans_are_fp32_unless_tf32_is_asked_for():
    assert TensorRTSettings().tf32 is False  # TensorRT's own default is TF32 on: the builder clears it
    assert plan_tolerance("fp32", tf32=False) == TOLERANCES["fp32"] == 1e-4
    assert TOLERANCES["fp32"] < plan_tolerance("fp32", tf32=True) == TOLERANCES["tf32"] < TOLERANCES["fp16"]
    assert plan_tolerance("fp16", tf32=True) == TOLERANCES["fp16"]  # TF32 changes only what fp32 means


def test_reduced_precision_graphs_are_verified_where_the_artefact_runs():
    # A bf16 TensorRT build is verified on its plan: OpenVINO (the CPU bf16 runtime) is not on GPU machines.
    assert graph_verify_runtime("bf16", "tensorrt") is None
    assert graph_verify_runtime("bf16", "onnxruntime") == "openvino"
    assert graph_verify_runtime("fp16", "tensorrt") == graph_verify_runtime("fp16", "onnxruntime") == "onnxruntime"


@pytest.mark.parametrize("version,ok", [("11.4.0", True), ("10.13.3.9", True), ("10.0.1", True), ("8.6.1", False),
                                        ("12.0.0", False), ("dev", False)])
def test_supported_tensorrt_versions_are_10_and_11(version, ok):
    reason = unsupported_version(version)
    assert (reason is None) == ok
    if not ok:
        assert "10.x or 11.x" in reason or "unreadable" in reason


def test_bf16_graph_for_tensorrt_keeps_resize_fp32(tmp_path):
    class Upsampler(torch.nn.Module):
        c_in, c_out = 2, 1

        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(2, 1, 3, padding=1)

        def forward(self, x, t):
            y = F.avg_pool2d(self.conv(x), 2)
            return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False) + t[:, None, None, None]

    export_onnx(Upsampler().eval(), tmp_path / "u.onnx", opt_size=(16, 16))
    model = convert_precision(onnx.load(str(tmp_path / "u.onnx")), "bf16")
    g = onnx.shape_inference.infer_shapes(model).graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(g.value_info) + list(g.input)}
    resize = [n for n in g.node if n.op_type == "Resize"]
    conv = [n for n in g.node if n.op_type == "Conv"]
    assert resize and all(types[n.input[0]] == TensorProto.FLOAT for n in resize)
    assert conv and all(types[n.input[0]] == TensorProto.BFLOAT16 for n in conv)


def test_missing_tensorrt_names_the_extra_to_install():
    ok, reason = tensorrt_status()
    if ok:
        pytest.skip("TensorRT and a GPU are present here")
    with pytest.raises(BackendUnavailableError) as err:
        require_tensorrt()
    assert "pip install 'ddpm-engine[tensorrt]'" in str(err.value) or "NVIDIA GPU" in str(err.value)
    assert resolve_backend("auto") in ("openvino", "onnxruntime")


# ---- These need TensorRT 11 and an NVIDIA GPU (skipped elsewhere by tests/conftest.py). ----

@pytest.mark.tensorrt
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_tensorrt_plan_matches_pytorch(export_net, tmp_path, precision):
    name, net = export_net
    result = build(net, tmp_path / "eng", backend="tensorrt", precision=precision, batch=(1, 2, 4),
                   size=((16, 16), (32, 32), (80, 80)), builder_optimization_level=1)
    entry = result.manifest["artefacts"]["tensorrt"]
    v = entry["verification"]
    print(f"{name} TensorRT {precision}: max abs error vs PyTorch {v['max_abs_err']:.3g} (tolerance {v['tolerance']:g})")
    # The stated bound: max|eps - eps_torch| / max(1, max|eps_torch|) within TOLERANCES (fp32 1e-4, TF32 off).
    assert entry["settings"]["tf32"] is False and v["tolerance"] == TOLERANCES[precision]
    assert v["worst"]["scaled_err"] <= TOLERANCES[precision]
    if precision == "bf16":  # verified on the plan, not through OpenVINO
        assert "verification" not in result.manifest["artefacts"]["onnx_bf16"]
        assert result.manifest["artefacts"]["onnx_bf16"]["verified_as"] == "tensorrt"
    assert entry["gpu"]["compute_capability"] and entry["library"]["name"] == "tensorrt"
    assert (tmp_path / "eng" / "tensorrt" / "timing.cache").stat().st_size > 0


@pytest.mark.tensorrt
def test_tensorrt_rebuild_reuses_timing_cache_and_cache_hit(tiny, tmp_path):
    kw = dict(backend="tensorrt", batch=(1, 1, 2), size=((16, 16), (32, 32), (48, 48)), builder_optimization_level=1)
    first = build(tiny, tmp_path / "eng", **kw)
    assert not first.manifest["artefacts"]["tensorrt"]["timing_cache_reused"]
    assert build(tiny, tmp_path / "eng", **kw).cached
    forced = build(tiny, tmp_path / "eng", force=True, **kw)
    assert not forced.cached and forced.manifest["artefacts"]["tensorrt"]["timing_cache_reused"]


@pytest.mark.tensorrt
def test_refittable_engine_takes_new_weights_without_rebuild(tiny, tmp_path):
    from ddpm_engine.export.onnx_export import _example
    from ddpm_engine.export.tensorrt_build import deserialize_plan, refit_plan, run_plan

    result = build(tiny, tmp_path / "eng", backend="tensorrt", batch=(1, 1, 2), size=((16, 16), (32, 32), (48, 48)),
                   refit="refit", builder_optimization_level=1)
    _, engine = deserialize_plan(tmp_path / "eng" / result.manifest["artefacts"]["tensorrt"]["path"])
    torch.manual_seed(1)
    other = TinyUNet().eval()
    export_onnx(other, tmp_path / "other.onnx", opt_size=(32, 32))
    refit_plan(engine, tmp_path / "other.onnx")
    x, t = _example(other, 2, (32, 32))
    with torch.no_grad():
        ref = other(x, t)
    assert float((run_plan(engine, x, t) - ref).abs().max()) < 1e-2


@pytest.mark.tensorrt
def test_missing_plan_is_derived_on_first_use(tiny, tmp_path):
    from ddpm_engine.export import ensure_artefact

    build(tiny, tmp_path / "eng", backend="onnxruntime", precision="fp16", batch=(1, 1, 2),
          size=((16, 16), (32, 32), (48, 48)), verify=False)
    plan = ensure_artefact(tmp_path / "eng", "tensorrt")
    assert plan.name == "model.plan" and plan.stat().st_size > 0
