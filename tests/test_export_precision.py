"""fp16 / bf16 ONNX graphs: norms, softmax and reductions stay fp32; verified vs PyTorch; overflow is caught.

The rules and the runtime checks run on the stand-in net and on a small CARE-SST U-Net (fixture export_net)."""
import onnx
import pytest
import torch
from onnx import TensorProto

from ddpm_engine.export import TOLERANCES, VerificationError, convert_precision, export_onnx, verify_onnx
from ddpm_engine.export.precision import is_channel_mean, precision_summary
from export_standin import LoudNet, SumSquaresNet, single_thread

CASES = [(1, 24, 24), (3, 37, 29), (2, 40, 40)]
# Ops each net has that must stay fp32: the stand-in spells a norm out (Pow, Sqrt); CARE-SST exports its channel
# LayerNorm spelled out too (ReduceMean, Sqrt), and has GRN and softmaxes over features and over keys + memory
# slots (linear attention) and over keys (full attention).
KEPT_FP32 = {"standin": ("LayerNormalization", "Softmax", "ReduceMean", "ReduceL2", "Pow", "Sqrt", "Sin", "Cos"),
             "care-sst": ("Softmax", "ReduceMean", "ReduceL2", "Sqrt", "Sin", "Cos")}


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def fp32_graph(export_net, tmp_path_factory):
    path = tmp_path_factory.mktemp("prec") / "model.onnx"
    with single_thread():
        export_onnx(export_net[1], path, opt_size=(24, 24))
    return path


def _input_dtypes(model, op_type, skip=frozenset(), only=None):
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(g.input) + list(g.output) + list(g.value_info)}
    types.update({i.name: i.data_type for i in g.initializer})
    return [types.get(n.input[0]) for n in g.node if n.op_type == op_type and n.name not in skip
            and (only is None or n.name in only)]


def _channel_means(model):
    """Names of the 1x1 Convs with one output channel and equal weights (means over channels)."""
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    weights |= {n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node
                if n.op_type == "Constant" and n.attribute[0].name == "value"}
    return {n.name for n in model.graph.node
            if n.op_type == "Conv" and n.input[1] in weights and is_channel_mean(weights[n.input[1]])}


def _norm_divisions(model):
    """Input dtypes of each Div whose divisor is a Sqrt, and of the Sub producing its numerator."""
    g = onnx.shape_inference.infer_shapes(model).graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(g.input) + list(g.output) + list(g.value_info)}
    producer = {o: n for n in g.node for o in n.output}
    dtypes = []
    for n in g.node:
        if n.op_type == "Div" and getattr(producer.get(n.input[1]), "op_type", None) == "Sqrt":
            numerator = producer.get(n.input[0])
            dtypes += [types.get(i) for i in n.input]
            if getattr(numerator, "op_type", None) == "Sub":
                dtypes += [types.get(i) for i in numerator.input]
    return dtypes


@pytest.mark.parametrize("precision,low", [("fp16", TensorProto.FLOAT16), ("bf16", TensorProto.BFLOAT16)])
def test_conversion_keeps_norms_softmax_reductions_fp32_and_convs_low(export_net, fp32_graph, precision, low):
    name = export_net[0]
    model = convert_precision(onnx.load(str(fp32_graph)), precision)
    print(name, precision, precision_summary(model))
    for op in KEPT_FP32[name] + ("Gemm",):  # Gemm: the timestep MLP, which feeds every block
        dtypes = _input_dtypes(model, op)
        assert dtypes and set(dtypes) == {TensorProto.FLOAT}, (op, dtypes)
    for op in ("Conv", "ConvTranspose", "MatMul", "Einsum"):
        dtypes = _input_dtypes(model, op, skip=_channel_means(model))
        assert dtypes and set(dtypes) == {low}, (op, dtypes)
    # CARE-SST's channel LayerNorm takes its means with 1x1 convs of equal weights: those stay fp32 (2 per norm).
    means = _channel_means(model)
    assert len(means) == (80 if name == "care-sst" else 0)
    assert set(_input_dtypes(model, "Conv", only=means)) <= {TensorProto.FLOAT}
    # The decomposed norms (x - mean) / sqrt(var + eps): every Div by a Sqrt, and the Sub centring its numerator,
    # stay fp32 too (CARE-SST: 40 norms).
    assert _norm_divisions(model) and set(_norm_divisions(model)) == {TensorProto.FLOAT}
    # I/O stays fp32 by default; bf16 graphs are raised to opset 22 (bf16 Conv).
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    if precision == "bf16":
        assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 22


def test_reduced_io_on_request(fp32_graph):
    model = convert_precision(onnx.load(str(fp32_graph)), "fp16", keep_io_types=False)
    assert [i.type.tensor_type.elem_type for i in model.graph.input] == [TensorProto.FLOAT16] * 2
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16


