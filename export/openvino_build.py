"""OpenVINO IR (model.xml + model.bin) from the fp32 ONNX file; bf16 is an inference-precision hint."""
from __future__ import annotations

from pathlib import Path

from ddpm_engine.engine.errors import BackendUnavailableError

IR_DIR = "openvino"
IR_NAME = "model.xml"
# OpenVINO keeps fp32 weights in the IR and lowers precision when it compiles: bf16 runs on CPUs with
# AVX-512 bf16 / AMX, and OpenVINO itself keeps the sensitive ops (norms, softmax) in fp32.
HINTS = {"fp32": "f32", "bf16": "bf16"}


def require_openvino():
    """Import openvino or raise BackendUnavailableError naming the extra."""
    try:
        import openvino as ov
    except ImportError as exc:
        raise BackendUnavailableError(f"OpenVINO is not installed ({exc}); pip install 'ddpm-engine[openvino]'") from None
    return ov


def cpu_supports(precision: str) -> bool:
    """Whether this CPU runs `precision` natively under OpenVINO (bf16 needs AVX-512 bf16 or AMX; int8 is fast with
    AVX-512 VNNI / AVX-VNNI or AMX)."""
    if precision == "fp32":
        return True
    ov = require_openvino()
    caps = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return {"bf16": "BF16", "fp16": "FP16", "int8": "INT8"}[precision] in caps


def build_openvino_ir(onnx_path: str | Path, engine_dir: str | Path, precision: str = "fp32") -> dict:
    """Convert the ONNX file to <engine>/openvino/model.xml (+ .bin); returns the manifest entry (without hashes)."""
    ov = require_openvino()
    if precision not in HINTS:
        raise ValueError(f"the openvino backend builds fp32 or bf16 (CPU), not {precision!r}; "
                         "use --backend tensorrt or onnxruntime for fp16")
    out = Path(engine_dir) / IR_DIR
    out.mkdir(parents=True, exist_ok=True)
    # Core.read_model runs the same ONNX frontend as ov.convert_model without the model-conversion tool's
    # start-up (5 s vs 0.3 s here, mostly its telemetry); the saved IR is what the backend loads either way.
    graph = ov.Core().read_model(str(onnx_path))
    # compress_to_fp16=False: the default would store fp16 weights, a precision loss nobody asked for.
    ov.save_model(graph, str(out / IR_NAME), compress_to_fp16=False)
    return {
        "path": f"{IR_DIR}/{IR_NAME}",
        "files": [f"{IR_DIR}/{IR_NAME}", f"{IR_DIR}/model.bin"],
        "precision": precision,
        "inference_precision_hint": HINTS[precision],
        "compile_config": {"INFERENCE_PRECISION_HINT": HINTS[precision]},
        "native": cpu_supports(precision),
        "source": Path(onnx_path).name,
    }
