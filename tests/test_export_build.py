"""build(): engines for onnxruntime and openvino (fp32, bf16) checked against PyTorch, cache hits, atomicity."""
import errno
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddpm_engine.export import TOLERANCES, artefact_path, build, check_engine_dir, ensure_artefact, read_manifest
from ddpm_engine.export.model_source import load_torch_model
from export_standin import TinyUNet, single_thread

BATCH, SIZE = (1, 1, 3), ((16, 16), (24, 24), (40, 40))
COMBOS = [("onnxruntime", "fp32"), ("openvino", "fp32"), ("onnxruntime", "bf16"), ("openvino", "bf16")]


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _tiny():
    torch.manual_seed(0)
    return TinyUNet().eval()


def _other_tiny():
    torch.manual_seed(1)
    return TinyUNet().eval()


def _build_all(model, directory):
    """The four CPU engines into one directory in turn: later builds reuse the exported ONNX file."""
    results = {}
    with single_thread():
        for backend, precision in COMBOS:
            results[backend, precision] = build(model, directory, backend=backend, precision=precision,
                                                batch=BATCH, size=SIZE)
    return results


def _bundled():
    from ddpm_engine.models import load_model

    try:
        return load_model("sst-small")
    except FileNotFoundError as exc:  # the preset's weights are trained and committed separately
        pytest.skip(f"bundled model not available: {exc}")


@pytest.fixture(scope="module", params=["tiny-standin", "care-sst-dim8", "sst-small"])
def engines(request, tmp_path_factory):
    model = _bundled() if request.param == "sst-small" else request.getfixturevalue(
        {"tiny-standin": "tiny", "care-sst-dim8": "care_sst_small"}[request.param])
    directory = tmp_path_factory.mktemp(request.param) / "engine"
    return request.param, model, directory, _build_all(model, directory)


@pytest.mark.parametrize("backend,precision", COMBOS)
def test_cpu_engines_match_pytorch(engines, backend, precision):
    name, _, _, results = engines
    manifest = results[backend, precision].manifest
    assert manifest["backend"] == backend and manifest["precision"] == precision
    key = backend if backend == "openvino" else ("onnxruntime" if precision == "fp32" else f"onnx_{precision}")
    v = manifest["artefacts"][key]["verification"]
    print(f"{name} {backend} {precision}: max abs error vs PyTorch {v['max_abs_err']:.3g} over "
          f"{[(c['batch'], c['height'], c['width']) for c in v['cases']]} ({v['runtime']}, tolerance {v['tolerance']:g})")
    assert v["max_abs_err"] <= TOLERANCES[precision]
    assert {(c["height"], c["width"]) for c in v["cases"]} >= {(37, 29)}
    if precision == "bf16" and (backend == "onnxruntime" or manifest["artefacts"]["openvino"]["native"]):
        assert v["max_abs_err"] > 1e-5  # bf16 arithmetic really happened
    elif precision == "bf16":
        # A CPU without native bf16 (AVX2 only): OpenVINO ignores the hint and runs fp32, as the manifest says.
        assert v["max_abs_err"] <= TOLERANCES["fp32"]
    if backend == "openvino":
        assert manifest["artefacts"]["openvino"]["inference_precision_hint"] == {"fp32": "f32", "bf16": "bf16"}[precision]


def test_bf16_onnx_graph_is_not_offered_to_onnxruntime_cpu(engines):
    from ddpm_engine.engine.errors import BackendUnavailableError

    _, _, directory, _ = engines
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu runs bf16 graphs")
    # The last build into the directory (openvino bf16) kept the onnxruntime bf16 build's graph: it matches.
    manifest = read_manifest(directory)
    assert manifest["backend"] == "openvino" and manifest["artefacts"]["onnxruntime"]["precision"] == "bf16"
    assert manifest["artefacts"]["onnx_bf16"]["verification"]["runtime"].startswith("openvino")
    with pytest.raises(BackendUnavailableError, match="no bf16 kernels; load it with backend='openvino'"):
        check_engine_dir(directory, "onnxruntime")
    check_engine_dir(directory, "openvino")


def test_later_builds_reuse_the_exported_onnx(engines):
    _, _, _, results = engines
    for combo in COMBOS[1:]:
        stages = {s["stage"]: s for s in results[combo].stages}
        onnx_stage = next(s for n, s in stages.items() if n.startswith("export"))
        assert onnx_stage["reused"], combo


def test_manifest_records_model_io_profile_libraries(engines):
    _, model, directory, _ = engines
    m = read_manifest(directory)
    assert m["format_version"] == 1 and m["gpu"]["name"] is None and m["gpu"]["compute_capability"] is None
    assert m["model"]["c_in"] == 2 and m["model"]["c_out"] == 1 and len(m["model"]["weights_sha256"]) == 64
    assert [t["name"] for t in m["io"]["inputs"]] == ["sample", "timestep"] and m["io"]["outputs"][0]["name"] == "eps"
    assert m["profile"]["batch"] == {"min": 1, "opt": 1, "max": 3}
    assert m["profile"]["height"] == {"min": 16, "opt": 24, "max": 40} and m["profile"]["dynamic_hw"]
    assert m["libraries"]["openvino"] and m["libraries"]["torch"] and m["libraries"]["onnxruntime"]
    for entry in m["artefacts"].values():
        assert all(len(h) == 64 for h in entry["files"].values())
    # The kept PyTorch weights rebuild the same model.
    kept = load_torch_model(directory)
    x, t = torch.randn(1, 2, 16, 16), torch.rand(1)
    with torch.no_grad():
        assert torch.equal(kept(x, t), model(x, t))


