"""`build(model, out_dir, ...)`: PyTorch -> verified ONNX -> backend artefact, written as an engine directory."""
from __future__ import annotations

import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from ddpm_engine.engine.errors import EngineError, EngineFileError

from .engine_dir import check_engine_dir, hash_files, verify_files
from .staging import clean_stale_staging, staging_dir
from .manifest import (BACKENDS, FORMAT, FORMAT_VERSION, _version, gpu_info, library_versions, read_manifest,
                       sha256_json, write_manifest)
from .diffusers_source import ARCH as DIFFUSERS_ARCH
from .model_source import describe_model, resolve_model, save_model_checkpoint
from .onnx_export import (DEFAULT_OPSET, EXTERNAL_DATA_THRESHOLD, TOLERANCES, default_cases, export_onnx, save_onnx,
                          verify_onnx)
from .precision import PRECISIONS, convert_precision
from .quality_gate import GateSettings
from .quantize import CalibrationSettings
from .profile import Profile, parse_batch, parse_size
from .tensorrt_build import TensorRTSettings, plan_tolerance, tensorrt_status

ONNX_NAME = "model.onnx"
DEFAULT_SIZE = ((32, 32), (300, 300), (320, 320))  # CARE-SST tiles; a diffusers model defaults to its sample_size
# Bump when a change in this package changes what a build writes: old caches then stop matching.
BUILDER_VERSION = 2  # 2: the CARE-SST layers export their OpenVINO-friendly forms (models/layers.py)
# int8 is an OpenVINO artefact only: NNCF-quantised IR, accepted by the quality gate (quality_gate.py).
BUILD_PRECISIONS = PRECISIONS + ("int8",)
_LIB_OF = {"onnxruntime": "onnxruntime", "openvino": "openvino", "tensorrt": "tensorrt", "torch": "torch"}

Progress = Callable[[str, str, dict], None]


@dataclass
class BuildResult:
    """Where the engine is, its manifest, whether the whole build was a cache hit, and per-stage timings."""

    directory: Path
    manifest: dict
    cached: bool
    stages: list[dict] = field(default_factory=list)

    @property
    def backend(self) -> str:
        return self.manifest["backend"]


class _Stages:
    """Times named stages and reports start/done/reused to an optional progress callback."""

    def __init__(self, progress: Progress | None):
        self.progress = progress
        self.done: list[dict] = []

    def run(self, name: str, fn, *args, **kwargs):
        if self.progress:
            self.progress(name, "start", {})
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        info = {"stage": name, "seconds": round(time.perf_counter() - t0, 3), "reused": False}
        if isinstance(result, dict) and result.get("_reused"):
            info["reused"] = True
        self.done.append(info)
        if self.progress:
            self.progress(name, "reused" if info["reused"] else "done", info)
        return result

    def note(self, message: str) -> None:
        if self.progress:
            self.progress(message, "info", {})


def is_x86() -> bool:
    """x86-64 CPU (OpenVINO's CPU plugin target for this project)."""
    return platform.machine().lower() in ("x86_64", "amd64", "x64", "i686")


def resolve_backend(backend: str, precision: str = "fp32") -> str:
    """'auto': tensorrt with TensorRT + CUDA, else openvino on x86 (fp32/bf16), else onnxruntime."""
    if backend != "auto":
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; must be auto or one of {list(BACKENDS)}")
        return backend
    if tensorrt_status()[0]:
        return "tensorrt"
    try:
        import openvino  # noqa: F401

        has_ov = True
    except ImportError:
        has_ov = False
    if has_ov and is_x86() and precision in ("fp32", "bf16", "int8"):
        return "openvino"
    return "onnxruntime"


