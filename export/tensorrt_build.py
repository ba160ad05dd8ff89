"""TensorRT 11 plan from the ONNX file: strongly typed network, optimisation profile, timing cache, refit."""
from __future__ import annotations

import importlib
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from ddpm_engine.engine.errors import BackendUnavailableError, EngineError

from .profile import Profile, tensorrt_shapes

TRT_DIR = "tensorrt"
PLAN_NAME = "model.plan"
TIMING_CACHE = "timing.cache"
INSTALL = "pip install 'ddpm-engine[tensorrt]'"
# 10.x builds weakly typed networks unless asked (create_network's STRONGLY_TYPED flag); 11.x is always strongly typed.
SUPPORTED_MAJORS = (10, 11)


class TensorRTBuildError(EngineError):
    """TensorRT could not parse the ONNX file or build the plan; the message carries TensorRT's own errors."""


@dataclass(frozen=True)
class TensorRTSettings:
    """Builder settings that change the plan (all of them go into the cache key)."""

    builder_optimization_level: int = 3  # 0..5; 0 ignores the timing cache
    workspace_bytes: int = 4 << 30
    # None; "refit" (REFIT: new weights of the same architecture without a rebuild); "identical" (REFIT_IDENTICAL:
    # refit only with the build-time weights, e.g. weight-stripped plans; no optimisation is given up).
    refit: str | None = None
    hardware_compatibility: str | None = None  # None, "AMPERE_PLUS" or "SAME_COMPUTE_CAPABILITY"
    # fp32 layers in TF32 (10-bit mantissa): TensorRT's default, but then an "fp32" plan is not fp32. Off unless
    # asked for; a TF32 plan is verified at TOLERANCES["tf32"].
    tf32: bool = False

    def __post_init__(self):
        if not 0 <= int(self.builder_optimization_level) <= 5:
            raise ValueError(f"builder_optimization_level must be 0..5, got {self.builder_optimization_level}")
        if self.refit not in (None, "identical", "refit"):
            raise ValueError(f"refit must be None, 'identical' or 'refit', got {self.refit!r}")
        if self.workspace_bytes < 0:
            raise ValueError("workspace_bytes must be >= 0")
        if self.hardware_compatibility not in (None, "AMPERE_PLUS", "SAME_COMPUTE_CAPABILITY"):
            raise ValueError("hardware_compatibility must be None, 'AMPERE_PLUS' or 'SAME_COMPUTE_CAPABILITY', got "
                             f"{self.hardware_compatibility!r}")

    def as_dict(self) -> dict:
        return asdict(self)


def unsupported_version(version: str) -> str | None:
    """Why this TensorRT version cannot build or run our plans, or None when it can (SUPPORTED_MAJORS)."""
    try:
        major = int(str(version).split(".")[0])
    except ValueError:
        return f"TensorRT reports an unreadable version {version!r}"
    if major not in SUPPORTED_MAJORS:
        return (f"TensorRT {version} is not supported: ddpm-engine builds strongly typed networks with TensorRT "
                f"{' or '.join(f'{m}.x' for m in SUPPORTED_MAJORS)}; {INSTALL}")
    return None


def tensorrt_status() -> tuple[bool, str]:
    """(available, reason): a supported TensorRT (10.x or 11.x) importable and a CUDA GPU present. Never raises."""
    import torch

    gpu = torch.cuda.is_available()
    try:
        trt = importlib.import_module("tensorrt")
    except ImportError as exc:
        where = "" if gpu else " (and it needs an NVIDIA GPU: none is visible here)"
        return False, f"TensorRT is not installed ({exc}){where}; {INSTALL}"
    except Exception as exc:  # noqa: BLE001 - a broken install (missing libnvinfer) raises OSError etc.
        return False, f"TensorRT failed to import ({type(exc).__name__}: {exc}); reinstall with {INSTALL}"
    too_old = unsupported_version(getattr(trt, "__version__", "?"))
    if too_old:
        return False, too_old
    if not gpu:
        return False, "TensorRT needs an NVIDIA GPU with CUDA, and torch sees none on this machine"
    return True, f"TensorRT {trt.__version__}"


def require_tensorrt():
    """Import tensorrt lazily, or raise BackendUnavailableError saying what is missing and what to install."""
    ok, reason = tensorrt_status()
    if not ok:
        raise BackendUnavailableError(reason)
    import tensorrt as trt

    return trt


_LOGGER = None


