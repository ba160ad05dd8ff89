"""Loading checks: missing, corrupt, truncated and mismatched manifests and artefacts, each one clear error."""
import json
import shutil
import types

import pytest
import torch

from ddpm_engine.engine.errors import BackendUnavailableError, EngineFileError
from ddpm_engine.export import build, check_engine_dir, read_manifest
from ddpm_engine.export.manifest import write_manifest
from export_standin import TinyUNet, single_thread

BATCH, SIZE = (1, 1, 2), ((16, 16), (16, 16), (24, 24))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("pristine") / "engine"
    with single_thread():
        build(TinyUNet().eval(), directory, backend="openvino", precision="fp32", batch=BATCH, size=SIZE, verify=False)
    return directory


@pytest.fixture
def engine(pristine, tmp_path):
    directory = tmp_path / "engine"
    shutil.copytree(pristine, directory)
    return directory


def _edit(directory, fn):
    m = json.loads((directory / "engine.json").read_text())
    fn(m)
    write_manifest(directory, m)


def test_pristine_engine_passes_every_cpu_backend(engine):
    for backend in ("openvino", "onnxruntime", "torch"):
        assert check_engine_dir(engine, backend)["backend"] == "openvino"
    assert check_engine_dir(engine)["backend"] == "openvino"  # default: the backend it was built for


def test_missing_directory_and_missing_manifest(tmp_path, engine):
    with pytest.raises(EngineFileError, match="does not exist; build it with `ddpm-engine build MODEL -o"):
        check_engine_dir(tmp_path / "nope")
    (engine / "engine.json").unlink()
    with pytest.raises(EngineFileError, match="has no engine.json"):
        check_engine_dir(engine)


def test_corrupt_manifest(engine):
    (engine / "engine.json").write_bytes(b"\x00\xff garbage {{{")
    with pytest.raises(EngineFileError, match="corrupt or truncated .*rebuild it with"):
        read_manifest(engine)


