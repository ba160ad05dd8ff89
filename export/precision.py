"""fp16 / bf16 ONNX graphs made at the ONNX level, keeping norms, softmax and reductions in fp32."""
from __future__ import annotations

from collections import defaultdict

import numpy as np

PRECISIONS = ("fp32", "fp16", "bf16")

# Ops whose arithmetic overflows or loses too much in 16 bits (sums of squares over H*W overflow fp16 at
# 300x300; variance, exp and sinusoids need the mantissa): always computed in fp32 with casts around them.
FP32_OPS = frozenset({
    "LayerNormalization", "GroupNormalization", "InstanceNormalization", "BatchNormalization",
    "LpNormalization", "MeanVarianceNormalization", "RMSNormalization", "SkipLayerNormalization",
    "Softmax", "LogSoftmax",
    "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp",
    "ReduceProd", "CumSum",
    "Pow", "Sqrt", "Reciprocal", "Exp", "Log", "Sin", "Cos", "Range",
})
REDUCTIONS = frozenset(op for op in FP32_OPS if op.startswith("Reduce") or op in ("CumSum",))
# The heavy ops (all the FLOPs): always in reduced precision, which is the point of the conversion.
HEAVY_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm", "Einsum"})
# TensorRT has no bf16 Resize: keep it fp32 in bf16 graphs.
FP32_OPS_BF16 = frozenset({"Resize"})

_NAMES = {"fp16": "float16", "bf16": "bfloat16"}


def _onnx_type(precision: str) -> int:
    from onnx import TensorProto

    return {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16, "fp32": TensorProto.FLOAT}[precision]


def _convert_array(arr: np.ndarray, precision: str) -> np.ndarray:
    if precision == "fp16":
        # Out-of-range constants (e.g. -1e9 masks) become +-65504, not inf.
        return np.clip(arr, -65504.0, 65504.0).astype(np.float16)
    import ml_dtypes

    return arr.astype(ml_dtypes.bfloat16)


def _to_tensor(arr: np.ndarray, name: str, precision: str):
    from onnx import numpy_helper

    return numpy_helper.from_array(_convert_array(arr, precision), name)


_PROTO_LIMIT = 2 * 1024**3 - 64 * 1024**2


def _without_data(model):
    """Copy of a graph whose initializers keep name, type and dims but no data (fits in protobuf's 2 GB)."""
    import onnx

    light = onnx.ModelProto()
    light.CopyFrom(model)
    for init in light.graph.initializer:
        for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
            init.ClearField(field)
        del init.external_data[:]
        init.data_location = onnx.TensorProto.DEFAULT
    return light


def _upgrade_opset(model, version: int):
    """onnx.version_converter to `version`; big graphs are converted without their weights, which are then put
    back by initializer name (the converter rewrites nodes, not weights)."""
    from onnx import version_converter

    if model.ByteSize() < _PROTO_LIMIT:
        return version_converter.convert_version(model, version)
    data = {i.name: i for i in model.graph.initializer}
    out = version_converter.convert_version(_without_data(model), version)
    for init in out.graph.initializer:
        if init.name in data:
            init.CopyFrom(data[init.name])
    return out


def _infer(model):
    """Shape/type inference; above protobuf's 2 GB it runs on a copy whose initializers carry no data (types and
    dims are all inference needs), and the result is applied to the real graph."""
    import onnx

    if model.ByteSize() < _PROTO_LIMIT:
        return onnx.shape_inference.infer_shapes(model, strict_mode=False)
    light = onnx.shape_inference.infer_shapes(_without_data(model), strict_mode=False)
    del model.graph.value_info[:]
    model.graph.value_info.extend(light.graph.value_info)
    return model


def _float_values(model) -> dict[str, int]:
    """elem_type of every typed value (inputs, outputs, initializers, inferred intermediates)."""
    inferred = _infer(model)
    g = inferred.graph
    types = {}
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    for init in g.initializer:
        types[init.name] = init.data_type
    for node in g.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    types[node.output[0]] = a.t.data_type
    return types


