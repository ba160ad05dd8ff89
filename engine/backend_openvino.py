"""OpenVINO backend for x86 CPUs: per buffer set, a model compiled for its exact shapes, reading and writing in place."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .backends import check_bound, require
from .errors import EngineFileError

CACHE_ENV = "DDPM_ENGINE_CACHE_DIR"  # where compiled models are cached; set it empty to compile afresh every run


def compiled_model_cache(cache_key: str) -> Path | None:
    """The folder OpenVINO caches this engine's compiled models in (CACHE_DIR), or None where caching is off.

    Outside the engine directory: that one is checked file by file against its manifest, may be read-only, and may
    be copied to another CPU, for which a compiled blob is wrong (OpenVINO keys its blobs by model, settings and
    device, so one folder could hold every engine; the engine's cache key only makes one engine's easy to delete).
    """
    root = os.environ.get(CACHE_ENV)
    if root is None:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ddpm-engine"
    return Path(root) / "openvino" / cache_key[:16] if root else None


class OpenVinoBackend:
    """fp32, or bf16 through OpenVINO's inference-precision hint (I/O stays fp32), as the manifest records it."""

    name = "openvino"
    capturable = False
    io_dtypes = {"sample": torch.float32, "timestep": torch.float32, "eps": torch.float32}

    def __init__(self, model_path, compile_config: dict, threads: int | None = None, cache_dir: Path | None = None):
        ov = require("openvino")
        self._ov, self._core = ov, ov.Core()
        self.device = torch.device("cpu")
        self.config = {"PERFORMANCE_HINT": "LATENCY", **compile_config}
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = threads
        self.cache_dir = cache_dir
        if cache_dir is not None:
            self.config["CACHE_DIR"] = str(cache_dir)
        self.cache_hits = 0  # binds whose compiled model OpenVINO loaded from CACHE_DIR instead of compiling
        try:
            self.model = self._core.read_model(str(model_path))
        except Exception as exc:  # OpenVINO raises RuntimeError with its own message for bad files
            raise EngineFileError(f"{model_path}: OpenVINO cannot load it ({str(exc).splitlines()[0]}); "
                                  "rebuild the engine") from None

    def bind(self, sample, timestep, eps):
        check_bound(self, sample, timestep, eps)
        ov = self._ov
        # Compiled for this buffer set's exact shapes: a dynamic [?, C, ?, ?] model runs ~1.3x slower on CPU
        # (measured with sst-small, 1 thread). The Runner binds each (batch, H, W) once, so this is paid once.
        model = self.model.clone()
        model.reshape({"sample": ov.PartialShape(list(sample.shape)), "timestep": ov.PartialShape(list(timestep.shape))})
        compiled = self._core.compile_model(model, "CPU", self.config)
        self.cache_hits += bool(compiled.get_property("LOADED_FROM_CACHE"))
        request = compiled.create_infer_request()
        # shared_memory=True wraps the torch storage: OpenVINO reads the inputs and writes eps in place.
        request.set_tensor("sample", ov.Tensor(sample.numpy(), shared_memory=True))
        request.set_tensor("timestep", ov.Tensor(timestep.numpy(), shared_memory=True))
        request.set_tensor("eps", ov.Tensor(eps.numpy(), shared_memory=True))
        return request.infer
