"""ONNX export: names, dynamic batch and H/W at odd sizes, static fallback, external data, verification errors.

Export, odd sizes and the verification error run on the stand-in net and on a small CARE-SST U-Net (export_net)."""
import copy

import onnx
import pytest
import torch

from ddpm_engine.export import TOLERANCES, VerificationError, export_onnx, verify_onnx
from export_standin import FixedSizeNet, single_thread


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def net_onnx(export_net, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    with single_thread():
        return export_onnx(export_net[1], path, opt_size=(24, 24))


def test_export_names_and_dynamic_axes(net_onnx):
    proto = onnx.load(str(net_onnx.path))
    assert [i.name for i in proto.graph.input] == ["sample", "timestep"]
    assert [o.name for o in proto.graph.output] == ["eps"]
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 2, "height", "width"]
    assert net_onnx.dynamic_hw and not net_onnx.external_data and net_onnx.files == [net_onnx.path]


def test_dynamic_graph_matches_pytorch_at_odd_sizes_and_batches(export_net, net_onnx):
    name, net = export_net
    report = verify_onnx(net_onnx.path, net, [(1, 24, 24), (3, 37, 29), (2, 75, 75), (5, 9, 13)])
    print(f"{name} fp32 ONNX Runtime vs PyTorch:", [(c["batch"], c["height"], c["width"], f"{c['max_abs_err']:.2e}")
                                           for c in report.cases])
    assert report.max_abs_err < TOLERANCES["fp32"]
    assert {(c["height"], c["width"]) for c in report.cases} >= {(37, 29), (75, 75)}


def test_verification_failure_names_worst_case_and_error(export_net, net_onnx):
    other = copy.deepcopy(export_net[1])  # same architecture, other weights
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.1 * torch.randn_like(p))
    with pytest.raises(VerificationError) as err:
        verify_onnx(net_onnx.path, other, [(1, 24, 24), (2, 37, 29)])
    msg = str(err.value)
    assert "eps at batch" in msg and "max abs error" in msg and "tolerance 0.0001" in msg


def test_model_with_baked_size_falls_back_to_static_with_note(tmp_path):
    net = FixedSizeNet().eval()
    info = export_onnx(net, tmp_path / "m.onnx", opt_size=(8, 8))
    assert not info.dynamic_hw
    assert "static size 8x8" in info.note
    dims = [d.dim_param or d.dim_value for d in onnx.load(str(info.path)).graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 2, 8, 8]
    verify_onnx(info.path, net, [(1, 8, 8), (3, 8, 8)])


def test_large_model_gets_external_data_file(tiny, tmp_path):
    # A threshold of 1 kB stands in for protobuf's 2 GB limit.
    info = export_onnx(tiny, tmp_path / "big.onnx", opt_size=(16, 16), external_data_threshold=1024)
    assert info.external_data and (tmp_path / "big.onnx.data").is_file()
    proto = onnx.load(str(tmp_path / "big.onnx"), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    verify_onnx(info.path, tiny, [(2, 19, 17)])


def test_optional_simplification_is_kept_only_when_it_helps(tiny, tmp_path, monkeypatch):
    pytest.importorskip("onnxslim")
    import ddpm_engine.export.simplify as simplify_mod
    from ddpm_engine.export import build

    # Latency is noisy on a shared machine: pin it to test both decisions.
    monkeypatch.setattr(simplify_mod, "_median_latency", lambda *a, **k: 0.01)
    kw = dict(backend="onnxruntime", precision="fp16", batch=(1, 1, 2), size=((16, 16), (24, 24), (40, 40)))
    result = build(tiny, tmp_path / "e", simplify=True, **kw)
    info = result.manifest["artefacts"]["onnx"]["simplified"]
    assert info["kept"] and info["nodes_after"] < info["nodes_before"]
    assert len(onnx.load(str(tmp_path / "e" / "model.onnx")).graph.node) == info["nodes_after"]
    assert result.manifest["artefacts"]["onnx_fp16"]["verification"]["max_abs_err"] < TOLERANCES["fp16"]
    calls = iter([0.01, 0.02])  # simplified graph twice as slow: the original stays
    monkeypatch.setattr(simplify_mod, "_median_latency", lambda *a, **k: next(calls))
    slower = build(tiny, tmp_path / "f", simplify=True, **kw).manifest["artefacts"]["onnx"]["simplified"]
    assert not slower["kept"] and len(onnx.load(str(tmp_path / "f" / "model.onnx")).graph.node) == slower["nodes_before"]