def test_fp16_graph_in_onnxruntime_matches_pytorch(export_net, fp32_graph, tmp_path):
    name, net = export_net
    path = tmp_path / "model.fp16.onnx"
    onnx.save(convert_precision(onnx.load(str(fp32_graph)), "fp16"), str(path))
    report = verify_onnx(path, net, CASES, precision="fp16", fp32_graph=fp32_graph)
    assert report.range_check["checked"] and report.range_check["max_abs"] < 65504
    print(f"{name} fp16 ONNX Runtime vs PyTorch: max abs error {report.max_abs_err:.3g} (tolerance {report.tolerance:g})")
    assert report.max_abs_err < TOLERANCES["fp16"]
    assert report.max_abs_err > 1e-6  # it really ran in reduced precision


@pytest.mark.parametrize("keep_io", [True, False])
def test_bf16_graph_in_openvino_matches_pytorch(export_net, fp32_graph, tmp_path, keep_io):
    # ONNX Runtime's CPU provider has no bf16 kernels; OpenVINO runs the graph with its own bf16/fp32 types.
    name, net = export_net
    path = tmp_path / "model.bf16.onnx"
    onnx.save(convert_precision(onnx.load(str(fp32_graph)), "bf16", keep_io_types=keep_io), str(path))
    report = verify_onnx(path, net, CASES, precision="bf16", runtime="openvino")
    print(f"{name} bf16 (io fp32={keep_io}) OpenVINO vs PyTorch: max abs error {report.max_abs_err:.3g} "
          f"(tolerance {report.tolerance:g})")
    assert 1e-5 < report.max_abs_err < TOLERANCES["bf16"]


def test_fp16_overflow_is_refused_naming_the_tensor(tmp_path):
    # The CPU runtimes fuse fp16 casts away and compute in fp32, so the check runs the fp32 graph with every
    # tensor the fp16 graph stores in fp16 exposed, and refuses any above 65504.
    net = LoudNet().eval()
    export_onnx(net, tmp_path / "loud.onnx", opt_size=(8, 8))
    verify_onnx(tmp_path / "loud.onnx", net, [(1, 8, 8)], tolerance=1.0)  # fine in fp32
    onnx.save(convert_precision(onnx.load(str(tmp_path / "loud.onnx")), "fp16"), str(tmp_path / "loud16.onnx"))
    with pytest.raises(VerificationError, match=r"overflows: tensor '.*' reaches \|x\| = .* > 65504"):
        verify_onnx(tmp_path / "loud16.onnx", net, [(1, 8, 8)], precision="fp16", tolerance=1.0,
                    fp32_graph=tmp_path / "loud.onnx")


def test_non_finite_output_is_refused(tmp_path):
    class NaNNet(torch.nn.Module):
        c_in, c_out = 2, 1

        def forward(self, x, t):
            return torch.sqrt(x[:, :1] - 100.0) + t[:, None, None, None]  # NaN everywhere in ONNX and torch

    net = NaNNet()
    export_onnx(net, tmp_path / "nan.onnx", opt_size=(8, 8), dynamic_hw=False)
    with pytest.raises(VerificationError, match="inf/NaN"):
        verify_onnx(tmp_path / "nan.onnx", net, [(1, 8, 8)])


def test_sum_of_squares_over_large_image_does_not_overflow_fp16(tmp_path):
    # 300x300 unit values: sum of squares ~ 9e4 > 65504 (fp16 max); the reduction must run in fp32.
    net = SumSquaresNet().eval()
    export_onnx(net, tmp_path / "ss.onnx", opt_size=(16, 16))
    model = convert_precision(onnx.load(str(tmp_path / "ss.onnx")), "fp16")
    assert set(_input_dtypes(model, "ReduceSum")) == {TensorProto.FLOAT}
    onnx.save(model, str(tmp_path / "ss16.onnx"))
    report = verify_onnx(tmp_path / "ss16.onnx", net, [(1, 300, 300)], precision="fp16", fp32_graph=tmp_path / "ss.onnx")
    print(f"fp16 L2-normalised 300x300: max abs error {report.max_abs_err:.3g}, largest fp16 tensor "
          f"{report.range_check['max_abs']:.3g}")
    assert report.range_check["max_abs"] < 65504


@pytest.mark.parametrize("precision,runtime", [("fp16", "onnxruntime"), ("bf16", "openvino")])
def test_conversion_of_graphs_above_protobuf_limit(export_net, fp32_graph, tmp_path, monkeypatch, precision, runtime):
    # Above 2 GB, inference and the opset upgrade run on a weight-less copy; a tiny limit takes that path here.
    import ddpm_engine.export.precision as precision_mod

    monkeypatch.setattr(precision_mod, "_PROTO_LIMIT", 10)
    path = tmp_path / f"model.{precision}.onnx"
    onnx.save(convert_precision(onnx.load(str(fp32_graph)), precision), str(path))
    report = verify_onnx(path, export_net[1], CASES[:2], precision=precision, runtime=runtime)
    assert report.max_abs_err < TOLERANCES[precision]