def resolve_precision(precision: str, backend: str, cpu_bf16: bool | None = None) -> str:
    """'auto' without a measurement: bf16 for OpenVINO on CPUs with native bf16 (AVX-512 BF16 or AMX), fp32
    everywhere else. (`build` measures instead for OpenVINO: precision_choice.py; this is the label benchmarks give
    another machine's default, and every other backend's auto.)

    cpu_bf16: whether the CPU has native bf16 (default: ask OpenVINO about this machine's); benchmarks pass what
    they recorded, to label another machine's default. On this project's 2-core AVX-512 BF16 CPU, sst-small
    sampled 2.5x faster than the seed loop in bf16 against 1.3-1.7x in fp32 (benchmarks/RESULTS.md), within 0.03
    of fp32 after 50 steps on the [-1, 1] scale.
    """
    if precision != "auto":
        return precision
    if backend == "openvino":
        if cpu_bf16 is None:
            from .openvino_build import cpu_supports

            cpu_bf16 = cpu_supports("bf16")
        if cpu_bf16:
            return "bf16"
    return "fp32"


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        if os.path.samefile(src, dst):
            return  # two entries share a file (the onnxruntime entry is the ONNX graph itself)
        dst.unlink()
    try:
        os.link(src, dst)  # same filesystem (the staging dir is beside the target): instant, no extra space
    except OSError:
        shutil.copy2(src, dst)


def _reuse(old_dir: Path | None, old: dict | None, name: str, key: str, stage: Path) -> dict | None:
    """Copy a previous build's artefact into the staging dir when its stage key matches and its files verify."""
    if not old or old_dir is None:
        return None
    entry = old["artefacts"].get(name)
    if not entry or entry.get("key") != key:
        return None
    try:
        verify_files(old_dir, entry, name)
    except EngineFileError:
        return None
    for rel in entry["files"]:
        _link_or_copy(old_dir / rel, stage / rel)
    cache = entry.get("timing_cache")
    if cache and (old_dir / cache).is_file() and not (stage / cache).exists():
        _link_or_copy(old_dir / cache, stage / cache)
    return {**entry, "_reused": True}


def artefact_entry(directory: Path, backend: str, entry: dict) -> dict:
    """Finish a manifest entry: sha256 of every file, the library version that made it, GPU for TensorRT."""
    entry = {k: v for k, v in entry.items() if k != "_reused"}
    files = entry["files"]
    if isinstance(files, list):
        entry["files"] = hash_files(directory, files)
    entry["backend"] = backend if backend in BACKENDS else entry.get("backend")
    lib = _LIB_OF.get(backend)
    if lib and "library" not in entry:
        entry["library"] = {"name": lib, "version": library_versions()[lib]}
    if backend == "tensorrt":
        import tensorrt as trt

        entry["library"] = {"name": "tensorrt", "version": trt.__version__}
        entry["gpu"] = gpu_info()
    return entry


def _stage_keys(desc: dict, profile: Profile, precision: str, io_precision: str, backend: str, opset: int,
                dynamic_hw: bool, external_data_threshold: int, trt: TensorRTSettings, verify: bool,
                tolerance: float | None, libs: dict, gpu: dict, simplify: bool = False,
                gate: GateSettings | None = None) -> dict[str, str]:
    model_key = {"arch": desc["arch"], "config": desc["config"], "weights": desc["weights_sha256"]}
    base = {"builder": BUILDER_VERSION, "format": FORMAT_VERSION, "model": model_key}
    onnx_key = sha256_json({**base, "opset": opset, "dynamic_hw": dynamic_hw, "profile": profile.as_dict(),
                            "external": external_data_threshold, "torch": libs["torch"], "onnx": libs["onnx"],
                            "verify": verify, "ort": libs["onnxruntime"],
                            **({"simplify": _version("onnxslim")} if simplify else {})})
    prec_key = sha256_json({"onnx": onnx_key, "precision": precision, "io": io_precision, "verify": verify,
                            "tolerance": tolerance, "ort": libs["onnxruntime"], "ov": libs["openvino"]})
    keys = {"torch": sha256_json(base), "onnx": onnx_key, f"onnx_{precision}": prec_key,
            "onnxruntime": sha256_json({"graph": prec_key, "ort": libs["onnxruntime"]}),
            "openvino": sha256_json({"graph": onnx_key, "precision": precision, "ov": libs["openvino"],
                                     "verify": verify, "tolerance": tolerance,
                                     # int8 / auto: what quantises, calibrates and gates them
                                     **({"nncf": _version("nncf"), "calibration": CalibrationSettings().as_dict(),
                                         "gate": gate.as_dict()} if gate else {})}),
            "tensorrt": sha256_json({"graph": prec_key, "trt": libs["tensorrt"], "gpu": gpu, "settings": trt.as_dict(),
                                     "profile": profile.as_dict()})}
    # The whole-build key covers only what this backend's build uses: installing TensorRT does not invalidate
    # an OpenVINO engine.
    used = ["torch", "onnx"] + ([f"onnx_{precision}"] if precision != "fp32" and backend in ("onnxruntime", "tensorrt")
                                else []) + ([backend] if backend != "torch" else [])
    keys["cache_key"] = sha256_json({"keys": {k: keys[k] for k in used}, "backend": backend, "precision": precision})
    return keys