def logger():
    """The process's one TensorRT logger: TensorRT treats the logger as a singleton and keeps the first one it is
    given, so every builder, runtime, parser and refitter shares this one (or later ones lose their error text).

    It prints warnings and keeps errors (the API itself only returns None/False): take `mark()` before a call and
    read `errors_since(mark)` after a failure, so each failure reports its own errors.
    """
    global _LOGGER
    if _LOGGER is None:
        trt = require_tensorrt()

        class CapturingLogger(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)
                self._lock, self._errors = threading.Lock(), []

            def log(self, severity, msg):
                if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                    with self._lock:  # TensorRT requires a thread-safe logger
                        self._errors.append(str(msg))
                elif severity == trt.ILogger.Severity.WARNING:
                    print(f"[TensorRT] warning: {msg}")

            def mark(self) -> int:
                with self._lock:
                    return len(self._errors)

            def errors_since(self, mark: int) -> str:
                with self._lock:
                    return "; ".join(self._errors[mark:]) or "no error was logged"

        _LOGGER = CapturingLogger()
    return _LOGGER


def _make_progress(trt, report: Callable[[str], None] | None):
    class Progress(trt.IProgressMonitor):
        """Reports top-level builder phases; returning False from step_complete would cancel the build."""

        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self._start: dict[str, float] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            self._start[phase_name] = time.perf_counter()
            if report and parent_phase is None:
                report(f"{phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name, step):
            return True

        def phase_finish(self, phase_name):
            t0 = self._start.pop(phase_name, None)
            if report and t0 is not None and time.perf_counter() - t0 > 1.0:
                report(f"{phase_name} done in {time.perf_counter() - t0:.1f} s")

    return Progress()


def _parse_onnx(trt, parser, onnx_path: Path) -> None:
    # parse_from_file resolves external data relative to the file, so big models work the same way.
    if not parser.parse_from_file(str(onnx_path)):
        errors = []
        for i in range(parser.num_errors):
            e = parser.get_error(i)
            errors.append(f"{e.node_name()} ({e.node_operator()}): {e.desc()}")
        raise TensorRTBuildError(f"TensorRT cannot parse {onnx_path.name}: {'; '.join(errors) or 'unknown error'}")


def build_tensorrt_plan(
    onnx_path: str | Path,
    engine_dir: str | Path,
    profile: Profile,
    c_in: int,
    settings: TensorRTSettings = TensorRTSettings(),
    *,
    timing_cache: str | Path | None = None,
    report: Callable[[str], None] | None = None,
) -> dict:
    """Build <engine>/tensorrt/model.plan; read and update the timing cache beside it (or `timing_cache`).

    The network is strongly typed (the only kind TensorRT 11 has), so the plan's precision is the ONNX graph's:
    pass the fp16/bf16 graph from precision.convert_precision for a reduced-precision engine.
    """
    trt = require_tensorrt()
    onnx_path = Path(onnx_path)
    out = Path(engine_dir) / TRT_DIR
    out.mkdir(parents=True, exist_ok=True)
    log = logger()
    mark = log.mark()
    builder = trt.Builder(log)
    # Strongly typed: the plan's precision is the ONNX graph's. Required on 10.x, accepted and ignored on 11.x.
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, log)
    _parse_onnx(trt, parser, onnx_path)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(settings.workspace_bytes))
    config.builder_optimization_level = int(settings.builder_optimization_level)
    if settings.refit == "identical":
        config.set_flag(trt.BuilderFlag.REFIT_IDENTICAL)
    elif settings.refit == "refit":
        config.set_flag(trt.BuilderFlag.REFIT)
    if settings.tf32:
        config.set_flag(trt.BuilderFlag.TF32)
    else:
        config.clear_flag(trt.BuilderFlag.TF32)
    if settings.hardware_compatibility:
        config.hardware_compatibility_level = getattr(trt.HardwareCompatibilityLevel, settings.hardware_compatibility)

    opt_profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in tensorrt_shapes(profile, c_in).items():
        opt_profile.set_shape(name, lo, opt, hi)
    if config.add_optimization_profile(opt_profile) < 0:
        raise TensorRTBuildError(f"TensorRT rejected the optimisation profile {profile.as_dict()}")

    cache_path = Path(timing_cache) if timing_cache else out / TIMING_CACHE
    cache_bytes = cache_path.read_bytes() if cache_path.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    # ignore_mismatch=False: a cache from another GPU is refused instead of silently mistuning the plan.
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
        cache_bytes = b""
    progress = _make_progress(trt, report)
    config.progress_monitor = progress

    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - t0
    if plan is None:
        raise TensorRTBuildError(f"TensorRT failed to build the engine: {log.errors_since(mark)}")
    plan_path = out / PLAN_NAME
    plan_path.write_bytes(bytes(plan))
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    return {
        "path": f"{TRT_DIR}/{PLAN_NAME}",
        "files": [f"{TRT_DIR}/{PLAN_NAME}"],
        "timing_cache": f"{TRT_DIR}/{TIMING_CACHE}",
        "timing_cache_reused": bool(cache_bytes),
        "source": onnx_path.name,
        "settings": settings.as_dict(),
        "shapes": {k: [list(s) for s in v] for k, v in tensorrt_shapes(profile, c_in).items()},
        "build_seconds": round(seconds, 2),
        "refittable": settings.refit is not None,
    }