def test_truncated_manifest(engine):
    text = (engine / "engine.json").read_text()
    (engine / "engine.json").write_text(text[: len(text) // 2])
    with pytest.raises(EngineFileError, match="corrupt or truncated"):
        check_engine_dir(engine, "openvino")


def test_manifest_missing_required_keys(engine):
    _edit(engine, lambda m: (m.pop("artefacts"), m.pop("profile")))
    with pytest.raises(EngineFileError, match="truncated or damaged: missing profile, artefacts"):
        read_manifest(engine)


def test_foreign_json_is_not_a_manifest(engine):
    (engine / "engine.json").write_text(json.dumps({"hello": "world"}))
    with pytest.raises(EngineFileError, match="not a ddpm-engine manifest"):
        read_manifest(engine)


def test_other_format_version(engine):
    _edit(engine, lambda m: m.update(format_version=99))
    with pytest.raises(EngineFileError, match="format version 99, this ddpm-engine reads version 1; rebuild"):
        check_engine_dir(engine)


@pytest.mark.parametrize("rel", ["model.onnx", "openvino/model.bin", "model/model.safetensors"])
def test_truncated_artefact(engine, rel):
    data = (engine / rel).read_bytes()
    (engine / rel).write_bytes(data[: len(data) // 2])
    backend = {"model.onnx": "onnxruntime", "openvino/model.bin": "openvino", "model/model.safetensors": "torch"}[rel]
    with pytest.raises(EngineFileError, match=f"{rel} is corrupt, truncated .*sha256 mismatch.*--backend {backend}"):
        check_engine_dir(engine, backend)


def test_corrupt_artefact_same_size(engine):
    path = engine / "openvino" / "model.xml"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(EngineFileError, match="openvino/model.xml is corrupt"):
        check_engine_dir(engine, "openvino")


def test_missing_artefact_file(engine):
    (engine / "openvino" / "model.bin").unlink()
    with pytest.raises(EngineFileError, match="openvino file openvino/model.bin is missing; rebuild it with "
                                              r"`ddpm-engine build .* --backend openvino`"):
        check_engine_dir(engine, "openvino")


def test_artefact_from_another_build_is_refused(engine, tmp_path):
    torch.manual_seed(1)
    other = tmp_path / "other"
    build(TinyUNet().eval(), other, backend="onnxruntime", batch=BATCH, size=SIZE, verify=False)
    shutil.copy(other / "model.onnx", engine / "model.onnx")
    with pytest.raises(EngineFileError, match="model.onnx is corrupt, truncated or not the one this manifest"):
        check_engine_dir(engine, "onnxruntime")


def test_backend_without_artefact_says_how_to_build_it(engine):
    _edit(engine, lambda m: m["artefacts"].pop("openvino"))
    with pytest.raises(EngineFileError, match="has no openvino artefact; build it with `ddpm-engine build .* --backend "
                                              "openvino`"):
        check_engine_dir(engine, "openvino")


def test_other_openvino_version(engine):
    _edit(engine, lambda m: m["artefacts"]["openvino"]["library"].update(version="2024.1.0"))
    with pytest.raises(EngineFileError, match="written by OpenVINO 2024.1.0, this machine has .*--backend openvino"):
        check_engine_dir(engine, "openvino")


def test_onnx_verified_by_newer_onnxruntime(engine):
    _edit(engine, lambda m: m["artefacts"]["onnxruntime"]["library"].update(version="99.0.0"))
    with pytest.raises(EngineFileError, match="ONNX Runtime 99.0.0, this machine has the older"):
        check_engine_dir(engine, "onnxruntime")


def _fake_tensorrt(monkeypatch, version, gpu):
    import ddpm_engine.export.engine_dir as engine_dir
    import ddpm_engine.export.tensorrt_build as tensorrt_build

    monkeypatch.setattr(tensorrt_build, "require_tensorrt", lambda: types.SimpleNamespace(__version__=version))
    monkeypatch.setattr(engine_dir, "gpu_info", lambda: gpu)


def _add_tensorrt_entry(engine, version, gpu):
    (engine / "tensorrt").mkdir()
    (engine / "tensorrt" / "model.plan").write_bytes(b"plan bytes")
    from ddpm_engine.export.manifest import sha256_file

    entry = {"backend": "tensorrt", "path": "tensorrt/model.plan",
             "files": {"tensorrt/model.plan": sha256_file(engine / "tensorrt" / "model.plan")},
             "library": {"name": "tensorrt", "version": version}, "gpu": gpu}
    _edit(engine, lambda m: m["artefacts"].update(tensorrt=entry))


H100 = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "cuda": "13.0"}
A100 = {"name": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0", "cuda": "13.0"}


def test_tensorrt_plan_for_another_gpu_is_refused(engine, monkeypatch):
    _add_tensorrt_entry(engine, "11.4.0", A100)
    _fake_tensorrt(monkeypatch, "11.4.0", H100)
    with pytest.raises(EngineFileError, match=r"built for NVIDIA A100.*\(compute capability 8.0\), this machine has "
                                              r"NVIDIA H100.*rebuild it on this GPU"):
        check_engine_dir(engine, "tensorrt")
    _fake_tensorrt(monkeypatch, "11.4.0", A100)
    check_engine_dir(engine, "tensorrt")


def test_hardware_compatible_plan_runs_on_other_gpus_of_its_class(engine, monkeypatch):
    _add_tensorrt_entry(engine, "11.4.0", A100)
    _edit(engine, lambda m: m["artefacts"]["tensorrt"].update(settings={"hardware_compatibility": "AMPERE_PLUS"}))
    _fake_tensorrt(monkeypatch, "11.4.0", H100)
    check_engine_dir(engine, "tensorrt")
    _fake_tensorrt(monkeypatch, "11.4.0", {"name": "Tesla V100", "compute_capability": "7.0", "cuda": "12.0"})
    with pytest.raises(EngineFileError, match="built for NVIDIA A100"):
        check_engine_dir(engine, "tensorrt")


def test_tensorrt_plan_from_another_tensorrt_version_is_refused(engine, monkeypatch):
    _add_tensorrt_entry(engine, "11.3.0", H100)
    _fake_tensorrt(monkeypatch, "11.4.0", H100)
    with pytest.raises(EngineFileError, match="built with TensorRT 11.3.0, this machine has 11.4.0"):
        check_engine_dir(engine, "tensorrt")


def test_tensorrt_plan_on_a_machine_without_tensorrt(engine):
    from ddpm_engine.export.tensorrt_build import tensorrt_status

    if tensorrt_status()[0]:
        pytest.skip("TensorRT and a GPU are present here")
    _add_tensorrt_entry(engine, "11.4.0", H100)
    with pytest.raises(BackendUnavailableError, match="TensorRT|NVIDIA GPU"):
        check_engine_dir(engine, "tensorrt")


def test_unknown_backend(engine):
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        check_engine_dir(engine, "tpu")
