"""engine.json: the manifest of an engine directory, library/GPU fingerprints and the build cache key."""
from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path

from ddpm_engine.engine.errors import EngineFileError

from .staging import MANIFEST, restore_set_aside

FORMAT = "ddpm-engine"
FORMAT_VERSION = 1
BACKENDS = ("tensorrt", "onnxruntime", "openvino", "torch")
# Top-level keys every manifest of this format version has (a file missing one is truncated or foreign).
REQUIRED_KEYS = ("format", "format_version", "model", "io", "profile", "precision", "artefacts", "libraries",
                 "gpu", "build", "cache_key")
_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj) -> str:
    """Hex sha256 of a canonical JSON rendering (sorted keys, no whitespace)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover
        return None
    names = {"tensorrt": ("tensorrt", "tensorrt-cu13", "tensorrt-cu12"),
             "onnxruntime": ("onnxruntime", "onnxruntime-gpu")}.get(module, (module,))
    for name in names:
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return None


def library_versions() -> dict[str, str | None]:
    """Versions of everything that shapes an artefact (None: not installed). Read from package metadata, so
    nothing heavy (TensorRT, CUDA) is imported just to build a manifest."""
    import torch

    out = {name: _version(name) for name in ("onnx", "onnxruntime", "openvino", "tensorrt")}
    out["torch"] = torch.__version__
    out["ddpm-engine"] = _version("ddpm-engine")
    out["python"] = platform.python_version()
    return out


def gpu_info() -> dict[str, object]:
    """Name and compute capability of CUDA device 0, or Nones on a machine without one."""
    import torch

    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        return {"name": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}",
                "cuda": torch.version.cuda}
    return {"name": None, "compute_capability": None, "cuda": None}


def major_minor(version: str | None) -> str | None:
    """'2026.4.1-22982-...' -> '2026.4'; '1.32.0' -> '1.32'."""
    if not version:
        return None
    parts = version.split("+")[0].split("-")[0].split(".")
    return ".".join(parts[:2])


def write_manifest(directory: str | os.PathLike, manifest: dict) -> Path:
    """Write engine.json atomically (temp file + fsync + rename): readers see the old or the new file, never half."""
    directory = Path(directory)
    path = directory / MANIFEST
    tmp = directory / f".{MANIFEST}.tmp-{os.getpid()}"
    data = json.dumps(manifest, indent=2, sort_keys=False, default=str) + "\n"
    with open(tmp, "w") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_manifest(directory: str | os.PathLike) -> dict:
    """Parse and structurally check engine.json; EngineFileError for a missing, corrupt, truncated or foreign
    manifest or another format version, saying what to rebuild."""
    directory = Path(directory)
    path = directory / MANIFEST
    rebuild = f"rebuild it with `ddpm-engine build MODEL -o {directory}`"
    if not directory.exists():
        restore_set_aside(directory)  # a build killed mid-swap (no atomic exchange here) set the engine aside
    if not directory.exists():
        raise EngineFileError(f"engine directory {directory} does not exist; build it with "
                              f"`ddpm-engine build MODEL -o {directory}`")
    if not directory.is_dir():
        raise EngineFileError(f"{directory} is not an engine directory (it is a file)")
    if not path.is_file():
        raise EngineFileError(f"{directory} has no {MANIFEST}: not an engine directory, or a build that did not "
                              f"finish; {rebuild}")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EngineFileError(f"{path} is corrupt or truncated ({exc.__class__.__name__}: {exc}); {rebuild}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise EngineFileError(f"{path} is not a ddpm-engine manifest; {rebuild}")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise EngineFileError(f"{path} has engine format version {version!r}, this ddpm-engine reads version "
                              f"{FORMAT_VERSION}; {rebuild} (an engine directory can be its own MODEL)")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise EngineFileError(f"{path} is truncated or damaged: missing {', '.join(missing)}; {rebuild}")
    if not isinstance(manifest["artefacts"], dict):
        raise EngineFileError(f"{path} is damaged: 'artefacts' is not a mapping; {rebuild}")
    return manifest