def test_second_identical_build_is_a_cache_hit(engines):
    _, model, directory, _ = engines
    mtimes = {p: p.stat().st_mtime_ns for p in directory.rglob("*") if p.is_file()}
    again = build(model, directory, backend="openvino", precision="bf16", batch=BATCH, size=SIZE)
    assert again.cached
    assert sum(s["seconds"] for s in again.stages) < 2.0
    assert {p: p.stat().st_mtime_ns for p in directory.rglob("*") if p.is_file()} == mtimes


def test_build_leaves_the_callers_model_as_it_was(tmp_path):
    model = _tiny().double().train()  # the caller's dtype and mode; export needs fp32 and eval on CPU
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = build(model, tmp_path / "e", backend="onnxruntime", precision="fp32", batch=(1, 1, 2),
                   size=((16, 16), (16, 16), (24, 24)))
    assert all(m.training for m in model.modules())
    assert all(p.dtype == torch.float64 and p.device.type == "cpu" for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert result.manifest["artefacts"]["onnx"]["verification"]["max_abs_err"] < 1e-4


def test_changed_weights_are_not_a_cache_hit(tmp_path):
    model = _tiny()
    first = build(model, tmp_path / "e", backend="onnxruntime", batch=BATCH, size=SIZE)
    with torch.no_grad():
        model.outc.bias.add_(1.0)
    second = build(model, tmp_path / "e", backend="onnxruntime", batch=BATCH, size=SIZE)
    assert not second.cached and second.manifest["cache_key"] != first.manifest["cache_key"]
    assert second.manifest["model"]["weights_sha256"] != first.manifest["model"]["weights_sha256"]


def _crash_inside(monkeypatch, stage):
    """Make one stage die half-way, after it has written part of its files (as a kill would)."""
    import importlib

    build_mod = importlib.import_module("ddpm_engine.export.build")  # the attribute `build` is the function

    def half_then_die(real):
        def wrapper(*args, **kwargs):
            real(*args, **kwargs)
            raise RuntimeError(f"injected crash in {stage}")
        return wrapper

    target = {"torch": "save_model_checkpoint", "onnx": "export_onnx", "backend": "_openvino_stage",
              "manifest": "write_manifest"}[stage]
    monkeypatch.setattr(build_mod, target, half_then_die(getattr(build_mod, target)))


@pytest.mark.parametrize("stage", ["torch", "onnx", "backend", "manifest"])
def test_build_killed_mid_way_leaves_no_engine_and_no_debris(tmp_path, monkeypatch, stage):
    target = tmp_path / "eng"
    _crash_inside(monkeypatch, stage)
    with pytest.raises(RuntimeError, match="injected crash"):
        # fp32: the stage _crash_inside patches (auto measures through precision_choice instead)
        build(_tiny(), target, backend="openvino", precision="fp32", batch=BATCH, size=SIZE, verify=False)
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []  # the staging directory was removed


def test_failed_rebuild_keeps_the_previous_engine_intact(tmp_path, monkeypatch):
    target = tmp_path / "eng"
    build(_tiny(), target, backend="onnxruntime", batch=BATCH, size=SIZE, verify=False)
    before = read_manifest(target)
    _crash_inside(monkeypatch, "backend")
    with pytest.raises(RuntimeError, match="injected crash"):
        build(_tiny(), target, backend="openvino", precision="bf16", batch=BATCH, size=SIZE, verify=False)
    assert read_manifest(target) == before
    check_engine_dir(target, "onnxruntime")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eng"]


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_failed_install_rename_keeps_the_previous_engine(tmp_path, monkeypatch, exchange):
    from ddpm_engine.export import staging

    target = tmp_path / "eng"
    build(_tiny(), target, backend="onnxruntime", batch=BATCH, size=SIZE, verify=False)
    before = read_manifest(target)
    real_rename = os.rename

    def refuse_install(src, dst, *args, **kwargs):
        if Path(src).name.startswith(".eng.building-"):  # the staging dir going in as the engine
            raise OSError(errno.EIO, "injected: the rename that installs the engine failed")
        return real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", refuse_install)
    monkeypatch.setattr(staging, "_exchange", refuse_install if exchange else lambda a, b: False)
    with pytest.raises(OSError, match="injected"):
        build(_other_tiny(), target, backend="onnxruntime", batch=BATCH, size=SIZE, verify=False)
    assert read_manifest(target) == before
    check_engine_dir(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eng"]


# Where a build is SIGKILLed (tests/kill_build.py: right after that call returns) -> the engine the directory
# must then hold: the previous one until the new one is complete and swapped in.
KILLS = {
    "weights-saved": ("build save_model_checkpoint", "old"),
    "onnx-exported": ("build export_onnx", "old"),
    "openvino-ir-written": ("build _openvino_stage", "old"),
    "manifest-written": ("build write_manifest", "old"),
    "engines-exchanged": ("staging _exchange", "new"),
    "old-set-aside-without-renameat2": ("os rename --no-exchange", "old"),
}


@pytest.mark.parametrize("kill", list(KILLS))
def test_sigkilled_build_leaves_the_previous_engine_or_the_complete_new_one(tmp_path, kill):
    from ddpm_engine.engine import load

    target = tmp_path / "eng"
    build(_tiny(), target, backend="onnxruntime", batch=BATCH, size=SIZE, verify=False)
    before = read_manifest(target)
    args, holds = KILLS[kill]
    here = Path(__file__).parent
    child = subprocess.run([sys.executable, str(here / "kill_build.py"), str(target), *args.split()], cwd=here,
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]

    after = read_manifest(target)
    assert after["backend"] == {"old": "onnxruntime", "new": "openvino"}[holds]
    assert (after == before) == (holds == "old")
    check_engine_dir(target)  # every artefact file present with its recorded sha256
    x = load(target).sample(torch.zeros(1, 1, 16, 16), timesteps=2)
    assert x.shape == (1, 1, 16, 16) and torch.isfinite(x).all()
    # Nothing else looks like an engine unless it is one: the dead build's dot-named leftovers either lack
    # engine.json or verify in full, and the next build removes them.
    for left in (p for p in tmp_path.iterdir() if p != target):
        assert left.name.startswith(".eng."), left
        if (left / "engine.json").exists():
            check_engine_dir(left)
    build(_tiny(), target, backend="onnxruntime", batch=BATCH, size=SIZE, verify=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eng"]


def test_refuses_to_replace_a_directory_that_is_not_an_engine(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"meow")
    with pytest.raises(FileExistsError, match="not an engine directory"):
        build(_tiny(), tmp_path / "photos", backend="onnxruntime", batch=BATCH, size=SIZE, verify=False)
    assert (tmp_path / "photos" / "cat.jpg").read_bytes() == b"meow"


def test_ensure_artefact_derives_openvino_ir_from_the_onnx_file(tmp_path):
    target = tmp_path / "eng"
    build(_tiny(), target, backend="onnxruntime", batch=BATCH, size=SIZE)
    assert "openvino" not in read_manifest(target)["artefacts"]
    path = ensure_artefact(target, "openvino")
    assert path == target / "openvino" / "model.xml" and path.is_file()
    derived = read_manifest(target)["artefacts"]["openvino"]
    assert derived["derived"] and derived["verification"]["max_abs_err"] < 1e-4
    assert artefact_path(target, "openvino") == path
    assert ensure_artefact(target, "openvino") == path  # second call: nothing to do
    assert artefact_path(target, "onnxruntime") == target / "model.onnx"
    assert artefact_path(target, "torch") == target / "model"
    assert not [p for p in target.iterdir() if p.name.startswith(".")]


def test_tensorrt_artefact_without_tensorrt_is_refused_with_install_hint(tmp_path):
    from ddpm_engine.engine.errors import BackendUnavailableError
    from ddpm_engine.export.tensorrt_build import tensorrt_status

    if tensorrt_status()[0]:
        pytest.skip("TensorRT and a GPU are present here")
    target = tmp_path / "eng"
    build(_tiny(), target, backend="onnxruntime", batch=BATCH, size=SIZE, verify=False)
    with pytest.raises(BackendUnavailableError, match="TensorRT|NVIDIA GPU"):
        ensure_artefact(target, "tensorrt")
    with pytest.raises(BackendUnavailableError):
        build(_tiny(), tmp_path / "trt", backend="tensorrt", batch=BATCH, size=SIZE)
    assert not (tmp_path / "trt").exists()


def test_rebuild_from_an_engine_directory_uses_its_kept_weights(tmp_path):
    model = _tiny()
    first = build(model, tmp_path / "a", backend="onnxruntime", batch=BATCH, size=SIZE, verify=False)
    second = build(str(tmp_path / "a"), tmp_path / "b", backend="onnxruntime", batch=BATCH, size=SIZE, verify=False)
    assert second.manifest["model"]["weights_sha256"] == first.manifest["model"]["weights_sha256"]
    shutil.rmtree(tmp_path / "a")


def test_auto_precision_is_bf16_only_for_openvino_on_cpus_with_native_bf16():
    from ddpm_engine.export.build import resolve_precision
    from ddpm_engine.export.openvino_build import cpu_supports

    assert resolve_precision("auto", "openvino") == ("bf16" if cpu_supports("bf16") else "fp32")
    for backend in ("onnxruntime", "torch", "tensorrt"):
        assert resolve_precision("auto", backend) == "fp32"
    assert resolve_precision("fp32", "openvino") == "fp32"  # an explicit precision is kept
