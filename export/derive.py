"""Artefacts derived on first use: a backend's artefact made inside an existing engine directory from what it holds."""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from ddpm_engine.engine.errors import BackendUnavailableError, EngineFileError

from .build import artefact_entry
from .engine_dir import rebuild_hint, artefact_path, verify_files
from .manifest import BACKENDS, read_manifest, write_manifest
from .onnx_export import default_cases, verify_onnx
from .profile import Profile
from .tensorrt_build import TensorRTSettings


def _verify_derived(directory: Path, tmp: Path, entry: dict, profile: Profile, precision: str, backend: str) -> dict:
    """One quick check of a first-use artefact against the kept PyTorch model: min batch, an odd size."""
    from .model_source import load_torch_model

    model = load_torch_model(directory)
    case = default_cases(profile.batch, profile.sizes, profile.dynamic_hw, profile.multiple)[-1:]
    if backend == "tensorrt":
        from .tensorrt_build import verify_plan

        return verify_plan(tmp / entry["path"], model, case, precision=precision, tf32=entry["settings"]["tf32"])
    return verify_onnx(tmp / entry["path"], model, case, precision=precision, runtime="openvino",
                       openvino_hint=entry["inference_precision_hint"]).as_dict()


def make_backend_artefact(directory: Path, manifest: dict, backend: str) -> dict:
    """Derive one backend's artefact inside an existing engine directory (first-use path of ensure_artefact).

    Written into a temporary sub-directory, then renamed into place, so an interrupted derivation leaves the
    engine as it was. Returns the artefact entry with relative file paths (not yet hashed).
    """
    precision = manifest["precision"]
    profile = Profile.from_dict(manifest["profile"])
    tmp = directory / f".derive-{backend}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        if backend == "openvino":
            from .openvino_build import build_openvino_ir

            if precision == "fp16":
                raise BackendUnavailableError(f"{directory} is an fp16 engine and OpenVINO builds fp32 or bf16 on "
                                              f"CPU; build a bf16 or fp32 engine with `ddpm-engine build {directory} "
                                              f"-o DIR --backend openvino --precision bf16`")
            if precision == "int8":  # quantised and gated at build time only: never derived on load
                raise EngineFileError(f"{directory} is an int8 engine whose OpenVINO IR is missing; rebuild it with "
                                      f"`ddpm-engine build {directory} -o {directory} --backend openvino "
                                      "--precision int8`")
            entry = build_openvino_ir(directory / manifest["artefacts"]["onnx"]["path"], tmp, precision)
        elif backend == "onnxruntime":
            src = manifest["artefacts"].get(f"onnx_{precision}") or manifest["artefacts"]["onnx"]
            if src.get("precision", "fp32") != precision:
                raise EngineFileError(f"{directory} has no {precision} ONNX graph; rebuild it with `ddpm-engine build "
                                      f"{directory} -o {directory} --backend onnxruntime --precision {precision}`")
            shutil.rmtree(tmp)
            return {"path": src["path"], "files": list(src["files"]), "precision": precision,
                    "cpu_runnable": precision != "bf16", "derived": True}
        elif backend == "tensorrt":
            from .tensorrt_build import build_tensorrt_plan

            src = manifest["artefacts"].get(f"onnx_{precision}") or manifest["artefacts"]["onnx"]
            if src.get("precision", "fp32") != precision:
                raise EngineFileError(f"{directory} has no {precision} ONNX graph for TensorRT; rebuild with "
                                      f"`ddpm-engine build {directory} -o {directory} --backend tensorrt "
                                      f"--precision {precision}`")
            entry = build_tensorrt_plan(directory / src["path"], tmp, profile, manifest["model"]["c_in"],
                                        TensorRTSettings(**manifest["build"]["tensorrt"]))
            entry["precision"] = precision
        else:
            raise EngineFileError(f"cannot derive a {backend} artefact")
        if manifest["build"].get("verify", True):
            entry["verification"] = _verify_derived(directory, tmp, entry, profile, precision, backend)
        # Move the new files into place (no file of the engine is overwritten: these paths were absent).
        for rel in sorted({Path(f).parts[0] for f in entry["files"]} | {Path(entry.get("timing_cache", entry["path"])).parts[0]}):
            src_p, dst_p = tmp / rel, directory / rel
            if src_p.exists():
                if dst_p.exists():
                    shutil.rmtree(dst_p) if dst_p.is_dir() else dst_p.unlink()
                os.replace(src_p, dst_p)
        entry["derived"] = True
        return entry
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _derive(directory: Path, manifest: dict, backend: str) -> dict:
    """Make a missing artefact from what the directory holds; returns its manifest entry (with hashes)."""
    source = manifest["artefacts"].get("onnx")
    if source is None:
        raise EngineFileError(f"{directory} has neither a {backend} artefact nor an ONNX file to derive it from; "
                              f"build it with {rebuild_hint(directory, backend)}")
    verify_files(directory, source, "onnx")
    entry = make_backend_artefact(directory, manifest, backend)
    return artefact_entry(directory, backend, entry)


def ensure_artefact(directory: str | os.PathLike, backend: str) -> Path:
    """Path of the backend's artefact, deriving it first if the engine lacks it (OpenVINO IR from the ONNX file,
    ONNX Runtime graph in the engine's precision, TensorRT plan where TensorRT and a GPU exist).

    The new artefact is written to a temporary name, renamed into place, and recorded by an atomic rewrite of
    engine.json; concurrent first loads at worst derive it twice. Raises EngineFileError / BackendUnavailableError
    with the command to build it when it cannot be derived here.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; must be one of {list(BACKENDS)}")
    if backend not in manifest["artefacts"]:
        if backend == "torch":
            raise EngineFileError(f"{directory} keeps no PyTorch weights; rebuild it from the original model")
        entry = _derive(directory, manifest, backend)
        manifest = read_manifest(directory)  # another process may have added artefacts meanwhile
        manifest["artefacts"][backend] = entry
        write_manifest(directory, manifest)
    return artefact_path(directory, backend)
