"""Export a noise-prediction U-Net to ONNX (sample, timestep -> eps) and verify it against PyTorch."""
from __future__ import annotations

import copy
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ddpm_engine.engine.errors import EngineError

INPUT_NAMES = ("sample", "timestep")
OUTPUT_NAMES = ("eps",)
DEFAULT_OPSET = 17  # LayerNormalization is a single op from 17; TensorRT 11, ORT and OpenVINO all parse it
# Protobuf cannot hold a message above 2 GiB, so bigger graphs keep their weights in a side file.
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3 - 64 * 1024**2
# Odd sizes a U-Net with stride-2 stages must survive (75 -> 37 -> 18 and back, padded to the skip).
ODD_SIZES = ((37, 29), (75, 75))

# Threads for verification runs (torch, ONNX Runtime, OpenVINO); unset = the libraries' defaults. On a loaded
# machine, 1 avoids oversubscription stalls (a 2-thread torch forward can be 50x slower than a 1-thread one).
VERIFY_THREADS_ENV = "DDPM_ENGINE_VERIFY_THREADS"

# Max abs error vs PyTorch, scaled by max(1, max |eps_torch|), that verification accepts per precision.
# tf32: an fp32 TensorRT plan built with TF32 on (fp16's 10-bit mantissa in products, fp32 range and sums).
TOLERANCES = {"fp32": 1e-4, "tf32": 1e-2, "fp16": 2e-2, "bf16": 1e-1}


class VerificationError(EngineError):
    """The exported graph disagrees with PyTorch beyond tolerance, or overflows to inf/NaN."""


@dataclass
class ExportInfo:
    """What the export produced: files, opset, and whether H/W stayed dynamic."""

    path: Path
    files: list[Path]
    opset: int
    dynamic_hw: bool
    external_data: bool
    note: str = ""
    simplified: dict | None = None  # what export/simplify.py measured, when it ran


@dataclass
class VerifyReport:
    """Per-case errors of one verification run; `worst` is the case with the largest scaled error."""

    runtime: str
    precision: str
    tolerance: float
    cases: list[dict] = field(default_factory=list)
    range_check: dict | None = None

    @property
    def worst(self) -> dict:
        return max(self.cases, key=lambda c: c["scaled_err"])

    @property
    def max_abs_err(self) -> float:
        return max(c["max_abs_err"] for c in self.cases)

    def as_dict(self) -> dict:
        return {
            "runtime": self.runtime,
            "precision": self.precision,
            "tolerance": self.tolerance,
            "metric": "max|onnx - torch| / max(1, max|torch|) over eps",
            "max_abs_err": self.max_abs_err,
            "worst": self.worst,
            "cases": self.cases,
            **({"fp16_range_check": self.range_check} if self.range_check else {}),
        }


def export_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The model in eval mode, fp32, on CPU, as export and verification need it, leaving the caller's untouched:
    the model itself when it already is, otherwise a copy (a caller's CUDA, fp64 or training model stays so)."""
    tensors = [*model.parameters(), *model.buffers()]
    if not any(m.training for m in model.modules()) and all(
            t.device.type == "cpu" and (t.dtype == torch.float32 or not t.is_floating_point()) for t in tensors):
        return model
    return copy.deepcopy(model).eval().float().cpu()


def model_channels(model: torch.nn.Module) -> tuple[int, int]:
    """(c_in, c_out) from the model contract attributes."""
    try:
        return int(model.c_in), int(model.c_out)
    except AttributeError:
        raise ValueError("the model must expose c_in and c_out (input and output channel counts)") from None


def _example(model, batch: int, hw: tuple[int, int], seed: int = 0):
    c_in, _ = model_channels(model)
    g = torch.Generator().manual_seed(seed)
    # Times in [0, max_timestep): the seed's continuous t in [0, 1), a diffusers model's integer timestep range.
    return torch.randn(batch, c_in, *hw, generator=g), torch.rand(batch, generator=g) * getattr(model, "max_timestep", 1.0)


def _torch_export(model, args, path: Path, opset: int, dynamic_hw: bool) -> None:
    axes = {"sample": {0: "batch"}, "timestep": {0: "batch"}, "eps": {0: "batch"}}
    if dynamic_hw:
        axes["sample"].update({2: "height", 3: "width"})
        axes["eps"].update({2: "height", 3: "width"})
    with warnings.catch_warnings(), torch.no_grad():
        # Tracer warnings about Python ints from shapes are expected; the dynamic-shape check below is the judge.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, args, str(path), input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES),
            opset_version=opset, dynamic_axes=axes, do_constant_folding=True, dynamo=False,
        )