def _io_section(desc: dict, precision: str, io_precision: str, dynamic_hw: bool) -> dict:
    dtype = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[io_precision if precision != "fp32" else "fp32"]
    hw = ["height", "width"] if dynamic_hw else None
    return {
        "inputs": [{"name": "sample", "shape": ["batch", desc["c_in"], *(hw or ["H", "W"])], "dtype": dtype},
                   {"name": "timestep", "shape": ["batch"], "dtype": dtype}],
        "outputs": [{"name": "eps", "shape": ["batch", desc["c_out"], *(hw or ["H", "W"])], "dtype": dtype}],
        "layout": "NCHW",
    }


def graph_verify_runtime(precision: str, backend: str) -> str | None:
    """Where a reduced-precision ONNX graph is verified before the backend artefact is made, or None: verified as
    the artefact itself (a TensorRT bf16 plan: OpenVINO, the only CPU runtime with bf16, is not on GPU machines)."""
    # ONNX Runtime's CPU provider has fp16 kernels (or runs fp16 nodes in fp32 via inserted casts) but none for
    # bf16: bf16 graphs are executed by OpenVINO, keeping the graph's own types (bf16 between reduced ops).
    if precision != "bf16":
        return "onnxruntime"
    return None if backend == "tensorrt" else "openvino"