def is_channel_mean(weights: np.ndarray) -> bool:
    """Whether Conv weights are a mean over channels: [1, C, 1, 1], all equal (models.layers.LayerNorm2d's export
    form). Such a Conv is a reduction: kept fp32 by the fp16/bf16 conversion and out of int8 (quantize)."""
    return weights.ndim == 4 and weights.shape[0] == 1 and weights.shape[2:] == (1, 1) and bool(
        (weights == weights.flat[0]).all())


def plan_precision(model, precision: str, keep_fp32_ops=frozenset()) -> dict[int, str]:
    """Decide, per node index, 'low' or 'fp32' (nodes touching no float tensor are absent).

    Rules, in order: nodes that do not depend on the image input (the timestep embedding) stay fp32 (they are
    tiny and feed every block); FP32_OPS stay fp32; heavy ops go low; other ops stay fp32 when all their
    non-constant float inputs are fp32, or when an fp32 input is a reduction over their other input (the
    `x - mean(x)`, `x * rsqrt(mean(x^2))` and `x * (g / mean(g))` of decomposed norms); the rest go low.
    """
    from onnx import TensorProto, numpy_helper

    g = model.graph
    types = _float_values(model)
    fp32_ops = FP32_OPS | set(keep_fp32_ops) | (FP32_OPS_BF16 if precision == "bf16" else set())
    is_float = lambda name: types.get(name) == TensorProto.FLOAT  # noqa: E731
    consts = {i.name for i in g.initializer}
    consts |= {n.output[0] for n in g.node if n.op_type == "Constant"}
    graph_inputs = {vi.name: vi for vi in g.input if vi.name not in consts}
    # Image-like inputs: rank >= 3 (sample [B, C, H, W]); the timestep [B] is not one.
    spatial = {name for name, vi in graph_inputs.items()
               if len(vi.type.tensor_type.shape.dim) >= 3 and is_float(name)}
    weights = {i.name: i for i in g.initializer}
    weights |= {n.output[0]: _value_attr(n).t for n in g.node if n.op_type == "Constant" and _value_attr(n)}

    def averaging(node) -> bool:  # a norm's mean over channels written as a Conv: stays fp32 like ReduceMean
        w = weights.get(node.input[1]) if node.op_type == "Conv" and len(node.input) == 2 else None
        return w is not None and is_channel_mean(numpy_helper.to_array(w))

    producer: dict[str, int] = {}
    plan: dict[int, str] = {}
    # For each fp32 value, the set of tensors it is a reduction of (walking back through fp32 nodes).
    reduced_from: dict[str, set[str]] = defaultdict(set)
    for idx, node in enumerate(g.node):
        for out in node.output:
            producer[out] = idx
        if node.op_type == "Constant":
            continue
        float_in = [i for i in node.input if i and is_float(i)]
        float_out = [o for o in node.output if is_float(o)]
        if not float_in and not float_out:
            continue
        live_in = [i for i in float_in if i not in consts]
        if any(i in spatial for i in live_in):
            spatial.update(node.output)
        if not any(i in spatial for i in live_in) and not (node.op_type in HEAVY_OPS and not live_in):
            mode = "fp32"
        elif node.op_type in fp32_ops or averaging(node):
            mode = "fp32"
        elif node.op_type in HEAVY_OPS:
            mode = "low"
        else:
            in_modes = [_value_mode(i, producer, plan, graph_inputs) for i in live_in]
            fp32_in = [i for i, m in zip(live_in, in_modes) if m == "fp32"]
            low_in = [i for i, m in zip(live_in, in_modes) if m != "fp32"]
            if live_in and not low_in:
                mode = "fp32"
            elif fp32_in and any(reduced_from[f] & (set(low_in) | _sources(low_in, reduced_from)) for f in fp32_in):
                mode = "fp32"
            else:
                mode = "low"
        plan[idx] = mode
        if mode == "fp32":
            derived = set()
            for i in live_in:
                derived |= reduced_from.get(i, set())
            if node.op_type in REDUCTIONS or averaging(node):
                derived |= set(live_in)
                # Also what a square/abs/centring just before the reduction was applied to: in
                # y / sqrt(sum(y * y)) the reduction is over y*y, but the Div pairs its result with y.
                for i in live_in:
                    if i in producer and g.node[producer[i]].op_type in ("Mul", "Pow", "Abs", "Sub"):
                        derived |= {j for j in g.node[producer[i]].input if j and is_float(j)}
            for out in node.output:
                reduced_from[out] = set(derived)
    return plan


