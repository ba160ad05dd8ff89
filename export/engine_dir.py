"""The engine directory: artefact hashes and load-time checks (atomic staging: staging.py; first-use derivation: derive.py)."""
from __future__ import annotations

import os
from pathlib import Path

from ddpm_engine.engine.errors import BackendUnavailableError, EngineFileError

from .manifest import (BACKENDS, FORMAT_VERSION, MANIFEST, gpu_info, library_versions, major_minor, read_manifest,
                       sha256_file)


def hash_files(root: Path, relpaths) -> dict[str, str]:
    """{relative path: sha256} for files under root."""
    return {rel: sha256_file(Path(root) / rel) for rel in relpaths}


def rebuild_hint(directory: Path, backend: str | None = None) -> str:
    flag = f" --backend {backend}" if backend else ""
    return f"`ddpm-engine build {directory} -o {directory}{flag}`"


def verify_files(directory: Path, entry: dict, what: str) -> None:
    """Every file of an artefact exists with the recorded sha256 (catches truncation, corruption, swaps)."""
    directory = Path(directory)
    files = entry.get("files")
    if not isinstance(files, dict) or not files:
        raise EngineFileError(f"{directory / MANIFEST}: the {what} entry lists no files; rebuild the engine")
    for rel, digest in files.items():
        path = directory / rel
        if not path.is_file():
            raise EngineFileError(f"{directory}: {what} file {rel} is missing; rebuild it with "
                                  f"{rebuild_hint(directory, entry.get('backend'))}")
        if sha256_file(path) != digest:
            raise EngineFileError(f"{directory}: {what} file {rel} is corrupt, truncated or not the one this manifest "
                                  f"was written for (sha256 mismatch); rebuild it with "
                                  f"{rebuild_hint(directory, entry.get('backend'))}")


def _check_library(directory: Path, backend: str, entry: dict) -> None:
    built = (entry.get("library") or {}).get("version")
    have = library_versions()
    if backend == "tensorrt":
        from .tensorrt_build import require_tensorrt

        trt = require_tensorrt()
        if built != trt.__version__:
            raise EngineFileError(f"{directory}: the TensorRT plan was built with TensorRT {built}, this machine has "
                                  f"{trt.__version__} (plans are tied to one version); rebuild it with "
                                  f"{rebuild_hint(directory, 'tensorrt')}")
        gpu, want = gpu_info(), entry.get("gpu") or {}
        compat = (entry.get("settings") or {}).get("hardware_compatibility")
        if compat == "AMPERE_PLUS":  # built to run on any Ampere or newer GPU
            ok = _cc(gpu["compute_capability"]) >= (8, 0)
        elif compat == "SAME_COMPUTE_CAPABILITY":  # any GPU of the same compute capability
            ok = gpu["compute_capability"] == want.get("compute_capability")
        else:
            ok = (gpu["name"], gpu["compute_capability"]) == (want.get("name"), want.get("compute_capability"))
        if not ok:
            raise EngineFileError(f"{directory}: the TensorRT plan was built for {want.get('name')} (compute "
                                  f"capability {want.get('compute_capability')}), this machine has {gpu['name']} "
                                  f"({gpu['compute_capability']}); rebuild it on this GPU with "
                                  f"{rebuild_hint(directory, 'tensorrt')}")
    elif backend == "openvino":
        if have["openvino"] is None:
            raise BackendUnavailableError("OpenVINO is not installed; pip install 'ddpm-engine[openvino]'")
        if major_minor(built) != major_minor(have["openvino"]):
            raise EngineFileError(f"{directory}: the OpenVINO IR was written by OpenVINO {built}, this machine has "
                                  f"{have['openvino']}; rebuild it with {rebuild_hint(directory, 'openvino')} "
                                  f"(or delete {directory / 'openvino'} and it is re-derived from the ONNX file on load)")
    elif backend == "onnxruntime":
        if have["onnxruntime"] is None:
            raise BackendUnavailableError("ONNX Runtime is not installed; pip install 'ddpm-engine[onnx]'")
        if entry.get("precision") == "bf16":
            import onnxruntime as ort

            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise BackendUnavailableError(
                    f"{directory} is a bf16 engine and ONNX Runtime's CPU provider has no bf16 kernels; load it with "
                    "backend='openvino' (bf16 on x86 CPUs) or 'tensorrt', or rebuild with --precision fp32")
        # ONNX files are forward compatible: only an older runtime than the one that verified the graph may lack
        # an opset or kernel, so refuse that direction only.
        if _vtuple(have["onnxruntime"]) < _vtuple(built):
            raise EngineFileError(f"{directory}: the ONNX graph was verified with ONNX Runtime {built}, this machine "
                                  f"has the older {have['onnxruntime']}; upgrade onnxruntime or rebuild with "
                                  f"{rebuild_hint(directory, 'onnxruntime')}")


def _cc(capability: str | None) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in str(capability).split("."))
    except ValueError:
        return ()


def _vtuple(v: str | None) -> tuple[int, ...]:
    mm = major_minor(v)
    if not mm:
        return ()
    try:
        return tuple(int(x) for x in mm.split("."))
    except ValueError:
        return ()


def check_engine_dir(directory: str | os.PathLike, backend: str | None = None) -> dict:
    """Validate an engine directory for `backend` (default: the one it was built for) and return its manifest.

    Refuses, each with one EngineFileError naming what to rebuild: a missing, corrupt or truncated manifest,
    another format version, an artefact that is not recorded, missing or whose sha256 differs, an artefact from
    another library version (TensorRT: exact; OpenVINO: major.minor; ONNX Runtime: older than the builder), and a
    TensorRT plan for another GPU. BackendUnavailableError when the backend's library or GPU is absent.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    backend = backend or manifest.get("backend")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; must be one of {list(BACKENDS)}")
    entry = manifest["artefacts"].get(backend)
    if entry is None:
        raise EngineFileError(f"{directory} has no {backend} artefact; build it with "
                              f"{rebuild_hint(directory, backend)} (or load with ensure_artefact, which derives it "
                              "from the ONNX file where possible)")
    verify_files(directory, entry, backend)
    _check_library(directory, backend, entry)
    return manifest


def artefact_path(directory: str | os.PathLike, backend: str | None = None) -> Path:
    """Checked path of what a backend loads: the ONNX file (onnxruntime), model.xml (openvino), model.plan
    (tensorrt), or the checkpoint directory (torch)."""
    directory = Path(directory)
    manifest = check_engine_dir(directory, backend)
    return directory / manifest["artefacts"][backend or manifest["backend"]]["path"]


__all__ = ["FORMAT_VERSION", "artefact_path", "check_engine_dir", "hash_files", "verify_files"]