def build(
    model_or_name,
    out_dir: str | os.PathLike,
    backend: str = "auto",
    precision: str = "auto",
    batch=(1, 1, 8),
    size=None,
    *,
    io_precision: str = "fp32",
    opset: int = DEFAULT_OPSET,
    dynamic_hw: bool = True,
    verify: bool = True,
    tolerance: float | None = None,
    builder_optimization_level: int = 3,
    workspace_bytes: int = 4 << 30,
    refit: str | None = None,
    hardware_compatibility: str | None = None,
    tf32: bool = False,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
    force: bool = False,
    simplify: bool = False,
    progress: Progress | None = None,
    scheduler=None,
    gate: GateSettings = GateSettings(),
) -> BuildResult:
    """Build an engine directory for one backend and precision; reuse everything a previous identical build made.

    model_or_name: an nn.Module (model(sample [B, c_in, H, W], timestep [B]) -> eps [B, c_out, H, W]), a bundled
    preset name, a checkpoint directory, a CARE-SST .pth, an engine directory (rebuild from its kept weights), a
    diffusers pipeline directory, or a diffusers UNet2DModel with `scheduler=` its DDPMScheduler / DDIMScheduler.
    batch: (min, opt, max) or "MIN:OPT:MAX"; size: (h, w), ((h, w) min, opt, max) or "HxW[:HxW:HxW]" (default: the
    CARE-SST tiles, 32x32:300x300:320x320, or a diffusers U-Net's sample_size).
    precision: "fp32", "fp16", "bf16", "int8" (openvino: NNCF-quantised, kept only if it passes the quality gate), or
        "auto": for openvino the fastest of fp32, bf16 (where native) and int8 that passes the gate, timed at the
        profile's opt shape (precision_choice.py); elsewhere resolve_precision's rule.
    gate: the quality gate's settings (quality_gate.GateSettings: the reduced main job and its 1 % tolerance).
    io_precision: "fp32" keeps fp32 I/O for reduced-precision graphs; "fp16"/"bf16" (= precision) reduces it.
    simplify: run onnxslim on the exported graph, kept only if it removes nodes and ONNX Runtime is not slower.
    tf32: let a TensorRT plan run fp32 layers in TF32 (faster on Ampere and newer, verified at TOLERANCES["tf32"]);
        off by default, so that an fp32 plan is fp32.
    The directory is written atomically; a failed or killed build leaves the previous engine (or nothing).
    """
    if precision not in BUILD_PRECISIONS + ("auto",):
        raise ValueError(f"precision must be one of {list(BUILD_PRECISIONS + ('auto',))}, got {precision!r}")
    backend = resolve_backend(backend, "fp32" if precision == "auto" else precision)
    if precision == "int8" and backend != "openvino":
        raise ValueError(f"--precision int8 is built for the openvino backend only (NNCF quantisation checked by the "
                         f"quality gate); the {backend} backend cannot run it: use --backend openvino, or fp32 / "
                         "fp16 / bf16")
    # OpenVINO's auto is decided by measurement in its stage; "auto" stays in the stage keys until then.
    measured = backend == "openvino" and precision in ("auto", "int8")
    precision = precision if measured else resolve_precision(precision, backend)
    if io_precision not in ("fp32", precision):
        raise ValueError(f"io_precision must be 'fp32' or the engine precision {precision!r}, got {io_precision!r}")
    out_dir = Path(out_dir)
    stages = _Stages(progress)
    model, source = stages.run("load model", resolve_model, model_or_name, scheduler)
    if backend == "openvino" and precision == "fp16":
        raise ValueError("the openvino backend builds fp32 or bf16 on CPU; use --backend onnxruntime or tensorrt for fp16")
    if io_precision != "fp32" and backend in ("openvino", "torch"):
        raise ValueError(f"reduced-precision I/O is for the onnxruntime and tensorrt graphs; the {backend} backend "
                         "keeps fp32 I/O (drop --io-precision)")
    batch, sizes = parse_batch(batch), parse_size(DEFAULT_SIZE if size is None else size)
    if size is None and hasattr(model, "default_size"):
        sizes = (model.default_size,) * 3  # a diffusers U-Net's sample_size
    profile = Profile(batch, sizes, dynamic_hw, getattr(model, "size_multiple", 1))
    trt_settings = TensorRTSettings(builder_optimization_level, workspace_bytes, refit, hardware_compatibility, tf32)
    if backend == "tensorrt":
        from .tensorrt_build import require_tensorrt

        require_tensorrt()
    libs, gpu = library_versions(), gpu_info()
    desc = stages.run("hash weights", describe_model, model, source)
    keys = _stage_keys(desc, profile, precision, io_precision, backend, opset, dynamic_hw, external_data_threshold,
                       trt_settings, verify, tolerance, libs, gpu, simplify, gate if measured else None)

    clean_stale_staging(out_dir)  # also on a cache hit; puts back an engine a killed build had set aside
    old = None
    if out_dir.is_dir() and (out_dir / "engine.json").is_file():
        try:
            old = read_manifest(out_dir)
        except EngineFileError:
            old = None  # a damaged engine is simply rebuilt
    if old and not force and old.get("cache_key") == keys["cache_key"]:
        try:
            check_engine_dir(out_dir, backend)
            for name in old["artefacts"]:
                verify_files(out_dir, old["artefacts"][name], name)
            stages.note(f"cache hit: {out_dir} already holds this build (key {keys['cache_key'][:12]})")
            return BuildResult(out_dir, old, True, stages.done)
        except EngineError:
            pass
    old_dir = out_dir if old and not force else None
    old = old if old_dir else None

    with staging_dir(out_dir) as stage:
        artefacts: dict[str, dict] = {}

        def keep_weights():
            hit = _reuse(old_dir, old, "torch", keys["torch"], stage)
            if hit:
                return hit
            files = save_model_checkpoint(model, stage, desc)
            return {"path": "model", "files": files, "precision": "fp32", "format": "safetensors + config.json"}

        artefacts["torch"] = stages.run("save PyTorch weights", keep_weights)

        def onnx_stage():
            hit = _reuse(old_dir, old, "onnx", keys["onnx"], stage)
            if hit:
                return hit
            info = export_onnx(model, stage / ONNX_NAME, opt_size=profile.opt_size, opset=opset,
                               dynamic_hw=dynamic_hw, external_data_threshold=external_data_threshold)
            if simplify:
                from .simplify import simplify_onnx

                info.simplified = simplify_onnx(
                    stage / ONNX_NAME, desc["c_in"], profile.opt_size,
                    lambda proto, path: save_onnx(proto, path, external_data_threshold))
                info.files = [p for p in (stage / ONNX_NAME, stage / f"{ONNX_NAME}.data") if p.exists()]
            entry = {"path": ONNX_NAME, "files": [p.name for p in info.files], "precision": "fp32",
                     "opset": info.opset, "dynamic_hw": info.dynamic_hw, "external_data": info.external_data,
                     "note": info.note, "exporter": "torch.onnx (TorchScript, dynamo=False)",
                     "simplified": getattr(info, "simplified", None)}
            if verify:
                prof = profile if info.dynamic_hw else profile.static_at(profile.opt_size)
                cases = default_cases(prof.batch, prof.sizes, info.dynamic_hw, prof.multiple)
                entry["verification"] = verify_onnx(stage / ONNX_NAME, model, cases, precision="fp32",
                                                    tolerance=tolerance).as_dict()
            return entry

        artefacts["onnx"] = stages.run("export + verify ONNX (fp32, ONNX Runtime)" if verify else "export ONNX",
                                       onnx_stage)
        if not artefacts["onnx"]["dynamic_hw"] and dynamic_hw:
            stages.note("note: " + artefacts["onnx"]["note"])
            profile = profile.static_at(profile.opt_size)

        graph = ONNX_NAME
        if precision != "fp32" and backend in ("onnxruntime", "tensorrt"):
            name = f"onnx_{precision}"

            def precision_stage():
                hit = _reuse(old_dir, old, name, keys[name], stage)
                if hit:
                    return hit
                import onnx

                src = onnx.load(str(stage / ONNX_NAME))
                low = convert_precision(src, precision, keep_io_types=io_precision == "fp32")
                files = save_onnx(low, stage / f"model.{precision}.onnx", external_data_threshold)
                entry = {"path": f"model.{precision}.onnx", "files": [p.name for p in files], "precision": precision,
                         "io_precision": io_precision, "opset": next(o.version for o in low.opset_import
                                                                    if o.domain in ("", "ai.onnx")),
                         "kept_fp32": "norms, softmax, reductions, pow/sqrt/exp, timestep embedding"}
                if verify and runtime:
                    cases = default_cases(profile.batch, profile.sizes, profile.dynamic_hw, profile.multiple)
                    entry["verification"] = verify_onnx(stage / entry["path"], model, cases, precision=precision,
                                                        runtime=runtime, tolerance=tolerance,
                                                        fp32_graph=stage / ONNX_NAME).as_dict()
                elif verify:
                    entry["verified_as"] = backend
                return entry

            runtime = graph_verify_runtime(precision, backend)
            artefacts[name] = stages.run(f"convert to {precision} + verify ({runtime})" if verify and runtime else
                                         f"convert to {precision}", precision_stage)
            graph = artefacts[name]["path"]

        # The ONNX Runtime entry is the graph in the engine's precision: recorded whenever this build made it.
        if backend == "onnxruntime" or precision == "fp32" or (precision == "fp16" and backend == "tensorrt"):
            src = artefacts.get(f"onnx_{precision}", artefacts["onnx"])
            artefacts["onnxruntime"] = {"path": graph, "files": list(src["files"]), "precision": precision,
                                        "key": keys["onnxruntime"],
                                        "cpu_runnable": precision != "bf16",
                                        "verification": src.get("verification")}

        choice = None
        if backend == "openvino" and measured:
            def measured_stage():
                from .precision_choice import measured_openvino_artefact

                nonlocal choice
                hit = _reuse(old_dir, old, "openvino", keys["openvino"], stage)
                if hit:
                    choice = old.get("precision_choice")
                    return hit
                entry, choice = measured_openvino_artefact(stage, ONNX_NAME, profile, precision, desc["c_in"],
                                                           desc["c_out"], gate, stages.note)
                if verify and entry["precision"] != "int8":  # int8's check is the gate: per call it is ~1e-2 off
                    entry["verification"] = _verify_ir(stage, entry, model, profile, entry["precision"], tolerance)
                return entry

            what = "calibrate + quantise (NNCF), quality gate" + (", timing" if precision == "auto" else "")
            artefacts["openvino"] = stages.run(f"OpenVINO IR ({precision}: {what})", measured_stage)
            precision = artefacts["openvino"]["precision"]
        elif backend == "openvino":
            artefacts["openvino"] = stages.run(
                f"OpenVINO IR ({precision}) + verify" if verify else f"OpenVINO IR ({precision})",
                lambda: _reuse(old_dir, old, "openvino", keys["openvino"], stage)
                or _openvino_stage(stage, model, profile, precision, verify, tolerance))
        elif backend == "tensorrt":
            artefacts["tensorrt"] = stages.run(
                "TensorRT plan", lambda: _reuse(old_dir, old, "tensorrt", keys["tensorrt"], stage)
                or _tensorrt_stage(stage, out_dir if out_dir.is_dir() else None, model, graph, profile,
                                   desc["c_in"], trt_settings, verify, tolerance, precision, stages))

        # Artefacts an earlier build left for other backends stay when they match this build exactly (same
        # weights, profile, precision and libraries: their stage key), so building openvino after tensorrt
        # into one directory keeps both.
        for name in (old or {}).get("artefacts", {}):
            if name not in artefacts and keys.get(name):
                hit = _reuse(old_dir, old, name, keys[name], stage)
                if hit:
                    artefacts[name] = hit
        for name, entry in list(artefacts.items()):
            entry = artefact_entry(stage, name, entry)
            entry.setdefault("key", keys.get(name))
            artefacts[name] = entry
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "backend": backend,
            "precision": precision,
            "model": desc,
            "io": _io_section(desc, precision, io_precision, profile.dynamic_hw),
            "profile": profile.as_dict(),
            "artefacts": artefacts,
            "libraries": libs,
            "gpu": gpu,
            "build": {"backend_requested": backend, "opset": opset, "dynamic_hw_requested": dynamic_hw,
                      "verify": verify, "tolerance": tolerance if tolerance is not None else (
                          plan_tolerance(precision, tf32) if backend == "tensorrt" else TOLERANCES.get(precision)),
                      "io_precision": io_precision, "tensorrt": trt_settings.as_dict(), "simplify": simplify,
                      "external_data_threshold": external_data_threshold, "builder_version": BUILDER_VERSION,
                      "machine": platform.machine(), "stages": stages.done},
            "cache_key": keys["cache_key"],
        }
        if choice:
            manifest["precision_choice"] = choice
        if desc["arch"] == DIFFUSERS_ARCH:  # the sampling settings of its scheduler (engine.diffusers_schedule)
            manifest["schedule"] = desc["config"]["schedule"]
        # engine.json is the last file written: a staging dir without it never becomes an engine.
        write_manifest(stage, manifest)
    return BuildResult(out_dir, manifest, False, stages.done)


