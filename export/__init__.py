"""ddpm_engine.export: torch -> ONNX (+ verification) -> TensorRT plan / OpenVINO IR, precision, engine directory."""
from .build import BuildResult, build, resolve_backend
from .derive import ensure_artefact
from .engine_dir import artefact_path, check_engine_dir
from .manifest import FORMAT_VERSION, read_manifest
from .onnx_export import TOLERANCES, VerificationError, export_onnx, verify_onnx
from .precision import convert_precision
from .profile import Profile, parse_batch, parse_size

__all__ = ["BuildResult", "FORMAT_VERSION", "Profile", "TOLERANCES", "VerificationError", "artefact_path", "build",
           "check_engine_dir", "convert_precision", "ensure_artefact", "export_onnx", "parse_batch", "parse_size",
           "read_manifest", "resolve_backend", "verify_onnx"]