def _sources(names, reduced_from) -> set[str]:
    out = set()
    for n in names:
        out |= reduced_from.get(n, set())
    return out


def _value_mode(name: str, producer, plan, graph_inputs) -> str:
    if name in producer:
        return plan.get(producer[name], "fp32")
    return "fp32"  # graph inputs arrive as fp32 (a reduced-precision input is cast up/down explicitly)


def _value_attr(node):
    return next((a for a in node.attribute if a.name == "value"), None)


def convert_precision(model, precision: str, *, keep_io_types: bool = True, keep_fp32_ops=frozenset()):
    """Return a copy of an fp32 ModelProto whose heavy ops run in fp16/bf16, with Casts at every boundary.

    keep_io_types=True keeps `sample`, `timestep` and `eps` fp32 (the runtime's buffers stay fp32; the casts
    are fused by TensorRT); False makes the I/O the reduced type. bf16 graphs are raised to opset 22, the first
    where Conv/ConvTranspose accept bfloat16.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if precision == "fp32":
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        return copy
    if precision not in _NAMES:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if precision == "bf16" and opset < 22:
        model = _upgrade_opset(model, 22)
    else:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)  # not SerializeToString: that fails above 2 GB
        model = copy
    low = _onnx_type(precision)
    types = _float_values(model)
    plan = plan_precision(model, precision, keep_fp32_ops)
    g = model.graph
    FLOAT = TensorProto.FLOAT

    inits = {i.name: i for i in g.initializer}
    const_nodes = {n.output[0]: n for n in g.node if n.op_type == "Constant"}
    # Which dtype each consumer wants for each float value.
    wants: dict[str, set[str]] = defaultdict(set)
    for idx, node in enumerate(g.node):
        mode = plan.get(idx)
        if mode is None:
            continue
        for i in node.input:
            if i and types.get(i) == FLOAT:
                wants[i].add(mode)
    for o in g.output:
        if types.get(o.name) == FLOAT:
            wants[o.name].add("fp32" if keep_io_types else "low")

    # Constants: convert in place when only low consumers use them, else keep fp32 and add a low copy.
    low_copy: dict[str, str] = {}
    new_inits = []
    for name, modes in wants.items():
        if name in inits and inits[name].data_type == FLOAT:
            arr = numpy_helper.to_array(inits[name])
            if modes == {"low"}:
                inits[name].CopyFrom(_to_tensor(arr, name, precision))
                types[name] = low
            elif "low" in modes:
                low_copy[name] = f"{name}__{precision}"
                new_inits.append(_to_tensor(arr, low_copy[name], precision))
        elif name in const_nodes:
            attr = _value_attr(const_nodes[name])
            if attr is None or attr.t.data_type != FLOAT:
                continue  # value_float(s) constants stay fp32 and get a Cast like any fp32 tensor
            arr = numpy_helper.to_array(attr.t)
            if modes == {"low"}:
                attr.t.CopyFrom(_to_tensor(arr, attr.t.name, precision))
                types[name] = low
            elif "low" in modes:
                low_copy[name] = f"{name}__{precision}"
                new_inits.append(_to_tensor(arr, low_copy[name], precision))
    g.initializer.extend(new_inits)

    # Dtype each produced float value will have after conversion.
    produced: dict[str, int] = {}
    for vi in g.input:
        if types.get(vi.name) == FLOAT and vi.name not in inits:
            if not keep_io_types:
                vi.type.tensor_type.elem_type = low
                types[vi.name] = low
            produced[vi.name] = types[vi.name]
    for name in inits:
        produced[name] = inits[name].data_type
    for name, n in const_nodes.items():
        attr = _value_attr(n)
        produced[name] = attr.t.data_type if attr is not None else types.get(name, FLOAT)

    new_nodes = []
    casts: dict[tuple[str, int], str] = {}

    def cast(name: str, to: int) -> str:
        key = (name, to)
        if key not in casts:
            out = f"{name}__cast_{'fp32' if to == FLOAT else precision}"
            new_nodes.append(helper.make_node("Cast", [name], [out], to=to, name=f"{out}_node"))
            casts[key] = out
        return casts[key]

    for idx, node in enumerate(g.node):
        mode = plan.get(idx)
        if node.op_type == "Constant" or mode is None:
            new_nodes.append(node)
            for o in node.output:
                if o not in produced and types.get(o) == FLOAT:
                    produced[o] = FLOAT
            continue
        target = low if mode == "low" else FLOAT
        for k, i in enumerate(node.input):
            if not i or i not in produced or produced[i] not in (FLOAT, low):
                continue
            if produced[i] == target:
                continue
            if target == low and i in low_copy:
                node.input[k] = low_copy[i]
            else:
                node.input[k] = cast(i, target)
        if mode == "low":
            for a in node.attribute:
                # Casts to float and float fills inside the low region produce the low type instead.
                if node.op_type == "Cast" and a.name == "to" and a.i == FLOAT:
                    a.i = low
                if node.op_type == "ConstantOfShape" and a.name == "value" and a.t.data_type == FLOAT:
                    a.t.CopyFrom(_to_tensor(numpy_helper.to_array(a.t), a.t.name, precision))
        new_nodes.append(node)
        for o in node.output:
            if types.get(o) == FLOAT or (node.op_type == "Cast" and mode == "low" and types.get(o) == FLOAT):
                produced[o] = target

    # Graph outputs: rename the producer's tensor and cast it to the I/O type under the output's name.
    renames = {}
    for o in g.output:
        if types.get(o.name) != FLOAT:
            continue
        want = FLOAT if keep_io_types else low
        if produced.get(o.name, FLOAT) != want:
            inner = f"{o.name}__{'fp32' if produced[o.name] == FLOAT else precision}"
            renames[o.name] = inner
        o.type.tensor_type.elem_type = want
    if renames:
        for node in new_nodes:
            for k, out in enumerate(node.output):
                if out in renames:
                    node.output[k] = renames[out]
            for k, i in enumerate(node.input):
                if i in renames:
                    node.input[k] = renames[i]
        for name, inner in renames.items():
            want = FLOAT if keep_io_types else low
            new_nodes.append(helper.make_node("Cast", [inner], [name], to=want, name=f"{name}_output_cast"))
    del g.node[:]
    g.node.extend(new_nodes)
    del g.value_info[:]  # stale dtypes; re-inferred below
    model = _infer(model)
    if model.ByteSize() < _PROTO_LIMIT:
        onnx.checker.check_model(model)  # big graphs are checked by the runtimes that verify them
    return model


def precision_summary(model) -> dict[str, dict[str, int]]:
    """Count of nodes per op type by the dtype of their first float input ('float32', 'float16', ...)."""
    from onnx import TensorProto

    g = _infer(model).graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in list(g.input) + list(g.output) + list(g.value_info)}
    types.update({i.name: i.data_type for i in g.initializer})
    names = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16", TensorProto.BFLOAT16: "bfloat16"}
    out: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for node in g.node:
        dt = next((names[types[i]] for i in node.input if types.get(i) in names), None)
        if dt and node.op_type != "Cast":
            out[node.op_type][dt] += 1
    return {k: dict(v) for k, v in out.items()}