def _openvino_stage(stage: Path, model, profile: Profile, precision: str, verify: bool, tolerance) -> dict:
    from .openvino_build import build_openvino_ir

    entry = build_openvino_ir(stage / ONNX_NAME, stage, precision)
    if verify:
        entry["verification"] = _verify_ir(stage, entry, model, profile, precision, tolerance)
    return entry


def _verify_ir(stage: Path, entry: dict, model, profile: Profile, precision: str, tolerance) -> dict:
    cases = default_cases(profile.batch, profile.sizes, profile.dynamic_hw, profile.multiple)
    return verify_onnx(stage / entry["path"], model, cases, precision=precision, runtime="openvino",
                       openvino_hint=entry["inference_precision_hint"], tolerance=tolerance).as_dict()


def _tensorrt_stage(stage: Path, old_dir: Path | None, model, graph: str, profile: Profile, c_in: int,
                    settings: TensorRTSettings, verify: bool, tolerance, precision: str, stages: _Stages) -> dict:
    from .tensorrt_build import TIMING_CACHE, TRT_DIR, build_tensorrt_plan, verify_plan

    # The timing cache outlives rebuilds (forced ones too: it holds only kernel timings, and TensorRT refuses one
    # from another device): copy the previous one in so unchanged layers are not re-timed.
    if old_dir is not None and (old_dir / TRT_DIR / TIMING_CACHE).is_file():
        (stage / TRT_DIR).mkdir(parents=True, exist_ok=True)
        shutil.copy2(old_dir / TRT_DIR / TIMING_CACHE, stage / TRT_DIR / TIMING_CACHE)
    entry = build_tensorrt_plan(stage / graph, stage, profile, c_in, settings,
                                report=lambda msg: stages.note(f"  TensorRT: {msg}"))
    entry["precision"] = precision
    if verify:
        cases = default_cases(profile.batch, profile.sizes, profile.dynamic_hw, profile.multiple)
        entry["verification"] = verify_plan(stage / entry["path"], model, cases, precision=precision,
                                            tf32=settings.tf32, tolerance=tolerance)
    return entry