def _runs_at(path: Path, model, hw: tuple[int, int]) -> bool | None:
    """Does the graph accept another H/W and match PyTorch there (not just not crash)? None: PyTorch itself
    rejects that size, so it says nothing about the graph."""
    import onnxruntime as ort

    x, t = _example(model, 2, hw, seed=1)
    try:
        with torch.no_grad():
            ref = model(x, t).numpy()
    except Exception:  # noqa: BLE001
        return None
    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        out = sess.run(None, {"sample": x.numpy(), "timestep": t.numpy()})[0]
    except Exception:  # noqa: BLE001
        return False
    return out.shape == ref.shape and float(np.abs(out - ref).max()) <= 1e-3 * max(1.0, float(np.abs(ref).max()))


def _probe_dynamic_hw(path: Path, model, opt_size: tuple[int, int]) -> None:
    """Raise unless the graph works at a size other than the traced one (odd first; models that need a multiple
    of 2^k get an even candidate)."""
    h, w = opt_size
    for probe in ((h + 11, w + 5), (h + 16, w + 16), (2 * h, 2 * w)):
        ok = _runs_at(path, model, probe)
        if ok is None:
            continue
        if not ok:
            raise RuntimeError(f"the graph traced at {h}x{w} gives wrong results or fails at {probe[0]}x{probe[1]}")
        return
    raise RuntimeError(f"the PyTorch model itself runs at none of the probe sizes around {h}x{w}")