def deserialize_plan(plan_path: str | Path):
    """(runtime, ICudaEngine) for a plan file; EngineFileError when TensorRT rejects it (other version or GPU)."""
    from ddpm_engine.engine.errors import EngineFileError

    trt = require_tensorrt()
    log = logger()
    mark = log.mark()
    runtime = trt.Runtime(log)
    engine = runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
    if engine is None:
        raise EngineFileError(f"TensorRT {trt.__version__} cannot load {plan_path} (built by another TensorRT "
                              f"version or for another GPU, or damaged): {log.errors_since(mark)}; "
                              "rebuild it with `ddpm-engine build DIR -o DIR --backend tensorrt`")
    return runtime, engine


def refit_plan(engine, onnx_path: str | Path) -> None:
    """Load new weights of the same architecture into a refittable engine from an ONNX file (no rebuild)."""
    trt = require_tensorrt()
    log = logger()
    mark = log.mark()
    refitter = trt.Refitter(engine, log)
    parser_refitter = trt.OnnxParserRefitter(refitter, log)
    if not parser_refitter.refit_from_file(str(onnx_path)) or not refitter.refit_cuda_engine():
        raise TensorRTBuildError(f"refit from {onnx_path} failed: {log.errors_since(mark)}")


def run_plan(engine, sample, timestep):
    """eps for CUDA tensors sample [B, c_in, H, W] and timestep [B] through a deserialized engine (verification
    and tests; the runtime's TensorRT backend binds its own persistent buffers instead)."""
    import torch

    trt = require_tensorrt()
    context = engine.create_execution_context()
    dtypes = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.BF16: torch.bfloat16}
    inputs = {"sample": sample, "timestep": timestep}
    for name, tensor in inputs.items():
        want = dtypes[engine.get_tensor_dtype(name)]
        inputs[name] = tensor.to(device="cuda", dtype=want).contiguous()
        context.set_input_shape(name, tuple(inputs[name].shape))
        context.set_tensor_address(name, inputs[name].data_ptr())
    b, _, h, w = sample.shape
    out_shape = tuple(context.get_tensor_shape("eps"))
    eps = torch.empty(out_shape, device="cuda", dtype=dtypes[engine.get_tensor_dtype("eps")])
    context.set_tensor_address("eps", eps.data_ptr())
    missing = context.infer_shapes()
    if missing:
        raise TensorRTBuildError(f"TensorRT could not infer shapes for {missing} at batch {b}, {h}x{w}")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        if not context.execute_async_v3(stream.cuda_stream):
            raise TensorRTBuildError(f"TensorRT execute_async_v3 failed at batch {b}, {h}x{w}")
    stream.synchronize()
    return eps.float().cpu()


def plan_tolerance(precision: str, tf32: bool) -> float:
    """Default verification tolerance of a plan: its precision's, or TF32's for an fp32 plan built with TF32."""
    from .onnx_export import TOLERANCES

    return TOLERANCES["tf32" if tf32 and precision == "fp32" else precision]


def verify_plan(plan_path, model, cases, *, precision: str = "fp32", tf32: bool = False,
                tolerance: float | None = None) -> dict:
    """The plan vs PyTorch fp32 at each (batch, H, W): same metric as onnx_export.verify_onnx, at plan_tolerance."""
    import math

    import torch

    from .onnx_export import VerificationError, _example, export_copy

    model = export_copy(model)
    tolerance = plan_tolerance(precision, tf32) if tolerance is None else float(tolerance)
    _, engine = deserialize_plan(plan_path)
    rows = []
    for i, (b, h, w) in enumerate(cases):
        x, t = _example(model, b, (h, w), seed=i)
        with torch.no_grad():
            ref = model(x, t)
        out = run_plan(engine, x, t)
        if not torch.isfinite(out).all():
            raise VerificationError(f"TensorRT plan ({precision}) overflows to inf/NaN at batch {b}, {h}x{w}")
        err = float((out - ref).abs().max())
        scale = max(1.0, float(ref.abs().max()))
        rows.append({"batch": b, "height": h, "width": w, "max_abs_err": err, "scaled_err": err / scale})
    worst = max(rows, key=lambda r: r["scaled_err"])
    if not math.isfinite(worst["scaled_err"]) or worst["scaled_err"] > tolerance:
        raise VerificationError(f"TensorRT plan ({precision}) differs from PyTorch: eps at batch {worst['batch']}, "
                                f"{worst['height']}x{worst['width']}: max abs error {worst['max_abs_err']:.3g} "
                                f"(scaled {worst['scaled_err']:.3g} > tolerance {tolerance:g})")
    return {"runtime": "tensorrt", "precision": precision, "tolerance": tolerance, "worst": worst,
            "max_abs_err": max(r["max_abs_err"] for r in rows), "cases": rows}