def save_onnx(proto, path: Path, external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> list[Path]:
    """Write a ModelProto as one file, or with `<name>.data` beside it when it is too big for protobuf."""
    import onnx

    path = Path(path)
    external = proto.ByteSize() > external_data_threshold
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    if external:
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
        os.chmod(data, 0o644)  # onnx creates it 0600; engines are shared read-only artefacts
        return [path, data]
    onnx.save_model(proto, str(path))
    return [path]


def export_onnx(
    model: torch.nn.Module,
    path: str | os.PathLike,
    *,
    opt_size: tuple[int, int] = (64, 64),
    opset: int = DEFAULT_OPSET,
    dynamic_hw: bool = True,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
) -> ExportInfo:
    """Export with inputs `sample` [B, c_in, H, W], `timestep` [B] and output `eps`; batch always dynamic.

    Dynamic H/W is kept only if the exported graph really works at another (odd) size; a model that bakes
    its size into the trace falls back to a static graph at `opt_size`, and `note` says so.
    """
    import onnx

    path = Path(path)
    model = export_copy(model)
    args = _example(model, 2, tuple(opt_size))
    note = ""
    if dynamic_hw:
        try:
            _torch_export(model, args, path, opset, dynamic_hw=True)
            _probe_dynamic_hw(path, model, tuple(opt_size))
        except Exception as exc:  # noqa: BLE001 - any failure means: fall back to a static size
            note = (f"dynamic H/W export failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                    f"exported with static size {opt_size[0]}x{opt_size[1]}")
            dynamic_hw = False
    if not dynamic_hw:
        _torch_export(model, args, path, opset, dynamic_hw=False)
    proto = onnx.load(str(path))
    proto.producer_name = "ddpm-engine"
    files = save_onnx(proto, path, external_data_threshold)
    return ExportInfo(path=path, files=files, opset=opset, dynamic_hw=dynamic_hw,
                      external_data=len(files) > 1, note=note)


def default_cases(batch: tuple[int, int, int], sizes: tuple, dynamic_hw: bool,
                  multiple: int = 1) -> list[tuple[int, int, int]]:
    """(batch, H, W) cases: min batch at the opt size, then odd sizes (rounded up to `multiple`) at other batches,
    within the profile."""
    (b_min, b_opt, b_max) = batch
    (h_min, w_min), (h_opt, w_opt), (h_max, w_max) = sizes
    cases = [(b_min, h_opt, w_opt)]
    if dynamic_hw:
        odd_batches = [min(b_max, max(b_min, 3)), min(b_max, max(b_min, 2))]
        for b, (h, w) in zip(odd_batches, ((-(-h // multiple) * multiple, -(-w // multiple) * multiple)
                                           for h, w in ODD_SIZES)):
            h, w = min(max(h, h_min), h_max), min(max(w, w_min), w_max)
            cases.append((b, h, w))
    elif b_max != b_min:
        cases.append((min(b_max, max(b_min, 3)), h_opt, w_opt))
    return list(dict.fromkeys(cases))


def _verify_threads() -> int | None:
    value = os.environ.get(VERIFY_THREADS_ENV)
    return int(value) if value else None


def _run_onnxruntime(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    # A one-off check: no spinning worker threads competing with PyTorch's.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if _verify_threads():
        so.intra_op_num_threads = _verify_threads()
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    in_type = sess.get_inputs()[0].type

    def run(x: np.ndarray, t: np.ndarray) -> np.ndarray:
        if in_type == "tensor(float16)":
            x, t = x.astype(np.float16), t.astype(np.float16)
        return sess.run(None, {"sample": x, "timestep": t})[0]

    return run


def _run_openvino(path: Path, hint: str):
    import openvino as ov

    core = ov.Core()
    graph = core.read_model(str(path))
    # Reduced-precision I/O: let OpenVINO convert from/to fp32 buffers (its Python API hands bf16 over as
    # float16-typed numpy arrays, which would silently misread the values).
    ppp = ov.preprocess.PrePostProcessor(graph)
    for i, port in enumerate(graph.inputs):
        if port.get_element_type() != ov.Type.f32:
            ppp.input(i).tensor().set_element_type(ov.Type.f32)
    for i, port in enumerate(graph.outputs):
        if port.get_element_type() != ov.Type.f32:
            ppp.output(i).tensor().set_element_type(ov.Type.f32)
    config = {"INFERENCE_PRECISION_HINT": hint}
    if _verify_threads():
        config["INFERENCE_NUM_THREADS"] = _verify_threads()
    compiled = core.compile_model(ppp.build(), "CPU", config)

    def run(x: np.ndarray, t: np.ndarray) -> np.ndarray:
        out = compiled({"sample": x, "timestep": t})
        return np.asarray(out[compiled.outputs[0]], dtype=np.float32)

    return run


FP16_MAX = 65504.0


def _fp16_tensor_sources(low_path: Path) -> list[str]:
    """Names, in the fp32 graph, of every tensor the fp16 graph stores in fp16 (its casts map to their source)."""
    import onnx

    low = onnx.load(str(low_path), load_external_data=False)
    inits = {i.name for i in low.graph.initializer}
    inputs = {i.name for i in low.graph.input}
    names = []
    for vi in list(low.graph.value_info) + list(low.graph.output):
        if vi.type.tensor_type.elem_type != onnx.TensorProto.FLOAT16 or vi.name in inits:
            continue
        name = vi.name
        for suffix in ("__cast_fp16", "__fp16"):
            name = name.removesuffix(suffix)
        if name not in inputs:
            names.append(name)
    return sorted(set(names))


def _fp16_range_check(fp32_path: Path, low_path: Path, feeds: list[tuple[tuple, np.ndarray, np.ndarray]]) -> dict:
    """Run the fp32 graph exposing every tensor the fp16 graph keeps in fp16; the largest |value| says whether
    fp16 storage overflows. CPU runtimes fuse fp16 casts away (computing in fp32), so they cannot show this."""
    import onnx
    import onnxruntime as ort

    names = _fp16_tensor_sources(low_path)
    proto = onnx.load(str(fp32_path))
    produced = {o for n in proto.graph.node for o in n.output}
    have = {o.name for o in proto.graph.output}
    names = [n for n in names if n in produced and n not in have]
    for n in names:
        proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(n))
    if proto.ByteSize() > EXTERNAL_DATA_THRESHOLD:
        return {"checked": False, "reason": "graph too large for an in-memory range check"}
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if _verify_threads():
        so.intra_op_num_threads = _verify_threads()
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    out_names = [o.name for o in sess.get_outputs()]
    worst = {"checked": True, "tensor": None, "max_abs": 0.0, "limit": FP16_MAX, "tensors": len(names)}
    for case, x, t in feeds:
        for name, value in zip(out_names, sess.run(None, {"sample": x, "timestep": t})):
            if name not in names and name != "eps":
                continue
            m = float(np.abs(value).max()) if value.size else 0.0
            if not np.isfinite(m) or m > worst["max_abs"]:
                worst.update(tensor=name, max_abs=m, batch=case[0], height=case[1], width=case[2])
    return worst


def verify_onnx(
    path: str | os.PathLike,
    model: torch.nn.Module,
    cases: list[tuple[int, int, int]] | None = None,
    *,
    precision: str = "fp32",
    runtime: str = "onnxruntime",
    tolerance: float | None = None,
    openvino_hint: str = "f32",
    fp32_graph: str | os.PathLike | None = None,
    seed: int = 0,
) -> VerifyReport:
    """Run the graph at every (batch, H, W) case against PyTorch fp32; raise VerificationError on inf/NaN or
    when max|onnx - torch| / max(1, max|torch|) exceeds the tolerance (TOLERANCES[precision] by default).

    runtime="openvino" runs the graph through OpenVINO, which ONNX Runtime's CPU provider lacks bf16 kernels for.
    With openvino_hint="f32" OpenVINO keeps the graph's own types (bf16 tensors between reduced ops, fp32 where the
    graph keeps fp32), as TensorRT's strongly typed network does; "bf16" is how the openvino backend runs an fp32
    IR (OpenVINO lowers the precision itself).
    fp32_graph (fp16 graphs): the fp32 source, run with every tensor the fp16 graph stores in fp16 exposed; any
    above 65504 fails as an overflow naming the tensor (CPU runtimes fuse the casts away and would hide it).
    """
    path = Path(path)
    tolerance = TOLERANCES[precision] if tolerance is None else float(tolerance)
    cases = cases or [(1, 37, 29), (3, 75, 75)]
    if runtime == "onnxruntime":
        run = _run_onnxruntime(path)
    elif runtime == "openvino":
        run = _run_openvino(path, openvino_hint)
    else:
        raise ValueError(f"unknown verification runtime {runtime!r}")
    model = export_copy(model)
    torch_threads = torch.get_num_threads()
    if _verify_threads():
        torch.set_num_threads(_verify_threads())
    try:
        report = _compare(run, path, model, cases, runtime, openvino_hint, precision, tolerance, seed)
        if precision == "fp16" and fp32_graph is not None:
            feeds = [((b, h, w), *(a.numpy() for a in _example(model, b, (h, w), seed=seed + i)))
                     for i, (b, h, w) in enumerate(cases)]
            rng = _fp16_range_check(Path(fp32_graph), path, feeds)
            report.range_check = rng
            if rng.get("checked") and not (rng["max_abs"] <= FP16_MAX):
                raise VerificationError(
                    f"{path.name} (fp16) overflows: tensor {rng['tensor']!r} reaches |x| = {rng['max_abs']:.3g} > "
                    f"{FP16_MAX:g} (fp16 max) at batch {rng['batch']}, {rng['height']}x{rng['width']}; build in bf16 "
                    "or fp32, or rescale the model")
        return report
    finally:
        torch.set_num_threads(torch_threads)


def _compare(run, path, model, cases, runtime, openvino_hint, precision, tolerance, seed) -> VerifyReport:
    label = runtime if runtime == "onnxruntime" else f"openvino (INFERENCE_PRECISION_HINT={openvino_hint})"
    report = VerifyReport(runtime=label, precision=precision, tolerance=tolerance)
    for i, (b, h, w) in enumerate(cases):
        x, t = _example(model, b, (h, w), seed=seed + i)
        with torch.no_grad():
            ref = model(x, t).float().numpy()
        try:
            out = np.asarray(run(x.numpy(), t.numpy()), dtype=np.float32)
        except Exception as exc:  # noqa: BLE001 - report which case broke, in one line
            raise VerificationError(f"{path.name} failed to run in {runtime} at batch {b}, {h}x{w}: "
                                    f"{str(exc).strip().splitlines()[0][:300]}") from exc
        if out.shape != ref.shape:
            raise VerificationError(f"{path.name} ({runtime}): eps has shape {out.shape} at batch {b}, {h}x{w}; "
                                    f"PyTorch gives {ref.shape}")
        finite = np.isfinite(out)
        if not finite.all():
            raise VerificationError(
                f"{path.name} ({precision}, {runtime}) overflows: eps has {int((~finite).sum())} inf/NaN values "
                f"at batch {b}, {h}x{w} (PyTorch max |eps| = {float(np.abs(ref).max()):.3g})")
        err = float(np.abs(out - ref).max())
        scale = max(1.0, float(np.abs(ref).max()))
        report.cases.append({"batch": b, "height": h, "width": w, "max_abs_err": err,
                             "scaled_err": err / scale, "ref_max_abs": scale,
                             "mean_abs_err": float(np.abs(out - ref).mean())})
    worst = report.worst
    if not math.isfinite(worst["scaled_err"]) or worst["scaled_err"] > tolerance:
        raise VerificationError(
            f"{path.name} ({precision}, {runtime}) differs from PyTorch: worst tensor eps at batch {worst['batch']}, "
            f"{worst['height']}x{worst['width']}: max abs error {worst['max_abs_err']:.3g} "
            f"(scaled {worst['scaled_err']:.3g} > tolerance {tolerance:g})")
    return report
